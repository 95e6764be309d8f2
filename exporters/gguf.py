"""GGUF writer and reader for slim (per-layer sized) LLaMA models, with exact int4 groups.

Writer: uniform models as arch `llama`; models whose layers differ as arch `deci`, whose
per-layer arrays (`deci.attention.head_count`, `...head_count_kv`, `deci.feed_forward_length`)
llama.cpp reads layer by layer (DESIGN.md section 4). Q and K rows get llama.cpp's per-head
RoPE permutation. Tensor types F32, F16 and Q4_1; a Q4_1 block (32 weights of a row: fp16 d,
fp16 m, 16 bytes of nibbles with element j low and j + 16 high) holds our groups exactly:
d = a, m = b, repeated over the 32-blocks of a 64- or 128-group.

The gguf package writes the container and decodes tensors; the block packing, the
permutation and the `deci` layout are ours because no library writes them from a slim model
(llama.cpp's convert_hf_to_gguf reads HF checkpoints of uniform shape and requantizes).

Reader: a `llama` or `deci` GGUF (F32 / F16 / Q4_1 tensors) back into SlimLlamaForCausalLM
(transformers reads neither `deci` nor some llama2.c-converted files such as stories260K).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from accelerate.utils import align_module_device
from tqdm.auto import tqdm
from gguf import GGUFWriter

from saap_edge.errors import UserError
from saap_edge.models.gguf_index import GGUFIndex
from saap_edge.models.int4_linear import Int4Linear
from saap_edge.models.slim import SlimLlamaConfig
from saap_edge.models.stream import float_weight, streamed_weights, weight_rows
from saap_edge.models.gguf_file import (  # noqa: F401  (the layout and the reader, re-exported)
    ATTENTION_TENSORS,
    BLOCK,
    LAYER_NAMES,
    NORMS,
    Q4_1_BYTES,
    llama3_factors,
    permute_rows,
    q4_1_blocks,
    q4_1_parts,
    read_gguf,
    unpermute_rows,
)
from saap_edge.quant.int4 import quantize_groups

QUANTS = {"f32": QT.F32, "f16": QT.F16, "q4_1": QT.Q4_1}
EMBED_TYPES = (*QUANTS, "q8_0")  # the token embedding / output matrix may also be Q8_0 (8-bit, blocks of 32)
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}
# Rows of an embedding / output matrix quantized (and checked) at a time: numpy's temporaries
# then stay a few times ROWS_AT_ONCE x hidden floats instead of a few copies of a 128k-row matrix
ROWS_AT_ONCE = 8192


def q8_0_blocks(w, n_rows: int | None = None) -> np.ndarray:
    """gguf's own Q8_0 quantizer (d = max|x| / 127 per block of 32, f16; q = round(x / d)) over
    a [rows, cols] float32 matrix, ROWS_AT_ONCE rows at a time into one preallocated array. `w`
    is the matrix, or a function (lo, hi) -> its float32 rows lo..hi and `n_rows` its height (a
    streamed embedding matrix is then never whole in float32)."""
    rows = w if callable(w) else (lambda lo, hi: w[lo:hi])
    n_rows = w.shape[0] if n_rows is None else n_rows
    out = None
    for lo in range(0, n_rows, ROWS_AT_ONCE):
        part = gguf.quants.quantize(np.asarray(rows(lo, lo + ROWS_AT_ONCE), dtype=np.float32), QT.Q8_0)
        if out is None:
            out = np.empty((n_rows, part.shape[1]), dtype=part.dtype)
        out[lo:lo + len(part)] = part
    return out

# ---------------------------------------------------------------------- layout helpers


ROPE_SCALING = ("default", "llama3", "linear", "yarn")  # rope_scaling types llama.cpp's llama / deci run


def rope_kind(config) -> str:
    """The config's rope scaling type ("default" for none); UserError for one llama.cpp does not run."""
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type")) or "default"
    if kind not in ROPE_SCALING:
        raise UserError(f"rope scaling {kind!r} has no equivalent in llama.cpp's llama architecture (the GGUF exporter "
                        f"writes {', '.join(ROPE_SCALING)}); export with --format onnx")
    return kind


