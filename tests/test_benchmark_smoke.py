"""Every benchmark script `make bench` runs (and chat.py, reconstruct_precision.py) runs its
`--smoke` configuration: the same code path on a tiny model or tiny sizes, each in a subprocess
as a user runs it. Each must exit 0, write <name>_smoke.json and .md to --out (nothing there
without the `_smoke` name) and hold at least one measured row.

Minutes in all, so deselected by default; `make smoke` runs them (pytest -m smoke).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.smoke

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _ppl_rows(data: dict) -> list[dict]:
    """Rows with a finite perplexity on every test set they were scored on."""
    return [r for r in data["rows"] if r.get("ppl") and all(finite(v) for v in r["ppl"].values())]


def check_prune_quality(data: dict) -> None:
    rows = _ppl_rows(data)
    assert any(r["table"] == "dense" for r in rows)
    assert any(r["table"] == "main" and r["reconstruct"] == "lsq" and 0 < r["removed_share"] < 1 for r in rows)
    assert len(rows) == len(data["rows"]) and not data["not_run"]


def check_recovery(data: dict) -> None:
    rows = _ppl_rows(data)
    assert any(r.get("table") == "grid" for r in rows)
    assert any(r.get("table") == "main" and r.get("steps", 0) > 0 and finite(r.get("train_s")) for r in rows)
    assert any(r.get("table") == "zeroshot" and 0 <= r["average"] <= 1 for r in data["rows"])
    llama = next(r for r in data["rows"] if r.get("table") == "llama")
    assert any("Q4_1 embeddings (llama.cpp" in k for k in llama["entries"])  # a dense quant with a forced embedding type
    assert all(finite(e["ppl"]) and e["mib"] > 0 for e in llama["entries"].values())
    assert data["verdict"][-1].startswith("- Target at least one saap-edge artifact on llama.cpp's Pareto front")
    costs = [r for r in data["rows"] if r.get("table") == "cost"]
    assert len(costs) == 2 and all(finite(r["step_s"]) and r["step_s"] > 0 for r in costs)
    # the equal-CPU-time row trained the steps its probe priced (or says its fixed costs exceed the budget)
    equal = next(r for r in data["rows"] if r.get("table") == "equal")
    assert (equal["steps"] >= 1 and finite(equal["ppl"]["wikitext2"])) or (equal["steps"] == 0 and equal["infeasible"])
    assert not [r for r in data["rows"] if "failed" in r]


def check_export_quality(data: dict) -> None:
    rows = data["rows"]
    assert rows[0]["runtime"] == "torch (float32)" and len(rows) > 1
    assert all(finite(r["ppl"]) and finite(r["vs_torch"]) for r in rows)


def check_matmulnbits_zero_points(data: dict) -> None:
    assert len(data["rows"]) == 4 and all(finite(r["us"]) and r["us"] > 0 for r in data["rows"])


def _with_tasks(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "tasks" in r and finite(r.get("average")) and 0 <= r["average"] <= 1]


def check_report(data: dict) -> None:
    rows = _with_tasks(_ppl_rows(data))
    assert any(r["table"] == "dense" for r in rows) and any(r["table"] == "I" for r in rows)
    assert any(r["table"] == "XII" and r["recovery"] == "qalora" for r in rows)


def check_method(method: str):
    def check(data: dict) -> None:
        rows = _ppl_rows(data)
        assert any(r["table"] == "main" and r["method"] == method for r in _with_tasks(rows))
        assert any(r["table"] == "recovered" for r in rows) and any(r["table"] == "ablation" for r in rows)
    return check


def check_chat(data: dict) -> None:
    assert len(data["models"]) == 2
    for m in data["models"]:
        assert len(m["answers"]) == len(data["prompts"]) and finite(m["mean_answer_tokens"])


def check_reconstruct_precision(data: dict) -> None:
    assert data["rows"] and all(finite(r["rel_err_fp64"]) and finite(r["rel_err_fp32"]) for r in data["rows"])
    assert data["verdicts"]


def check_tokenizer_parity(data: dict) -> None:
    now = [r for r in data["rows"] if r["written"] == "saap-edge now"]
    assert len(now) >= 3 and all(r["texts_equal"] == r["texts"] and r["wiki_ids_equal"] for r in now)
    assert any(r["written"] == "before" and not r["wiki_ids_equal"] for r in data["rows"])


# script, results name, takes --data-dir, takes --work, the check of its JSON
SCRIPTS = [
    ("prune_quality", "prune_quality_smoke", True, True, check_prune_quality),
    ("recovery", "recovery_smoke", True, True, check_recovery),
    ("export_quality", "export_quality_smoke", True, True, check_export_quality),
    ("matmulnbits_zero_points", "matmulnbits_zero_points_smoke", False, False, check_matmulnbits_zero_points),
    ("report", "report_smoke", True, True, check_report),
    ("adapruner", "adapruner_smoke", True, True, check_method("adapruner")),
    ("hywia", "hywia_smoke", True, True, check_method("hywia")),
    ("chat", "chat_smoke", True, True, check_chat),
    ("reconstruct_precision", "reconstruct_precision_smoke", True, False, check_reconstruct_precision),
    ("tokenizer_parity", "tokenizer_parity_smoke", True, False, check_tokenizer_parity),
]


@pytest.mark.parametrize("script, name, data_flag, work_flag, check", SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_benchmark_smoke(script, name, data_flag, work_flag, check, tmp_path, data_dir):
    out = tmp_path / "out"
    cmd = [sys.executable, f"benchmarks/{script}.py", "--smoke", "--out", str(out)]
    cmd += ["--data-dir", str(data_dir)] if data_flag else []
    cmd += ["--work", str(tmp_path / "work")] if work_flag else []
    # one intra-op thread unless the caller says otherwise: on a busy machine torch's threads waiting on each other
    # made these tiny-model runs several times slower (they check code paths, not speed)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert (out / f"{name}.md").is_file() and (out / f"{name}.md").read_text().strip()
    data = json.loads((out / f"{name}.json").read_text())
    check(data)
    assert "--smoke" in json.dumps(data.get("command", ""))
    # results of a full run are never written by a smoke run: every file it leaves in --out is a `_smoke` one
    assert all("_smoke" in p.name for p in out.iterdir()), sorted(p.name for p in out.iterdir())
