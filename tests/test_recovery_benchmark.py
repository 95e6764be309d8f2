"""The judgements benchmarks/recovery.py writes into its results: which artifacts are on the
Pareto front of file size against perplexity, and what a setting's curve in log(steps) predicts."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from recovery import _predict, dominated_by, log_fit, verdict  # noqa: E402


def _entries(**points):
    return {label: {"mib": mib, "ppl": ppl, "decode_tok_s": 1.0} for label, (mib, ppl) in points.items()}


def test_pareto_front_of_size_against_perplexity():
    e = _entries(**{"dense Q2_K": (84.0, 75.0), "dense Q2_K small emb": (60.0, 80.0),
                    "saap-edge: a": (66.0, 106.0),   # larger and worse than the small-embedding quant
                    "saap-edge: b": (42.0, 400.0),   # the smallest file: nothing smaller is better
                    "saap-edge: c": (60.0, 80.0)})   # ties with a dense quant: neither dominates
    assert dominated_by(e, "saap-edge: a") == ["dense Q2_K small emb", "saap-edge: c"]
    assert dominated_by(e, "saap-edge: b") == []
    assert dominated_by(e, "saap-edge: c") == []
    lines = verdict({"entries": e})
    assert any(line.startswith("- saap-edge: a (66.0 MiB") and "off the front; dense Q2_K small emb" in line for line in lines)
    assert any(line.startswith("- saap-edge: b (42.0 MiB") and "smaller than every dense quant" in line for line in lines)
    assert lines[-1].startswith("- Target at least one saap-edge artifact on llama.cpp's Pareto front: met by 2")


def test_pareto_target_missed_when_a_dense_quant_dominates_each():
    e = _entries(**{"dense Q2_K": (50.0, 75.0), "saap-edge: a": (66.0, 106.0)})
    assert verdict({"entries": e})[-1].endswith("missed: a dense quant dominates each of ours.")


def _row(steps, ppl, train_s=None):
    return {"steps": steps, "ppl": {"wikitext2": ppl}, "train_s": train_s if train_s is not None else steps * 6.0}


def test_log_steps_line_and_its_prediction():
    # points exactly on ppl = 130 - 4 ln(steps)
    pts = [_row(s, 130 - 4 * math.log(s)) for s in (60, 300, 600)]
    c, m = log_fit(pts)
    assert (c, m) == pytest.approx((130.0, -4.0))
    text = _predict(pts, goal=100.0)
    steps = math.exp(30 / 4)  # where the line reaches 100
    assert f"about {steps:,.0f} steps" in text
    assert f"predicts {130 - 4 * math.log(1200):.1f} at 1200 steps" in text
    assert f"({steps * 6.0 / 3600:,.1f} hours" in text


def test_no_improvement_predicts_no_budget():
    assert "predicts no budget" in _predict([_row(60, 110.0), _row(300, 111.0)], goal=90.0)
