"""Config variants of LLaMA checkpoints through GGUF: biases, rope scaling (linear, YaRN,
LLaMA-3.1's rope_freqs read back), the fast metadata index, and the inputs export refuses in
one line (exit 2, nothing written): layer 0 without heads, a tensor of the wrong shape, an
unknown rope scaling type."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import DATA_DIR, hetero_model, tiny_llama
from saap_edge.cli import main

llama_cpp = pytest.importorskip("llama_cpp")


def _save(path, tokenizer, seed: int = 0, **config):
    """A 2-layer LLaMA (hidden 128, 4 heads / 2 KV heads of 32) with `config` overrides, as an HF
    directory; weights scaled as conftest.hetero_model's, so logits spread (no near-ties for the
    top-1 check) and stay within the F32 bound."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{"vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
                         "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, **config})
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif p.dim() == 2:
                p.normal_(0, 0.08)
            else:
                p.uniform_(0.8, 1.2)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return model


def _export(src, out, capsys, *extra):
    """F32 GGUF export without the export's own logits check: the tests bound the difference
    themselves, relative to the logits' scale (the check's absolute 1e-3 is for trained models)."""
    rc = main(["export", str(src), "--format", "gguf", "--quant", "f32", "--embed-type", "f32", "--out", str(out),
               "--no-progress", "--no-validate", *extra])
    return rc, capsys.readouterr()


@pytest.mark.parametrize("config", [
    {"attention_bias": True, "mlp_bias": True},
    {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
], ids=["biases", "linear-rope", "yarn-rope"])
def test_config_variants_compute_the_same_logits_in_llama_cpp(config, tmp_path, tiny_tokenizer, capsys):
    """llama.cpp's logits equal torch's within 1e-5 of their scale only when the variant is written:
    biases dropped or rope scaling left out move them by more than 1e-2 of it (checked below)."""
    src = tmp_path / "src"
    model = _save(src, tiny_tokenizer, **config)
    rc, captured = _export(src, tmp_path / "m.gguf", capsys)
    assert rc == 0, captured.err
    from exporters.validate import llama_cpp_logits, probe_tokens

    ids = probe_tokens(512, 1)
    got = llama_cpp_logits(tmp_path / "m.gguf", ids)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
        plain = _without_variant(model, config)(torch.tensor([ids])).logits[0].numpy()
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() < 1e-5 * scale
    assert np.abs(plain - ref).max() > 1e-2 * scale  # the variant matters on these tokens


def _without_variant(model, config):
    import copy

    from transformers import LlamaForCausalLM

    cfg = copy.deepcopy(model.config)
    if "rope_scaling" in config:
        cfg.rope_scaling = None
    else:
        cfg.attention_bias = cfg.mlp_bias = False
    plain = LlamaForCausalLM(cfg).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("bias")}, strict=False)
    return plain


LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("scaling", [LLAMA31, LLAMA31 | {"factor": 32.0}, LLAMA31 | {"high_freq_factor": 2.0,
                                                                                   "original_max_position_embeddings": 4096}])
def test_rope_freqs_are_fitted_back_to_the_scaling_that_wrote_them(scaling):
    from saap_edge.models.gguf_file import fit_llama3, llama3_factors

    for head_dim, base in ((64, 500000.0), (128, 500000.0), (16, 10000.0)):
        f = llama3_factors(head_dim, base, scaling["factor"], 1.0, scaling["high_freq_factor"],
                           scaling["original_max_position_embeddings"]).astype(np.float32)
        fitted = fit_llama3(f, head_dim, base)
        assert fitted is not None
        again = llama3_factors(head_dim, base, fitted["factor"], fitted["low_freq_factor"], fitted["high_freq_factor"],
                               fitted["original_max_position_embeddings"])
        assert np.allclose(again, f, rtol=1e-5)
    assert fit_llama3(np.array([1.0, 3.0, 1.0, 7.0]), 8, 10000.0) is None  # not a llama3 shape


