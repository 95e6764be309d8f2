"""AdaPruner against the default SAAP and LLM-Pruner: SmolLM2-135M, full WikiText-2 and PTB test
sets, with the default reconstruction and no recovery training (rows: `main`), and the search
ablations of the paper on the first --ablation-limit windows (rows: `ablation`): TPE vs random
search at the same number of trials, data-only search (metric fixed) and metric-only search
(windows fixed).

Protocol: every row is `saap-edge compress` run through its Python API with --no-recover and
the default reconstruction (so AdaPruner's trials are scored on the refit model, as the final
one is), then scored on the test sets. AdaPruner: a pool of --pool-size windows of 128 tokens
of books (seed 0), --calib-samples windows a point, --trials completed trials with
--startup random ones first, objective = perplexity on the first 32 windows of WikiText-2's
*validation* split. Its pool statistics are cached (under $SAAP_EDGE_CACHE), so the first
AdaPruner row pays for them and later rows reuse them; both are reported. Finished rows are
cached under --work, so an interrupted run resumes.

    python benchmarks/adapruner.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import cached_row, machine, quality_arguments, write_results  # noqa: E402

from saap_edge.compress import CompressJob, compress, versions  # noqa: E402
from saap_edge.config import PruneSettings, ReconstructSettings, RunSettings, SearchSettings  # noqa: E402
from saap_edge.eval.ppl import evaluate_ppl  # noqa: E402
from saap_edge.models.load import load_model  # noqa: E402
from saap_edge.report import format_table  # noqa: E402

ABLATIONS = [
    ("TPE, data + metric", {}),
    ("random search", {"sampler": "random"}),
    ("data only (metric fixed)", {"space": "data"}),
    ("metric only (windows fixed)", {"space": "metric"}),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    quality_arguments(p, "adapruner")
    p.add_argument("--pool-size", type=int, default=SearchSettings().pool_size)
    p.add_argument("--trials", type=int, default=SearchSettings().trials)
    p.add_argument("--startup", type=int, default=SearchSettings().startup)
    return p.parse_args(argv)


def _row(a, key: str, table: str, label: str, method: str, ratio: float, limit: int, search: dict | None = None) -> dict | None:
    if a.only and not key.startswith(tuple(a.only)):
        return None
    row = cached_row(a.work / "rows" / f"{key}.json", lambda: _measure(a, key, table, label, method, ratio, limit, search))
    print(f"[{time.strftime('%H:%M:%S')}] {key}: {row['ppl']}", flush=True)
    return row


def _measure(a, key: str, table: str, label: str, method: str, ratio: float, limit: int, search: dict | None) -> dict:
    """Compress with `method` (no recovery), then score the output on the test sets."""
    out = a.work / "models" / key
    out.parent.mkdir(parents=True, exist_ok=True)
    s = PruneSettings(method=method, ratio=ratio, calib_samples=a.calib_samples)
    q = SearchSettings(pool_size=a.pool_size, trials=a.trials, startup=a.startup, **(search or {}))
    job = CompressJob(a.model, out, s, ReconstructSettings(), RunSettings(device="cpu", data_dir=a.data_dir, progress=False),
                      overwrite=True, eval_ppl=[], recover=None, search=q)
    t0 = time.perf_counter()
    report = compress(job)
    wall = time.perf_counter() - t0
    loaded = load_model(str(out), "cpu", "float32")
    res = evaluate_ppl(loaded.model, loaded.tokenizer, a.datasets, window=128, limit=limit or None, data_dir=a.data_dir,
                       progress=False)
    row = {"key": key, "table": table, "label": label, "method": method, "ratio": ratio,
           "params": report["params"]["after"], "removed_share": report["params"]["removed_share"],
           "ppl": {k: v["ppl"] for k, v in res.items()}, "windows": {k: v["windows"] for k, v in res.items()},
           "compress_s": wall, "time_s": report["time_s"]}
    if "search" in report:
        sr = report["search"]
        row["search"] = {"best": sr["best"], "pool_s": sr["pool_s"], "pool_cached": sr["pool_cache"]["cached"],
                         "search_s": sr["time_s"], "trial_s": sr["trial_s"], "trials": len(sr["trials"]),
                         "settings": sr["settings"], "curve": [[t["number"], t["value"]] for t in sr["trials"]]}
    return row


def run(a: argparse.Namespace) -> dict:
    rows = []
    for ratio in a.ratios:
        for label, method in (("adapruner", "adapruner"), ("saap (default)", "saap"), ("llm-pruner (param_mix)", "llm-pruner")):
            rows.append(_row(a, f"main-{ratio:.2f}-{method}", "main", label, method, ratio, a.limit))
    if not a.no_ablations:
        for ratio in a.ratios:
            for label, overrides in ABLATIONS:
                name = label.split(" ")[0].lower().rstrip(",")
                rows.append(_row(a, f"ablation-{ratio:.2f}-{name}-{overrides.get('space', 'both')}", "ablation", label,
                                 "adapruner", ratio, a.ablation_limit, overrides))
    return {"benchmark": "adapruner", "model": a.model, "command": "python benchmarks/adapruner.py " + " ".join(sys.argv[1:]),
            "protocol": {"pool_size": a.pool_size, "calib_samples": a.calib_samples, "trials": a.trials,
                         "startup": a.startup, "objective": "wikitext2 validation, 32 windows of 128 tokens",
                         "reconstruction": ReconstructSettings().to_dict(), "recovery": "none"},
            "machine": machine(), "versions": versions(), "rows": [r for r in rows if r]}


def markdown(data: dict) -> str:
    rows = data["rows"]
    if not rows:
        return "# AdaPruner: no rows measured\n"
    datasets = list(rows[0]["ppl"])
    p = data["protocol"]
    out = [f"# AdaPruner on {data['model']}", "",
           f"Every row: `compress` with the default reconstruction (AdaPruner refits its point's own units, `select global`: "
           f"under local selection every point gives one model), no recovery training. AdaPruner: pool {p['pool_size']} "
           f"windows x 128 tokens of books, {p['calib_samples']} windows a point, {p['trials']} trials "
           f"({p['startup']} random first), objective {p['objective']}. Made by `{data['command']}`; "
           f"{data['machine']['cores']} CPU cores.", ""]
    for table, title in (("main", "Full test sets"), ("ablation", "Search ablations (first test windows only)")):
        sel = [r for r in rows if r["table"] == table]
        if not sel:
            continue
        n = ", ".join(f"{d} {k}" for d, k in sel[0]["windows"].items())
        head = ["ratio", "variant", "removed"] + datasets + ["best point", "search s", "pool statistics s", "s per trial"]
        body = []
        for r in sel:
            sr = r.get("search")
            per_trial = sum(sr["trial_s"]) / len(sr["trial_s"]) if sr and sr["trial_s"] else None
            best = f"{sr['best']['metric']}, objective {sr['best']['value']:.1f}" if sr else "-"
            body.append([f"{r['ratio']:.0%}", r["label"], f"{r['removed_share']:.2%}"] + [r["ppl"][d] for d in datasets]
                        + [best, sr["search_s"] if sr else None,
                           (f"{sr['pool_s']:.0f} (cached)" if sr["pool_cached"] else f"{sr['pool_s']:.0f}") if sr else None,
                           per_trial])
        out += [f"## {title} ({n} windows)", "", format_table(head, body), ""]
    return "\n".join(out)


def main(argv=None) -> None:
    a = parse_args(argv)
    data = run(a)
    paths = write_results(a.out, "adapruner", data, markdown(data))
    print(markdown(data))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
