"""Streamed checkpoints (saap_edge.models.stream): the model on the meta device, each module's
tensors read from the safetensors files as it runs, computes what the loaded model computes."""

import numpy as np
import pytest
import torch

from conftest import hetero_model, save_tiny32, tiny_llama


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_a_streamed_checkpoint_computes_the_loaded_models_logits_and_holds_no_weights(tmp_path, tiny_tokenizer):
    from saap_edge.models.load import load_model
    from saap_edge.models.stream import stream_model

    path = save_tiny32(tmp_path / "m", tiny_tokenizer)
    ids = list(range(3, 40))
    loaded = load_model(str(path), "cpu", "float32").model
    streamed = stream_model(path).model
    assert all(p.device.type == "meta" for p in streamed.parameters())
    assert torch.equal(_logits(streamed, ids), _logits(loaded, ids))
    assert all(p.device.type == "meta" for p in streamed.parameters())  # dropped again after the forward


def test_a_bf16_int4_checkpoint_streams_in_float32_with_its_groups_as_stored(tmp_path, tiny_tokenizer):
    from saap_edge.models.load import load_model
    from saap_edge.models.stream import stream_model
    from saap_edge.quant.int4 import quantize_model

    model = hetero_model()
    quantize_model(model, 32)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "q", safe_serialization=True)
    tiny_tokenizer.save_pretrained(tmp_path / "q")
    ids = list(range(3, 40))
    loaded = load_model(str(tmp_path / "q"), "cpu", "float32").model
    assert torch.equal(_logits(stream_model(tmp_path / "q").model, ids), _logits(loaded, ids))


def test_a_float_checkpoint_quantized_as_read_equals_quantize_model(tmp_path, tiny_tokenizer):
    from saap_edge.models.int4_linear import Int4Linear
    from saap_edge.models.stream import stream_model
    from saap_edge.quant.int4 import quantize_model

    path = save_tiny32(tmp_path / "m", tiny_tokenizer)
    ids = list(range(3, 40))
    streamed = stream_model(path, int4=True, group_size=32).model
    assert sum(isinstance(m, Int4Linear) for m in streamed.modules()) == 4 * 7
    reference = tiny_llama(n_heads=4, n_kv=2, hidden=128, ffn=256, layers=4)
    quantize_model(reference, 32)
    assert torch.equal(_logits(streamed, ids), _logits(reference, ids))
    assert streamed.config.quantization["group_size"] == 32


def test_a_checkpoint_missing_a_tensor_is_refused_in_one_line(tmp_path, tiny_tokenizer):
    from safetensors.torch import load_file, save_file

    from saap_edge.errors import UserError
    from saap_edge.models.stream import stream_model

    path = save_tiny32(tmp_path / "m", tiny_tokenizer)
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="lack 1 tensors.*model.layers.1.mlp.up_proj.weight"):
        stream_model(path)


