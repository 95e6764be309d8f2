"""Tests of the saap-edge command line: what `compress` writes, how bad input fails, `eval`.

The CLI runs in-process through `saap_edge.cli.main` (fast); one subprocess test checks the
real exit status and stderr. Every failure must exit 2 with one line on stderr and leave
nothing at --out: no directory and no temporary sibling.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import book_text
from saap_edge.cli import main

EXPECTED_FILES = {
    "config.json", "generation_config.json", "model.safetensors", "slim.py", "int4_linear.py",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "prune_plan.json", "report.json", "layers.png", "README.md",
}
# tiny_llama in conftest: 6 layers, hidden 64, 8 heads / 4 KV heads, MLP 128
LAYERS, HIDDEN, N_HEADS, N_KV, FFN, ALIGN = 6, 64, 8, 4, 128, 32
FAST = ["--no-progress", "--calib-samples", "8", "--recon-samples", "16", "--eval-limit", "4", "--no-recover"]  # recovery: test_recover.py
VALID = ["--ratio", "0.3", "--keep-first", "1"]
NO_EVAL = ["--eval-ppl"]  # empty list: skip the before/after perplexity check


def compress_args(model, out: Path, data_dir: Path, *extra: str) -> list[str]:
    return ["compress", "--model", str(model), "--data-dir", str(data_dir), *FAST, "--out", str(out), *extra]


def leftovers(out: Path) -> list[str]:
    """Temporary or backup siblings that atomic_dir may leave next to --out."""
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


def expect_user_error(capsys, argv: list[str], out: Path, *needles: str) -> str:
    """Run the CLI, check exit 2 + one stderr line containing every needle + nothing written."""
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("saap-edge compress: error: "), lines[0]
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    assert not out.exists()
    assert leftovers(out) == []
    return lines[0]


# ---------------------------------------------------------------- a successful compress


@pytest.fixture(scope="module")
def _runs() -> dict:
    return {}


@pytest.fixture
def compressed(_runs, tiny_model_dir, data_dir, tmp_path_factory, capsys) -> dict:
    """One SAAP compress of the tiny model at --ratio 0.3, shared by the tests below."""
    if "compress" not in _runs:
        out = tmp_path_factory.mktemp("compressed") / "slim"
        rc = main(compress_args(tiny_model_dir, out, data_dir, *VALID, "--method", "saap"))
        captured = capsys.readouterr()
        _runs["compress"] = {"rc": rc, "out": out, "stdout": captured.out, "stderr": captured.err}
    return _runs["compress"]


def test_compress_writes_exactly_the_checkpoint_files(compressed):
    out = compressed["out"]
    assert compressed["rc"] == 0, compressed["stderr"]
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    assert leftovers(out) == []


def test_compress_report_plan_config_and_weights_agree(compressed):
    from safetensors import safe_open

    out = compressed["out"]
    report = json.loads((out / "report.json").read_text())
    plan = json.loads((out / "prune_plan.json").read_text())
    config = json.loads((out / "config.json").read_text())
    params = report["params"]
    assert params["removed_share"] >= 0.3
    assert params["removed_share"] == pytest.approx((params["before"] - params["after"]) / params["before"])
    assert report["settings"]["ratio"] == 0.3 and report["settings"]["method"] == "saap"

    layers = plan["layers"]
    assert len(layers) == config["num_hidden_layers"] == LAYERS
    assert report["settings"]["units"] == "groups,heads"  # auto, resolved and recorded
    heads = [len(lp["kv_groups"]) * lp["n_heads"] // lp["n_kv"] if lp["heads"] is None else len(lp["heads"]) for lp in layers]
    assert heads == config["num_attention_heads_per_layer"]
    assert [len(lp["kv_groups"]) for lp in layers] == config["num_key_value_heads_per_layer"]
    assert [len(lp["channels"]) for lp in layers] == config["intermediate_size_per_layer"]
    # --keep-first 1 and the default --keep-last 1: those layers stay dense, the rest shrank
    for i in (0, LAYERS - 1):
        assert (heads[i], len(layers[i]["channels"])) == (N_HEADS, FFN)
    assert sum(heads) < LAYERS * N_HEADS or sum(config["intermediate_size_per_layer"]) < LAYERS * FFN
    assert all(w % ALIGN == 0 for w in config["intermediate_size_per_layer"])

    # the saved weights have the planned shapes and hold exactly params.after parameters
    head_dim = config["head_dim"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        assert shapes[p + "self_attn.q_proj.weight"] == (heads[i] * head_dim, HIDDEN)
        assert shapes[p + "self_attn.k_proj.weight"] == (len(layers[i]["kv_groups"]) * head_dim, HIDDEN)
        assert shapes[p + "mlp.down_proj.weight"] == (HIDDEN, config["intermediate_size_per_layer"][i])
    assert sum(math.prod(s) for s in shapes.values()) == params["after"]


def test_compress_records_the_reconstruction(compressed):
    """The refit ran layer by layer: its settings are in the plan and the report, with time,
    peak memory and, per pruned layer, an output error below plain slicing's."""
    out = compressed["out"]
    report = json.loads((out / "report.json").read_text())
    plan = json.loads((out / "prune_plan.json").read_text())
    recon = report["reconstruction"]
    assert recon["method"] == "lsq" and recon["samples"] == 16 and plan["reconstruction"]["samples"] == 16
    assert plan["reconstruction"]["target"] == recon["target"] == "prefix" and len(plan["reconstruction"]["sha256"]) == 64
    assert recon["time_s"] > 0 and recon["peak_rss_mib"] > 0 and report["time_s"]["reconstruct_s"] == recon["time_s"]
    refits = [e[k] for e in recon["layers"] for k in ("attn", "mlp") if k in e and e[k]["removed_units"]]
    assert refits and all(r["rel_err_refit"] < r["rel_err_sliced"] for r in refits)