def _add_rope_scaling(writer: GGUFWriter, config) -> None:
    """linear and YaRN scaling as llama.cpp reads them (rope.scaling.*); llama3's is rope_freqs."""
    kind = rope_kind(config)
    if kind in ("default", "llama3"):
        return
    scaling = config.rope_scaling
    writer.add_rope_scaling_factor(float(scaling["factor"]))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        return
    if scaling.get("attention_factor") is not None or scaling.get("mscale") or scaling.get("mscale_all_dim"):
        raise UserError("YaRN with its own attention_factor / mscale is not written to GGUF (llama.cpp derives the "
                        "attention factor from the scaling factor); export with --format onnx")
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_orig_ctx_len(int(scaling.get("original_max_position_embeddings")
                                             or config.max_position_embeddings))
    writer.add_rope_scaling_yarn_beta_fast(float(scaling.get("beta_fast") or 32.0))
    writer.add_rope_scaling_yarn_beta_slow(float(scaling.get("beta_slow") or 1.0))


def llama3_rope_factors(config) -> np.ndarray | None:
    """`rope_freqs.weight` for LLaMA-3.1-style rope scaling, as llama.cpp expects it."""
    if rope_kind(config) != "llama3":
        return None
    s = config.rope_scaling
    factors = llama3_factors(config.head_dim, config.rope_theta, s["factor"], s.get("low_freq_factor", 1.0),
                             s.get("high_freq_factor", 4.0), s.get("original_max_position_embeddings", 8192))
    return factors.astype(np.float32)


# ---------------------------------------------------------------------- writer


@dataclass
class GGUFInfo:
    """What was written: architecture, tensor types and the checks' raw material."""

    path: Path
    arch: str
    quant: str
    tensor_types: dict[str, str] = field(default_factory=dict)
    # name -> a function giving (codes, a, b) as written; functions, not arrays: a checkpoint's
    # tensors are read again when the check needs them, one at a time (a streamed model holds none)
    int4_tensors: dict[str, Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]]] = field(default_factory=dict)
    embed_type: str = "f16"
    # name -> (the module whose weight it quantized, the streamed checkpoint or None), read back a
    # block of rows at a time by the check (a 128k-row matrix is GBs in float32)
    q8_tensors: dict[str, tuple[torch.nn.Module, Any]] = field(default_factory=dict)


def _slim_config(model) -> SlimLlamaConfig:
    config = model.config
    if not isinstance(config, SlimLlamaConfig):
        config = SlimLlamaConfig(**config.to_dict())
    return config


def _check_layers(config: SlimLlamaConfig) -> None:
    if config.layer_sizes(0)[0] == 0:
        raise UserError("layer 0 keeps no attention heads: llama.cpp cannot load such a GGUF (it reads the attention "
                        "sizes from layer 0); prune with --keep-first 1 (layer 0 kept whole) or export with --format onnx")
    for i in range(config.num_hidden_layers):
        heads, kv, ffn = config.layer_sizes(i)
        if heads > 0 and ffn == 0:
            raise UserError(f"layer {i} keeps {heads} attention heads but MLP width 0: llama.cpp drops such a layer "
                            "whole and would compute a different model; prune with a plan that keeps MLP channels there")


