"""Killed runs: SIGKILL after a checkpoint, then --resume in a new process, ends in the bytes of
an uninterrupted run; SIGKILL while the output is being written leaves nothing at --out, and
the next run cleans the killed run's temporary files and succeeds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import book_text, save_tiny32
from saap_edge.cli import main

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_tokenizer) -> Path:
    root = tmp_path_factory.mktemp("kill")
    save_tiny32(root / "dense", tiny_tokenizer)
    (root / "book.txt").write_text(book_text(60_000))
    assert main(["compress", "--model", str(root / "dense"), "--calib", str(root / "book.txt"), "--calib-samples", "4",
                 "--recon-samples", "4", "--no-recover", "--keep-first", "1", "--ratio", "0.2", "--out", str(root / "pruned"),
                 "--no-progress", "--eval-ppl", "none"]) == 0
    return root / "pruned"


def _recover(pruned: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "saap_edge.cli", "recover", str(pruned), "--out", str(out),
            "--recover-data", str(pruned.parent / "book.txt"), "--recover-steps", "40", "--save-every", "4",
            "--recovery", "qalora", "--train", "lora,offsets", "--recover-loss", "lm", "--recover-seq-len", "64",
            "--batch-size", "4", "--eval-ppl", "none", "--no-progress", *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _kill_when(cmd: list[str], ready, timeout: float = 300) -> None:
    """Start `cmd`, SIGKILL it as soon as `ready()` holds (polled every 2 ms)."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before it could be killed: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the moment to kill")
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_killed_after_a_checkpoint_resumes_to_the_uninterrupted_bytes(pruned, tmp_path):
    _run(_recover(pruned, tmp_path / "whole"))
    out = tmp_path / "killed"
    ckpts = tmp_path / "killed.checkpoints"
    _kill_when(_recover(pruned, out), lambda: (ckpts / "step-000008" / "trainer_state.json").exists())
    assert not out.exists()
    _run(_recover(pruned, out, "--resume"))
    for name in ("model.safetensors", "config.json", "prune_plan.json"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_killed_while_writing_the_output_leaves_nothing_and_the_next_run_works(pruned, tmp_path):
    out = tmp_path / "out"
    _kill_when(_recover(pruned, out), lambda: any(tmp_path.glob(".out.tmp-*")))
    assert not out.exists()
    assert list(tmp_path.glob(".out.tmp-*"))  # the killed run's half-written output, invisible at --out
    _run(_recover(pruned, out, "--resume"))  # its last checkpoint is the final step: only the output is written
    assert (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".out.*"))  # the stale temporary output was removed
