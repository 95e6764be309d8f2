"""Perplexity of a causal LM over non-overlapping windows of a text."""

from __future__ import annotations

import math
import os
import time
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saap_edge.data import load_text
from saap_edge.errors import UserError
from saap_edge.models.onednn import onednn_linears


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameter-free module)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def token_windows(tokenizer: Any, text: str, window: int, limit: int | None) -> torch.Tensor:
    """Tokenize ``text`` once and cut it into ``[N, window]`` full windows (tail dropped)."""
    if window < 2:
        raise UserError(f"perplexity window must be >= 2 tokens, got {window}")
    ids = torch.as_tensor(list(tokenizer(text)["input_ids"]), dtype=torch.long)
    n_windows = ids.numel() // window
    if limit is not None:
        n_windows = min(n_windows, max(limit, 0))
    if n_windows == 0:
        raise UserError(f"text has {ids.numel()} tokens: no full window of {window} tokens "
                        f"to score (limit={limit})")
    return ids[: n_windows * window].view(n_windows, window)


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    text: str,
    window: int = 128,
    limit: int | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, float | int]:
    """Perplexity of ``model`` on ``text`` over non-overlapping ``window``-token windows.

    Each window is scored on its own (no context carried over): its ``window - 1`` next
    token predictions are scored with log_softmax in float32 and the NLLs are summed in
    float64. ``limit`` keeps only the first ``limit`` windows. Returns
    ``{"ppl", "nll" (mean per token), "windows", "tokens_scored", "window", "seconds"}``
    (``seconds``: wall time of the scoring).
    """
    windows = token_windows(tokenizer, text, window, limit)
    return window_perplexity(model, windows, batch_size, device, progress)


@torch.inference_mode()
def window_perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
    fast: bool = True,
) -> dict[str, float | int]:
    """Perplexity over token windows [N, T], each scored on its own (see `perplexity`).
    `fast`: float32 CPU models compute their linears with oneDNN (saap_edge.models.onednn)."""
    device = torch.device(device) if device is not None else model_device(model)
    window = windows.shape[1]
    total_nll = torch.zeros((), dtype=torch.float64)
    t0 = time.perf_counter()
    with onednn_linears(model, enabled=fast):
        for start in tqdm(range(0, len(windows), batch_size), desc="ppl", disable=not progress, leave=False):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch).logits[:, :-1].float()
            logprobs = F.log_softmax(logits, dim=-1)
            nll = -logprobs.gather(-1, batch[:, 1:, None]).squeeze(-1)
            total_nll += nll.double().sum().cpu()
    scored = windows.shape[0] * (window - 1)
    mean_nll = total_nll.item() / scored
    return {"ppl": math.exp(mean_nll), "nll": mean_nll, "windows": windows.shape[0],
            "tokens_scored": scored, "window": window, "seconds": time.perf_counter() - t0}


def evaluate_ppl(
    model: torch.nn.Module,
    tokenizer: Any,
    sources: list[str],
    split: str = "test",
    window: int = 128,
    limit: int | None = None,
    data_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, dict[str, float | int]]:
    """Perplexity on each source (dataset name or .txt path), keyed by the source as given."""
    return {
        source: perplexity(model, tokenizer, load_text(source, split, data_dir), window=window,
                           limit=limit, batch_size=batch_size, device=device, progress=progress)
        for source in sources
    }
