"""What recovery trains, besides (or instead of) LoRA adapters, while the result stays int4.

- ``offsets``: the group offsets b of every Int4Linear ([out, in / G]); the full-rank form of
  what a group-pooled QA-LoRA update can express (QA-LoRA's merge adds B A to b).
- ``scales``: the group scales a; the codes q never change, so w = a q + b stays exact int4.
- ``norms``: the RMSNorm weights (kept in float, a few thousand numbers per layer).
- ``lora``: peft adapters (recover/adapters.py), merged at the end.
- ``full``: every weight of a float model (distil-quantize, before int4 groups exist): the
  embedding, projections, norms and output matrix; the model trains in float32 (its weights
  are the masters) and returns to its dtype before it is quantized.

The direct parts are trained as float32 masters whose forward value is already the fp16
the device stores (Int4Linear.train_groups); `freeze` rounds them to those buffers, so the
model after training computes exactly what it computed in its last training step. Norms of
a bfloat16 / float16 model train the same way: a float32 master (`parametrizations.weight.
original`) whose forward value is the model's dtype (AdamW's steps of ~1e-3 are below
bfloat16's resolution near 1.0 and would be lost in place); `freeze` leaves that value.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from saap_edge.models.int4_linear import Int4Linear

NORM_SUFFIXES = ("input_layernorm", "post_attention_layernorm", "norm")


def _is_norm(name: str, module: nn.Module) -> bool:
    return name.rsplit(".", 1)[-1] in NORM_SUFFIXES and hasattr(module, "weight") and not isinstance(module, (nn.Linear, Int4Linear))


def enable_direct(model: nn.Module, parts: tuple[str, ...]) -> int:
    """Make the direct parts of `parts` trainable in `model` (a plain or peft-wrapped model);
    returns how many numbers that adds."""
    n = 0
    if "full" in parts:
        for name, p in model.named_parameters():
            if "lora_" not in name:
                if p.dtype != torch.float32:
                    raise ValueError(f"--train full trains float32 weights; {name} is {p.dtype} (cast the model first)")
                p.requires_grad_(True)
                n += p.numel()
        return n
    for name, module in model.named_modules():
        if isinstance(module, Int4Linear) and ("offsets" in parts or "scales" in parts):
            for p in module.train_groups(scales="scales" in parts, offsets="offsets" in parts):
                p.requires_grad_(True)
                n += p.numel()
        elif "norms" in parts and _is_norm(name, module):
            n += _train_norm(module).numel()
    return n


class _InDtype(nn.Module):
    """Parametrization: a float32 master seen by the forward in the model's dtype."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, master: torch.Tensor) -> torch.Tensor:
        return master.to(self.dtype)


def _train_norm(module: nn.Module) -> nn.Parameter:
    """Make a norm's weight trainable with a float32 master; returns the parameter trained."""
    if parametrize.is_parametrized(module, "weight"):
        master = module.parametrizations.weight.original
    elif module.weight.dtype == torch.float32:
        master = module.weight
    else:
        dtype = module.weight.dtype
        module.weight = nn.Parameter(module.weight.detach().float())
        parametrize.register_parametrization(module, "weight", _InDtype(dtype), unsafe=True)  # the dtype changes on purpose
        master = module.parametrizations.weight.original
    master.requires_grad_(True)
    return master


def direct_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters that are not LoRA adapters, by name (what checkpoints save)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name}


def freeze(model: nn.Module) -> None:
    """Round trained group parameters to their fp16 buffers and stop every gradient."""
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.freeze_groups()
        elif parametrize.is_parametrized(module, "weight"):
            value = module.weight.detach()  # the master in the model's dtype: what training computed with
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            module.weight = nn.Parameter(value, requires_grad=False)
    model.requires_grad_(False)
