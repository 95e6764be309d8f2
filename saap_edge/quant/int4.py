"""Group-wise asymmetric int4: each row of a Linear weight (out x in) is cut into groups of G
consecutive inputs; per group a = (max - min) / 15 and b = min are stored as fp16, and the
codes q = clamp(round((w - b) / a), 0, 15) are computed from those fp16 values, so the
weight the device computes with, a * q + b, is exactly what is stored (DESIGN.md section 3).
GGUF Q4_1 (d = a, m = b per 32-block) and MatMulNBits (zero point -b / a) map onto it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saap_edge.errors import UserError

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
        out, n_in = self.codes.shape
        q = self.codes.reshape(out, n_in // self.group_size, self.group_size).float()
        w = q * self.scales.float()[..., None] + self.offsets.float()[..., None]
        return w.reshape(out, n_in).to(dtype)


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


def quantize_groups(weight: torch.Tensor, group_size: int) -> Int4Groups:
    """Quantize a [out, in] weight in groups of `group_size` inputs (in % group_size == 0)."""
    out, n_in = weight.shape
    if n_in % group_size:
        raise ValueError(f"group size {group_size} does not divide the input dimension {n_in}")
    w = weight.detach().float().reshape(out, n_in // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((high - low) / LEVELS).half()
    offsets = low.half()
    a, b = scales.float()[..., None], offsets.float()[..., None]
    q = torch.round((w - b) / torch.where(a > 0, a, torch.ones_like(a))).clamp(0, LEVELS)
    q = torch.where(a > 0, q, torch.zeros_like(q))
    return Int4Groups(q.to(torch.uint8).reshape(out, n_in), scales, offsets, group_size)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two codes a byte along each row: element 2j in the low nibble, 2j + 1 in the high one."""
    if codes.shape[-1] % 2:
        raise ValueError("an even number of codes per row is needed to pack nibbles")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_nibbles."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
