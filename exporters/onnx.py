"""ONNX exporter: the slim decoder with a KV cache, int4 projections as com.microsoft MatMulNBits.

The graph is the Hugging Face forward of the slim model traced by
`torch.onnx.export(dynamo=True)` with optimum's input and output names (ONNX_NAMES), so
each layer's past / present carries that layer's own KV-head count. Only the projection
modules are swapped before export (DESIGN.md section 5):

- int4: y = MatMulNBits(x, B, scales, zero_points = 0, K, N, bits=4, block_size=G)
  + MatMul(group sums of x, offsets^T). B holds the checkpoint's packed codes unchanged
  (uint8 [N, K/G, G/2], element 2j in the low nibble: our order and ORT's), scales are the
  fp16 a widened to float32, the uint8 zero points are 0 and the offsets are the fp16 b
  widened to float32, so the graph's weights are a*q + b with every stored number intact.
  Why not one MatMulNBits with float zero points zp = -b/a (DESIGN.md section 5, which is
  exact to ~1 ulp): onnxruntime 1.32's CPU kernel has no fast path for float zero points;
  on a 1536 x 576 projection at batch 1 it takes ~28x the time of uint8 zero points, which
  run as fast as an fp32 MatMul (benchmarks/matmulnbits_zero_points.py). The group-sum term costs one small MatMul
  ([.., K/G] x [K/G, N]) per projection.
- f16: weights stored as float16 initializers, cast to float32 in the graph (half the file,
  float32 arithmetic on every CPU provider). f32: weights as they are.

The traced op is a torch custom op whose eager implementation computes exactly what
MatMulNBits computes, so the exported program is checked in torch before ORT sees it.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runtime.base import ONNX_NAMES  # noqa: F401  (the graph's names; re-exported)
from saap_edge.errors import UserError
from saap_edge.models.int4_linear import Int4Linear, unpack_nibbles

ONNX_QUANTS = ("int4", "f16", "f32")
ONNX_EMBED_TYPES = ("f16", "f32", "int8")  # the token embedding / output matrix (int8: 8-bit blocks of 32)
IR_VERSION = 10  # onnx 1.23 writes 14; onnxruntime 1.2x-1.3x read at most 10-13 (DESIGN.md 5)
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"  # baked into the graph by the exporter: never rename it



# ---------------------------------------------------------------------------------------------
# MatMulNBits as a torch custom op: eager semantics == the contrib op's, ONNX translation below
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("saap::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                 k: int, n: int, block_size: int, bits: int = 4) -> torch.Tensor:
    """x [..., K] @ W^T with W[n, k] = (q - zp) * s per block of `block_size` along K
    (MatMulNBits with uint8 zero points. bits 4: two codes and two zero points a byte, rows
    padded to whole bytes; bits 8: one code a byte, zero points [N, K / block_size])."""
    groups = k // block_size
    if bits == 4:
        q = unpack_nibbles(b).reshape(n, groups, block_size).to(x.dtype)
        zp = unpack_nibbles(zero_points.reshape(n, -1))[:, :groups].to(x.dtype)
    else:
        q = b.reshape(n, groups, block_size).to(x.dtype)
        zp = zero_points.reshape(n, groups).to(x.dtype)
    w = (q - zp[..., None]) * scales.reshape(n, groups, 1).to(x.dtype)
    return F.linear(x, w.reshape(n, k))


@matmul_nbits.register_fake
def _(x, b, scales, zero_points, k, n, block_size, bits=4):
    return x.new_empty(*x.shape[:-1], n)


def _matmul_nbits_schema():
    """onnx ships no schemas for onnxruntime's contrib ops; the tracer needs one for MatMulNBits
    (the subset of com.microsoft::MatMulNBits v1 that we emit: A, B, scales, zero_points)."""
    from onnx.defs import OpSchema

    param = OpSchema.FormalParameter
    attr = OpSchema.Attribute
    return OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[param("A", "T1"), param("B", "T2"), param("scales", "T1"), param("zero_points", "T2")],
        outputs=[param("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], ""), ("T2", ["tensor(uint8)"], "")],
        attributes=[attr("K", OpSchema.AttrType.INT, ""), attr("N", OpSchema.AttrType.INT, ""),
                    attr("bits", OpSchema.AttrType.INT, ""), attr("block_size", OpSchema.AttrType.INT, "")],
    )


def _matmul_nbits_onnx(x, b, scales, zero_points, k: int, n: int, block_size: int, bits: int = 4):
    import onnxscript

    op = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MatMulNBits", _matmul_nbits_schema())
    return op(x, b, scales, zero_points, K=k, N=n, bits=bits, block_size=block_size)


Q8_BLOCK = 32  # 8-bit embedding blocks: GGUF's Q8_0 block, so both formats store the same numbers
Q8_ROWS_AT_ONCE = 8192


def q8_parts(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0's rule for a [V, H] matrix: per block of 32, d = max|x| / 127, q = round(x / d) (half
    away from zero), d kept in float16. Returns codes + 128 as uint8 [V, H/32, 32] (MatMulNBits'
    8-bit layout, zero point 128) and d as float32 [V, H/32]."""
    v, h = weight.shape
    if h % Q8_BLOCK:
        raise UserError(f"--embed-type int8 needs a hidden size divisible by {Q8_BLOCK}, not {h}")
    codes = torch.empty(v, h // Q8_BLOCK, Q8_BLOCK, dtype=torch.uint8)
    scales = torch.empty(v, h // Q8_BLOCK, dtype=torch.float32)
    for lo in range(0, v, Q8_ROWS_AT_ONCE):  # bounded temporaries: a 128k-row matrix is GBs in float32
        w = weight[lo:lo + Q8_ROWS_AT_ONCE].detach().float().cpu().reshape(-1, h // Q8_BLOCK, Q8_BLOCK)
        d = w.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = torch.sign(w) * torch.floor((w * inv).abs() + 0.5)
        codes[lo:lo + len(w)] = (q + 128).to(torch.uint8)
        scales[lo:lo + len(w)] = d.squeeze(-1).half().float()
    return codes, scales


def q8_decode(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The [V, H] float32 matrix that 8-bit codes and scales hold."""
    return ((codes.float() - 128) * scales[..., None]).reshape(codes.shape[0], -1)


def q8_round_(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [V, H] (float32) replaced in place by what its 8-bit blocks hold, Q8_ROWS_AT_ONCE
    rows at a time (q8_decode(*q8_parts(w)) without two more copies of a 128k-row matrix)."""
    for lo in range(0, weight.shape[0], Q8_ROWS_AT_ONCE):
        rows = weight[lo:lo + Q8_ROWS_AT_ONCE]
        rows.copy_(q8_decode(*q8_parts(rows)))
    return weight


class Int8Embedding(nn.Module):
    """Token embedding from 8-bit blocks: Gather of the codes and scales, then (q - 128) * d."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)

    def forward(self, ids):
        flat = ids.reshape(-1)  # index_select: one Gather on axis 0 of each initializer
        rows = torch.index_select(self.codes, 0, flat).float() - 128  # [n, H/32, 32]
        rows = rows * torch.index_select(self.scales, 0, flat)[..., None]
        return rows.reshape(*ids.shape, -1)


class Int8Head(nn.Module):
    """The output matrix as 8-bit MatMulNBits (zero point 128) over the same codes and scales."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.n, groups, block = codes.shape
        self.k, self.block_size = groups * block, block
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("zero_points", torch.full_like(codes[..., 0], 128))

    def forward(self, x):
        return torch.ops.saap.matmul_nbits(x, self.codes, self.scales, self.zero_points, self.k, self.n, self.block_size, 8)


def matmul_nbits_parts(layer: Int4Linear, half: bool = False) -> dict[str, torch.Tensor]:
    """The initializers of one int4 projection: MatMulNBits' B (uint8 [N, K/G, G/2]), scales
    (f32 [N*K/G]) and zero points (uint8 zeros, [N * ceil(K/G / 2)]), and the offsets (f32 [K/G, N]).
    half: scales and offsets as the checkpoint's fp16 (the fused graph stores them so and widens
    them in the graph)."""
    n, k, g = layer.out_features, layer.in_features, layer.group_size
    groups = k // g
    dtype = torch.float16 if half else torch.float32
    return {
        "qweight": layer.qweight.reshape(n, groups, g // 2).clone(),
        "scales": layer.scales.to(dtype).reshape(-1).contiguous(),
        "zero_points": torch.zeros(n * ((groups + 1) // 2), dtype=torch.uint8),
        "offsets": layer.offsets.to(dtype).t().contiguous(),
    }


class NBitsLinear(nn.Module):
    """An Int4Linear as MatMulNBits (the a*q part) plus the offsets applied to group sums of x."""

    def __init__(self, layer: Int4Linear):
        super().__init__()
        self.k, self.n, self.block_size = layer.in_features, layer.out_features, layer.group_size
        for name, tensor in matmul_nbits_parts(layer).items():
            self.register_buffer(name, tensor)

    def forward(self, x):
        scaled = torch.ops.saap.matmul_nbits(x, self.qweight, self.scales, self.zero_points, self.k, self.n, self.block_size)
        sums = x.reshape(*x.shape[:-1], self.k // self.block_size, self.block_size).sum(-1)
        return scaled + sums @ self.offsets


class HalfLinear(nn.Module):
    """A bias-free Linear stored as float16, computed in the activations' dtype."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(torch.float16).clone())

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


class HalfEmbedding(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(torch.float16).clone())

    def forward(self, ids):
        return F.embedding(ids, self.weight).float()


# ---------------------------------------------------------------------------------------------
# The exported module
# ---------------------------------------------------------------------------------------------

class DecoderWithPast(nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present), flat."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.n_layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache()
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, return_dict=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def input_names(n_layers: int) -> list[str]:
    names = list(ONNX_NAMES["inputs"])
    for i in range(n_layers):
        names += [ONNX_NAMES["past_key"].format(i=i), ONNX_NAMES["past_value"].format(i=i)]
    return names


def output_names(n_layers: int) -> list[str]:
    names = [ONNX_NAMES["logits"]]
    for i in range(n_layers):
        names += [ONNX_NAMES["present_key"].format(i=i), ONNX_NAMES["present_value"].format(i=i)]
    return names


def kv_shapes(config) -> list[tuple[int, int]]:
    """(KV heads, head dim) of each layer."""
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = getattr(config, "num_key_value_heads_per_layer", None) or [config.num_key_value_heads] * config.num_hidden_layers
    return [(int(h), int(hd)) for h in kv]


def example_inputs(config, batch: int = 1, seq: int = 3, past: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = []
    for h, hd in kv_shapes(config):
        kv += [torch.randn(batch, h, past, hd, generator=g), torch.randn(batch, h, past, hd, generator=g)]
    return (ids, mask, pos, *kv)


def prepare(model: nn.Module, quant: str, embed_type: str = "f32") -> nn.Module:
    """A copy of the float32 slim model with projections swapped for the ONNX quant type.

    int4 needs an Int4Linear model (quantize fp weights first with saap_edge.quant.int4)."""
    import copy

    m = copy.deepcopy(model).float().eval()
    m.config._attn_implementation = "sdpa"
    for parent in list(m.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Int4Linear):
                if quant != "int4":
                    child = _dense_linear(child)
                setattr(parent, name, NBitsLinear(child) if quant == "int4" else _half_or_full(child, quant))
            elif isinstance(child, nn.Linear) and name != "lm_head" and quant == "f16":
                setattr(parent, name, HalfLinear(child.weight))
    if embed_type == "int8":
        tied = m.lm_head.weight is m.model.embed_tokens.weight
        emb = Int8Embedding(*q8_parts(m.model.embed_tokens.weight))
        # tied: the head holds the embedding's own tensors, one set of initializers as in the checkpoint
        head = Int8Head(emb.codes, emb.scales) if tied else Int8Head(*q8_parts(m.lm_head.weight))
        m.model.embed_tokens, m.lm_head = emb, head
    elif embed_type == "f16" or quant == "f16":
        emb = m.model.embed_tokens
        half = HalfEmbedding(emb.weight)
        tied = m.lm_head.weight is emb.weight
        m.model.embed_tokens = half
        head = HalfLinear(m.lm_head.weight)
        if tied:
            head.weight = half.weight  # one initializer for both, as in the checkpoint
        m.lm_head = head
    return m


def stored_weights_model(model: nn.Module, quant: str, embed_type: str, in_place: bool = False) -> nn.Module:
    """The torch model with every weight rounded as the artifact stores it (f16 embeddings or
    projections); int4 projections are already exact. What ONNX logits are validated against.
    `in_place`: round `model` itself (an exporter done with it), not a copy. A streamed model
    (saap_edge.models.stream) is rounded as each weight is read."""
    import copy

    from saap_edge.models.stream import streamed_weights

    if quant != "f16" and embed_type not in ("f16", "int8"):
        return model

    def stored(name: str, w: torch.Tensor) -> torch.Tensor:
        is_embed = name.endswith(("embed_tokens.weight", "lm_head.weight"))
        if w.dim() == 2 and is_embed and embed_type == "int8":
            return q8_round_(w if w.dtype == torch.float32 else w.float())
        if w.dim() == 2 and (is_embed and embed_type == "f16" or not is_embed and quant == "f16"):
            return w.half().float()
        return w

    weights = streamed_weights(model)
    if weights is not None:  # weights only: an int4 layer's qweight / scales / offsets are exact already
        weights.transform = lambda name, t: stored(name, t) if name.endswith(".weight") and t.is_floating_point() else t
        return model
    m = model if in_place else copy.deepcopy(model)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(stored(name, p))
    return m


def _dense_linear(layer: Int4Linear) -> nn.Linear:
    lin = nn.Linear(layer.in_features, layer.out_features, bias=False)
    lin.weight.data.copy_(layer.dequantized(torch.float32))
    return lin


def _half_or_full(layer: nn.Linear, quant: str) -> nn.Module:
    return HalfLinear(layer.weight) if quant == "f16" else layer


@dataclass
class OnnxInfo:
    path: Path  # the output folder
    quant: str
    embed_type: str
    n_layers: int
    kv: list[tuple[int, int]]
    int4_tensors: dict[str, Int4Linear] = field(default_factory=dict)  # initializer prefix -> source layer
    # fused graph: module -> (prefix of the stacked initializers holding its rows, its first row)
    packed: dict[str, tuple[str, int]] = field(default_factory=dict)
    accuracy: str = "fp32"  # MatMulNBits activations: fp32, int8-head (output matrix only) or int8 (accuracy_level 4)


def export_onnx(model: nn.Module, folder: Path, quant: str = "int4", embed_type: str = "f32",
                tokenizer=None, provenance: dict | None = None) -> OnnxInfo:
    """Write `folder`/model.onnx (+ .data, config.json, tokenizer files) from a slim float32 model.

    For int4 the model must hold Int4Linear projections (exporters.export quantizes fp ones)."""
    import onnx
    from torch.export import Dim

    if quant not in ONNX_QUANTS:
        raise UserError(f"--quant {quant!r} is not one of {', '.join(ONNX_QUANTS)} for ONNX")
    check_block_size(model, quant)
    prepared = prepare(model, quant, embed_type)
    int4 = {name: mod for name, mod in model.named_modules() if isinstance(mod, Int4Linear)} if quant == "int4" else {}
    n = model.config.num_hidden_layers
    wrapper = DecoderWithPast(prepared).eval()
    args = example_inputs(model.config)
    batch, seq, past, total = Dim.DYNAMIC, Dim.DYNAMIC, Dim.DYNAMIC, Dim.DYNAMIC
    # (the varargs *past form one entry of the input structure)
    shapes = [{0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, tuple({0: batch, 2: past} for _ in range(2 * n))]
    folder.mkdir(parents=True, exist_ok=True)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        quiet.setLevel(logging.ERROR)  # "torchvision is not installed" notes and such
        program = torch.onnx.export(
            wrapper, args, dynamo=True, input_names=input_names(n), output_names=output_names(n),
            dynamic_shapes=tuple(shapes), custom_translation_table={torch.ops.saap.matmul_nbits.default: _matmul_nbits_onnx},
            optimize=True, verbose=False,
        )
    quiet.setLevel(level)
    proto = program.model_proto
    proto.ir_version = min(proto.ir_version, IR_VERSION)
    onnx.save_model(proto, str(folder / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    os.chmod(folder / DATA_FILE, 0o644)  # onnx creates it private; the model file is 0644 too
    write_side_files(model, folder, quant, embed_type, tokenizer, provenance or {})
    return OnnxInfo(folder, quant, embed_type, n, kv_shapes(model.config), int4)


def check_block_size(model: nn.Module, quant: str) -> None:
    if quant != "int4":
        return
    for name, mod in model.named_modules():
        if isinstance(mod, Int4Linear):
            g = mod.group_size
            if g < 16 or g & (g - 1):
                raise UserError(f"{name}: group size {g} cannot be a MatMulNBits block (a power of two >= 16 is "
                                "needed); re-quantize with --group-size 32, 64 or 128")


def write_side_files(model, folder: Path, quant: str, embed_type: str, tokenizer, provenance: dict):
    cfg = model.config.to_dict()
    # optimum sizes the empty past from these scalar fields: they are exact when every layer
    # shares one KV-head count (the only case optimum can run); the per-layer lists stay too.
    kv = kv_shapes(model.config)
    cfg["num_key_value_heads"] = kv[0][0]
    cfg["head_dim"] = kv[0][1]
    cfg["model_type"] = "llama"
    cfg.pop("auto_map", None)
    cfg["use_cache"] = True
    cfg["saap_onnx"] = {"quant": quant, "embed_type": embed_type, "kv_heads_per_layer": [h for h, _ in kv],
                        "ir_version": IR_VERSION, **provenance}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if tokenizer is not None:
        from saap_edge.outputs import save_tokenizer

        save_tokenizer(tokenizer, folder)  # tokenizer.json: what runtime/ort.py reads
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(folder))


def initializer(proto_or_path, name: str) -> np.ndarray:
    """One initializer of a saved model as numpy (external data loaded)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(proto_or_path)) if not hasattr(proto_or_path, "graph") else proto_or_path
    for t in proto.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)
