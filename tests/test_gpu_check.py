"""The prepared GPU run's script on tiny shapes (its CPU smoke mode): the Table III shapes it
builds have the parameter counts asked for, and it writes its JSON / Markdown."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check  # noqa: E402


def test_saap_shapes_hit_the_parameter_targets():
    base = gpu_check.LLAMA_7B
    n = base["num_hidden_layers"]
    dense = gpu_check.params_of(base, [32] * n, [11008] * n)
    assert abs(dense - 6.74e9) / 6.74e9 < 0.01  # LLaMA-7B
    for target in gpu_check.TABLE3_PARAMS:
        cfg = gpu_check.shaped(base, target)
        got = gpu_check.params_of(base, cfg.num_attention_heads_per_layer, cfg.intermediate_size_per_layer)
        assert abs(got - target) / target < 0.01
        assert cfg.num_attention_heads_per_layer[:4] == [32] * 4 and cfg.intermediate_size_per_layer[-2:] == [11008] * 2
        assert all(f % 32 == 0 for f in cfg.intermediate_size_per_layer)


def test_small_run_writes_its_results(tmp_path):
    assert gpu_check.main(["--small", "--out", str(tmp_path), "--reps", "1"]) == 0
    data = json.loads((tmp_path / "gpu_check_small.json").read_text())
    assert [r["model"] for r in data["rows"]][0] == "dense" and len(data["rows"]) == 3
    params = [r["params"] for r in data["rows"]]
    assert params[0] > params[1] > params[2]
    assert 0.15 < data["estimation"]["removed_share"] < 0.25 and data["bandwidth"]["gbs"] > 0
    assert "| dense |" in (tmp_path / "gpu_check_small.md").read_text()
