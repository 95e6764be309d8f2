"""Recovery by distillation and by training the int4 groups themselves.

KD loss against reference computations, the teacher's top-k cache (same loss as on the fly,
keyed, bounded, damage-tolerant), offset / scale / norm training that keeps the codes,
resume with kd, and the teacher's bad-input messages.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import book_text, tiny_llama
from saap_edge.cli import main
from saap_edge.config import RecoverSettings
from saap_edge.errors import UserError
from saap_edge.models.int4_linear import Int4Linear
from saap_edge.quant.int4 import quantize_model
from saap_edge.recover import RecoverRun, as_slim, recover_model
from saap_edge.recover.adapters import attach, lora_config, merge
from saap_edge.recover.data import recovery_windows
from saap_edge.recover.distill import Teacher, kd_loss, teacher_targets
from saap_edge.recover.params import direct_parameters, enable_direct, freeze
from saap_edge.recover.train import latest_checkpoint, train, window_indices


def logits(seed: int, shape=(2, 5, 40), scale: float = 3.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


# ------------------------------------------------------------------ the loss


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_vocabulary_kd_equals_torch_kl_div(temperature):
    s, t = logits(0), logits(1)
    ref = F.kl_div(torch.log_softmax(s / temperature, -1).reshape(-1, 40), torch.log_softmax(t / temperature, -1).reshape(-1, 40),
                   log_target=True, reduction="batchmean") * temperature**2
    got = kd_loss(s, teacher_targets(t, temperature, 0), temperature)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6), (got, ref)


def test_topk_kd_is_the_kl_of_the_grouped_distributions():
    """k tokens + one tail bucket, computed explicitly per position; k = V is the full KL."""
    s, t, k, temp = logits(2), logits(3), 6, 1.5
    p, q = torch.softmax(t / temp, -1), torch.softmax(s / temp, -1)
    ids = p.topk(k, -1).indices
    pk, qk = p.gather(-1, ids), q.gather(-1, ids)
    pg = torch.cat([pk, 1 - pk.sum(-1, keepdim=True)], -1)
    qg = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    ref = (pg * (pg.log() - qg.log())).sum(-1).mean() * temp**2
    got = kd_loss(s, teacher_targets(t, temp, k), temp)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6), (got, ref)
    full = kd_loss(s, teacher_targets(t, temp, 0), temp)
    assert torch.allclose(kd_loss(s, teacher_targets(t, temp, 39), temp), full, rtol=1e-4, atol=1e-5)
    assert got <= full + 1e-6  # grouping never increases a KL (data processing inequality)


@pytest.mark.parametrize("topk", [0, 8])
def test_student_equal_to_teacher_gives_zero_loss_and_zero_gradient(topk):
    t = logits(4)
    s = t.clone().requires_grad_(True)
    loss = kd_loss(s, teacher_targets(t, 2.0, topk), 2.0)
    loss.backward()
    assert abs(loss.item()) < 1e-6 and s.grad.abs().max() < 1e-6


# ------------------------------------------------------------------ teacher targets and their cache


def int4_model(seed: int = 0):
    model = as_slim(tiny_llama(n_heads=4, n_kv=2, hidden=128, ffn=256, layers=3, seed=seed))
    quantize_model(model, None)
    return model.eval()


def dense_model(seed: int = 0):
    return tiny_llama(n_heads=4, n_kv=2, hidden=128, ffn=256, layers=3, seed=seed).eval()


@pytest.fixture(scope="module")
def data(tiny_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("kd") / "text.txt"
    path.write_text(book_text(40_000))
    return recovery_windows(tiny_tokenizer, str(path), 32, 4, 0, None)


def make_teacher(model, data, cache=None, topk=16, temperature=1.0, mib=4096):
    n = len(data.train)
    return Teacher(model, data.train, lambda start, count: window_indices(start, count, 0, n), temperature, topk,
                   {"data_sha256": data.sha256, "heldout": 4, "seed": 0}, cache, mib, batch_size=4)


def test_cached_targets_equal_on_the_fly_and_are_reused(data, tmp_path):
    student = int4_model(seed=1)
    out = student(input_ids=data.train[window_indices(254, 5, 0, len(data.train))]).logits
    live = make_teacher(dense_model(), data).targets(254, 5)  # spans two cache chunks (256 positions each)
    first = make_teacher(dense_model(), data, cache=tmp_path)
    cached = first.targets(254, 5)
    assert first.computed == 2 and first.hits == 0
    again = make_teacher(dense_model(), data, cache=tmp_path)
    reread = again.targets(254, 5)
    assert again.computed == 0 and again.hits == 2
    for t in (cached, reread):
        assert torch.equal(t.ids, live.ids) and torch.allclose(t.logp, live.logp, atol=1e-6)
        # stated tolerance: the same loss to 1e-6 (batched teacher passes differ only in float rounding)
        assert abs(kd_loss(out, t, 1.0).item() - kd_loss(out, live, 1.0).item()) < 1e-6


def test_cache_is_keyed_by_teacher_and_settings_and_bounded(data, tmp_path):
    a = make_teacher(dense_model(0), data, cache=tmp_path)
    a.targets(0, 4)
    b = make_teacher(dense_model(1), data, cache=tmp_path)  # other weights: another key, recomputed
    c = make_teacher(dense_model(0), data, cache=tmp_path, temperature=2.0)
    assert len({a.cache, b.cache, c.cache}) == 3
    b.targets(0, 4)
    assert b.computed == 1 and b.hits == 0
    # one chunk of 256 x 32 x 16 x 8 bytes = 1 MiB; under a 2 MiB bound the new chunk evicts
    # both older chunks (least recently used first; c holds none)
    d = make_teacher(dense_model(2), data, cache=tmp_path, mib=2)
    d.targets(0, 4)
    assert len(list(d.cache.glob("positions-*"))) == 1 and not a.cache.exists() and not b.cache.exists()
    assert sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file()) <= 2 * 2**20
    # a key that alone would pass the bound computes its targets without storing them
    e = make_teacher(dense_model(2), data, cache=tmp_path / "small", mib=1)
    assert torch.equal(e.targets(0, 4).ids, d.targets(0, 4).ids) and not list(e.cache.glob("positions-*"))


def test_a_damaged_cache_chunk_is_recomputed(data, tmp_path):
    t = make_teacher(dense_model(), data, cache=tmp_path)
    good = t.targets(0, 4)
    chunk = next(t.cache.glob("positions-*.safetensors"))
    chunk.write_bytes(chunk.read_bytes()[:1000])
    again = make_teacher(dense_model(), data, cache=tmp_path)
    assert torch.equal(again.targets(0, 4).ids, good.ids) and again.computed == 1


# ------------------------------------------------------------------ training the int4 groups


def three_lm_steps(model, batch, lr: float) -> torch.Tensor:
    """Three AdamW steps on every trainable parameter; the logits after them."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(3):
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        return model(input_ids=batch).logits


