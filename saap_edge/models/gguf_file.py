"""GGUF files of LLaMA decoders, the side models/ needs: the tensor layout (names, Q4_1 blocks,
llama.cpp's RoPE row order) and the reader, a `llama` or `deci` GGUF (F32 / F16 / Q4_1 tensors)
back into SlimLlamaForCausalLM (transformers reads neither `deci` nor some llama2.c-converted
files such as stories260K). The writer (exporters/gguf.py) shares the layout from here, so
loading a GGUF never imports an exporter.
"""

from __future__ import annotations

import logging
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
    from transformers.modeling_utils import no_init_weights

    with no_init_weights():
        model = SlimLlamaForCausalLM(config)
    _load_tensors(model, config, tensors, path)
    apply_rope_scaling(model, path)
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


# ---------------------------------------------------------------------- rope scaling


def llama3_factors(head_dim: int, base: float, factor: float, low: float, high: float, old: float) -> np.ndarray:
    """LLaMA-3.1-style rope scaling as per-frequency divisors (llama.cpp's `rope_freqs.weight`):
    1 for short wavelengths, `factor` for long ones, a smooth blend between (transformers' rule)."""
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * np.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    blend = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, blend))


def fit_llama3(factors: np.ndarray, head_dim: int, base: float) -> dict | None:
    """The llama3 rope_scaling that gives `factors` (a GGUF's rope_freqs), or None when none does.

    The divisors fix the factor (their largest) and, through the blended entries, the line
    s = (old / wavelen - low) / (high - low); (old, low, high) scaled together give the same
    divisors, so low is taken as 1. Candidates: LLaMA-3.1's boundaries (high 4, old 8192), the
    least-squares line through two or more blended entries, boundaries just below the first
    scaled wavelength; the first that reproduces the divisors (relative 1e-4) is returned."""
    f = np.asarray(factors, dtype=np.float64)
    factor = float(f.max())
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if factor <= 1.0 or len(f) != len(freqs):
        return None
    wavelen = 2 * np.pi / freqs
    blended = (f > 1 + 1e-5) & (f < factor * (1 - 1e-5))
    candidates = [(4.0, 8192.0)]
    if blended.sum() >= 2:
        s = (1 / f[blended] - 1 / factor) / (1 - 1 / factor)
        slope, icept = np.polyfit(1 / wavelen[blended], s, 1)
        if icept < 0:
            high = 1 - 1 / icept
            candidates.append((high, slope * (high - 1)))
    if (f == factor).any():
        old = float(wavelen[f == factor].min()) * 0.999
        if blended.sum() == 1:  # old between the blended wavelength and the first scaled one; high from the blend
            w0 = float(wavelen[blended][0])
            s_one = (1 / float(f[blended][0]) - 1 / factor) / (1 - 1 / factor)
            for o in (w0 * 1.001, (w0 * old) ** 0.5, old):
                candidates.append((1 + (o / w0 - 1) / s_one, o))
        elif not blended.any() and (f == 1.0).any():
            candidates.append((old / (float(wavelen[f == 1.0].max()) * 1.001), old))
    for high, old in candidates:
        old = round(old) if abs(old - round(old)) < 1e-6 * old else old
        if high > 1 and np.allclose(llama3_factors(head_dim, base, factor, 1.0, high, old), f, rtol=1e-4, atol=0):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": float(high),
                    "original_max_position_embeddings": old}
    return None


def rope_scaling_of(index, arch: str, head_dim: int, base: float, path: Path) -> dict | None:
    """The rope_scaling a GGUF's metadata and rope_freqs describe, as transformers spells it (None:
    plain RoPE); UserError for a kind it cannot express. `index`: a saap_edge.models.gguf_index.GGUFIndex."""
    kind = index.get(f"{arch}.rope.scaling.type", "none")
    factor = index.get(f"{arch}.rope.scaling.factor")
    if "rope_freqs.weight" in index.tensors:
        freqs = np.asarray(index.tensors["rope_freqs.weight"].data, dtype=np.float64).reshape(-1)
        scaling = fit_llama3(freqs, head_dim, base)
        if scaling is None and not np.allclose(freqs, 1.0):
            raise UserError(f"{path}: its rope_freqs are not LLaMA-3.1-style rope scaling for head size {head_dim}; "
                            "load the model's HF directory instead")
        return scaling
    if kind in ("none", None) or not factor or factor == 1.0:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        orig = index.get(f"{arch}.rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": int(orig or 0) or None,
                "beta_fast": float(index.get(f"{arch}.rope.scaling.yarn_beta_fast", 32.0)),
                "beta_slow": float(index.get(f"{arch}.rope.scaling.yarn_beta_slow", 1.0))}
    raise UserError(f"{path}: rope scaling {kind!r} is not one saap-edge reads (linear, yarn, llama3 rope_freqs); "
                    "load the model's HF directory instead")


def apply_rope_scaling(model, path: Path) -> dict | None:
    """Give a model loaded from the GGUF at `path` the file's rope scaling (transformers' GGUF
    reader ignores rope_freqs and rope.scaling.*, so its model runs plain RoPE): the config's
    rope_scaling set and the rotary embedding rebuilt from it. Returns the scaling applied."""
    from saap_edge.models.gguf_index import GGUFIndex

    config = model.config
    index = GGUFIndex(path)
    arch = index.get("general.architecture", "llama")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    scaling = rope_scaling_of(index, arch, head_dim, float(config.rope_theta), path)
    if scaling is None or (getattr(config, "rope_scaling", None) or {}).get("rope_type") == scaling["rope_type"]:
        return None
    config.rope_scaling = scaling
    rotary = model.model.rotary_emb
    device = rotary.inv_freq.device
    model.model.rotary_emb = type(rotary)(config=config, device=device)
    logging.getLogger(__name__).warning("%s: rope scaling %s read from the file (transformers' GGUF reader drops it)",
                                        path.name, scaling["rope_type"])
    return scaling
