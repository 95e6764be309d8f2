"""Int4Linear: a Linear layer stored as group-wise int4 (packed codes, fp16 scale and offset).

Like slim.py this file imports only torch, so `save_pretrained` copies it next to the
weights and an int4 checkpoint loads with `trust_remote_code=True` too.

Storage of an [out, in] weight with group size G (DESIGN.md section 3):
- `qweight` uint8 [out, in / 2]: codes 0..15, element 2j in the low nibble, 2j + 1 in the high;
- `scales`  fp16  [out, in / G]: a = (max - min) / 15 of each group;
- `offsets` fp16  [out, in / G]: b = min of each group (recovery moves only these).
The layer computes with w = a * q + b, evaluated in float32 from the stored fp16 values,
which is also what GGUF Q4_1 and ONNX MatMulNBits decode to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUANT_SCHEME = "saap-int4-group"
QUANT_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


def dequantize(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """a * q + b for unpacked codes [out, in] and per-group scales / offsets [out, in / G]."""
    out, n_in = codes.shape
    groups = scales.shape[-1]
    q = codes.reshape(out, groups, n_in // groups).float()
    w = q * scales.float()[..., None] + offsets.float()[..., None]
    return w.reshape(out, n_in).to(dtype)


class Int4Linear(nn.Module):
    """A bias-free Linear whose weight is group-wise int4; see the module docstring."""

    def __init__(self, in_features: int, out_features: int, group_size: int, device=None):
        super().__init__()
        if in_features % group_size or in_features % 2:
            raise ValueError(f"group size {group_size} does not divide the input dimension {in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("offsets", torch.zeros(out_features, groups, dtype=torch.float16, device=device))
        self._cache: tuple | None = None

    @classmethod
    def from_parts(cls, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> "Int4Linear":
        """Build from unpacked codes [out, in] (uint8 0..15) and fp16 scales / offsets [out, in / G]."""
        out, n_in = codes.shape
        layer = cls(n_in, out, n_in // scales.shape[-1], device=codes.device)
        layer.qweight.copy_(pack_nibbles(codes))
        layer.scales.copy_(scales)
        layer.offsets.copy_(offsets)
        return layer

    @property
    def codes(self) -> torch.Tensor:
        return unpack_nibbles(self.qweight)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight a * q + b in `dtype`, cached until a buffer changes (in place or replaced)."""
        # (a weight made under inference_mode cannot enter autograd: the mode is part of the key)
        key = tuple((id(t), t._version, t.device) for t in (self.qweight, self.scales, self.offsets))
        key += (dtype, torch.is_inference_mode_enabled())
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, dequantize(self.codes, self.scales, self.offsets, dtype))
        return self._cache[1]

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight (float32), for code that reads `.weight` of a projection."""
        return self.dequantized(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(x.dtype))

    def _apply(self, fn, recurse=True):
        # Scales and offsets are the stored fp16 values the devices run; a model-wide cast
        # (.to(bfloat16), .float()) must not round them, so only their device follows.
        scales, offsets = self.scales, self.offsets
        super()._apply(fn, recurse)
        self.scales = scales.to(self.qweight.device)
        self.offsets = offsets.to(self.qweight.device)
        self._cache = None
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=4, group_size={self.group_size}"


def replace_linears(model: nn.Module, group_size: int, modules=QUANT_MODULES) -> None:
    """Swap every bias-free nn.Linear named like `modules` for an empty Int4Linear (for loading)."""
    for name, child in list(model.named_modules()):
        for attr, sub in list(child.named_children()):
            if attr in modules and isinstance(sub, nn.Linear):
                setattr(child, attr, Int4Linear(sub.in_features, sub.out_features, group_size, device=sub.weight.device))
