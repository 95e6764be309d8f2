"""The judgements benchmarks/recovery.py writes into its results: which artifacts are on the
Pareto front of file size against perplexity, what a setting's curve in log(steps) predicts, and
how many steps a row gets at equal CPU time."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from recovery import _predict, dominated_by, equal_steps, equal_time_section, log_fit, verdict  # noqa: E402


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


def test_equal_cpu_time_steps_pay_the_fixed_costs_first():
    ref = {"step_s": 5.0, "fixed_s": 0.0}
    # 60 offsets steps = 300 s; GPTQ + offsets pass take 100 s, a full step 10 s: 20 steps fit
    assert equal_steps(60, ref, {"step_s": 10.0, "fixed_s": 100.0}) == 20
    assert equal_steps(60, ref, ref) == 60  # the reference itself
    assert equal_steps(60, ref, {"step_s": 7.0, "fixed_s": 0.0}) == 42  # floor(300 / 7): never over the budget
    assert equal_steps(60, ref, {"step_s": 1.0, "fixed_s": 400.0}) == 0  # the fixed costs alone exceed it


def test_equal_cpu_time_section_lists_reference_rows_and_infeasible_ones():
    rows = [{"key": "cost-qd-offsets-rtn", "table": "cost", "step_s": 5.0, "fixed_s": 0.0},
            {"key": "cost-dq-full-rtn", "table": "cost", "step_s": 8.0, "fixed_s": 1.0},
            {"key": "order-qd-offsets-rtn-60", "table": "order", "label": "offsets", "steps": 60,
             "ppl": {"wikitext2": 116.0}, "train_s": 300.0},
            {"key": "equal-dq-full-rtn-60", "table": "equal", "label": "full then RTN", "budget": 60, "steps": 37,
             "ppl": {"wikitext2": 133.0}, "train_s": 296.0, "quantize_s": 1.0},
            {"key": "equal-x-60", "table": "equal", "label": "too dear", "budget": 60, "steps": 0,
             "infeasible": "its fixed costs alone take longer than the budget"}]
    text = "\n".join(equal_time_section({"protocol": {"grid_limit": 256, "datasets": ["wikitext2", "ptb"]}, "rows": rows}))
    assert "| dq-full-rtn " in text and "1.60x" in text  # the probe's step against the offsets step
    assert "reference: offsets" in text and "| 116 " in text and "| 133 " in text and "| 297 " in text
    assert "too dear" in text and "fixed costs alone" in text
    assert equal_time_section({"protocol": {}, "rows": rows[:3]}) == []  # no equal rows, no section
