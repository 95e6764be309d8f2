"""saap-edge bench: the memory probe, derived ratios / roofline, the Markdown table, end to end."""

from __future__ import annotations

import json
import re
import sys

import pytest

from conftest import DATA_DIR, hetero_model
from saap_edge.bench import DENSE, BenchModel, add_derived, run_bench
from saap_edge.bench.probe import run_child
from saap_edge.render import bench_markdown as markdown
from saap_edge.cli import main
from saap_edge.config import BenchSettings
from saap_edge.errors import UserError

STORIES = DATA_DIR / "models" / "stories260K" / "stories260K.gguf"


def test_peak_rss_probe_measures_a_known_allocation():
    base = "import numpy as np, time; time.sleep(0.4)"
    alloc = "import numpy as np, time; a = np.ones(256 * 2**20 // 8); time.sleep(0.4)"
    idle = run_child([sys.executable, "-c", base])
    busy = run_child([sys.executable, "-c", alloc])
    assert idle["rc"] == busy["rc"] == 0
    assert 256 * 0.95 < busy["peak_rss_mib"] - idle["peak_rss_mib"] < 256 * 1.1


def _row(model, runtime, decode, prefill, params, nbytes, per_token, mem, weight_bytes=None):
    speed = lambda m: {"median": m, "min": m * 0.9, "max": m * 1.1, "runs": [m]}  # noqa: E731
    return {"model": model, "runtime": runtime, "status": "ok", "params": params, "artifact_bytes": nbytes,
            "weight_bytes": nbytes if weight_bytes is None else weight_bytes,
            "bytes_per_token": per_token, "peak_memory_mib": mem, "memory_kind": "peak RSS of the row's process",
            "decode_tok_s": speed(decode), "prefill_tok_s": speed(prefill)}


def test_markdown_renders_the_json_faithfully():
    data = {"settings": BenchSettings().to_dict(), "bandwidth": {"gbs": 20.0, "method": "numpy sum (read)", "threads": 2, "reps": 5},
            "machine": {"cpu": "x"}, "rows": [
                _row(DENSE, "gguf-f16", 10.0, 100.0, 100_000_000, 200 * 2**20, 200e6, 300.0),
                _row("small (20% pruned)", "gguf-q4_1", 40.0, 150.0, 80_000_000, 62 * 2**20, 50e6, 90.0, 50 * 2**20),
                _row("small (20% pruned)", "gguf-f16", 12.5, 120.0, 80_000_000, 160 * 2**20, 160e6, 250.0),
                {"model": "small (20% pruned)", "runtime": "onnx-int4", "status": "failed", "reason": "onnxruntime is not installed"},
            ]}
    add_derived(data)
    md = markdown(data)
    table = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("| ")][1:]
    assert len(table) == 3  # the failed row is listed below the table, not in it
    dense, q4, f16 = table
    assert dense[:5] == [DENSE, "gguf-f16", "100.00M", "200.0", "200.0"] and q4[3:6] == ["62.0", "50.0", "90.0"]
    assert q4[7] == "40.00 [36.00-44.00]" and f16[8] == "1.25x"  # decode vs dense of the same runtime
    assert q4[8] == "-"  # no dense gguf-q4_1 row in this run
    assert f16[10] == f"{20e9 / 160e6:.1f}" and f16[11] == f"{12.5 / (20e9 / 160e6):.0%}"  # roofline
    assert "- small (20% pruned) / onnx-int4: onnxruntime is not installed" in md
    # targets: 50 MiB of weights (62 MiB file) vs 2 x 100M fp16 bytes = 26% (met; the file would be 33%);
    # speed-up 4x vs ideal 4x = 100% (met)
    memory, speed = data["targets"]
    assert "int4 weights stored" in memory["target"] and abs(memory["measured"] - 50 * 2**20 / 200e6) < 1e-9
    assert memory["met"] and "whole file: 32.5%" in memory["target"]
    assert "decode speed-up" in speed["target"] and abs(speed["measured"] - 1.0) < 1e-9
    assert re.search(r"int4 weights stored <= 30% .*: measured 26% \(bar 30%\) -> met", md)


def test_onnx_targets_compare_with_llama_cpp_and_the_dense_onnx_row():
    from saap_edge.bench import targets

    small = "small (20% pruned)"
    rows = [_row(DENSE, "gguf-f16", 10.0, 100.0, 100_000_000, 200 * 2**20, 200e6, 300.0),
            _row(DENSE, "onnx-int4", 20.0, 100.0, 100_000_000, 70e6, 70e6, 300.0),
            _row(small, "gguf-q4_1", 40.0, 150.0, 80_000_000, 50 * 2**20, 50e6, 90.0),
            _row(small, "onnx-int4", 30.0, 150.0, 80_000_000, 56e6, 56e6, 90.0)]
    got = {t["target"].split(": ", 1)[1].split(" (")[0]: t for t in targets(rows) if "onnx-int4" in t["target"]}
    vs_cpp = got["decode >= 0.9x llama.cpp Q4_1"]
    assert vs_cpp["measured"] == 0.75 and not vs_cpp["met"]  # 30 vs 40 tok/s
    size = got["weights stored <= 30% of the dense fp16 weights"]
    assert abs(size["measured"] - 56e6 / 200e6) < 1e-12 and size["met"]
    speed = got["decode speed-up over the dense onnx-int4 >= 95% of the bytes-read ideal"]
    assert speed["ideal"] == 70e6 / 56e6 and abs(speed["measured"] - 1.5 / 1.25) < 1e-12 and speed["met"]


