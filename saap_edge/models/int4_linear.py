"""Int4Linear: a Linear layer stored as group-wise int4 (packed codes, fp16 scale and offset).

Like slim.py this file imports only torch, so `save_pretrained` copies it next to the
weights and an int4 checkpoint loads with `trust_remote_code=True` too.

Storage of an [out, in] weight with group size G (DESIGN.md section 3):
- `qweight` uint8 [out, in / 2]: codes 0..15, element 2j in the low nibble, 2j + 1 in the high;
- `scales`  fp16  [out, in / G]: a = (max - min) / 15 of each group;
- `offsets` fp16  [out, in / G]: b = min of each group (recovery moves only these).
The layer computes with w = a * q + b, evaluated in float32 from the stored fp16 values,
which is also what GGUF Q4_1 and ONNX MatMulNBits decode to.

Recovery may train a and b themselves (`train_groups`): they become float32 parameters
whose forward value is rounded to fp16 (straight-through), so the trained layer computes
exactly what `freeze_groups` stores; the codes never change.

Memory: with gradients on, the weight is dequantized in the forward pass and again in the
backward pass (`_Int4MatMul`) instead of being kept for it, so training holds the int4
storage plus one projection's float weight at a time, not a float copy of the model (the
QLoRA recipe). Without gradients the forward keeps its dequantized weight (`cache_weights`,
what makes an int4 model evaluate as fast as its float twin); `weight_cache(model, False)`
turns that off where memory matters more (export, large models). Reading `.weight` or
`dequantized()` never caches.
"""

from __future__ import annotations

from contextlib import contextmanager

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


