"""oneDNN linears for float32 inference on the CPU.

torch sends a float32 `F.linear` on the CPU to MKL's sgemm, which on the AMD EPYC machines
here runs at ~195 GFLOPS on 2 cores; oneDNN's matmul on the same shapes, reached through
the `aten::mkldnn_linear` op with the weight in oneDNN's layout, runs at ~470 GFLOPS.
Both compute in float32 (oneDNN sums in another order: logits of SmolLM2 agree within 2e-4
at a logit scale of 40 and WikiText-2 perplexity to 7 digits; tests/test_ppl.py checks it).
Perplexity and the forward passes of reconstruction use it for the duration of a block.
"""

from __future__ import annotations

from contextlib import contextmanager

import psutil
import torch
from torch import nn


class OneDNNLinear(nn.Module):
    """y = x W^T + b through `aten::mkldnn_linear` (what torch.utils.mkldnn.MkldnnLinear does,
    without its deprecated TorchScript wrapper); W is held in oneDNN's layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = weight.detach().float().contiguous().to_mkldnn()
        self.bias = None if bias is None else bias.detach().float().contiguous().to_mkldnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float().contiguous().to_mkldnn()
        y = torch.ops.aten.mkldnn_linear(flat, self.weight, self.bias).to_dense()
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)


def _linears(model: nn.Module):
    """(parent, name, module) for every linear-like child: nn.Linear, or a module with a 2-D
    `weight` whose forward is x @ weight.T (+ bias), such as Int4Linear."""
    from saap_edge.models.int4_linear import Int4Linear

    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear or isinstance(child, Int4Linear):
                yield parent, name, child


def usable(model: nn.Module) -> bool:
    """oneDNN is built in, the model is float32 on the CPU, RAM holds a second copy of its weights,
    and no adapter wrapper (peft) reads its linears' weights directly."""
    params = list(model.parameters())
    if not torch.backends.mkldnn.is_available() or not params:
        return False
    if any(type(m).__module__.startswith("peft") for m in model.modules()):
        return False
    if params[0].device.type != "cpu" or params[0].dtype != torch.float32:
        return False
    # sizes, not weights: Int4Linear.weight dequantizes (it would dequantize every layer once more per call)
    weight_bytes = sum(m.in_features * m.out_features * 4 for _, _, m in _linears(model))
    return weight_bytes < 0.5 * psutil.virtual_memory().available


@contextmanager
def onednn_linears(model: nn.Module, enabled: bool = True):
    """Within the block, the model's linears compute with oneDNN (a copy of each weight in its
    layout); the original modules come back afterwards. A no-op where `usable` says no."""
    if not (enabled and usable(model)):
        yield model
        return
    swapped = []
    try:
        for parent, name, child in list(_linears(model)):
            setattr(parent, name, OneDNNLinear(child.weight, getattr(child, "bias", None)))
            swapped.append((parent, name, child))
        yield model
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
