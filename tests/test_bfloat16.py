"""The GPU path's numerics, run on the CPU: compress + kd recovery (norms and offsets trained) +
export in bfloat16, with the teacher pass, float32 masters and placement checked."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import DATA_DIR, save_tiny32


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, tiny_tokenizer):
    """One bfloat16 compress with kd recovery training offsets and norms, stage calls spied on."""
    import saap_edge.compress as compress_mod
    import saap_edge.recover as recover_pkg
    import saap_edge.recover.stage as recover_mod
    from saap_edge.cli import main

    root = tmp_path_factory.mktemp("bf16")
    model = save_tiny32(root / "dense", tiny_tokenizer)
    seen: dict[str, list] = {"train": [], "placement": []}
    real_train, real_recover, real_pass = recover_mod.train, compress_mod.recover_model, recover_pkg.teacher_pass

    def devices(m) -> set[str]:
        return {str(p.device) for p in m.parameters()} | {str(b.device) for b in m.buffers()}

    def spy_train(model, data, s, *args, teacher=None, **kwargs):
        trained = [p for p in model.parameters() if p.requires_grad]
        seen["train"].append({"student": devices(model), "teacher_device": str(teacher.device),
                              "teacher_in_memory": teacher.model is not None,
                              "masters": {p.dtype for p in trained}, "model_dtype": next(model.parameters()).dtype})
        return real_train(model, data, s, *args, teacher=teacher, **kwargs)

    def spy_recover(model, *args, **kwargs):
        before = devices(model)
        out = real_recover(model, *args, **kwargs)
        seen["placement"].append(("recover_model", before, devices(out.model)))
        return out

    def spy_pass(teacher, *args, **kwargs):
        before = devices(teacher)
        key = real_pass(teacher, *args, **kwargs)
        seen["placement"].append(("teacher_pass", before, devices(teacher)))
        return key

    mp = pytest.MonkeyPatch()
    mp.setattr(recover_mod, "train", spy_train)
    mp.setattr(compress_mod, "recover_model", spy_recover)
    mp.setattr(recover_pkg, "teacher_pass", spy_pass)
    out = root / "out"
    try:
        rc = main(["compress", "--model", str(model), "--out", str(out), "--data-dir", str(DATA_DIR), "--dtype", "bfloat16",
                   "--device", "cpu", "--ratio", "0.25", "--keep-first", "1", "--calib-samples", "4", "--recon-samples", "8",
                   "--recover-steps", "3", "--batch-size", "2", "--recover-seq-len", "32",
                   "--train", "offsets,norms", "--group-lr", "0.05", "--eval-ppl", "none",
                   "--teacher-cache", str(root / "cache"), "--no-progress"])
    finally:
        mp.undo()
    assert rc == 0
    return {"root": root, "dense": model, "out": out, "seen": seen}


def test_the_teacher_pass_runs_alone_and_the_student_trains_alone(bf16_run):
    report = json.loads((bf16_run["out"] / "report.json").read_text())
    teacher = report["recovery"]["teacher"]
    assert teacher["pass"].startswith("before training") and teacher["cache_chunks_written"] >= 1
    assert teacher["positions"] == 3 * 2  # steps x micro-batch: only what the run reads is computed
    (call,) = bf16_run["seen"]["train"]
    assert not call["teacher_in_memory"]  # targets come from the cache the pass filled
    assert call["student"] == {call["teacher_device"]}  # at train(), both on one device
    for stage in ("estimation", "slice + reconstruct", "teacher pass", "recovery"):
        assert report["memory_measured"][stage]["host_peak_mib"] > 0


def test_every_trained_tensor_has_a_float32_master_in_a_bfloat16_model(bf16_run):
    (call,) = bf16_run["seen"]["train"]
    assert call["model_dtype"] == torch.bfloat16 and call["masters"] == {torch.float32}


def test_no_stage_leaves_a_model_on_another_device_than_it_found_it(bf16_run):
    for stage, before, after in bf16_run["seen"]["placement"]:
        assert before == after, stage
    assert {s for s, *_ in bf16_run["seen"]["placement"]} == {"recover_model", "teacher_pass"}


def test_trained_norms_changed_and_the_int4_export_is_bit_exact(bf16_run):
    from exporters import ExportJob, export
    from exporters.gguf import q4_1_parts
    from saap_edge.models.int4_linear import unpack_nibbles

    dense = load_file(bf16_run["dense"] / "model.safetensors")
    out = load_file(bf16_run["out"] / "model.safetensors")
    norm = "model.layers.0.post_attention_layernorm.weight"
    assert out[norm].dtype == torch.bfloat16 and not torch.equal(out[norm], dense[norm].to(torch.bfloat16))
    result = export(ExportJob(str(bf16_run["out"]), "gguf", out=bf16_run["root"] / "m.gguf"))
    v = result.info["validation"]
    assert v["weights_exact"] and v["weights_max_abs_diff"] == 0.0
    # the codes in the file are the trained checkpoint's, byte for byte
    from gguf import GGUFReader

    t = next(t for t in GGUFReader(str(result.path)).tensors if t.name == "blk.0.ffn_down.weight")
    codes, _, _ = q4_1_parts(t.data)
    assert (codes == unpack_nibbles(out["model.layers.0.mlp.down_proj.qweight"]).numpy()).all()