class _Int4MatMul(torch.autograd.Function):
    """y = x w^T with w = a q + b dequantized in the forward pass and again in the backward
    pass, never saved; gradients for x and, when trained, for the scales a and offsets b:
    dL/db[o, g] = sum over the group's inputs j of dL/dw[o, j], dL/da[o, g] = the same sum
    weighted by q[o, j]. (torch has no int4 matmul with trainable group parameters on every
    device; bitsandbytes' 4-bit layers train neither their scales nor their offsets.)"""

    @staticmethod
    def forward(ctx, x, qweight, scales, offsets):
        ctx.save_for_backward(x, qweight, scales, offsets)
        w = dequantize(unpack_nibbles(qweight), scales, offsets, x.dtype)
        return x @ w.T

    @staticmethod
    def backward(ctx, grad):
        x, qweight, scales, offsets = ctx.saved_tensors
        codes = unpack_nibbles(qweight)
        gx = gs = go = None
        if ctx.needs_input_grad[0]:
            gx = (grad @ dequantize(codes, scales, offsets, grad.dtype)).to(x.dtype)
        out, n_in = codes.shape
        groups = scales.shape[-1]
        g2, x2 = grad.reshape(-1, out), x.reshape(-1, n_in).to(grad.dtype)
        if ctx.needs_input_grad[2]:  # scales: the weight gradient itself, weighted by the codes
            gw = (g2.T @ x2).float().reshape(out, groups, -1)
            gs = (gw * codes.reshape(out, groups, -1)).sum(-1).to(scales.dtype)
            if ctx.needs_input_grad[3]:
                go = gw.sum(-1).to(offsets.dtype)
        elif ctx.needs_input_grad[3]:  # offsets alone: sum_j dL/dw[o, j] = grad^T (x summed over each group),
            # a matmul G times smaller than the weight gradient's
            go = (g2.T.float() @ x2.float().reshape(-1, groups, n_in // groups).sum(-1)).to(offsets.dtype)
        return gx, None, gs, go


class Int4Linear(nn.Module):
    """A bias-free Linear whose weight is group-wise int4; see the module docstring."""

    cache_weights = True  # keep the dequantized weight between no-gradient forwards

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

    def train_groups(self, scales: bool = False, offsets: bool = False) -> list[nn.Parameter]:
        """Make the scales and/or offsets trainable float32 parameters; returns them."""
        made = []
        for name, on in (("scales", scales), ("offsets", offsets)):
            if on and not isinstance(getattr(self, name), nn.Parameter):
                value = getattr(self, name).detach().float()
                del self._buffers[name]
                self.register_parameter(name, nn.Parameter(value))
            if on:
                made.append(getattr(self, name))
        self._cache = None
        return made

    def freeze_groups(self) -> None:
        """Round trained scales / offsets to the fp16 buffers the devices run (what training computed)."""
        for name in ("scales", "offsets"):
            value = getattr(self, name)
            if isinstance(value, nn.Parameter):
                del self._parameters[name]
                self.register_buffer(name, value.detach().half())
        self._cache = None

    def _stored(self, name: str) -> torch.Tensor:
        """scales / offsets as the device stores them: a trained fp32 value is rounded to fp16,
        with the gradient passed straight through the rounding."""
        t = getattr(self, name)
        if t.dtype == torch.float16:
            return t
        return t + (t.detach().half().float() - t.detach())

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight a * q + b in `dtype` (a fresh tensor; part of the graph of trained groups)."""
        return dequantize(self.codes, self._stored("scales"), self._stored("offsets"), dtype)

    def _cached(self, dtype: torch.dtype) -> torch.Tensor:
        """`dequantized(dtype)` kept until a buffer changes (in place or replaced)."""
        # (a weight made under inference_mode cannot enter autograd: the mode is part of the key)
        key = tuple((id(t), t._version, t.device) for t in (self.qweight, self.scales, self.offsets))
        key += (dtype, torch.is_inference_mode_enabled())
        if self._cache is None or self._cache[0] != key:
            self._cache = None
            with torch.no_grad():
                self._cache = (key, self.dequantized(dtype))
        return self._cache[1]

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight (float32), for code that reads `.weight` of a projection (not cached:
        peft and others read it for its dtype and device)."""
        with torch.no_grad():
            return self.dequantized(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trained = self.scales.requires_grad or self.offsets.requires_grad
        if torch.is_grad_enabled() and (trained or x.requires_grad):
            self._cache = None  # training holds no float copy (an evaluation before it may have left one)
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            return _Int4MatMul.apply(x.to(dtype), self.qweight, self._stored("scales"), self._stored("offsets"))
        if not self.cache_weights:
            self._cache = None
            return F.linear(x, self.dequantized(x.dtype))
        return F.linear(x, self._cached(x.dtype))

    def _apply(self, fn, recurse=True):
        # Scales and offsets are the stored fp16 values the devices run; a model-wide cast
        # (.to(bfloat16), .float()) must not round them, so only their device follows.
        # Trained fp32 masters keep their dtype the same way.
        kept = {name: getattr(self, name) for name in ("scales", "offsets")}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            if isinstance(old, nn.Parameter):
                getattr(self, name).data = old.data.to(self.qweight.device)
            else:
                setattr(self, name, old.to(self.qweight.device))
        self._cache = None
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=4, group_size={self.group_size}"


@contextmanager
def weight_cache(model: nn.Module, enabled: bool):
    """Within the block, the Int4Linear layers of `model` keep (or do not keep) their
    dequantized weights between forwards; dropped caches free their memory at once."""
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    before = [m.cache_weights for m in layers]
    for m in layers:
        m.cache_weights = enabled
        if not enabled:
            m._cache = None
    try:
        yield model
    finally:
        for m, on in zip(layers, before):
            m.cache_weights = on


def replace_linears(model: nn.Module, group_size: int, modules=QUANT_MODULES) -> None:
    """Swap every bias-free nn.Linear named like `modules` for an empty Int4Linear (for loading)."""
    for name, child in list(model.named_modules()):
        for attr, sub in list(child.named_children()):
            if attr in modules and isinstance(sub, nn.Linear):
                setattr(child, attr, Int4Linear(sub.in_features, sub.out_features, group_size, device=sub.weight.device))
