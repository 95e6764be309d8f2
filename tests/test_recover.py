"""Recovery: int4 checkpoints, QA-LoRA adapters (peft), merge, trainer, resume, CLI.

Tiny models here have head_dim 32 (hidden 128, 4 heads, 2 KV heads, MLP 256) so every
projection input is a multiple of the int4 group size.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import book_text, tiny_llama
from saap_edge.cli import main
from saap_edge.config import RecoverSettings
from saap_edge.errors import UserError
from saap_edge.eval.ppl import window_perplexity
from saap_edge.models.int4_linear import Int4Linear, dequantize
from saap_edge.quant.int4 import quantize_groups, quantize_model
from saap_edge.recover import RecoverRun, as_slim, recover_model
from saap_edge.recover.adapters import attach, load_adapters, lora_config, merge, trainable_parameters
from saap_edge.recover.data import alpaca_text, recovery_documents, recovery_windows
from saap_edge.recover.train import latest_checkpoint, train

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def int4_model(seed: int = 0, group_size: int | None = None):
    model = as_slim(tiny_llama(n_heads=4, n_kv=2, hidden=128, ffn=256, layers=3, seed=seed))
    quantize_model(model, group_size)
    return model.eval()


def tokens(batch: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(peft_model, seed: int = 1, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def int4_layers(model) -> dict[str, Int4Linear]:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, Int4Linear)}


# ------------------------------------------------------------------ int4 layer and checkpoint


def test_int4_linear_computes_with_a_q_plus_b():
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    g = quantize_groups(w, 32)
    layer = Int4Linear.from_parts(g.codes, g.scales, g.offsets)
    assert torch.equal(layer.codes, g.codes)
    x = torch.randn(3, 128)
    assert torch.equal(layer(x), x @ g.dequantize().T)
    assert torch.equal(layer.weight, dequantize(g.codes, g.scales, g.offsets))


def test_model_cast_keeps_scales_and_offsets_fp16():
    model = int4_model()
    before = {n: (m.scales.clone(), m.offsets.clone()) for n, m in int4_layers(model).items()}
    model.to(torch.bfloat16)
    for n, m in int4_layers(model).items():
        assert m.scales.dtype == m.offsets.dtype == torch.float16 and m.qweight.dtype == torch.uint8
        assert torch.equal(m.scales, before[n][0]) and torch.equal(m.offsets, before[n][1])


def test_int4_checkpoint_round_trip(tmp_path):
    """save_pretrained -> from_pretrained: identical packed codes, scales, offsets and logits;
    config.json carries the quantization section; a fresh process loads it by remote code."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = int4_model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    q = config["quantization"]
    assert q["bits"] == 4 and q["group_size"] == 128 and q["modules"] == list(MODULES) and q["scheme"]
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("model.layers.0.mlp.down_proj.qweight")
    assert "model.layers.0.mlp.down_proj.weight" not in keys
    assert packed.dtype == torch.uint8 and packed.shape == (128, 128)  # [out, in/2]: two codes a byte
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    a, b = int4_layers(model), int4_layers(loaded)
    assert a.keys() == b.keys() and len(a) == 3 * 7
    for n in a:
        for buf in ("qweight", "scales", "offsets"):
            assert torch.equal(getattr(a[n], buf), getattr(b[n], buf)), (n, buf)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    code = (f"from transformers import AutoModelForCausalLM as A\n"
            f"m = A.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)\n"
            f"print(type(m.model.layers[0].mlp.up_proj).__name__)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip() == "Int4Linear", run.stderr[-2000:]


# ------------------------------------------------------------------ adapters and merge


def test_zero_initialised_adapter_changes_nothing():
    model = int4_model()
    x = tokens()
    with torch.no_grad():
        ref = model(x).logits.clone()
        peft_model = attach(model, lora_config("qalora", 4, 8, 0.0, 128))
        assert torch.equal(peft_model(x).logits, ref)
    # peft's QA-LoRA layout: A reads in / G pooled features
    a = peft_model.base_model.model.model.layers[0].mlp.down_proj.lora_A["default"].weight
    assert a.shape == (4, 256 // 128)


def test_merged_int4_equals_the_adapter_model():
    """Merging moves only the offsets, to exactly fp16(b + delta); codes and scales keep every
    bit. The logits then agree within the fp16 rounding of the merged offsets: measured
    max |difference| is ~1e-3 of the logit scale here; the bound asserted is 5e-3."""
    model = int4_model()
    before = {n: (m.qweight.clone(), m.scales.clone(), m.offsets.clone()) for n, m in int4_layers(model).items()}
    peft_model = attach(model, lora_config("qalora", 4, 8, 0.0, 128))
    randomize_adapters(peft_model)
    x = tokens()
    deltas = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "qalora_group_size"):
            delta = module.get_delta_weight("default").detach().clone()
            deltas[name.removeprefix("base_model.model.")] = delta
            # the pooled update is constant within each group: the layer computes with w + delta
            # spread over the group's inputs (a float offset shift), to float32 precision
            xin = torch.randn(5, module.in_features, generator=torch.Generator().manual_seed(2))
            base = module.get_base_layer()
            w = base.dequantized() + delta.repeat_interleave(base.group_size, dim=1)
            with torch.no_grad():
                torch.testing.assert_close(module(xin), xin @ w.T, atol=1e-5, rtol=1e-5)
    assert len(deltas) == 3 * 7
    with torch.no_grad():
        unmerged = peft_model(x).logits.clone()
    merged = merge(peft_model)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    for name, m in int4_layers(merged).items():
        q, a, b = before[name]
        assert torch.equal(m.qweight, q) and torch.equal(m.scales, a)
        assert torch.equal(m.offsets, (b.float() + deltas[name]).half())
        assert not torch.equal(m.offsets, b)
    with torch.no_grad():
        out = merged(x).logits
    assert (out - unmerged).abs().max() <= 5e-3 * unmerged.abs().max()


def test_fp_lora_merge_equals_unmerged():
    model = as_slim(tiny_llama(n_heads=4, n_kv=2, hidden=128, ffn=256, layers=3))
    peft_model = attach(model, lora_config("lora", 4, 8, 0.0, None))
    randomize_adapters(peft_model)
    x = tokens()
    with torch.no_grad():
        unmerged = peft_model(x).logits.clone()
        merged = merge(peft_model)
        torch.testing.assert_close(merged(x).logits, unmerged, atol=1e-5, rtol=1e-5)
    assert isinstance(merged.model.layers[0].mlp.up_proj, torch.nn.Linear)


def test_adapters_save_and_load_the_peft_way(tmp_path):
    model = int4_model()
    peft_model = attach(model, lora_config("qalora", 4, 8, 0.0, 128))
    randomize_adapters(peft_model)
    x = tokens()
    with torch.no_grad():
        ref = peft_model(x).logits.clone()
    peft_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_qalora"] is True and config["qalora_group_size"] == 128 and config["r"] == 4
    assert (tmp_path / "adapter_model.safetensors").exists()
    reloaded = load_adapters(int4_model(), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, ref)


# ------------------------------------------------------------------ data


def test_alpaca_and_text_sources(tmp_path, data_dir):
    records = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
               {"instruction": "Say hi.", "input": "", "output": "Hi!"}]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    docs, kind = recovery_documents(str(tmp_path / "a.json"), data_dir)
    assert kind == "alpaca" and docs == [alpaca_text(r) for r in records]
    assert "### Input:\n2 and 3" in docs[0] and docs[0].endswith("### Response:\n5")
    assert "### Input" not in docs[1]
    assert recovery_documents(str(tmp_path / "a.jsonl"), data_dir)[0] == docs
    docs, kind = recovery_documents("books", data_dir)
    assert kind == "text" and "Emma Woodhouse" in docs[0]


