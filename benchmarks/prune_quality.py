"""Pruning quality without recovery: every method (and the SAAP variants the paper leaves
open) at several ratios on one model, WikiText-2 and PTB perplexity on 128-token windows.

Protocol: one model load, one calibration draw (--calib, --calib-samples x --seq-len tokens,
--seed) shared by all rows; calibration statistics (Taylor scores, activation statistics)
are collected once and shared by the methods that read them, and each row is charged the
collection time of what it reads. Perplexity: non-overlapping 128-token windows of the test
text joined by blank lines, the first --limit windows (N stated in the table).
Peak memory: the highest RSS sampled (10 ms) while a row ran, in one process.

    python benchmarks/prune_quality.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import PeakRSS, machine, timed, write_results  # noqa: E402

from saap_edge.compress import versions  # noqa: E402
from saap_edge.config import PruneSettings  # noqa: E402
from saap_edge.data import calibration_samples  # noqa: E402
from saap_edge.eval.ppl import evaluate_ppl  # noqa: E402
from saap_edge.models.load import load_model  # noqa: E402
from saap_edge.prune import prune, statistics  # noqa: E402
from saap_edge.prune.groups import total_params  # noqa: E402
from saap_edge.report import format_table  # noqa: E402

# Baselines, then SAAP: the default and the variants the paper leaves open (fusion scope,
# indicator, pruning direction, weight-norm extent, per-layer cap, cost weighting).
# (label, settings overrides, statistic it reads)
BASELINES = [
    ("llm-pruner (vectorize)", {"method": "llm-pruner", "taylor": "vectorize"}, "taylor"),
    ("llm-pruner (param_mix)", {"method": "llm-pruner", "taylor": "param_mix"}, "taylor"),
    ("flap", {"method": "flap"}, "inputs"),
    ("wanda-sp", {"method": "wanda-sp"}, "inputs"),
    ("magnitude", {"method": "magnitude"}, None),
    ("random", {"method": "random"}, None),
]
PAPER = {"method": "saap", "fusion_scope": "global", "indicator": "fluctuation", "direction": "high", "layer_cap": 1.0}
SAAP_VARIANTS = [
    ("saap (default: scope all, bound, cap 0.8)", {"method": "saap"}, "taylor"),
    ("saap paper-literal (scope global, fluctuation, prune high)", PAPER, "taylor"),
    ("saap scope global, fluctuation, prune low", {**PAPER, "direction": "low"}, "taylor"),
    ("saap scope global, fluctuation, prune low, norm out", {**PAPER, "direction": "low", "weight_norm": "out"}, "taylor"),
    ("saap scope layer, fluctuation, prune low", {**PAPER, "direction": "low", "fusion_scope": "layer"}, "taylor"),
    ("saap scope all, fluctuation, prune low, cap 0.8", {"method": "saap", "indicator": "fluctuation", "direction": "low"}, "taylor"),
    ("saap scope all, no indicator (mean), cap 0.8", {"method": "saap", "indicator": "none"}, "taylor"),
    ("saap scope all, bound, no cap", {"method": "saap", "layer_cap": 1.0}, "taylor"),
    ("saap scope all, bound, cap 0.8, cost^1", {"method": "saap", "cost_exponent": 1.0}, "taylor"),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument("--datasets", nargs="+", default=["wikitext2", "ptb"])
    p.add_argument("--limit", type=int, default=64, help="128-token windows per dataset (0: all)")
    p.add_argument("--calib", default="books")
    p.add_argument("--calib-samples", type=int, default=50)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--only", nargs="*", default=None, help="run only rows whose label starts with one of these")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--name", default="prune_quality")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    limit = args.limit or None
    loaded = load_model(args.model, "cpu", "float32")
    model, tok = loaded.model, loaded.tokenizer
    samples, calib_hash = calibration_samples(tok, args.calib, args.calib_samples, args.seq_len, args.seed, args.data_dir)
    ppl = lambda m: {k: v["ppl"] for k, v in evaluate_ppl(m, tok, args.datasets, window=128, limit=limit, data_dir=args.data_dir).items()}  # noqa: E731
    dense_ppl = ppl(model)
    rows = [{"label": "dense", "ratio": 0.0, "params": total_params(model), "removed_share": 0.0, "ppl": dense_ppl}]
    stats = statistics(model, samples, PruneSettings(), progress=True)
    stat_time: dict = {}
    stat_peak: dict = {}
    for ratio in args.ratios:
        for label, overrides, reads in BASELINES + SAAP_VARIANTS:
            if args.only and not label.startswith(tuple(args.only)):
                continue
            s = PruneSettings(ratio=ratio, seed=args.seed, calib=args.calib, calib_samples=args.calib_samples, seq_len=args.seq_len, **overrides).validate()
            if reads and reads not in stat_time:  # the first reader collects, timed alone
                with PeakRSS() as mem, timed(stat_time, reads):
                    stats.taylor(with_param_mix=True) if reads == "taylor" else stats.inputs()
                stat_peak[reads] = mem.peak_mib
            times: dict = {}
            with PeakRSS() as mem, timed(times, "prune_s"):
                result = prune(model, samples, s, progress=False, stats=stats)
            row = {
                "label": label, "ratio": ratio, "settings": s.to_dict(), "params": result.plan.params["after"],
                "removed_share": result.plan.params["removed_share"],
                "wall_s": times["prune_s"] + stat_time.get(reads, 0.0),
                "peak_rss_mib": max(mem.peak_mib, stat_peak.get(reads, 0.0)),
                "kept_heads": [lp.kept_heads for lp in result.plan.layers],
                "kept_mlp": [len(lp.channels) for lp in result.plan.layers],
            }
            row["ppl"] = ppl(result.model)
            rows.append(row)
            print(f"[{time.strftime('%H:%M:%S')}] {ratio:.0%} {label}: {row['ppl']}", flush=True)
            del result
    return {
        "benchmark": "prune_quality",
        "model": loaded.source,
        "protocol": {
            "calibration": {"source": args.calib, "samples": args.calib_samples, "seq_len": args.seq_len, "seed": args.seed, "sha256": calib_hash},
            "ppl": {"window": 128, "windows_per_dataset": limit or "all", "split": "test", "join": "blank lines"},
            "recovery": "none",
            "memory": "peak RSS sampled every 10 ms while the row ran, including the collection of the statistic it reads (one process, dense model loaded)",
            "wall_time": "ranking + search + slicing, plus the collection time of the statistic the method reads",
        },
        "statistic_collection_s": stat_time,
        "machine": machine(),
        "versions": versions(),
        "rows": rows,
    }


def markdown(data: dict) -> str:
    datasets = list(data["rows"][0]["ppl"])
    n = data["protocol"]["ppl"]["windows_per_dataset"]
    headers = ["ratio", "method", "params", "removed"] + [f"PPL {d}" for d in datasets] + ["wall s", "peak RSS MiB"]
    rows = []
    for r in data["rows"]:
        rows.append([f"{r['ratio']:.0%}", r["label"], r["params"], f"{r['removed_share']:.2%}"] + [r["ppl"][d] for d in datasets]
                    + [r.get("wall_s"), r.get("peak_rss_mib")])
    cal = data["protocol"]["calibration"]
    head = (
        f"# Pruning quality without recovery: {data['model']['model']}\n\n"
        f"Perplexity on the first {n} non-overlapping 128-token windows of each test set (text joined by blank lines); "
        f"calibration {cal['samples']} x {cal['seq_len']} tokens of `{cal['source']}`, seed {cal['seed']}; no recovery. "
        f"Machine: {data['machine']['cores']} CPU cores, float32. Made by `python benchmarks/prune_quality.py --data-dir ../shared/data`.\n\n"
    )
    return head + format_table(headers, rows) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    data = run(args)
    paths = write_results(args.out, args.name, data, markdown(data))
    print(markdown(data))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