def _q4_1_parts(module, name: str, permute_heads: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, a, b) of one projection as its Q4_1 blocks hold them (Q / K rows permuted for
    llama.cpp's RoPE): an int4 layer's own groups, or a float weight's by our group quantizer at
    the Q4_1 block size. Read through `align_module_device`: a streamed model holds the
    module's tensors only inside the block."""
    if module.in_features % BLOCK:
        raise UserError(f"{name}: input dimension {module.in_features} is not a multiple of 32, so Q4_1 blocks cannot "
                        "hold it; export with --quant f16 or f32")
    with align_module_device(module):
        if isinstance(module, Int4Linear):
            codes = module.codes.cpu().numpy()
            a, b = module.scales.cpu().numpy(), module.offsets.cpu().numpy()
        else:  # fp checkpoint: the same group quantizer, at the Q4_1 block size
            g = quantize_groups(module.weight.detach().float().cpu(), BLOCK)
            codes, a, b = g.codes.numpy(), g.scales.numpy(), g.offsets.numpy()
    if permute_heads:
        codes, a, b = (permute_rows(x, permute_heads) for x in (codes, a, b))
    return codes, a, b


def _bias(module) -> np.ndarray | None:
    """A projection's bias in float32 (None for a bias-free one), read inside align_module_device
    (a streamed module holds it only there)."""
    if getattr(module, "bias", None) is None:
        return None
    with align_module_device(module):
        return module.bias.detach().float().cpu().numpy()


def _projection(module, name: str, quant: str, permute_heads: int | None):
    """(array, raw GGML type, whether it holds int4 groups) of one projection in `quant`."""
    if quant == "q4_1":
        return q4_1_blocks(*_q4_1_parts(module, name, permute_heads)), QT.Q4_1, True
    dense = float_weight(module).numpy()
    if permute_heads:
        dense = permute_rows(dense, permute_heads)
    return (dense.astype(np.float16) if quant == "f16" else dense.astype(np.float32)), None, False


def _add_tokenizer(writer: GGUFWriter, tokenizer_dir: Path | None, source_gguf: Path | None, vocab_size: int,
                   pre_override: str | None = None, tokenizer=None) -> str:
    """Tokenizer metadata: copied verbatim from the source GGUF when there is one (exact,
    pre-tokenizer name included), else written from the HF tokenizer files as llama.cpp's converter
    writes them (exporters.gguf_vocab). Returns where it came from."""
    if pre_override and tokenizer_dir is None:
        raise UserError("--tokenizer-pre rewrites a tokenizer read from HF tokenizer files; this model's tokenizer is "
                        "its GGUF's, copied as it is: drop the flag")
    if source_gguf is not None and source_gguf.exists() and not pre_override:
        index = GGUFIndex(source_gguf)
        n_tokens = len(index.get("tokenizer.ggml.tokens") or [])
        if n_tokens > vocab_size:
            raise UserError(f"{source_gguf}: its tokenizer has {n_tokens} tokens but the embedding only {vocab_size} rows; "
                            "export from the model's own GGUF or HF directory")
        for key, f in index.fields.items():
            if key.startswith("tokenizer."):
                value = f.value.tolist() if isinstance(f.value, np.ndarray) else f.value
                writer.add_key_value(key, value, f.type, f.item_type)
        return f"copied from {source_gguf.name}"
    if tokenizer_dir is None:
        raise UserError("no tokenizer to write into the GGUF: the model directory has no tokenizer files; copy the "
                        "model's tokenizer files (tokenizer.json, tokenizer_config.json, tokenizer.model) into it")
    from exporters.gguf_vocab import add_vocab, vocab_fields

    fields = vocab_fields(tokenizer_dir, vocab_size, pre_override, tokenizer)
    add_vocab(writer, fields, tokenizer_dir)
    return fields.describe(tokenizer_dir)


def _add_sampling(writer: GGUFWriter, gen) -> None:
    """The model's sampling defaults (generation_config.json) as GGUF's general.sampling keys,
    which llama.cpp's tools and `saap-edge run --chat` read; nothing for a greedy model."""
    if gen is None or not getattr(gen, "do_sample", False):
        return
    keys = gguf.Keys.General
    if getattr(gen, "temperature", None) is not None:
        writer.add_float32(keys.SAMPLING_TEMP, float(gen.temperature))
    if getattr(gen, "top_k", None) is not None:
        writer.add_int32(keys.SAMPLING_TOP_K, int(gen.top_k))
    if getattr(gen, "top_p", None) is not None:
        writer.add_float32(keys.SAMPLING_TOP_P, float(gen.top_p))


def write_gguf(
    model,
    path: str | os.PathLike,
    quant: str = "q4_1",
    embed_type: str = "f16",
    tokenizer_dir: Path | None = None,
    source_gguf: Path | None = None,
    name: str = "saap-edge model",
    provenance: dict | None = None,
    progress: bool = False,
    tokenizer_pre: str | None = None,
    tokenizer=None,
) -> GGUFInfo:
    """Write `model` (slim or plain LLaMA, fp or int4) to `path` as GGUF; see the module doc."""
    if quant not in QUANTS or embed_type not in EMBED_TYPES:
        raise UserError(f"--quant must be one of {', '.join(QUANTS)} and --embed-type one of {', '.join(EMBED_TYPES)}")
    config = _slim_config(model)
    _check_layers(config)
    arch = "llama" if config.is_uniform else "deci"
    writer = GGUFWriter(str(path), arch, use_temp_file=True)
    # gguf writes the header first and the tensor data after, so each tensor goes to a temporary
    # file as it is made (the writer's own spooling) and the model is never held whole; the file
    # lies beside the output, not in /tmp, which may be small or in RAM
    writer.temp_file = tempfile.TemporaryFile(dir=Path(path).parent, prefix=f".{Path(path).name}.tensors-")
    _add_metadata(writer, config, name, quant)
    token_source = _add_tokenizer(writer, tokenizer_dir, source_gguf, config.vocab_size, tokenizer_pre, tokenizer)
    for key, value in (provenance or {}).items():
        writer.add_string(f"saap.{key}", str(value))
    writer.add_string("saap.tokenizer", token_source)
    _add_sampling(writer, getattr(model, "generation_config", None))
    info = GGUFInfo(Path(path), arch, quant, embed_type=embed_type)
    _Tensors(writer, info, model, embed_type).add_model(config, quant, progress)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return info


def _add_metadata(writer: GGUFWriter, config, name: str, quant: str) -> None:
    """The architecture's keys: sizes (per layer for a heterogeneous `deci` model), rope, norms."""
    n = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(n)
    heads, kv_heads, ffn = zip(*(config.layer_sizes(i)[:3] for i in range(n)))
    if config.is_uniform:
        writer.add_feed_forward_length(ffn[0])
        writer.add_head_count(heads[0])
        writer.add_head_count_kv(kv_heads[0])
    else:
        writer.add_feed_forward_length(list(ffn))
        writer.add_head_count(list(heads))
        writer.add_head_count_kv(list(kv_heads))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.rope_theta))
    _add_rope_scaling(writer, config)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)