def _tied_dir(path, tokenizer):
    """An HF directory of a tiny LLaMA with a tied output matrix (as SmolLM2), widths multiples of 32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("embed", ["q8_0", "f16"])
def test_the_streamed_gguf_export_writes_the_in_memory_writers_tensors(tmp_path, tiny_tokenizer, embed):
    """A float checkpoint with a tied head through `export` (streamed, quantized as read) holds
    the tensors the writer makes from the model loaded whole and quantized by quantize_model."""
    from gguf import GGUFReader

    from exporters import ExportJob, export, streams
    from exporters.gguf import write_gguf
    from saap_edge.models.load import load_model
    from saap_edge.quant.int4 import quantize_model
    from saap_edge.recover import as_slim

    src = _tied_dir(tmp_path / "m", tiny_tokenizer)
    job = ExportJob(model=str(src), format="gguf", embed_type=embed, out=tmp_path / "streamed.gguf")
    assert streams(job, src)
    result = export(job)
    assert result.info["validation"]["weights_exact"]
    whole = as_slim(load_model(str(src), "cpu", "float32").model)
    quantize_model(whole, 32)
    write_gguf(whole, tmp_path / "whole.gguf", "q4_1", embed, tokenizer_dir=src)
    a = {t.name: t for t in GGUFReader(tmp_path / "streamed.gguf").tensors}
    b = {t.name: t for t in GGUFReader(tmp_path / "whole.gguf").tensors}
    assert a.keys() == b.keys() and "output.weight" not in a
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type
        assert bytes(a[name].data) == bytes(b[name].data), name


def test_the_streamed_onnx_export_writes_the_in_memory_writers_initializers(tmp_path, tiny_tokenizer):
    import onnx
    from onnx import numpy_helper

    from exporters import ExportJob, export
    from exporters.onnx_fused import export_onnx_fused
    from saap_edge.models.load import load_model
    from saap_edge.quant.int4 import quantize_model
    from saap_edge.recover import as_slim

    src = _tied_dir(tmp_path / "m", tiny_tokenizer)
    result = export(ExportJob(model=str(src), format="onnx", out=tmp_path / "streamed"))
    assert result.info["validation"]["weights_checked"] == 3 * 7
    whole = as_slim(load_model(str(src), "cpu", "float32").model)
    quantize_model(whole, None)
    export_onnx_fused(whole, tmp_path / "whole", "int4", "int8", accuracy="int8-head")

    def inits(folder):
        proto = onnx.load(str(folder / "model.onnx"))
        return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}

    a, b = inits(tmp_path / "streamed"), inits(tmp_path / "whole")
    assert a.keys() == b.keys() and not any(n.startswith("lm_head") for n in a)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


def test_an_export_holds_one_modules_tensors_at_a_time(tmp_path, tiny_tokenizer, monkeypatch):
    """Every tensor the streamed export reads (writing and validating) finds the rest of the
    model unmaterialised: the host never holds more than the module being written or run."""
    from exporters import ExportJob, export
    from saap_edge.models import stream

    src = save_tiny32(tmp_path / "m", tiny_tokenizer)
    seen, models = [], []
    original = stream.stream_model

    def spying(*args, **kwargs):
        loaded = original(*args, **kwargs)
        models.append(loaded.model)
        return loaded

    read = stream.CheckpointTensors.__getitem__

    def spy(self, key):
        module = key.rpartition(".")[0]
        live = {n.rpartition(".")[0] for n, t in list(models[0].named_parameters()) + list(models[0].named_buffers())
                if t.device.type != "meta" and n in self}
        seen.append(live - {module})
        return read(self, key)

    monkeypatch.setattr(stream, "stream_model", spying)
    monkeypatch.setattr(stream.CheckpointTensors, "__getitem__", spy)
    for fmt in ("gguf", "onnx"):
        export(ExportJob(model=str(src), format=fmt, out=tmp_path / f"out-{fmt}"))
        assert len(seen) > 4 * 7 and not any(seen), [s for s in seen if s][:3]
        assert all(t.device.type == "meta" for t in models[-1].parameters())
        seen.clear()
        models.clear()


def test_a_tensor_widened_as_it_is_read_equals_the_stored_values_widened(tmp_path, monkeypatch):
    """read_tensor converts a bf16 tensor to float32 a chunk at a time (so both copies never sit
    in memory): every chunk boundary, the last partial chunk included, lands where it should."""
    from safetensors.torch import save_file

    from saap_edge.models import stream

    torch.manual_seed(0)
    w = torch.randn(37, 53).to(torch.bfloat16)
    save_file({"w": w}, tmp_path / "model.safetensors")
    monkeypatch.setattr(stream, "READ_CHUNK", 2 * 100)  # 100 bf16 values a chunk: 20 chunks, the last one partial
    entry = stream.safetensors_index(tmp_path)["w"]
    got = stream.read_tensor(entry, torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, w.float())
    assert torch.equal(stream.read_tensor(entry), w)
