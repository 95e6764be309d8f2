"""Distil the pruned fp model, then quantize (--recover-order distil-quantize), with GPTQ or
round-to-nearest, and a short offsets pass: int4 groups that export bit-exact, exact resume,
and the bad inputs named in one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import DATA_DIR, book_text, save_tiny32


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory, tiny_tokenizer):
    return save_tiny32(tmp_path_factory.mktemp("order") / "dense", tiny_tokenizer)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "recovery.txt"
    path.write_text(book_text(40_000))
    return path


def _argv(dense, out, text, cache, *extra) -> list[str]:
    return ["compress", "--model", str(dense), "--out", str(out), "--data-dir", str(DATA_DIR), "--device", "cpu",
            "--ratio", "0.25", "--keep-first", "1", "--calib-samples", "4", "--recon-samples", "8",
            "--recover-data", str(text), "--recover-steps", "3", "--batch-size", "2", "--recover-seq-len", "32",
            "--eval-ppl", "none", "--teacher-cache", str(cache), "--no-progress", *extra]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, dense_dir, text):
    from saap_edge.cli import main

    root = tmp_path_factory.mktemp("dq")
    out = root / "out"
    rc = main(_argv(dense_dir, out, text, root / "cache", "--recover-order", "distil-quantize", "--quantizer", "gptq",
                    "--quant-samples", "8", "--offset-steps", "2", "--lr", "1e-3"))
    assert rc == 0
    return {"root": root, "out": out, "report": json.loads((out / "report.json").read_text())}


def test_distil_quantize_trains_every_weight_then_ends_in_int4_groups(distilled, dense_dir):
    rec = distilled["report"]["recovery"]
    assert rec["settings"]["order"] == "distil-quantize" and rec["quantizer"] == "gptq"
    assert rec["trained"] == ["full", "offsets"] and rec["offsets_pass"]["steps"] == 2
    assert set(rec["heldout_ppl"]) >= {"before", "distilled", "quantized", "after"}
    assert rec["gptq"]["output_error"]["gptq_mean"] < rec["gptq"]["output_error"]["rtn_mean"]
    out = load_file(distilled["out"] / "model.safetensors")
    dense = load_file(dense_dir / "model.safetensors")
    # the embedding is no projection and is not pruned: only full training changes it
    assert not torch.equal(out["model.embed_tokens.weight"], dense["model.embed_tokens.weight"])
    assert "model.layers.1.mlp.down_proj.qweight" in out and "model.layers.1.mlp.down_proj.weight" not in out
    planned = list(distilled["report"]["memory_estimate"])  # the plan follows the order: train fp, quantize, offsets
    assert planned[-3:] == ["recovery", "quantize", "offsets pass"]


def test_distil_quantize_exports_its_int4_groups_bit_exact(distilled):
    from exporters import ExportJob, export
    from exporters.gguf import q4_1_parts
    from gguf import GGUFReader

    from saap_edge.models.int4_linear import unpack_nibbles

    result = export(ExportJob(str(distilled["out"]), "gguf", out=distilled["root"] / "m.gguf"))
    v = result.info["validation"]
    assert v["weights_exact"] and v["weights_max_abs_diff"] == 0.0
    out = load_file(distilled["out"] / "model.safetensors")
    t = next(t for t in GGUFReader(str(result.path)).tensors if t.name == "blk.1.ffn_down.weight")
    codes, _, _ = q4_1_parts(t.data)
    assert (codes == unpack_nibbles(out["model.layers.1.mlp.down_proj.qweight"]).numpy()).all()


def _recover(model, tokenizer, s, **run):
    from saap_edge.recover import RecoverRun, recover_model

    return recover_model(model, tokenizer, s, RecoverRun(progress=False, teacher_cache=None, **run)).model


def _int4_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_after_a_kill_is_bit_exact_in_distil_quantize(tiny_tokenizer, tmp_path, monkeypatch):
    """Killed after step 2 of 4 of the fp distillation; --resume ends in the same int4 model."""
    import importlib

    from saap_edge.config import RecoverSettings
    from saap_edge.recover import as_slim
    from tests.conftest import tiny_llama

    (tmp_path / "t.txt").write_text(book_text(40_000))
    s = RecoverSettings(data=str(tmp_path / "t.txt"), steps=4, batch_size=2, seq_len=32, loss="lm", order="distil-quantize",
                        quantizer="gptq", quant_samples=4, offset_steps=2, lr=1e-3)

    def student():
        return as_slim(tiny_llama(n_heads=4, n_kv=2, hidden=128, ffn=256, layers=2, seed=5))

    train_mod = importlib.import_module("saap_edge.recover.train")  # (the package's `train` is the function)
    whole = _int4_state(_recover(student(), tiny_tokenizer, s, ckpt_dir=tmp_path / "a", save_every=1))
    real_save = train_mod.save_checkpoint

    def killed_after_two(ckpt_dir, model, optimizer, step, meta, **kw):
        path = real_save(ckpt_dir, model, optimizer, step, meta, **kw)
        if step == 2 and ckpt_dir.name != "offsets":
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(train_mod, "save_checkpoint", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        _recover(student(), tiny_tokenizer, s, ckpt_dir=tmp_path / "b", save_every=1)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    resumed = _int4_state(_recover(student(), tiny_tokenizer, s, ckpt_dir=tmp_path / "b", save_every=1, resume=True))
    assert set(resumed) == set(whole) and any(k.endswith("qweight") for k in whole)
    for k in whole:
        assert torch.equal(resumed[k], whole[k]), k


def test_a_resume_in_another_order_is_refused_in_one_line(dense_dir, text, tmp_path, capsys):
    from saap_edge.cli import main

    out = tmp_path / "out"
    args = _argv(dense_dir, out, text, tmp_path / "cache", "--recover-loss", "lm", "--save-every", "1",
                 "--keep-checkpoints")
    assert main(args) == 0
    import shutil

    shutil.rmtree(out)
    capsys.readouterr()
    rc = main(args + ["--resume", "--recover-order", "distil-quantize"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and "order: checkpoint 'quantize-distil', now 'distil-quantize'" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("extra, needle", [
    (["--quantizer", "gptq", "--quant-samples", "0"], "--quant-samples"),
    (["--offset-steps", "3"], "--offset-steps is the offsets pass after distil-quantize"),
    (["--train", "full"], "--train full trains every fp weight; it needs --recover-order distil-quantize"),
    (["--recover-order", "distil-quantize", "--train", "offsets"], "--train takes full, lora or norms there"),
    (["--recover-order", "distil-quantize", "--recovery", "lora"], "it needs --recovery qalora"),
])
def test_bad_order_settings_exit_2_naming_the_fix(dense_dir, text, tmp_path, capsys, extra, needle):
    from saap_edge.cli import main

    out = tmp_path / "out"
    rc = main(_argv(dense_dir, out, text, tmp_path / "cache", *extra))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_full_training_plans_sixteen_bytes_a_weight():
    from transformers import LlamaConfig

    from saap_edge.config import RecoverSettings
    from saap_edge.memory import Shape, recovery_stages

    shape = Shape.of(LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=8,
                                 num_hidden_layers=2, vocab_size=1000))
    s = RecoverSettings(order="distil-quantize", quantizer="gptq", offset_steps=5).validate().resolved("cpu")
    stages = {st.stage: st for st in recovery_stages(shape, None, 4, 0.0, s, "cpu", 4096)}
    assert list(stages) == ["teacher pass", "recovery", "quantize", "offsets pass"]
    rec = stages["recovery"].card
    assert rec["student weights (float32 masters)"] == shape.params() * 4
    assert rec["gradients and AdamW (float32)"] == 3 * shape.params() * 4
    assert "input second moment and its inverse (float64)" in stages["quantize"].card
