"""GGUF files of LLaMA decoders, the side models/ needs: the tensor layout (names, Q4_1 blocks,
llama.cpp's RoPE row order) and the reader, a `llama` or `deci` GGUF (F32 / F16 / Q4_1 tensors)
back into SlimLlamaForCausalLM (transformers reads neither `deci` nor some llama2.c-converted
files such as stories260K). The writer (exporters/gguf.py) shares the layout from here, so
loading a GGUF never imports an exporter.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader

from saap_edge.errors import UserError
from saap_edge.models.int4_linear import Int4Linear
from saap_edge.models.slim import SlimLlamaConfig, SlimLlamaForCausalLM
from saap_edge.quant.int4 import quantization_section

BLOCK = 32  # Q4_1 weights per block
Q4_1_BYTES = 20  # fp16 d + fp16 m + 16 bytes of nibbles

# HF module of a decoder layer -> GGUF tensor name (blk.{i}.NAME.weight)
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
NORMS = {"attn_norm", "ffn_norm"}
ATTENTION_TENSORS = {"attn_q", "attn_k", "attn_v", "attn_output", "attn_norm"}


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half row order of Q or K -> llama.cpp's interleaved pairs, per head."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of permute_rows."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def q4_1_blocks(codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Pack int4 groups (codes uint8 [out, in]; fp16 scales / offsets [out, in / G]) as Q4_1
    bytes [out, in / 32 * 20]: per 32-block d = a, m = b of its group, nibbles j | j + 16."""
    out, n_in = codes.shape
    per_group = n_in // scales.shape[1] // BLOCK  # 32-blocks per group
    d = np.repeat(scales.astype(np.float16), per_group, axis=1)  # [out, in / 32]
    m = np.repeat(offsets.astype(np.float16), per_group, axis=1)
    q = codes.astype(np.uint8).reshape(out, n_in // BLOCK, BLOCK)
    nibbles = q[..., :16] | (q[..., 16:] << 4)
    blocks = np.concatenate([d[..., None].view(np.uint8), m[..., None].view(np.uint8), nibbles], axis=-1)
    return np.ascontiguousarray(blocks.reshape(out, n_in // BLOCK * Q4_1_BYTES))


def q4_1_parts(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of q4_1_blocks at 32-block granularity: (codes [out, in], d, m [out, in / 32])."""
    out = blocks.shape[0]
    b = blocks.reshape(out, -1, Q4_1_BYTES)
    d = b[..., 0:2].copy().view(np.float16)[..., 0]
    m = b[..., 2:4].copy().view(np.float16)[..., 0]
    nib = b[..., 4:]
    codes = np.concatenate([nib & 0x0F, nib >> 4], axis=-1).reshape(out, -1)
    return codes, d, m


# ---------------------------------------------------------------------- reader


def gguf_field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """The value of metadata key `key` (`default` when the file has none)."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _tensor(t) -> np.ndarray:
    """Float32 values of a GGUF tensor [rows, cols] (F32, F16 or any type gguf can decode)."""
    shape = tuple(reversed(t.shape.tolist()))
    if t.tensor_type in (QT.F32, QT.F16):
        return np.array(t.data, dtype=np.float32).reshape(shape)  # a copy: the file is memory-mapped read-only
    return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)


def read_gguf(path: str | os.PathLike) -> tuple[SlimLlamaForCausalLM, dict]:
    """Load a `llama` or `deci` GGUF into a SlimLlamaForCausalLM (float32) and its metadata.

    Q4_1 projections come back as Int4Linear with G = 32 and the file's exact d, m, codes.
    """
    path = Path(path)
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # truncated or not a GGUF at all
        raise UserError(f"cannot read {path} as GGUF: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
    arch = gguf_field(reader, "general.architecture")
    if arch not in ("llama", "deci"):
        raise UserError(f"{path}: GGUF architecture {arch!r} is not a LLaMA decoder (llama or deci)")
    tensors = {t.name: t for t in reader.tensors}
    config = _config_of(reader, arch, tensors)
    if "rope_freqs.weight" in tensors:
        raise UserError(f"{path}: rope_freqs (LLaMA-3.1 rope scaling) is not read back yet")
    from transformers.modeling_utils import no_init_weights

    with no_init_weights():
        model = SlimLlamaForCausalLM(config)
    _load_tensors(model, config, tensors, path)
    if any(isinstance(m, Int4Linear) for m in model.modules()):
        config.quantization = quantization_section(BLOCK)
    model.eval()
    meta = {key: gguf_field(reader, key) for key in reader.fields if key.startswith(("general.", "saap."))}
    meta["arch"] = arch
    return model, meta


def _config_of(reader: GGUFReader, arch: str, tensors: dict) -> SlimLlamaConfig:
    """The model's config from the GGUF's keys (per-layer lists for `deci`) and tensor shapes."""
    n = int(gguf_field(reader, f"{arch}.block_count"))

    def per_layer(key: str) -> list[int]:
        v = gguf_field(reader, f"{arch}.{key}")
        return [int(x) for x in v] if isinstance(v, list) else [int(v)] * n

    heads, kv_heads, ffn = per_layer("attention.head_count"), per_layer("attention.head_count_kv"), per_layer("feed_forward_length")
    hidden = int(gguf_field(reader, f"{arch}.embedding_length"))
    head_dim = int(gguf_field(reader, f"{arch}.attention.key_length", 0) or gguf_field(reader, f"{arch}.rope.dimension_count", 0)
                   or hidden // max(heads))
    vocab = tensors["token_embd.weight"].shape.tolist()[1]
    bos, eos = gguf_field(reader, "tokenizer.ggml.bos_token_id"), gguf_field(reader, "tokenizer.ggml.eos_token_id")
    pad = gguf_field(reader, "tokenizer.ggml.padding_token_id")
    return SlimLlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=n, num_attention_heads=max(heads),
        num_key_value_heads=max(kv_heads), intermediate_size=max(ffn), head_dim=head_dim,
        num_attention_heads_per_layer=heads, num_key_value_heads_per_layer=kv_heads, intermediate_size_per_layer=ffn,
        max_position_embeddings=int(gguf_field(reader, f"{arch}.context_length", 2048)),
        rms_norm_eps=float(gguf_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(gguf_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=int(bos) if bos is not None else None, eos_token_id=int(eos) if eos is not None else None,
        pad_token_id=int(pad) if pad is not None and int(pad) < vocab else None,
    )


def _load_tensors(model: SlimLlamaForCausalLM, config: SlimLlamaConfig, tensors: dict, path: Path) -> None:
    """The file's tensors into `model`: float tensors un-permuted (llama.cpp's q / k row order)
    into the state dict, Q4_1 projections as Int4Linear with the file's exact codes, d and m."""
    tie = config.tie_word_embeddings
    state: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.from_numpy(_tensor(tensors["token_embd.weight"])),
        "model.norm.weight": torch.from_numpy(_tensor(tensors["output_norm.weight"])),
    }
    if not tie:
        state["lm_head.weight"] = torch.from_numpy(_tensor(tensors["output.weight"]))
    for i in range(config.num_hidden_layers):
        layer = model.model.layers[i]
        heads, kv_heads = config.layer_sizes(i)[:2]
        for hf, gg in LAYER_NAMES.items():
            if heads == 0 and gg in ATTENTION_TENSORS:
                continue
            t = tensors.get(f"blk.{i}.{gg}.weight")
            if t is None:
                raise UserError(f"{path}: tensor blk.{i}.{gg}.weight is missing; the file is incomplete")
            permute = heads if gg == "attn_q" else kv_heads if gg == "attn_k" else None
            if t.tensor_type == QT.Q4_1 and gg not in NORMS:
                rows = t.shape.tolist()[1]
                codes, d, m = q4_1_parts(np.asarray(t.data, dtype=np.uint8).reshape(rows, -1))
                if permute:
                    codes, d, m = (unpermute_rows(x, permute) for x in (codes, d, m))
                parent, attr = hf.split(".")
                setattr(layer.get_submodule(parent), attr, Int4Linear.from_parts(
                    torch.from_numpy(codes.copy()), torch.from_numpy(d.copy()), torch.from_numpy(m.copy())))
                continue
            w = _tensor(t)
            if permute:
                w = unpermute_rows(w, permute)
            state[f"model.layers.{i}.{hf}.weight"] = torch.from_numpy(np.ascontiguousarray(w))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and tie)]
    if unexpected or any(not k.endswith(("qweight", "scales", "offsets")) for k in missing):
        raise UserError(f"{path}: tensors do not match the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if tie:
        model.tie_weights()
