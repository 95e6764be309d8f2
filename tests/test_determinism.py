"""The same command with the same seed gives the same bytes, across processes: the plan, the
weights, the adapters and optimizer state of every checkpoint, the GGUF and the ONNX files.
(report.json and a checkpoint's timing.json differ only by timings and memory readings, which
are measurements.)

Runs the CLI twice in fresh processes: torch seeds its default generator differently in every
process, so an unseeded draw (LoRA's initial A matrices were one) shows only this way.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import book_text, save_tiny32


def _cli(*argv: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "saap_edge.cli", *argv], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("report.json", "timing.json")}


def test_two_runs_of_one_command_write_identical_bytes(tmp_path, tiny_tokenizer, data_dir):
    dense = tmp_path / "dense"
    save_tiny32(dense, tiny_tokenizer)
    (tmp_path / "book.txt").write_text(book_text(30_000))
    runs = []
    out, gguf, onnx = tmp_path / "run", tmp_path / "m.gguf", tmp_path / "onnx"
    for i in (1, 2):  # the same command twice, at the same paths (outputs record where they came from)
        _cli("compress", "--model", str(dense), "--calib", str(tmp_path / "book.txt"), "--calib-samples", "4",
             "--recon-samples", "4", "--keep-first", "1", "--ratio", "0.2", "--out", str(out), "--recovery", "qalora",
             "--train", "lora,offsets,norms", "--recover-loss", "kd+lm", "--recover-data", str(tmp_path / "book.txt"),
             "--recover-steps", "4", "--save-every", "2", "--keep-checkpoints", "--recover-seq-len", "32",
             "--batch-size", "2", "--teacher-cache", "off", "--eval-ppl", "none", "--no-progress")
        _cli("export", str(out), "--format", "gguf", "--out", str(gguf))
        _cli("export", str(out), "--format", "onnx", "--out", str(onnx))
        runs.append({"run": _files(out), "checkpoints": _files(tmp_path / "run.checkpoints"),
                     "gguf": {"m.gguf": gguf.read_bytes()}, "onnx": _files(onnx)})
        for path in (out, tmp_path / "run.checkpoints", gguf, onnx):
            path.rename(path.with_name(f"{path.name}.{i}"))
    first, second = runs
    for name in first:
        assert first[name].keys() == second[name].keys(), name
        differ = [f for f in first[name] if first[name][f] != second[name][f]]
        assert not differ, (name, differ)
    assert any(f.endswith("adapter_model.safetensors") for f in first["checkpoints"])
    assert "model.safetensors" in first["run"] and "prune_plan.json" in first["run"]