def test_offset_and_scale_training_keeps_codes_and_freezes_exactly(data):
    model = int4_model()
    before = {n: (m.qweight.clone(), m.scales.clone(), m.offsets.clone()) for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    model.requires_grad_(False)
    n = enable_direct(model, ("offsets",))
    assert n == sum(o.numel() for _, _, o in before.values())
    batch = data.train[:2]
    trained = three_lm_steps(model, batch, lr=1e-2)
    freeze(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch).logits, trained)  # frozen fp16 buffers compute what training did
    for name, m in model.named_modules():
        if isinstance(m, Int4Linear):
            q, a, b = before[name]
            assert torch.equal(m.qweight, q) and torch.equal(m.scales, a)  # codes and untrained scales bit-identical
            assert m.offsets.dtype == torch.float16 and not torch.equal(m.offsets, b)
            assert "offsets" in m._buffers and not list(m.parameters())


def test_scales_norms_and_lora_together_merge_exactly(data):
    model = int4_model()
    codes = {n: m.qweight.clone() for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    norm = model.model.layers[1].input_layernorm.weight.detach().clone()
    peft_model = attach(model.requires_grad_(False), lora_config("qalora", 4, 8, 0.0, 128))
    enable_direct(peft_model, ("lora", "offsets", "scales", "norms"))
    names = set(direct_parameters(peft_model))
    assert any(n.endswith("scales") for n in names) and any(n.endswith("input_layernorm.weight") for n in names)
    batch = data.train[:2]
    trained = three_lm_steps(peft_model, batch, lr=1e-3)
    freeze(peft_model)
    merged = merge(peft_model)
    with torch.no_grad():
        out = merged(input_ids=batch).logits
    # the LoRA merge rounds offsets to fp16 once more: the bound of test_merged_int4_equals_the_adapter_model
    assert (out - trained).abs().max() <= 5e-3 * trained.abs().max(), ((out - trained).abs().max(), trained.abs().max())
    for n, m in merged.named_modules():
        if isinstance(m, Int4Linear):
            assert torch.equal(m.qweight, codes[n]) and m.scales.dtype == torch.float16
    assert not torch.equal(merged.model.layers[1].input_layernorm.weight, norm)


def _kd_train(data, tmp_path, steps, ckpt=None, resume=False, stop_after=None, cache=None):
    model = int4_model().requires_grad_(False)
    s = RecoverSettings(steps=steps, lr=3e-3, batch_size=4, seq_len=32, heldout=4, loss="kd+lm", kd_topk=16,
                        train="offsets,scales,norms").validate()
    enable_direct(model, s.trained)
    teacher = make_teacher(dense_model(), data, cache=cache)
    result = train(model, data, s, ckpt, 2 if ckpt else 0, resume, False, stop_after, teacher=teacher)
    return model, result


def test_kd_resume_equals_an_uninterrupted_run(data, tmp_path):
    full, full_result = _kd_train(data, tmp_path, 6)
    ckpt = tmp_path / "ckpt"
    _, first = _kd_train(data, tmp_path, 6, ckpt=ckpt, stop_after=4, cache=tmp_path / "cache")
    assert latest_checkpoint(ckpt).name == "step-000004" and (latest_checkpoint(ckpt) / "params.safetensors").exists()
    resumed, result = _kd_train(data, tmp_path, 6, ckpt=ckpt, resume=True, cache=tmp_path / "cache")
    assert result.resumed_from == 4 and result.losses == full_result.losses
    a, b = direct_parameters(full), direct_parameters(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_kd_training_moves_the_student_toward_the_teacher(data):
    model, result = _kd_train(data, None, 12)
    assert sum(result.losses[-3:]) < sum(result.losses[:3])


def test_recover_model_kd_without_teacher_is_refused(tiny_tokenizer, tmp_path):
    (tmp_path / "t.txt").write_text(book_text(40_000))
    s = RecoverSettings(steps=1, loss="kd", seq_len=32, heldout=4, group_size=128, data=str(tmp_path / "t.txt"))
    model = as_slim(tiny_llama(n_heads=4, n_kv=2, hidden=128, ffn=256, layers=3))
    with pytest.raises(UserError, match="needs the dense teacher"):
        recover_model(model, tiny_tokenizer, s, RecoverRun(progress=False, teacher_cache=None))


@pytest.mark.parametrize("argv, needle", [
    (["--train", "offsets,weights"], "--train 'offsets,weights'"),
    (["--recovery", "lora", "--train", "scales"], "needs --recovery qalora"),
    (["--kd-weight", "0"], "--kd-weight 0.0 must be in (0, 1]"),
])
def test_bad_distillation_settings(argv, needle, tmp_path, capsys):
    rc = main(["recover", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err, err


def test_a_teacher_with_another_vocabulary_is_named(tiny_tokenizer, tmp_path, data_dir, capsys):
    dense_dir, teacher_dir, pruned = tmp_path / "dense", tmp_path / "teacher", tmp_path / "pruned"
    tiny_llama(n_heads=4, n_kv=2, hidden=128, ffn=256, layers=2).save_pretrained(dense_dir, safe_serialization=True)
    tiny_tokenizer.save_pretrained(dense_dir)
    tiny_llama(n_heads=4, n_kv=2, hidden=128, ffn=256, layers=2, vocab=600).save_pretrained(teacher_dir, safe_serialization=True)
    tiny_tokenizer.save_pretrained(teacher_dir)
    assert main(["compress", "--model", str(dense_dir), "--data-dir", str(data_dir), "--calib-samples", "4", "--ratio", "0.2",
                 "--keep-first", "0", "--keep-last", "0", "--no-recover", "--eval-ppl", "--out", str(pruned),
                 "--no-progress"]) == 0
    (tmp_path / "t.txt").write_text(book_text(40_000))
    out = tmp_path / "out"
    base = ["recover", str(pruned), "--out", str(out), "--recover-loss", "kd", "--data-dir", str(data_dir),
            "--recover-data", str(tmp_path / "t.txt"), "--recover-seq-len", "32", "--no-progress", "--teacher-cache", "off",
            "--eval-ppl"]
    shutil.move(dense_dir, tmp_path / "moved")  # the recorded source is gone
    assert main(base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "teacher" in err[0] and str(dense_dir) in err[0] and "--teacher PATH" in err[0], err
    (pruned / "report.json").unlink()
    assert main(base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "records no source model" in err[0] and "--teacher PATH" in err[0]
    assert main(base + ["--teacher", str(teacher_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vocabulary of 600 tokens, the student 512" in err[0] and "--teacher" in err[0]
    assert not out.exists() and not (tmp_path / "out.checkpoints").exists()


def test_compress_with_kd_records_teacher_and_trained_parts(tmp_path, tiny_tokenizer, data_dir, capsys):
    model_dir = tmp_path / "dense"
    tiny_llama(n_heads=4, n_kv=2, hidden=128, ffn=256, layers=4).save_pretrained(model_dir, safe_serialization=True)
    tiny_tokenizer.save_pretrained(model_dir)
    (tmp_path / "t.txt").write_text(book_text(40_000))
    out = tmp_path / "out"
    rc = main(["compress", "--model", str(model_dir), "--data-dir", str(data_dir), "--calib-samples", "8", "--ratio", "0.25",
               "--keep-first", "1", "--out", str(out), "--recover-data", str(tmp_path / "t.txt"), "--recover-steps", "2",
               "--recover-seq-len", "32", "--batch-size", "4", "--no-progress", "--recover-loss", "kd",
               "--train", "offsets,norms", "--teacher-cache", str(tmp_path / "cache"), "--heldout-every", "1"])
    assert rc == 0, capsys.readouterr().err
    rec = json.loads((out / "report.json").read_text())["recovery"]
    assert rec["trained"] == ["offsets", "norms"] and rec["settings"]["loss"] == "kd"
    assert rec["teacher"]["cache_chunks_written"] == 1
    assert [step for step, _ in rec["heldout_curve"]] == [1, 2]
    assert rec["heldout_curve"][-1][1] == pytest.approx(rec["heldout_ppl"]["adapter"], rel=1e-6)


def test_each_trained_part_gets_its_learning_rate():
    """LoRA at lr, offsets and norms at group_lr, scales at a tenth of group_lr; one schedule."""
    from saap_edge.recover.train import SCALE_LR_SHARE, param_groups

    model = int4_model().requires_grad_(False)
    peft_model = attach(model, lora_config("qalora", 4, 8, 0.0, 128))
    enable_direct(peft_model, ("lora", "offsets", "scales", "norms"))
    s = RecoverSettings(lr=2e-4, group_lr=1e-3)
    groups = param_groups(peft_model, s)
    rates = [g["lr_share"] * s.lr for g in groups]
    assert rates == pytest.approx([2e-4, 1e-3, 1e-3 * SCALE_LR_SHARE])
    names = {id(p): n for n, p in peft_model.named_parameters()}
    assert all("lora_" in names[id(p)] for p in groups[0]["params"])
    assert all(names[id(p)].endswith("scales") for p in groups[2]["params"])
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in peft_model.parameters() if p.requires_grad)