def test_compress_prints_the_before_after_table(compressed):
    report = json.loads((compressed["out"] / "report.json").read_text())
    stdout = compressed["stdout"]
    before, after = report["params"]["before"], report["params"]["after"]
    assert re.search(rf"\| parameters\s+\| {before:,}\s+\| {after:,}\s+\|", stdout), stdout
    assert "removed share" in stdout and "(asked 30%)" in stdout
    assert "PPL wikitext2 (4 x 128 tok)" in stdout
    assert "| saap + refit" in stdout and "lsq, target prefix, 16 x 128 tok, select local" in stdout
    assert str(compressed["out"]) in stdout


def test_no_progress_hides_the_progress_bars(compressed):
    assert compressed["rc"] == 0
    assert "it/s" not in compressed["stderr"], compressed["stderr"]


def test_progress_bars_show_unless_turned_off(tiny_model_dir, data_dir, capsys):
    """The same evaluation draws its bar by default and none with --no-progress (so the test
    above fails if the flag stops working, and this one if the bars go)."""
    args = ["eval", str(tiny_model_dir), "--ppl", "wikitext2", "--limit", "3", "--data-dir", str(data_dir)]
    assert main(args) == 0
    assert "it/s" in capsys.readouterr().err
    assert main(args + ["--no-progress"]) == 0
    assert "it/s" not in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_export_shows_its_layers_unless_turned_off(tiny_model_dir, tmp_path, capsys, fmt):
    args = ["export", str(tiny_model_dir), "--format", fmt, "--quant", "f32", "--embed-type", "f32", "--no-validate"]
    assert main(args + ["--out", str(tmp_path / f"a.{fmt}")]) == 0
    assert f"{fmt.upper()} layers" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / f"b.{fmt}"), "--no-progress"]) == 0
    assert "layers" not in capsys.readouterr().err


# ---------------------------------------------------------------- bad input: exit 2, nothing written


def _gpt2_dir(tmp_path: Path) -> Path:
    from transformers import GPT2Config

    path = tmp_path / "gpt2"
    GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, architectures=["GPT2LMHeadModel"]).save_pretrained(path)
    assert [p.name for p in path.iterdir()] == ["config.json"]  # no weights: the check comes first
    return path


def _no_config_dir(tmp_path: Path) -> Path:
    path = tmp_path / "no-config"
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"")
    return path


def _corrupt_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "x.gguf"
    path.write_bytes(random.Random(0).randbytes(4096))
    return path


