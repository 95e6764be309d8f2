"""The README's first command on the real model: `make demo`'s steps with their defaults
(compress SmolLM2-135M at 20% with the CPU recovery budget, export the default GGUF, generate,
and chat through the model's own template). About 10 minutes on 2 cores, so marked slow:
`python -m pytest -m slow tests/test_demo_path.py`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _cli(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "saap_edge.cli", *args], capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"saap-edge {' '.join(args)} exited {run.returncode}: {run.stderr[-3000:]}"
    return run


def test_the_demo_compresses_exports_and_runs_smollm2(tmp_path, data_dir):
    from saap_edge.errors import UserError
    from saap_edge.models.load import DEFAULT_MODEL, resolve_model

    pytest.importorskip("llama_cpp")
    try:
        resolve_model(DEFAULT_MODEL)  # the model file ships in a package that is found, not imported
    except UserError as exc:
        pytest.skip(f"could not import the default model: {exc}")
    out = tmp_path / "saap-out"
    _cli("compress", "--ratio", "0.2", "--out", str(out), "--no-progress", "--data-dir", str(data_dir))
    report = json.loads((out / "report.json").read_text())
    assert 0.19 <= report["params"]["removed_share"] <= 0.21
    assert report["recovery"]["group_size"] and report["recovery"]["steps"] > 0
    wikitext = report["ppl"]["wikitext2"]
    # recovery helps: the int4 model after training beats the pruned fp model's windows it was scored on
    assert wikitext["recovered"]["ppl"] < wikitext["after"]["ppl"] * 1.05
    _cli("export", str(out), "--format", "gguf", "--quant", "q4_1", "--no-progress")
    ggufs = list(out.glob("*.gguf"))
    assert len(ggufs) == 1 and (out / "Modelfile").is_file()
    text = _cli("run", str(ggufs[0]), "--prompt", "The capital of France is", "-n", "12").stdout
    assert text.strip()
    chat = _cli("run", str(ggufs[0]), "--chat", "--prompt", "What is 2 + 2?", "-n", "24").stdout
    assert chat.strip()