@pytest.mark.parametrize("content,suffix,needle", [
    ("", ".txt", "is empty"),
    ("[]", ".json", "is empty"),
    ('[{"question": "x"}]', ".json", "not in Alpaca format"),
    ("{not json", ".json", "not valid JSON"),
    ("a,b\n1,2", ".csv", "unknown format"),
])
def test_bad_recovery_data_is_named(tmp_path, data_dir, content, suffix, needle):
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    with pytest.raises(UserError, match=needle):
        recovery_documents(str(path), data_dir)
    with pytest.raises(UserError, match="no such file"):
        recovery_documents(str(tmp_path / "missing.txt"), data_dir)


# ------------------------------------------------------------------ training


def _data(tiny_tokenizer, tmp_path, heldout: int = 4):
    path = tmp_path / "text.txt"
    path.write_text(book_text(40_000))
    return recovery_windows(tiny_tokenizer, str(path), 32, heldout, 0, None)


def _train(tiny_tokenizer, tmp_path, steps, ckpt=None, resume=False, stop_after=None, lr=1e-3, dropout=0.1):
    model = int4_model()
    s = RecoverSettings(steps=steps, rank=4, lr=lr, dropout=dropout, batch_size=4, seq_len=32, heldout=4, loss="lm",
                        train="lora").validate()
    peft_model = attach(model.requires_grad_(False), lora_config("qalora", 4, 8, dropout, 128))
    data = _data(tiny_tokenizer, tmp_path)
    result = train(peft_model, data, s, ckpt, 2 if ckpt else 0, resume, False, stop_after)
    return peft_model, result, data