BAD_INPUT = {
    "ratio-zero": (None, ["--ratio", "0"], ["--ratio 0.0", "(0, 1)"]),
    "ratio-negative": (None, ["--ratio", "-1"], ["--ratio -1.0", "(0, 1)"]),
    "unsupported-architecture": (_gpt2_dir, VALID, ["unsupported architecture", "'gpt2'"]),
    "missing-model-path": (lambda tmp: Path("/nonexistent/model"), VALID, ["/nonexistent/model", "does not exist"]),
    "dir-without-config": (_no_config_dir, VALID, ["no config.json"]),
    "corrupt-gguf": (_corrupt_gguf, VALID, ["x.gguf", "cannot read", "GGUF"]),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_exits_2_and_writes_nothing(case, tmp_path, tiny_model_dir, data_dir, capsys):
    make_model, extra, needles = BAD_INPUT[case]
    model = make_model(tmp_path) if make_model else tiny_model_dir
    out = tmp_path / "out"
    expect_user_error(capsys, compress_args(model, out, data_dir, *extra), out, *needles)


def test_ratio_beyond_the_feasible_max_names_the_max(tmp_path, tiny_model_dir, data_dir, capsys):
    # each prunable layer (1..4) keeps one KV group with one query head (saap's default units
    # include query-head slots) and one ALIGN-wide MLP block
    head_dim, per_kv = HIDDEN // N_HEADS, N_HEADS // N_KV
    kv_group = 2 * per_kv * head_dim * HIDDEN + 2 * head_dim * HIDDEN  # q + o rows/cols, k + v rows
    head = 2 * head_dim * HIDDEN  # q rows + o columns of one query head
    per_layer = (N_KV - 1) * kv_group + (per_kv - 1) * head + (FFN - ALIGN) * 3 * HIDDEN
    from transformers import AutoModelForCausalLM

    total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    limit = 4 * per_layer / total
    out = tmp_path / "out"
    argv = compress_args(tiny_model_dir, out, data_dir, "--ratio", "0.99", "--keep-first", "1")
    expect_user_error(capsys, argv, out, "--ratio 0.99", f"{limit:.4f}", f"at most {limit:.2%}")


def test_too_short_calibration_text_names_the_token_count(tmp_path, tiny_model_dir, data_dir, capsys):
    from transformers import AutoTokenizer

    calib = tmp_path / "calib.txt"
    calib.write_text("The cat sat on the mat.\n")
    n_tokens = len(AutoTokenizer.from_pretrained(tiny_model_dir)("The cat sat on the mat.")["input_ids"])
    assert 0 < n_tokens < 8 * 128
    out = tmp_path / "out"
    argv = compress_args(tiny_model_dir, out, data_dir, *VALID, "--calib", str(calib))
    expect_user_error(capsys, argv, out, f"holds 0 windows of 128 tokens ({n_tokens} tokens)", "--calib-samples asks for 8")


def test_recon_samples_beyond_the_calibration_text_names_the_windows_found(tmp_path, tiny_model_dir, data_dir, capsys):
    from transformers import AutoTokenizer

    calib = tmp_path / "calib.txt"
    calib.write_text(book_text(40_000))
    n_windows = len(AutoTokenizer.from_pretrained(tiny_model_dir)(book_text(40_000))["input_ids"]) // 128
    assert 8 <= n_windows < 500
    out = tmp_path / "out"
    argv = compress_args(tiny_model_dir, out, data_dir, *VALID, "--calib", str(calib), "--recon-samples", "500")
    expect_user_error(capsys, argv, out, f"holds {n_windows} windows of 128 tokens", "--recon-samples asks for 500")


def test_unknown_method_is_rejected_by_argparse(tmp_path, tiny_model_dir, data_dir, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(compress_args(tiny_model_dir, out, data_dir, *VALID, "--method", "bogus"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--method" in err and "invalid choice: 'bogus'" in err
    assert not out.exists() and leftovers(out) == []


def test_existing_results_need_overwrite(tmp_path, tiny_model_dir, data_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    old = out / "config.json"
    old.write_text('{"old": true}\n')
    stamp = old.stat().st_mtime_ns
    argv = compress_args(tiny_model_dir, out, data_dir, *VALID, "--method", "magnitude", *NO_EVAL)

    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "already holds results" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["config.json"]
    assert old.read_text() == '{"old": true}\n' and old.stat().st_mtime_ns == stamp
    assert leftovers(out) == []

    assert main(argv + ["--overwrite"]) == 0, capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    assert json.loads(old.read_text())["model_type"] == "saap_llama"
    assert leftovers(out) == []


def test_nan_weights_fail_cleanly(tmp_path, tiny_model_dir, data_dir, capsys):
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "nan-model"
    shutil.copytree(tiny_model_dir, model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(model_dir, safe_serialization=True)
    out = tmp_path / "out"
    argv = compress_args(model_dir, out, data_dir, *VALID, "--method", "saap", *NO_EVAL)
    # the NaN reaches the loss before any gradient: the message names the damaged weight
    expect_user_error(capsys, argv, out, "nan", "calibration sample 0", "layers.2.mlp.down_proj")


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "overwrite"])
def test_failure_while_saving_leaves_no_partial_output(existing, tmp_path, tiny_model_dir, data_dir, monkeypatch):
    import saap_edge.compress

    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "report.json").write_text("previous\n")

    def broken_plot(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(saap_edge.compress, "plot_layers", broken_plot)
    argv = compress_args(tiny_model_dir, out, data_dir, *VALID, "--method", "magnitude", *NO_EVAL, "--overwrite")
    with pytest.raises(RuntimeError, match="plot failed"):
        main(argv)
    if existing:  # the previous results survive a failed --overwrite run untouched
        assert [p.name for p in out.iterdir()] == ["report.json"]
        assert (out / "report.json").read_text() == "previous\n"
    else:
        assert not out.exists()
    assert leftovers(out) == []


def test_real_process_exit_code_and_single_stderr_line(tmp_path, tiny_model_dir, data_dir):
    out = tmp_path / "out"
    argv = compress_args("/nonexistent/model", out, data_dir, *VALID)
    proc = subprocess.run([sys.executable, "-m", "saap_edge.cli", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("saap-edge compress: error: model path /nonexistent/model does not exist")
    assert not out.exists() and leftovers(out) == []


# ---------------------------------------------------------------- help and eval


def _help_entries(argv: list[str], capsys) -> dict[str, str]:
    """Option -> its help text (whitespace normalised), parsed from `--help` output."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    entries: dict[str, str] = {}
    current = None
    for line in capsys.readouterr().out.splitlines():
        m = re.match(r"^  (--[\w-]+|[a-z]\w*)(\s|$)", line)
        if m:
            current = m.group(1)
            entries[current] = ""
        elif not line.strip() or not line.startswith("   "):
            current = None
        if current:
            entries[current] += " " + " ".join(line.split())
    return entries


def test_compress_help_lists_the_contract_flags_with_defaults(capsys):
    entries = _help_entries(["compress", "--help"], capsys)
    defaults = {
        "--model": "smollm2-135m", "--ratio": "0.2", "--method": "saap", "--calib": "books",
        "--calib-samples": "50", "--seq-len": "128", "--seed": "0", "--data-dir": "$SAAP_EDGE_DATA_DIR",
        "--device": "auto", "--out": "saap-out", "--overwrite": None,
    }
    for flag, default in defaults.items():
        assert flag in entries, flag
        if default is not None:
            assert f"default: {default}" in entries[flag], (flag, entries[flag])
    for method in ("saap", "llm-pruner", "flap", "wanda-sp", "magnitude", "random"):
        assert method in entries["--method"]


def test_eval_help_lists_its_flags_with_defaults(capsys):
    entries = _help_entries(["eval", "--help"], capsys)
    defaults = {
        "model": None, "--ppl": None, "--split": "test", "--window": "128", "--limit": "all",
        "--batch-size": "8", "--json": None, "--data-dir": "$SAAP_EDGE_DATA_DIR", "--device": "auto",
        "--dtype": "auto", "--no-progress": None,
    }
    for flag, default in defaults.items():
        assert flag in entries, flag
        if default is not None:
            assert f"default: {default}" in entries[flag], (flag, entries[flag])


def test_eval_of_the_compressed_model_writes_json(compressed, tmp_path, data_dir, capsys):
    result = tmp_path / "ppl.json"
    argv = ["eval", str(compressed["out"]), "--ppl", "wikitext2", "--limit", "2", "--json", str(result),
            "--data-dir", str(data_dir), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    data = json.loads(result.read_text())
    ppl = data["ppl"]["wikitext2"]
    assert ppl["windows"] == 2 and ppl["window"] == 128 and ppl["tokens_scored"] == 2 * 127
    assert 1 < ppl["ppl"] < math.inf
    assert data["model"]["path"] == str(compressed["out"])
    assert not result.with_name(result.name + ".tmp").exists()
    assert f"{ppl['ppl']:.4g}" in capsys.readouterr().out


def test_saved_model_reproduces_the_reported_perplexity(compressed, tmp_path, data_dir, capsys):
    """Checkpoint round trip: reloading the slim model gives the 'after' ppl of report.json."""
    report = json.loads((compressed["out"] / "report.json").read_text())
    after = report["ppl"]["wikitext2"]["after"]
    result = tmp_path / "ppl.json"
    argv = ["eval", str(compressed["out"]), "--ppl", "wikitext2", "--limit", str(after["windows"]),
            "--json", str(result), "--data-dir", str(data_dir), "--no-progress", "--device", "cpu"]
    assert main(argv) == 0, capsys.readouterr().err
    ppl = json.loads(result.read_text())["ppl"]["wikitext2"]
    assert ppl["windows"] == after["windows"] == 4
    assert ppl["ppl"] == pytest.approx(after["ppl"], rel=1e-5)


def test_eval_batch_size_reaches_perplexity(compressed, tmp_path, data_dir, monkeypatch, capsys):
    import saap_edge.eval.ppl as ppl_module

    seen = []
    real = ppl_module.perplexity

    def spy(*args, **kwargs):
        seen.append(kwargs.get("batch_size"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ppl_module, "perplexity", spy)
    text = tmp_path / "text.txt"
    text.write_text((data_dir / "text" / "books" / "botchan.txt").read_text(encoding="utf-8-sig")[:4000])
    argv = ["eval", str(compressed["out"]), "--ppl", str(text), "--limit", "2", "--batch-size", "1",
            "--data-dir", str(data_dir), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    assert seen == [1]
