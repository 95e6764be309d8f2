"""GGUF export: Q4_1 blocks decode bit-exactly to the int4 groups, llama.cpp runs the slim
(`deci`) and uniform (`llama`) files with torch's logits, the reader round-trips."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf.quants import dequantize

from conftest import DATA_DIR, hetero_model
from exporters.gguf import permute_rows, q4_1_blocks, q4_1_parts, read_gguf, unpermute_rows, write_gguf
from saap_edge.errors import UserError
from saap_edge.models.int4_linear import Int4Linear
from saap_edge.quant.int4 import quantize_groups, quantize_model

STORIES = DATA_DIR / "models" / "stories260K" / "stories260K.gguf"
# llama.cpp F32 weights and F32 KV cache against torch float32: measured ~1e-5 on these
# models (summation order differs); asserted bound:
F32_ATOL = 1e-4


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


def cpp_logits(llama_cpp, path, ids: list[int]) -> np.ndarray:
    """All-position logits from llama.cpp with an F32 KV cache (type 0 = GGML F32)."""
    llm = llama_cpp.Llama(str(path), logits_all=True, verbose=False, n_ctx=64, n_threads=2, type_k=0, type_v=0, seed=0)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    del llm
    gc.collect()
    return out


def torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


IDS = [1, 17, 250, 3, 99, 480, 64, 12, 301, 7]


def test_q4_1_blocks_pack_the_groups_exactly():
    torch.manual_seed(0)
    w = torch.randn(6, 256)
    for g in (32, 64, 128):
        grp = quantize_groups(w, g)
        blocks = q4_1_blocks(grp.codes.numpy(), grp.scales.numpy(), grp.offsets.numpy())
        assert blocks.shape == (6, 256 // 32 * 20)
        decoded = dequantize(blocks, QT.Q4_1).reshape(6, 256)  # gguf's own decoder
        assert np.array_equal(decoded, grp.dequantize().numpy()), g
        codes, d, m = q4_1_parts(blocks)
        assert np.array_equal(codes, grp.codes.numpy())
        assert np.array_equal(d, np.repeat(grp.scales.numpy(), g // 32, axis=1))


def test_rope_permutation_round_trips():
    w = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    p = permute_rows(w, 2)
    assert not np.array_equal(p, w) and np.array_equal(unpermute_rows(p, 2), w)


@pytest.mark.parametrize("heads_and_modules", [False, True])
def test_deci_q4_1_weights_equal_the_checkpoint_bit_for_bit(tmp_path, tiny_tokenizer, heads_and_modules):
    model = hetero_model(heads_and_modules=heads_and_modules)
    quantize_model(model, 32)
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    info = write_gguf(model, tmp_path / "m.gguf", "q4_1", "f32", tokenizer_dir=tmp_path / "tok")
    assert info.arch == "deci"
    reader = GGUFReader(tmp_path / "m.gguf")
    expect_heads = [4, 0, 6] if heads_and_modules else [4, 2, 4]
    assert [int(x) for x in reader.fields["deci.attention.head_count"].contents()] == expect_heads
    assert [int(x) for x in reader.fields["deci.feed_forward_length"].contents()] == [256, 96, 160]
    tensors = {t.name: t for t in reader.tensors}
    if heads_and_modules:  # the attention-free layer carries no attention tensor and no attention norm
        assert not [name for name in tensors if name.startswith("blk.1.attn")]
    for i, layer in enumerate(model.model.layers):
        config = model.config
        attention = [("self_attn.q_proj", "attn_q", config.num_attention_heads_per_layer[i]),
                     ("self_attn.k_proj", "attn_k", config.num_key_value_heads_per_layer[i])] if expect_heads[i] else []
        for hf, gg, heads in (*attention, ("mlp.down_proj", "ffn_down", None)):
            t = tensors[f"blk.{i}.{gg}.weight"]
            assert t.tensor_type == QT.Q4_1
            decoded = dequantize(np.asarray(t.data), QT.Q4_1).reshape(t.shape[1], t.shape[0])
            expect = layer.get_submodule(hf).dequantized().numpy()
            if heads:
                decoded = unpermute_rows(decoded, heads)
            assert np.array_equal(decoded, expect), (i, hf)
    # and the reader brings the same codes / scales / offsets back
    back, meta = read_gguf(tmp_path / "m.gguf")
    for a, b in zip(model.modules(), back.modules()):
        if isinstance(a, Int4Linear):
            assert isinstance(b, Int4Linear) and torch.equal(a.dequantized(), b.dequantized())


@pytest.mark.parametrize("uniform, heads_and_modules", [(False, False), (True, False), (False, True)])
def test_f32_gguf_logits_match_torch_in_llama_cpp(tmp_path, tiny_tokenizer, llama_cpp, uniform, heads_and_modules):
    model = hetero_model(uniform=uniform, heads_and_modules=heads_and_modules)
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    info = write_gguf(model, tmp_path / "m.gguf", "f32", "f32", tokenizer_dir=tmp_path / "tok")
    assert info.arch == ("llama" if uniform else "deci")
    ref = torch_logits(model, IDS)
    got = cpp_logits(llama_cpp, tmp_path / "m.gguf", IDS)
    assert np.abs(got - ref).max() < F32_ATOL, np.abs(got - ref).max()
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))


def test_stories260k_reader_reproduces_the_reference_story():
    model, meta = read_gguf(STORIES)
    tokens = GGUFReader(STORIES).fields["tokenizer.ggml.tokens"]
    vocab = [bytes(tokens.parts[i]).decode() for i in tokens.data]
    ids = [1]
    with torch.no_grad():
        for _ in range(40):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    text = "".join(vocab[i] for i in ids[1:]).replace("\u2581", " ").strip()
    reference = (DATA_DIR / "models" / "stories260K" / "stories260K.md").read_text()
    assert text.startswith("Once upon a time, there was a little girl named Lily.")
    assert text in reference.replace("\n", " ")


def test_stories260k_export_runs_in_llama_cpp_and_round_trips(tmp_path, llama_cpp):
    model, _ = read_gguf(STORIES)
    write_gguf(model, tmp_path / "s.gguf", "f32", "f32", source_gguf=STORIES)
    ids = [1, 400, 30, 200, 11]
    got = cpp_logits(llama_cpp, tmp_path / "s.gguf", ids)
    assert np.abs(got - torch_logits(model, ids)).max() < F32_ATOL
    # GGUF -> reader -> GGUF gives the same tensors
    again, _ = read_gguf(tmp_path / "s.gguf")
    write_gguf(again, tmp_path / "s2.gguf", "f32", "f32", source_gguf=STORIES)
    a = {t.name: np.asarray(t.data) for t in GGUFReader(tmp_path / "s.gguf").tensors}
    b = {t.name: np.asarray(t.data) for t in GGUFReader(tmp_path / "s2.gguf").tensors}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    original = {t.name: np.asarray(t.data) for t in GGUFReader(STORIES).tensors}
    assert all(np.array_equal(original[k], a[k]) for k in original)


def test_q4_1_refuses_widths_that_are_not_blocks():
    model, _ = read_gguf(STORIES)  # MLP width 172
    with pytest.raises(UserError, match="model.layers.0.mlp.down_proj: input dimension 172 is not a multiple of 32"):
        write_gguf(model, "/tmp/never.gguf", "q4_1", "f16", source_gguf=STORIES)


def test_reader_names_a_corrupt_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(STORIES.read_bytes()[:5000])
    with pytest.raises(UserError, match="cannot read .*bad.gguf as GGUF"):
        read_gguf(bad)


def test_q8_0_embeddings_decode_to_what_was_stored_and_run_in_llama_cpp(tmp_path, tiny_tokenizer, llama_cpp):
    """--embed-type q8_0: each block of 32 is q * d with d = max|x| / 127 (f16) and q = round(x / d);
    llama.cpp's logits follow torch's on the decoded matrices (F32 projections) within the error of
    its Q8_0 product, which rounds the activations to 8 bits too (measured: 2% of the logit scale)."""
    import copy

    from exporters.validate import check_gguf_weights

    model = hetero_model()
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    info = write_gguf(model, tmp_path / "m.gguf", "f32", "q8_0", tokenizer_dir=tmp_path / "tok")
    assert check_gguf_weights(info) == 2  # both matrices checked within Q8_0's step
    tensors = {t.name: t for t in GGUFReader(tmp_path / "m.gguf").tensors}
    decoded_model = copy.deepcopy(model)
    for name, weight, target in (("token_embd.weight", model.model.embed_tokens.weight, decoded_model.model.embed_tokens),
                                 ("output.weight", model.lm_head.weight, decoded_model.lm_head)):
        t = tensors[name]
        assert t.tensor_type == QT.Q8_0 and t.n_bytes == weight.numel() // 32 * 34  # 8.5 bits a weight
        w = weight.detach().numpy().reshape(weight.shape[0], -1, 32).astype(np.float32)
        d = (np.abs(w).max(-1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
        q = np.clip(np.sign(w) * np.floor(np.abs(w) / np.abs(w).max(-1, keepdims=True) * 127 + 0.5), -127, 127)
        decoded = dequantize(np.asarray(t.data), QT.Q8_0).reshape(weight.shape)
        assert np.array_equal(decoded, (q * d).reshape(weight.shape)), name
        with torch.no_grad():
            target.weight.copy_(torch.from_numpy(decoded))
    got = cpp_logits(llama_cpp, tmp_path / "m.gguf", IDS)
    ref = torch_logits(decoded_model, IDS)
    assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max(), (np.abs(got - ref).max(), np.abs(ref).max())
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