def test_a_few_steps_lower_the_loss(tiny_tokenizer, tmp_path):
    model = int4_model()
    data = _data(tiny_tokenizer, tmp_path)
    before = window_perplexity(model, data.heldout, progress=False)["ppl"]
    peft_model, result, _ = _train(tiny_tokenizer, tmp_path, 30, lr=3e-2, dropout=0.0)
    after = window_perplexity(peft_model, data.heldout, progress=False)["ppl"]
    assert trainable_parameters(peft_model) > 0
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5
    assert after < before * 0.95, (before, after)  # measured: 520 -> 468


def test_resume_equals_an_uninterrupted_run(tiny_tokenizer, tmp_path):
    """Stop after step 4 of 6 (checkpoint at 4), resume: the adapters equal, bit for bit,
    those of a run that was never interrupted (dropout on, so its RNG is covered too)."""
    full, full_result, _ = _train(tiny_tokenizer, tmp_path, 6)
    ckpt = tmp_path / "ckpt"
    _, first, _ = _train(tiny_tokenizer, tmp_path, 6, ckpt=ckpt, stop_after=4)
    assert latest_checkpoint(ckpt).name == "step-000004" and len(first.losses) == 4
    resumed, result, _ = _train(tiny_tokenizer, tmp_path, 6, ckpt=ckpt, resume=True)
    assert result.resumed_from == 4 and result.losses == full_result.losses
    # the training time counts the steps before the checkpoint too
    assert result.train_s > json.loads((ckpt / "step-000004" / "timing.json").read_text())["train_s"] > 0
    assert "train_s" not in json.loads((ckpt / "step-000004" / "trainer_state.json").read_text())  # the state stays reproducible
    a = {n: p for n, p in full.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    for f in ("adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "trainer_state.json"):
        assert (ckpt / "step-000006" / f).exists()


def test_resume_with_other_settings_is_refused(tiny_tokenizer, tmp_path):
    ckpt = tmp_path / "ckpt"
    _train(tiny_tokenizer, tmp_path, 4, ckpt=ckpt, stop_after=2)
    with pytest.raises(UserError, match=r"settings differ \(lr: checkpoint 0.001, now 0.002"):
        _train(tiny_tokenizer, tmp_path, 4, ckpt=ckpt, resume=True, lr=2e-3)


def test_nan_loss_stops_and_names_the_last_good_checkpoint(tiny_tokenizer, tmp_path, monkeypatch):
    """The loss of step 5 is made NaN (deterministically, on any CPU): training stops there and
    names the checkpoint of step 4, the last one written before it."""
    import importlib

    train_mod = importlib.import_module("saap_edge.recover.train")  # (the package exports a function of that name)
    real = train_mod.step_loss_of

    def poisoned(model, batch, s, teacher, start):
        loss = real(model, batch, s, teacher, start)
        return loss * float("nan") if start >= train_mod.batch_start(5, 0, s) else loss

    monkeypatch.setattr(train_mod, "step_loss_of", poisoned)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(UserError, match=r"recovery loss became nan at step 5; training stopped\. Last good checkpoint: "
                                        r".*step-000004 \(step 4\)"):
        _train(tiny_tokenizer, tmp_path, 8, ckpt=ckpt)
    assert latest_checkpoint(ckpt).name == "step-000004"


def test_recover_model_none_is_round_to_nearest(tiny_tokenizer):
    model = as_slim(tiny_llama(n_heads=4, n_kv=2, hidden=128, ffn=256, layers=3))
    w = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    out = recover_model(model, tiny_tokenizer, RecoverSettings(recovery="none", group_size=64), RecoverRun(progress=False))
    layer = out.model.model.layers[1].mlp.down_proj
    g = quantize_groups(w, 64)
    assert out.info["group_size"] == 64 and torch.equal(layer.codes, g.codes) and torch.equal(layer.offsets, g.offsets)


# ------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def tiny32_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny32")
    tiny_llama(n_heads=4, n_kv=2, hidden=128, ffn=256, layers=4).save_pretrained(path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def recovery_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "recovery.txt"
    path.write_text(book_text(60_000))
    return path


def cli(*argv) -> list[str]:
    return [*argv, "--no-progress", "--recover-seq-len", "64", "--batch-size", "4"]


def test_compress_prunes_then_recovers_to_int4(tiny32_dir, recovery_text, data_dir, tmp_path, capsys):
    out = tmp_path / "int4"
    rc = main(cli("compress", "--model", str(tiny32_dir), "--data-dir", str(data_dir), "--calib-samples", "8",
                  "--eval-limit", "2", "--ratio", "0.25", "--keep-first", "1", "--out", str(out),
                  "--recover-data", str(recovery_text), "--recover-steps", "4"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    rec = report["recovery"]
    assert rec["recovery"] == "qalora" and rec["steps"] == 4 and rec["trainable_params"] > 0
    assert set(rec["heldout_ppl"]) == {"before", "adapter", "after"}
    assert "recovered" in report["ppl"]["wikitext2"]
    config = json.loads((out / "config.json").read_text())
    head_dim = config["head_dim"]
    widths = [config["hidden_size"]] + [h * head_dim for h in config["num_attention_heads_per_layer"]] + config["intermediate_size_per_layer"]
    largest = next(g for g in (128, 64, 32) if all(w % g == 0 for w in widths))  # every projection's input width
    assert config["quantization"]["group_size"] == largest
    assert (out / "int4_linear.py").exists() and not (tmp_path / "int4.checkpoints").exists()
    assert "+ offsets (kd) int4" in captured.out


def test_recover_command_on_a_pruned_directory(tiny32_dir, recovery_text, data_dir, tmp_path, capsys):
    pruned = tmp_path / "pruned"
    assert main(cli("compress", "--model", str(tiny32_dir), "--data-dir", str(data_dir), "--calib-samples", "8",
                    "--eval-ppl", "--ratio", "0.25", "--keep-first", "1", "--out", str(pruned), "--no-recover")) == 0
    assert json.loads((pruned / "config.json").read_text()).get("quantization") is None
    out = tmp_path / "lora"
    rc = main(cli("recover", str(pruned), "--out", str(out), "--recovery", "lora", "--recover-data", str(recovery_text),
                  "--recover-steps", "3", "--eval-ppl", "--keep-checkpoints"))
    assert rc == 0, capsys.readouterr().err
    assert json.loads((out / "config.json").read_text()).get("quantization") is None  # fp LoRA: fp weights
    assert (out / "prune_plan.json").read_text() == (pruned / "prune_plan.json").read_text()
    assert (tmp_path / "lora.checkpoints" / "step-000003" / "adapter_config.json").exists()


def _expect_error(capsys, argv, out: Path, *needles):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    assert not out.exists()
    return err[0]


def test_bad_recovery_inputs_exit_2(tiny32_dir, recovery_text, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["recover", str(tiny32_dir), "--out", str(out), "--eval-ppl"]
    _expect_error(capsys, cli(*base, "--recover-data", str(tmp_path / "nope.txt")), out, "no such file")
    (tmp_path / "empty.txt").write_text("  \n")
    _expect_error(capsys, cli(*base, "--recover-data", str(tmp_path / "empty.txt")), out, "is empty")
    (tmp_path / "d.parquet").write_text("x")
    _expect_error(capsys, cli(*base, "--recover-data", str(tmp_path / "d.parquet")), out, "unknown format")
    _expect_error(capsys, cli(*base, "--group-size", "48"), out, "multiple of 32")
    _expect_error(capsys, cli(*base, "--group-size", "96"), out, "does not divide the input dimension 128")
    _expect_error(capsys, cli(*base, "--resume", "--recover-data", str(recovery_text)), out, "--resume: no checkpoint")


def test_resume_from_the_cli_after_a_nan_keeps_checkpoints(tiny32_dir, recovery_text, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["recover", str(tiny32_dir), "--out", str(out), "--eval-ppl", "--recover-data", str(recovery_text),
            "--recover-steps", "30", "--save-every", "1", "--lora-dropout", "0", "--train", "lora"]
    line = _expect_error(capsys, cli(*args, "--lr", "1e12"), out, "recovery loss became", "Last good checkpoint")
    ckpt = tmp_path / "out.checkpoints"
    assert ckpt.is_dir() and latest_checkpoint(ckpt) is not None and str(latest_checkpoint(ckpt)) in line
    _expect_error(capsys, cli(*args, "--lr", "1e-3", "--resume"), out, "settings differ", "lr: checkpoint 1000000000000.0, now 0.001")


def test_help_lists_the_recovery_flags(capsys):
    for argv in (["compress", "--help"], ["recover", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = " ".join(capsys.readouterr().out.split())
        for flag in ("--recovery {qalora,lora,none}", "--recover-steps", "--recover-data", "--resume", "--group-size",
                     "--save-every", "(default: qalora)", "60 on a CPU"):
            assert flag in text, (argv, flag)
        assert ("--no-recover" in text) == (argv[0] == "compress")
