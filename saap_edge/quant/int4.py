"""Group-wise asymmetric int4: each row of a Linear weight (out x in) is cut into groups of G
consecutive inputs; per group a = (max - min) / 15 and b = min are stored as fp16, and the
codes q = clamp(round((w - b) / a), 0, 15) are computed from those fp16 values, so the
weight the device computes with, a * q + b, is exactly what is stored (DESIGN.md section 3).
GGUF Q4_1 (d = a, m = b per 32-block) and MatMulNBits (zero point -b / a) map onto it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from saap_edge.errors import UserError
from saap_edge.models.int4_linear import QUANT_MODULES, QUANT_SCHEME, Int4Linear, dequantize, pack_nibbles, unpack_nibbles

__all__ = [
    "GROUP_SIZES", "Int4Groups", "Int4Linear", "choose_group_size", "check_group_size", "quantize_groups",
    "group_params", "group_codes", "prepare_quantization", "replace_projection",
    "pack_nibbles", "unpack_nibbles", "dequantize", "quantized_in_features", "quantize_model", "quantization_section",
]

GROUP_SIZES = (128, 64, 32)
LEVELS = 15  # 4 bits: codes 0..15


@dataclass
class Int4Groups:
    """One quantized weight. codes: uint8 [out, in] in 0..15; scales, offsets: fp16 [out, in / G]."""

    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """a * q + b per weight, computed in float32 from the stored fp16 a and b."""
        return dequantize(self.codes, self.scales, self.offsets, dtype)


def choose_group_size(in_features: dict[str, int], preferred: tuple[int, ...] = GROUP_SIZES) -> int:
    """The largest preferred G that divides every input dimension; UserError naming the
    first module whose input dimension none divides."""
    for g in preferred:
        if all(n % g == 0 for n in in_features.values()):
            return g
    smallest = min(preferred)
    name, n = next(((k, v) for k, v in in_features.items() if v % smallest), next(iter(in_features.items())))
    raise UserError(
        f"no int4 group size in {preferred} divides the input dimension {n} of {name}; "
        f"prune with --align {smallest} so every width is a multiple of {smallest}"
    )


def check_group_size(group_size: int, in_features: dict[str, int]) -> None:
    if group_size % 32 or group_size <= 0:
        raise UserError(f"int4 group size {group_size} must be a positive multiple of 32 (32, 64 or 128)")
    for name, n in in_features.items():
        if n % group_size:
            raise UserError(f"int4 group size {group_size} does not divide the input dimension {n} of {name}")


def group_params(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (a, b) of groups laid out along the last dimension of `w` [..., G]:
    a = (max - min) / 15, b = min."""
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    return ((high - low) / LEVELS).half(), low.half()


def group_codes(w: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Codes q = clamp(round((w - b) / a), 0, 15) of `w` [..., G] from the stored fp16 a, b [...]
    (0 where a = 0: the group is constant and b alone reproduces it). float tensor."""
    a, b = scales.float()[..., None], offsets.float()[..., None]
    q = torch.round((w - b) / torch.where(a > 0, a, torch.ones_like(a))).clamp(0, LEVELS)
    return torch.where(a > 0, q, torch.zeros_like(q))


def quantize_groups(weight: torch.Tensor, group_size: int) -> Int4Groups:
    """Quantize a [out, in] weight in groups of `group_size` inputs (in % group_size == 0),
    each group by round-to-nearest."""
    out, n_in = weight.shape
    if n_in % group_size:
        raise ValueError(f"group size {group_size} does not divide the input dimension {n_in}")
    w = weight.detach().float().reshape(out, n_in // group_size, group_size)
    scales, offsets = group_params(w)
    q = group_codes(w, scales, offsets)
    return Int4Groups(q.to(torch.uint8).reshape(out, n_in), scales, offsets, group_size)


def quantized_in_features(model: nn.Module, modules=QUANT_MODULES) -> dict[str, int]:
    """Input dimension of every projection that int4 quantization covers, by module name."""
    return {name: m.in_features for name, m in model.named_modules()
            if name.rsplit(".", 1)[-1] in modules and isinstance(m, (nn.Linear, Int4Linear))}


def quantization_section(group_size: int, modules=QUANT_MODULES) -> dict:
    """The `quantization` entry of config.json for an int4 checkpoint."""
    return {"scheme": QUANT_SCHEME, "bits": 4, "group_size": group_size, "modules": list(modules),
            "symmetric": False, "storage": {"qweight": "uint8 [out, in/2], code 2j low nibble, 2j+1 high",
                                            "scales": "float16 [out, in/G]", "offsets": "float16 [out, in/G]"},
            "dequantize": "w = scales * code + offsets"}


def prepare_quantization(model: nn.Module, group_size: int | None = None, modules=QUANT_MODULES) -> int:
    """Check that int4 groups can cover the model's projections, record the `quantization`
    section in its config and return the group size (None: the largest of 128/64/32 dividing
    every input dimension). Every quantizer calls this before it replaces a projection."""
    in_features = quantized_in_features(model, modules)
    if not in_features:
        raise UserError("the model has no q/k/v/o/gate/up/down projections to quantize")
    group_size = choose_group_size(in_features) if group_size is None else group_size
    check_group_size(group_size, in_features)
    for name, parent in model.named_modules():
        for attr, child in parent.named_children():
            if attr in modules and isinstance(child, nn.Linear) and child.bias is not None:
                raise UserError(f"{name}.{attr} has a bias; int4 groups here cover bias-free LLaMA projections only")
    model.config.quantization = quantization_section(group_size, modules)
    return group_size


def replace_projection(parent: nn.Module, attr: str, groups: Int4Groups) -> None:
    """parent.attr (an nn.Linear) becomes the Int4Linear of `groups`; its float weight goes now,
    not when a caller's list of modules does."""
    child = getattr(parent, attr)
    setattr(parent, attr, Int4Linear.from_parts(groups.codes, groups.scales, groups.offsets))
    child.to("meta")


def quantize_model(model: nn.Module, group_size: int | None = None, modules=QUANT_MODULES) -> int:
    """Replace the model's projections by round-to-nearest Int4Linear layers, in place.

    `group_size` None picks the largest of 128/64/32 that divides every input dimension.
    Records the `quantization` section in the model's config and returns the group size.
    """
    group_size = prepare_quantization(model, group_size, modules)
    for _name, parent in list(model.named_modules()):
        for attr, child in list(parent.named_children()):
            if attr in modules and isinstance(child, nn.Linear):
                replace_projection(parent, attr, quantize_groups(child.weight, group_size))
    return group_size


def check_prunable_to_int4(config, align: int, group_size: int | None) -> None:
    """Before pruning: fail fast when no pruned width could hold whole int4 groups.

    A pruned layer keeps whole KV groups (head_dim x query heads per KV head inputs of
    o_proj) and MLP widths in multiples of `align`; G must divide those and the hidden size.
    """
    g = group_size or min(GROUP_SIZES)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_group = head_dim * (config.num_attention_heads // config.num_key_value_heads)
    for what, n in (("the hidden size", config.hidden_size), ("a KV group's width (head_dim x heads per KV head)", kv_group),
                    ("--align", align)):
        if n % g:
            raise UserError(
                f"int4 groups of {g} cannot tile {what} = {n}; use --recovery lora or --no-recover"
                + (", or a --group-size dividing it" if group_size else "")
                + (f", or --align {g}" if what == "--align" else "")
            )