def test_bench_settings_are_checked():
    with pytest.raises(UserError, match="--runtimes vllm"):
        BenchSettings(runtimes=("vllm",)).validate()
    with pytest.raises(UserError, match="--reps must be >= 1"):
        BenchSettings(reps=0).validate()


def test_bench_runs_end_to_end_and_keeps_failed_rows(tmp_path, tiny_tokenizer, tiny_model_dir):
    pytest.importorskip("llama_cpp")
    from saap_edge.quant.int4 import quantize_model

    small = tmp_path / "small"
    m = hetero_model()
    quantize_model(m, 32)
    m.save_pretrained(small)
    tiny_tokenizer.save_pretrained(small)
    models = [BenchModel(DENSE, str(tiny_model_dir)), BenchModel("small", str(small)),
              BenchModel("stories", str(STORIES))]  # MLP width 172: no Q4_1 export, the row fails
    s = BenchSettings(runtimes=("torch", "gguf-q4_1"), prompt_tokens=8, new_tokens=4, reps=1, warmup=0,
                      validate_exports=False)
    data = run_bench(models, s, tmp_path / "out", progress=False)
    rows = {(r["model"], r["runtime"]): r for r in data["rows"]}
    assert len(rows) == 6
    bad = rows[("stories", "gguf-q4_1")]
    assert bad["status"] == "failed" and "172" in bad["reason"]
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    assert len(ok) == 5 and all(r["decode_tok_s"]["median"] > 0 and r["peak_memory_mib"] > 10 for r in ok)
    assert rows[("small", "gguf-q4_1")]["vs_dense"]["decode_tok_s"] > 0
    assert rows[("small", "torch")]["params"] == rows[("small", "gguf-q4_1")]["params"]  # logical weights, both ways
    on_disk = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(data["rows"], default=str))
    for name in ("bench.md", "bench_memory.png", "bench_speed.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_the_bench_command_runs_a_torch_and_a_gguf_row_through_the_cli(tmp_path, tiny_tokenizer, tiny_model_dir, capsys):
    """`saap-edge bench DIR --dense DIR` as a user types it: both models, both runtimes, the
    table printed and its files written."""
    from saap_edge.quant.int4 import quantize_model

    small = tmp_path / "small"
    m = hetero_model()
    quantize_model(m, 32)
    m.save_pretrained(small)
    tiny_tokenizer.save_pretrained(small)
    out = tmp_path / "bench"
    assert main(["bench", str(small), "--dense", str(tiny_model_dir), "--runtimes", "torch", "gguf-q4_1-embq8",
                 "--reps", "1", "--warmup", "0", "--new-tokens", "3", "--prompt-tokens", "8", "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert {(r["model"], r["runtime"]) for r in rows} == {(DENSE, "torch"), (DENSE, "gguf-q4_1-embq8"),
                                                          ("small", "torch"), ("small", "gguf-q4_1-embq8")}
    assert all(r["status"] == "ok" and r["decode_tok_s"]["median"] > 0 for r in rows), rows
    assert "gguf-q4_1-embq8" in printed and (out / "bench.md").is_file()


def test_bench_cli_bad_inputs(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["bench", str(tmp_path), "--runtimes", "tensorrt"]) == 2
    assert "--runtimes tensorrt" in capsys.readouterr().err


@pytest.mark.gpu
def test_bench_torch_rows_on_cuda_report_the_allocator_peak(tmp_path, tiny_model_dir):
    s = BenchSettings(runtimes=("torch",), prompt_tokens=8, new_tokens=4, reps=1, warmup=0, device="cuda")
    data = run_bench([BenchModel(DENSE, str(tiny_model_dir))], s, tmp_path / "out", progress=False)
    row = data["rows"][0]
    assert row["status"] == "ok", row.get("reason")
    assert row["memory_kind"] == "CUDA allocator peak" and 0 < row["peak_memory_mib"] < row["peak_rss_mib"]
    assert data["bandwidth"]["method"].startswith("torch device copy") and "gpu" in data["machine"]


def test_an_export_killed_by_the_system_fails_its_row_alone(tmp_path, tiny_model_dir, monkeypatch):
    """Each artifact is exported in its own process: one the kernel ends (as the OOM killer
    does, SIGKILL) fails its row in one line, and the torch row still runs."""
    import saap_edge.bench.probe as probe

    real = probe.run_child

    def killed_export(cmd, *args, **kwargs):
        if "export" in cmd:
            cmd = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
        return real(cmd, *args, **kwargs)

    monkeypatch.setattr(probe, "run_child", killed_export)
    s = BenchSettings(runtimes=("torch", "gguf-q4_1"), prompt_tokens=8, new_tokens=4, reps=1, warmup=0,
                      validate_exports=False)
    data = run_bench([BenchModel(DENSE, str(tiny_model_dir))], s, tmp_path / "out", progress=False)
    rows = {r["runtime"]: r for r in data["rows"]}
    assert rows["torch"]["status"] == "ok" and rows["torch"]["decode_tok_s"]["median"] > 0
    bad = rows["gguf-q4_1"]
    assert bad["status"] == "failed" and "killed by the system" in bad["reason"] and "\n" not in bad["reason"]