@dataclass
class _Tensors:
    """The tensors of a model added to a GGUFWriter one at a time, each recorded in `info` (its
    type, and what the read-back check needs to re-derive it)."""
    writer: GGUFWriter
    info: GGUFInfo
    model: Any
    embed_type: str

    def add(self, name: str, array: np.ndarray, raw: QT | None = None) -> None:
        if raw is None:
            self.writer.add_tensor(name, array)
        else:
            self.writer.add_tensor(name, array, raw_dtype=raw)
        self.info.tensor_types[name] = raw.name if raw is not None else {np.float32: "F32", np.float16: "F16"}[array.dtype.type]

    def embedding(self, name: str, module: torch.nn.Module) -> None:
        """The embedding or output matrix as --embed-type says."""
        n_rows, cols = module.weight.shape
        if self.embed_type == "q8_0":  # gguf's own Q8_0 quantizer: d = max|x| / 127 per block of 32 (f16), q = round(x / d)
            if cols % BLOCK:
                raise UserError(f"--embed-type q8_0 needs a hidden size divisible by {BLOCK}, not {cols}")
            streamed = streamed_weights(self.model)
            self.add(name, q8_0_blocks(lambda lo, hi: weight_rows(module, lo, hi, streamed).numpy(), n_rows), QT.Q8_0)
            self.info.q8_tensors[name] = (module, streamed)
            return
        w = float_weight(module).numpy()
        if self.embed_type == "q4_1":
            g = quantize_groups(torch.from_numpy(w), BLOCK)
            self.add(name, q4_1_blocks(g.codes.numpy(), g.scales.numpy(), g.offsets.numpy()), QT.Q4_1)
        else:
            self.add(name, w.astype(np.float16 if self.embed_type == "f16" else np.float32))

    def add_model(self, config, quant: str, progress: bool) -> None:
        inner = self.model.model
        self.embedding("token_embd.weight", inner.embed_tokens)
        self.add("output_norm.weight", float_weight(inner.norm).numpy())
        if not config.tie_word_embeddings:
            self.embedding("output.weight", self.model.lm_head)
        factors = llama3_rope_factors(config)
        if factors is not None:
            self.add("rope_freqs.weight", factors)
        for i, layer in enumerate(tqdm(inner.layers, desc="GGUF layers", unit="layer", disable=not progress)):
            self.add_layer(i, layer, config.layer_sizes(i), quant)

    def add_layer(self, i: int, layer, sizes, quant: str) -> None:
        heads, kv_heads = sizes[0], sizes[1]
        for hf, gg in LAYER_NAMES.items():
            if heads == 0 and gg in ATTENTION_TENSORS:
                continue  # an attention-free layer: llama.cpp's deci loader reads no attention tensor there
            module = layer.get_submodule(hf)
            tname = f"blk.{i}.{gg}.weight"
            if gg in NORMS:
                self.add(tname, float_weight(module).numpy())
                continue
            permute = heads if gg == "attn_q" else kv_heads if gg == "attn_k" else None
            name = f"model.layers.{i}.{hf}"
            array, raw, int4 = _projection(module, name, quant, permute)
            self.add(tname, array, raw)
            del array
            if int4:
                self.info.int4_tensors[tname] = partial(_q4_1_parts, module, name, permute)
            bias = _bias(module)
            if bias is not None:  # attention_bias / mlp_bias models: F32, Q / K entries in llama.cpp's RoPE order
                self.add(f"blk.{i}.{gg}.bias", permute_rows(bias, permute) if permute else bias)


# ---------------------------------------------------------------------- reader


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
