"""Seeding: the same command with the same seed gives the same bytes.

torch seeds its default generator differently in every process, so any stage that draws from
it (LoRA's initial A matrices, dropout) seeds it first from its own setting. transformers'
`set_seed` seeds Python's `random`, numpy and torch (every CUDA device too); on CUDA the
deterministic kernels torch offers are switched on (`deterministic_cuda`).
"""

from __future__ import annotations

import os

import torch
from transformers import set_seed as _hf_set_seed


def set_seed(seed: int) -> None:
    """Seed random, numpy and torch (CPU and every CUDA device)."""
    _hf_set_seed(seed)


def deterministic_cuda() -> None:
    """Deterministic CUDA kernels where torch has them (cuBLAS needs its workspace setting
    before the first matmul); ops without one warn instead of failing."""
    if not torch.cuda.is_available():
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
