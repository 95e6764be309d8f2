"""What recovery trains, besides (or instead of) LoRA adapters, while the result stays int4.

- ``offsets``: the group offsets b of every Int4Linear ([out, in / G]); the full-rank form of
  what a group-pooled QA-LoRA update can express (QA-LoRA's merge adds B A to b).
- ``scales``: the group scales a; the codes q never change, so w = a q + b stays exact int4.
- ``norms``: the RMSNorm weights (kept in float, a few thousand numbers per layer).
- ``lora``: peft adapters (recover/adapters.py), merged at the end.

The direct parts are trained as float32 masters whose forward value is already the fp16
the device stores (Int4Linear.train_groups); `freeze` rounds them to those buffers, so the
model after training computes exactly what it computed in its last training step.
"""

from __future__ import annotations

from torch import nn

from saap_edge.models.int4_linear import Int4Linear

NORM_SUFFIXES = ("input_layernorm", "post_attention_layernorm", "norm")


def _is_norm(name: str, module: nn.Module) -> bool:
    return name.rsplit(".", 1)[-1] in NORM_SUFFIXES and hasattr(module, "weight") and not isinstance(module, (nn.Linear, Int4Linear))


def enable_direct(model: nn.Module, parts: tuple[str, ...]) -> int:
    """Make the direct parts of `parts` trainable in `model` (a plain or peft-wrapped model);
    returns how many numbers that adds."""
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, Int4Linear) and ("offsets" in parts or "scales" in parts):
            for p in module.train_groups(scales="scales" in parts, offsets="offsets" in parts):
                p.requires_grad_(True)
                n += p.numel()
        elif "norms" in parts and _is_norm(name, module):
            module.weight.requires_grad_(True)
            n += module.weight.numel()
    return n


def direct_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters that are not LoRA adapters, by name (what checkpoints save)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name}


def freeze(model: nn.Module) -> None:
    """Round trained group parameters to their fp16 buffers and stop every gradient."""
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.freeze_groups()
    model.requires_grad_(False)
