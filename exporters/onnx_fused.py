"""The fused ONNX decoder (`export --format onnx`, default `--onnx-graph fused`).

One onnxruntime kernel per step of the LLaMA block, the graph onnxruntime-genai's own model
builder makes for LLaMA, here with each layer's own sizes:

  h = Gather(embedding, input_ids)
  per layer i:
    x, h = SkipSimplifiedLayerNormalization(pending, h, input_layernorm)   (the residual add fused in)
    q, k, v = projections of x
    a, present.i.key, present.i.value = com.microsoft::GroupQueryAttention(q, k, v,
        past_key_values.i.key, past_key_values.i.value, seqlens_k, total_sequence_length, cos, sin)
        with num_heads / kv_num_heads = layer i's own counts and the rotary embedding inside
    pending = o_proj(a); x, h = SkipSimplifiedLayerNormalization(pending, h, post_attention_layernorm)
    pending = down_proj(silu(gate_proj(x)) * up_proj(x))
  logits = lm_head(SkipSimplifiedLayerNormalization(pending, h, norm))

- Projections are the same initializers as the traced export (exporters.onnx.matmul_nbits_parts):
  int4 is MatMulNBits(x, codes, a, zero points 0) + (group sums of x) @ b, every stored number
  the checkpoint's; f16 / f32 are MatMul with the weight as stored. The embedding and output
  matrix follow --embed-type (f32, f16, or 8-bit blocks: Gather of the codes, and 8-bit
  MatMulNBits for the head over the same initializers when they are tied).
- The cache is BNSH with fixed integer head counts and head size (tools read each layer's
  shape from the input), a symbolic sequence axis. GroupQueryAttention writes the new keys
  after `seqlens_k` in place when past and present are one buffer (onnxruntime-genai's
  past_present_share_buffer; runtime/ort.py does the same with I/O binding); given a past
  of P positions and no shared buffer, present holds P + S.
- Positions come from the attention mask (sum - 1 = seqlens_k); there is no position_ids input.
- cos / sin caches are the model's own rotary embedding (rope scaling and attention scaling
  included) at every position up to max_position_embeddings: computed in the graph from its
  inv_freq (folded into constants when the session starts), or, for rope types whose inv_freq
  depends on the length, evaluated in torch and stored.
- Stored bytes: int4 scales and offsets and the 8-bit rows' steps are the checkpoint's fp16,
  widened by a Cast that onnxruntime folds at session start; MatMulNBits' constant zero points
  are ConstantOfShape nodes (no bytes).
- An attention-free layer (0 heads) has no attention nodes; its cache is a 1-head placeholder
  passed through from past to present and never read (onnxruntime-genai takes a 0 in the
  past shape for "unknown" and would size that layer like the largest).

Written node by node with onnx.helper: every node is one onnxruntime kernel, so there is
nothing to trace and no fusion pass that could miss a heterogeneous layer. The traced graph
(exporters.onnx) stays as `--onnx-graph dynamo`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import align_module_device
from tqdm.auto import tqdm
from torch import nn

from exporters.onnx import (
    DATA_FILE,
    IR_VERSION,
    MODEL_FILE,
    ONNX_NAMES,
    ONNX_QUANTS,
    Q8_BLOCK,
    OnnxInfo,
    check_block_size,
    write_side_files,
    kv_shapes,
    matmul_nbits_parts,
    q8_parts,
)
from saap_edge.errors import UserError
from saap_edge.models.int4_linear import Int4Linear
from saap_edge.models.stream import float_weight, tied_head

OPSET = 17
GENAI_CONFIG = "genai_config.json"
GQA_HEAD_MULTIPLE = 8  # GroupQueryAttention's CPU kernel needs head_size % 8 == 0
# --matmul-accuracy: MatMulNBits' accuracy_level. fp32 keeps float32 activations (the graph
# computes what torch computes on the stored weights); int8 quantizes each activation block to
# int8 inside the kernel (what llama.cpp does for Q4_1), faster and no longer bit-faithful.
# int8-head: float32 activations in every decoder layer, int8 only where the 8-bit output matrix
# meets the final hidden state (the largest matrix of a small model, read once per token).
# name -> (accuracy_level of the decoder's projections, of the 8-bit output matrix)
ACCURACY_LEVELS = {"fp32": (0, 0), "int8": (4, 4), "int8-head": (0, 4)}
DYNAMIC_ROPE = ("dynamic", "longrope")  # rope types whose inv_freq changes with the sequence length


def _float_bias(module: nn.Module) -> np.ndarray:
    with align_module_device(module):
        bias = getattr(module, "bias", None)
        return bias.detach().float().cpu().numpy() if isinstance(bias, torch.Tensor) else np.zeros(module.out_features, np.float32)


EXTERNAL_MIN_BYTES = 1024  # smaller initializers (shapes, constants) stay inside model.onnx


class _Graph:
    """Nodes, initializers and value names with unique node names."""

    def __init__(self, data: Path | None = None):
        self.nodes, self.inits, self._count = [], {}, 0
        self._widened: dict[str, str] = {}  # initializer -> its Cast (tied embedding and head share one)
        # Initializers of EXTERNAL_MIN_BYTES or more go to the weight file as they are made, and the
        # graph keeps only where they lie: the model is never held whole in memory. (onnx's own
        # external-data writer saves a finished graph, which would first hold every weight.)
        self.data = open(data, "wb") if data is not None else None

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import external_data_helper, numpy_helper

        if name not in self.inits:
            array = array if array.flags.c_contiguous else array.copy()  # (ascontiguousarray makes scalars 1-d)
            if self.data is not None and array.nbytes >= EXTERNAL_MIN_BYTES:
                # the entry without its bytes (from_array of an empty view), the bytes straight
                # from the array to the file: no copy of a large initializer in between
                tensor = numpy_helper.from_array(array.reshape(-1)[:0], name)
                del tensor.dims[:]
                tensor.dims.extend(array.shape)
                offset = self.data.tell()
                array.tofile(self.data)
                external_data_helper.set_external_data(tensor, DATA_FILE, offset, array.nbytes)
                tensor.ClearField("raw_data")
            else:
                tensor = numpy_helper.from_array(array, name)
            self.inits[name] = tensor
        return name

    def close(self) -> None:
        if self.data is not None:
            self.data.close()

    def widened(self, name: str, array: np.ndarray) -> str:
        """`array` stored as it is; a float16 one is widened to float32 in the graph (onnxruntime
        folds the Cast into a float32 constant when the session starts: half the bytes on disk)."""
        from onnx import TensorProto

        stored = self.init(name, array)
        if array.dtype != np.float16:
            return stored
        if stored not in self._widened:
            self._widened[stored] = self.op("Cast", [stored], to=TensorProto.FLOAT)
        return self._widened[stored]

    def filled(self, name: str, shape: tuple[int, ...], value: int = 0, dtype=np.uint8) -> str:
        """A tensor of one value written as ConstantOfShape of its shape: no bytes on disk, folded
        into a constant when the session starts (MatMulNBits' constant zero points)."""
        from onnx import numpy_helper

        return self.op("ConstantOfShape", [self.const(list(shape))], name=name,
                       value=numpy_helper.from_array(np.full(1, value, dtype)))

    def const(self, values, dtype=np.int64) -> str:
        arr = np.asarray(values, dtype=dtype)
        return self.init(f"const.{arr.dtype}.{'_'.join(map(str, arr.reshape(-1).tolist())) or 'empty'}.{arr.ndim}", arr)

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", name: str = "", **attrs):
        from onnx import helper

        self._count += 1
        base = name or f"{op_type}_{self._count}"
        outs = [f"{base}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def rename_output(self, value: str, name: str) -> None:
        """Give the node output `value` the graph-output name `name`."""
        for node in self.nodes:
            for i, out in enumerate(node.output):
                if out == value:
                    node.output[i] = name
                    return
        raise KeyError(value)


def fused_supported(config) -> str | None:
    """Why the fused graph cannot express this model, or None when it can."""
    hd = kv_shapes(config)[0][1]
    if hd % GQA_HEAD_MULTIPLE:
        return f"head size {hd} is not a multiple of {GQA_HEAD_MULTIPLE} (GroupQueryAttention's CPU kernel)"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} (the LLaMA block uses silu)"
    return None


class _Builder:
    def __init__(self, model: nn.Module, quant: str, embed_type: str, accuracy: str = "fp32", data: Path | None = None):
        self.m, self.quant, self.embed_type = model, quant, embed_type
        self.accuracy_level, self.head_accuracy_level = ACCURACY_LEVELS[accuracy]
        self.cfg = model.config
        self.g = _Graph(data)
        self._sums: dict[tuple[str, int], str] = {}
        self.packed: dict[str, tuple[str, int]] = {}  # module -> (packed initializer prefix, first row)

    # -- projections ---------------------------------------------------------------------------
    def linear(self, x: str, modules: list[tuple[str, nn.Module]], packed: str) -> str:
        """x @ [W_1; W_2; ..]^T: the projections that read the same input (q, k, v; gate, up) as one
        MatMulNBits / MatMul whose rows are theirs stacked in order, each number as stored."""
        g = self.g
        first = modules[0][1]
        int4 = self.quant == "int4" and all(isinstance(m, Int4Linear) for _, m in modules)
        if int4:
            # scales and offsets are stored as the checkpoint's fp16 and widened in the graph
            half = all(m.scales.dtype == m.offsets.dtype == torch.float16 for _, m in modules)
            parts = []
            for _, m in modules:
                with align_module_device(m):
                    parts.append({k: v.numpy() for k, v in matmul_nbits_parts(m, half).items()})
            k, gs = first.in_features, first.group_size
            n = sum(m.out_features for _, m in modules)
            row = 0
            for name, m in modules:
                self.packed[name] = (packed, row)
                row += m.out_features
            # every part is row-major in N (zero points: each row's groups padded to whole bytes), offsets [K/G, N]
            stacked = {p: np.concatenate([q[p] for q in parts], axis=1 if p == "offsets" else 0) for p in parts[0]}
            ins = [x, g.init(f"{packed}.qweight", stacked["qweight"]), g.widened(f"{packed}.scales", stacked["scales"]),
                   g.filled(f"{packed}.zero_points", stacked["zero_points"].shape)]
            scaled = g.op("MatMulNBits", ins, domain="com.microsoft", name=f"{packed}/MatMulNBits", K=k, N=n, bits=4,
                          block_size=gs, accuracy_level=self.accuracy_level)
            offsets = g.widened(f"{packed}.offsets", stacked["offsets"])
            y = g.op("Add", [scaled, g.op("MatMul", [self.group_sums(x, k, gs), offsets])])
        else:
            w = torch.cat([float_weight(m) for _, m in modules])
            y = g.op("MatMul", [x, self.weight_t(f"{packed}.weight", w, self.quant == "f16")])
        if any(isinstance(getattr(m, "bias", None), torch.Tensor) for _, m in modules):
            full = np.concatenate([_float_bias(m) for _, m in modules])
            y = g.op("Add", [y, g.init(f"{packed}.bias", full)])
        return y

    def group_sums(self, x: str, k: int, gs: int) -> str:
        """x [.., K] summed per group of gs: [.., K/gs], once per input (q, k, v share it)."""
        key = (x, gs)
        if key not in self._sums:
            grouped = self.g.op("Reshape", [x, self.g.const([0, 0, k // gs, gs])])
            self._sums[key] = self.g.op("ReduceSum", [grouped, self.g.const([-1])], keepdims=0)
        return self._sums[key]

    def weight_t(self, name: str, w: torch.Tensor, half: bool) -> str:
        """W [N, K] stored as given (f16 or f32), transposed (and widened) in the graph;
        onnxruntime folds both into one float32 constant when the session starts."""
        g = self.g
        stored = g.init(name, w.half().numpy() if half else w.numpy())
        if half:
            stored = g.op("Cast", [stored], to=1)
        return g.op("Transpose", [stored], perm=[1, 0])

    # -- embedding and head --------------------------------------------------------------------
    def embedding(self, ids: str) -> str:
        g = self.g
        w = float_weight(self.m.model.embed_tokens)
        if self.embed_type == "int8":
            codes, scales = (t.numpy() for t in q8_parts(w))
            c = g.init("model.embed_tokens.codes", codes)
            s = g.widened("model.embed_tokens.scales", scales.astype(np.float16))  # Q8_0's d, an fp16 value
            rows = g.op("Sub", [g.op("Cast", [g.op("Gather", [c, ids])], to=1), g.const(128.0, np.float32)])
            scaled = g.op("Mul", [rows, g.op("Unsqueeze", [g.op("Gather", [s, ids]), g.const([-1])])])
            return g.op("Reshape", [scaled, g.const([0, 0, -1])])
        if self.half_embedding:
            return g.op("Cast", [g.op("Gather", [g.init("model.embed_tokens.weight", w.half().numpy()), ids])], to=1)
        return g.op("Gather", [g.init("model.embed_tokens.weight", w.numpy()), ids])

    @property
    def half_embedding(self) -> bool:
        return self.embed_type == "f16" or self.quant == "f16" and self.embed_type != "int8"

    def head(self, x: str) -> str:
        g = self.g
        tied = tied_head(self.m)
        prefix = "model.embed_tokens" if tied else "lm_head"
        w = float_weight(self.m.lm_head)
        if self.embed_type == "int8":
            codes, scales = (t.numpy() for t in q8_parts(w))
            c, s = g.init(f"{prefix}.codes", codes), g.widened(f"{prefix}.scales", scales.astype(np.float16))
            v, h = w.shape
            if self.head_accuracy_level:  # int8 activations: 8-bit MatMulNBits over the stored blocks
                zp = g.filled(f"{prefix}.zero_points", (v * (h // Q8_BLOCK),), 128)
                flat = g.op("Reshape", [s, g.const([-1])])
                return g.op("MatMulNBits", [x, c, flat, zp], domain="com.microsoft", name="lm_head/MatMulNBits", K=h, N=v,
                            bits=8, block_size=Q8_BLOCK, accuracy_level=self.head_accuracy_level)
            # float32 activations: (q - 128) * d decoded from constants, which onnxruntime folds into one
            # float32 matrix when the session starts (8-bit MatMulNBits has no fast float32 kernel on CPU:
            # ~9x slower than this per decode step, measured on SmolLM2's 49152 x 576 head)
            rows = g.op("Mul", [g.op("Sub", [g.op("Cast", [c], to=1), g.const(128.0, np.float32)]),
                                g.op("Unsqueeze", [s, g.const([-1])])])
            weight = g.op("Reshape", [rows, g.const([v, h])])
            return g.op("MatMul", [x, g.op("Transpose", [weight], perm=[1, 0])])
        half = self.half_embedding
        name = f"{prefix}.weight"
        if tied and name in g.inits:  # the embedding's initializer, one copy as in the checkpoint
            stored = g.op("Cast", [name], to=1) if half else name
            return g.op("MatMul", [x, g.op("Transpose", [stored], perm=[1, 0])])
        return g.op("MatMul", [x, self.weight_t(name, w, half)])

    # -- the decoder ---------------------------------------------------------------------------
    def norm(self, pending: str | None, residual: str, module: nn.Module, name: str) -> tuple[str, str]:
        """(normalised, new residual): RMSNorm of residual + pending, the add fused in."""
        g = self.g
        w = g.init(f"{name}.weight", float_weight(module).numpy())
        eps = float(self.cfg.rms_norm_eps)
        if pending is None:
            return g.op("SimplifiedLayerNormalization", [residual, w], axis=-1, epsilon=eps, stash_type=1), residual
        out = g.op("SkipSimplifiedLayerNormalization", [pending, residual, w], n_out=4, domain="com.microsoft",
                   epsilon=eps)
        return out[0], out[3]

    def rotary_caches(self) -> tuple[str, str]:
        cfg = self.cfg
        hd = kv_shapes(cfg)[0][1]
        positions = int(cfg.max_position_embeddings)
        rotary = self.m.model.rotary_emb
        inv_freq = getattr(rotary, "inv_freq", None)
        if getattr(rotary, "rope_type", "default") not in DYNAMIC_ROPE and inv_freq is not None:
            # A fixed inv_freq: the tables are computed in the graph as the model computes them,
            # cos / sin(position * inv_freq) * attention_scaling (a float32 product, as torch's), and
            # onnxruntime folds them into constants when the session starts: 32 floats on disk
            # instead of 2 x max_position_embeddings x head_size / 2.
            g = self.g
            inv = g.init("rotary.inv_freq", inv_freq.detach().float().cpu().numpy().reshape(1, -1))
            pos = g.op("Cast", [g.op("Range", [g.const(0), g.const(positions), g.const(1)])], to=1)
            freqs = g.op("Mul", [g.op("Unsqueeze", [pos, g.const([1])]), inv], name="rotary/freqs")
            scaling = float(getattr(rotary, "attention_scaling", 1.0))
            tables = []
            for fn in ("Cos", "Sin"):
                t = g.op(fn, [freqs], name=f"rotary/{fn.lower()}")
                tables.append(g.op("Mul", [t, g.const(scaling, np.float32)]) if scaling != 1.0 else t)
            return tables[0], tables[1]
        x = torch.zeros(1, 1, hd)
        with torch.no_grad():  # inv_freq depends on the sequence length: the tables as torch evaluates them
            cos, sin = rotary(x, torch.arange(positions)[None])
        return (self.g.init("cos_cache", cos[0, :, : hd // 2].float().numpy()),
                self.g.init("sin_cache", sin[0, :, : hd // 2].float().numpy()))

    def build(self, progress: bool = False):
        from onnx import TensorProto, helper

        g, cfg, m = self.g, self.cfg, self.m
        n = cfg.num_hidden_layers
        kv = kv_shapes(cfg)
        heads = list(getattr(cfg, "num_attention_heads_per_layer", None) or [cfg.num_attention_heads] * n)
        ids, mask = ONNX_NAMES["inputs"][:2]
        # GroupQueryAttention's lengths: tokens seen per row minus one, and the mask's width
        seqlens = g.op("Cast", [g.op("Sub", [g.op("ReduceSum", [mask, g.const([1])], keepdims=0), g.const(1)])],
                       to=TensorProto.INT32, name="seqlens_k")
        total = g.op("Cast", [g.op("Gather", [g.op("Shape", [mask]), g.const(1)])], to=TensorProto.INT32,
                     name="total_sequence_length")
        cos, sin = self.rotary_caches()
        inputs = [helper.make_tensor_value_info(ids, TensorProto.INT64, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info(mask, TensorProto.INT64, ["batch_size", "total_sequence_length"])]
        outputs = []
        residual, pending = self.embedding(ids), None
        for i, layer in enumerate(tqdm(m.model.layers, desc="ONNX layers", unit="layer", disable=not progress)):
            h_kv, hd = kv[i]
            cache_heads = h_kv or 1  # attention-free: a 1-head placeholder (see the module docstring)
            past_k, past_v = ONNX_NAMES["past_key"].format(i=i), ONNX_NAMES["past_value"].format(i=i)
            pres_k, pres_v = ONNX_NAMES["present_key"].format(i=i), ONNX_NAMES["present_value"].format(i=i)
            for name in (past_k, past_v):
                inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                            ["batch_size", cache_heads, "past_sequence_length", hd]))
            for name in (pres_k, pres_v):
                outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                             ["batch_size", cache_heads, "total_sequence_length", hd]))
            prefix = f"model.layers.{i}"
            if h_kv == 0:  # attention-free: an empty cache passes through
                g.nodes.append(helper.make_node("Identity", [past_k], [pres_k], name=f"{prefix}/no_attention_k"))
                g.nodes.append(helper.make_node("Identity", [past_v], [pres_v], name=f"{prefix}/no_attention_v"))
            else:
                attn = layer.self_attn
                x, residual = self.norm(pending, residual, layer.input_layernorm, f"{prefix}.input_layernorm")
                qkv = self.linear(x, [(f"{prefix}.self_attn.{p}", getattr(attn, p)) for p in ("q_proj", "k_proj", "v_proj")],
                                  f"{prefix}.self_attn.qkv_proj")
                # packed query, key, value in one input (GroupQueryAttention splits it by its head counts)
                out = g.op("GroupQueryAttention", [qkv, "", "", past_k, past_v, seqlens, total, cos, sin], n_out=3,
                           domain="com.microsoft", name=f"{prefix}/GroupQueryAttention", num_heads=heads[i],
                           kv_num_heads=h_kv, do_rotary=1, rotary_interleaved=0, scale=float(attn.scaling),
                           local_window_size=-1)
                g.rename_output(out[1], pres_k)
                g.rename_output(out[2], pres_v)
                o = f"{prefix}.self_attn.o_proj"
                pending = self.linear(out[0], [(o, attn.o_proj)], o)
            x, residual = self.norm(pending, residual, layer.post_attention_layernorm,
                                    f"{prefix}.post_attention_layernorm")
            mlp = layer.mlp
            width = mlp.gate_proj.out_features
            gate_up = self.linear(x, [(f"{prefix}.mlp.{p}", getattr(mlp, p)) for p in ("gate_proj", "up_proj")],
                                  f"{prefix}.mlp.gate_up_proj")
            gate, up = g.op("Split", [gate_up, g.const([width, width])], n_out=2, axis=-1)
            act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
            d = f"{prefix}.mlp.down_proj"
            pending = self.linear(act, [(d, mlp.down_proj)], d)
        x, _ = self.norm(pending, residual, m.model.norm, "model.norm")
        logits = self.head(x)
        g.rename_output(logits, ONNX_NAMES["logits"])
        outputs.insert(0, helper.make_tensor_value_info(ONNX_NAMES["logits"], TensorProto.FLOAT,
                                                        ["batch_size", "sequence_length", cfg.vocab_size]))
        graph = helper.make_graph(g.nodes, "saap_edge_fused_decoder", inputs, outputs, list(g.inits.values()))
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid("com.microsoft", 1)],
                                  producer_name="saap-edge")
        proto.ir_version = IR_VERSION
        return proto


def export_onnx_fused(model: nn.Module, folder: Path, quant: str = "int4", embed_type: str = "f32",
                      tokenizer=None, provenance: dict | None = None, accuracy: str = "fp32",
                      progress: bool = False) -> OnnxInfo:
    """Write `folder`/model.onnx (+ .data, config.json, genai_config.json, tokenizer files) as the
    fused decoder. For int4 the model must hold Int4Linear projections."""
    import onnx

    if quant not in ONNX_QUANTS:
        raise UserError(f"--quant {quant!r} is not one of {', '.join(ONNX_QUANTS)} for ONNX")
    why = fused_supported(model.config)
    if why:
        raise UserError(f"the fused ONNX decoder cannot express this model: {why}; export with --onnx-graph dynamo")
    check_block_size(model, quant)
    model.eval()  # weights are read as float32 one by one; the caller's model is left as it is
    int4 = {name: mod for name, mod in model.named_modules() if isinstance(mod, Int4Linear)} if quant == "int4" else {}
    if accuracy not in ACCURACY_LEVELS:
        raise UserError(f"--matmul-accuracy {accuracy!r} is not one of {', '.join(ACCURACY_LEVELS)}")
    folder.mkdir(parents=True, exist_ok=True)
    builder = _Builder(model, quant, embed_type, accuracy, data=folder / DATA_FILE)
    try:
        with torch.no_grad():
            proto = builder.build(progress)
    finally:
        builder.g.close()
    onnx.save_model(proto, str(folder / MODEL_FILE))  # the weights are in DATA_FILE already
    os.chmod(folder / DATA_FILE, 0o644)
    write_side_files(model, folder, quant, embed_type, tokenizer,
                      {**(provenance or {}), "graph": "fused", "matmul_accuracy": accuracy})
    write_genai_config(model, folder, tokenizer)
    return OnnxInfo(folder, quant, embed_type, model.config.num_hidden_layers, kv_shapes(model.config), int4,
                    packed=builder.packed, accuracy=accuracy)


def end_of_turn_id(tokenizer) -> int | None:
    """The id of the token the tokenizer's chat template closes an assistant turn with (ChatML's
    <|im_end|>, LLaMA-3's <|eot_id|>); None without a template or when it is not one token."""
    from runtime.chat import ChatTemplate

    text = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if not isinstance(text, str):
        return None
    template = ChatTemplate(text, "tokenizer", tokenizer.bos_token or "", tokenizer.eos_token or "")
    try:
        return template.end_of_turn_id(lambda marker: tokenizer.encode(marker, add_special_tokens=False))
    except Exception:  # noqa: BLE001 - a template that cannot render a plain conversation: no marker
        return None


def write_genai_config(model: nn.Module, folder: Path, tokenizer=None) -> Path:
    """genai_config.json: what onnxruntime-genai reads to run the folder (names of the inputs
    and outputs, sizes, special tokens, search defaults). Its single head counts are the largest
    layer's; onnxruntime-genai >= 0.15 sizes each layer's cache from the past input shapes.
    The end-of-text ids include the chat template's end-of-turn token, and the search defaults
    are the generation config's (greedy unless it samples)."""
    cfg = model.config
    gen = getattr(model, "generation_config", None)

    def special(name):
        value = getattr(gen, name, None) if gen is not None else None
        return value if value is not None else getattr(cfg, name, None)

    kv = kv_shapes(cfg)
    heads = list(getattr(cfg, "num_attention_heads_per_layer", None) or [cfg.num_attention_heads])
    eos = special("eos_token_id")
    turn = end_of_turn_id(tokenizer)
    if turn is not None:
        ids = list(eos) if isinstance(eos, list) else [eos] if eos is not None else []
        eos = ids + [turn] if turn not in ids else (ids if len(ids) > 1 else ids[0])
    context = int(cfg.max_position_embeddings)

    def per_layer(name: str) -> str:  # onnxruntime-genai spells the layer index printf-style
        return ONNX_NAMES[name].replace("{i}", "%d")

    data = {
        "model": {
            "bos_token_id": special("bos_token_id"),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": kv[0][1],
                "hidden_size": int(cfg.hidden_size),
                "inputs": {"input_ids": ONNX_NAMES["inputs"][0], "attention_mask": ONNX_NAMES["inputs"][1],
                           "past_key_names": per_layer("past_key"), "past_value_names": per_layer("past_value")},
                "outputs": {"logits": ONNX_NAMES["logits"], "present_key_names": per_layer("present_key"),
                            "present_value_names": per_layer("present_value")},
                "num_attention_heads": max(heads),
                "num_hidden_layers": int(cfg.num_hidden_layers),
                "num_key_value_heads": max(h for h, _ in kv),
            },
            "eos_token_id": eos,
            "pad_token_id": special("pad_token_id") if special("pad_token_id") is not None else
            (eos[0] if isinstance(eos, list) else eos),
            "type": "llama",
            "vocab_size": int(cfg.vocab_size),
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }
    if gen is not None and getattr(gen, "do_sample", False):
        data["search"].update(do_sample=True, temperature=float(gen.temperature or 1.0), top_k=int(gen.top_k or 0),
                              top_p=float(gen.top_p or 1.0))
    if gen is not None and getattr(gen, "repetition_penalty", None):
        data["search"]["repetition_penalty"] = float(gen.repetition_penalty)
    path = folder / GENAI_CONFIG
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