def test_a_llama31_gguf_loads_with_its_rope_scaling(tmp_path, tiny_tokenizer, capsys):
    """transformers' GGUF reader drops rope_freqs; the model loaded from the file computes what the
    checkpoint computes (and not what plain RoPE computes)."""
    from saap_edge.models.gguf_file import read_gguf
    from saap_edge.models.load import load_model

    src = tmp_path / "src"
    model = _save(src, tiny_tokenizer, rope_scaling=LLAMA31, rope_theta=500000.0, max_position_embeddings=16384)
    rc, captured = _export(src, tmp_path / "m.gguf", capsys)
    assert rc == 0, captured.err
    ids = torch.tensor([[3 + (7 * i) % 500 for i in range(300)]])  # long enough for the scaled wavelengths to matter
    with torch.no_grad():
        ref = model(ids).logits
        plain = _without_variant(model, {"rope_scaling": None})(ids).logits
        assert (plain - ref).abs().max() > 1e-3
        for loaded in (load_model(str(tmp_path / "m.gguf"), "cpu", "float32").model, read_gguf(tmp_path / "m.gguf")[0]):
            assert loaded.config.rope_scaling["rope_type"] == "llama3"
            assert torch.allclose(loaded(ids).logits, ref, atol=1e-5)


def test_gguf_index_reads_what_gguf_py_reads():
    from gguf import GGUFReader

    from saap_edge.models.gguf_index import GGUFIndex

    path = DATA_DIR / "models" / "stories260K" / "stories260K.gguf"
    index, reader = GGUFIndex(path), GGUFReader(path)
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}  # gguf-py's header pseudo-fields
    assert set(index.fields) == set(fields)
    for key, f in fields.items():
        value = index.get(key)
        want = f.contents()
        assert (np.asarray(value).tolist() if isinstance(value, np.ndarray) else value) == want, key
    for t in reader.tensors:
        assert np.array_equal(np.asarray(index.tensors[t.name].data).reshape(-1), np.asarray(t.data).reshape(-1)), t.name
        assert index.tensors[t.name].tensor_type == t.tensor_type


def test_layer_0_without_heads_is_refused_in_one_line(tmp_path):
    from exporters.gguf import write_gguf
    from saap_edge.errors import UserError

    model = hetero_model(heads_and_modules=True)
    model.config.num_attention_heads_per_layer = [0, 4, 6]
    with pytest.raises(UserError, match="layer 0 keeps no attention heads"):
        write_gguf(model, tmp_path / "m.gguf", "f32")


@pytest.mark.parametrize("fmt", [["--format", "gguf"], ["--format", "onnx", "--onnx-graph", "dynamo"]],
                         ids=["streamed", "loaded"])
def test_a_tensor_of_the_wrong_shape_is_named(fmt, tmp_path, tiny_tokenizer, capsys):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    tiny_llama(layers=2).save_pretrained(src, safe_serialization=True)
    tiny_tokenizer.save_pretrained(src)
    state = load_file(src / "model.safetensors")
    state["model.layers.0.mlp.down_proj.weight"] = torch.zeros(65, 128)
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    rc = main(["export", str(src), *fmt, "--quant", "f32", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "down_proj" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_an_unknown_rope_scaling_is_refused(tmp_path, tiny_tokenizer, capsys):
    src = tmp_path / "src"
    _save(src, tiny_tokenizer, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    rc, captured = _export(src, tmp_path / "m.gguf", capsys)
    assert rc == 2 and "rope scaling 'dynamic'" in captured.err
    assert not (tmp_path / "m.gguf").exists()


def test_auto_dtype_keeps_a_16_bit_checkpoints_own_type_on_cuda(tmp_path, tiny_tokenizer):
    """`--dtype auto` on CUDA: an fp16 checkpoint is computed in fp16 (bfloat16 would round away
    three mantissa bits of every weight), a float32 one in bfloat16; float32 on the CPU."""
    from saap_edge.models.load import check_architecture, checkpoint_dtype, resolve_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    src = tmp_path / "fp16"
    tiny_llama(layers=1).to(torch.float16).save_pretrained(src, safe_serialization=True)
    config = check_architecture("hf", src)  # the config load_model reads once
    assert checkpoint_dtype(config) == torch.float16
    assert resolve_dtype("auto", cuda, checkpoint_dtype(config)) == torch.float16
    assert resolve_dtype("auto", cuda, torch.float32) == torch.bfloat16
    assert resolve_dtype("auto", cpu, torch.float16) == torch.float32
