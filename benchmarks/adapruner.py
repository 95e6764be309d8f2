"""AdaPruner against the default SAAP and LLM-Pruner: SmolLM2-135M, full WikiText-2 and PTB test
sets and the seven zero-shot tasks, with the default reconstruction, without recovery training
(rows: `main`) and with it (rows: `recovered`), and the search ablations of the paper on the
first --ablation-limit windows (rows: `ablation`): TPE vs random search at the same number of
trials, data-only search (metric fixed) and metric-only search (windows fixed).

Protocol: every row is `saap-edge compress` run through its Python API with the default
reconstruction (so AdaPruner's trials are scored on the refit model, as the final one is) and
--no-recover; a recovered row is `saap-edge recover` on that row's pruned model with
--recover-steps K (the CPU default of compress; QA-LoRA, kd loss from the dense model, books).
Each is scored on the test sets and on the first --task-limit items of each zero-shot task
(torch float32, standard errors from the item count). The TPE ablation row reuses the main
row's finished search (its study database is copied). AdaPruner: a pool of --pool-size windows of 128 tokens
of books (seed 0), --calib-samples windows a point, --trials completed trials with
--startup random ones first, objective = perplexity on the first 32 windows of WikiText-2's
*validation* split. Its pool statistics are cached (under $SAAP_EDGE_CACHE), so the first
AdaPruner row pays for them and later rows reuse them; both are reported. Finished rows are
cached under --work, so an interrupted run resumes.

    python benchmarks/adapruner.py --data-dir ../shared/data
    python benchmarks/adapruner.py --smoke --data-dir ../shared/data   # every row on a tiny model (adapruner_smoke.*)
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (compress_and_score, copy_chart, dense_rows, machine, main_of, main_rows,  # noqa: E402
                     method_row, quality_arguments, quality_smoke, quality_table, reconstruct_settings, recovered_rows,
                     task_arguments)

from saap_edge.compress import CompressJob, versions  # noqa: E402
from saap_edge.config import PruneSettings, RunSettings, SearchSettings  # noqa: E402
from saap_edge.render import format_table  # noqa: E402

ABLATIONS = [
    ("TPE, data + metric", {}),
    ("random search", {"sampler": "random"}),
    ("data only (metric fixed)", {"space": "data"}),
    ("metric only (windows fixed)", {"space": "metric"}),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    quality_arguments(p, "adapruner")
    p.add_argument("--baselines", type=Path, default=Path("benchmarks/work/hywia"),
                   help="work folder of benchmarks/hywia.py, whose recovered saap / llm-pruner rows (same protocol, same "
                        "pruned models) this one shares when that benchmark measured them first")
    p.add_argument("--pool-size", type=int, default=SearchSettings().pool_size)
    p.add_argument("--trials", type=int, default=SearchSettings().trials)
    p.add_argument("--startup", type=int, default=SearchSettings().startup)
    task_arguments(p)
    a = p.parse_args(argv)
    if a.smoke:  # and a pool of 16 windows, 3 trials (2 random first); no rows shared unless --baselines is given
        quality_smoke(a, p)
        a.pool_size, a.trials, a.startup = 16, 3, 2
        a.baselines = None if a.baselines == p.get_default("baselines") else a.baselines
    return a


def _measure(a, key: str, table: str, label: str, method: str, ratio: float, limit: int, search: dict | None = None,
             reuse: str | None = None) -> dict:
    """Compress with `method` (no recovery), then score the output on the test sets; `reuse`
    names a row whose finished search this one copies."""
    db = a.work / "models" / f"{key}.search.db"
    if reuse and not db.exists() and (a.work / "models" / f"{reuse}.search.db").exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(a.work / "models" / f"{reuse}.search.db", db)
    s = PruneSettings(method=method, ratio=ratio, calib_samples=a.calib_samples)
    q = SearchSettings(pool_size=a.pool_size, trials=a.trials, startup=a.startup, **(search or {}))
    job = CompressJob(a.model, a.work / "models" / key, s, reconstruct_settings(a),
                      RunSettings(device="cpu", data_dir=a.data_dir, progress=False), overwrite=True, eval_ppl=[],
                      recover=None, search=q)
    row, report = compress_and_score(a, key, job, limit)
    row.update(table=table, label=label)
    if report.search is not None:
        sr = report.search
        row["search"] = {"best": sr["best"], "pool_s": sr["pool_s"], "pool_cached": sr["pool_cache"]["cached"],
                         "search_s": sr["time_s"], "trial_s": sr["trial_s"], "trials": len(sr["trials"]),
                         "settings": sr["settings"], "curve": [[t["number"], t["value"]] for t in sr["trials"]]}
    return row


METHODS = (("adapruner", "adapruner"), ("saap (default)", "saap"), ("llm-pruner (param_mix)", "llm-pruner"))


def run(a: argparse.Namespace) -> dict:
    rows = dense_rows(a) + main_rows(a, METHODS, lambda key, label, method, ratio:
                                     _measure(a, key, "main", label, method, ratio, a.limit))
    for ratio in a.ratios:
        copy_chart(a, f"main-{ratio:.2f}-adapruner", "search.png", f"adapruner{'_smoke' if a.smoke else ''}_search_{ratio:.2f}.png")
    if not a.no_ablations:
        for ratio in a.ablation_ratios:
            for label, overrides in ABLATIONS:
                name = label.split(" ")[0].lower().rstrip(",")
                key = f"ablation-{ratio:.2f}-{name}-{overrides.get('space', 'both')}"
                reuse = f"main-{ratio:.2f}-adapruner" if not overrides else None
                rows.append(method_row(a, key, lambda: _measure(a, key, "ablation", label, "adapruner", ratio,
                                                                a.ablation_limit, overrides, reuse)))
    rows += recovered_rows(a, METHODS, a.baselines)
    return {"benchmark": "adapruner", "model": a.model, "command": "python benchmarks/adapruner.py " + " ".join(sys.argv[1:]),
            "protocol": {"pool_size": a.pool_size, "calib_samples": a.calib_samples, "trials": a.trials,
                         "startup": a.startup, "objective": "wikitext2 validation, 32 windows of 128 tokens",
                         "reconstruction": reconstruct_settings(a).to_dict(), "task_limit": a.task_limit,
                         "recover_steps": a.recover_steps},
            "machine": machine(), "versions": versions(), "rows": [r for r in rows if r]}


def markdown(data: dict) -> str:
    rows = data["rows"]
    if not rows:
        return "# AdaPruner: no rows measured\n"
    datasets = list(rows[0]["ppl"])
    p = data["protocol"]
    out = [f"# AdaPruner on {data['model']}", "",
           f"Every row: `compress` with the default reconstruction (AdaPruner refits its point's own units, `select global`: "
           f"under local selection every point gives one model). AdaPruner: pool {p['pool_size']} "
           f"windows x 128 tokens of books, {p['calib_samples']} windows a point, {p['trials']} trials "
           f"({p['startup']} random first), objective {p['objective']}. Recovered rows: {p.get('recover_steps')} steps of "
           "QA-LoRA (kd loss from the dense model, books) on the row's pruned model (`saap-edge recover`), as `compress` does on a CPU. Zero-shot: the first "
           f"{p.get('task_limit')} items of each task (or the whole set if smaller), torch float32, acc for BoolQ, PIQA, "
           "WinoGrande, ARC-e, acc_norm for HellaSwag, ARC-c, OBQA; ± is one standard error. "
           f"Made by `{data['command']}`; {data['machine']['cores']} CPU cores.", ""]
    for table, title in (("main", "Full test sets, no recovery"), ("recovered", "Full test sets, recovered"),
                         ("ablation", "Search ablations (first test windows only, no recovery)")):
        sel = [r for r in rows if r["table"] == table]
        if not sel:
            continue
        n = ", ".join(f"{d} {k}" for d, k in sel[0]["windows"].items())
        if table != "ablation":
            out += [f"## {title} ({n} windows)", "", quality_table(sel, datasets), ""]
        head = ["ratio", "variant", "removed"] + (datasets if table == "ablation" else []) + \
            ["best point", "search s", "pool statistics s", "s per trial"]
        body = []
        for r in sel:
            sr = r.get("search")
            if table != "ablation" and not sr:
                continue
            per_trial = sum(sr["trial_s"]) / len(sr["trial_s"]) if sr and sr["trial_s"] else None
            best = f"{sr['best']['metric']}, objective {sr['best']['value']:.1f}" if sr else "-"
            body.append([f"{r['ratio']:.0%}", r["label"], f"{r['removed_share']:.2%}"]
                        + ([r["ppl"][d] for d in datasets] if table == "ablation" else [])
                        + [best, sr["search_s"] if sr else None,
                           (f"{sr['pool_s']:.0f} (cached)" if sr["pool_cached"] else f"{sr['pool_s']:.0f}") if sr else None,
                           per_trial])
        if body:
            out += [f"### {title}: the searches" if table != "ablation" else f"## {title} ({n} windows)", "",
                    format_table(head, body), ""]
    return "\n".join(out)


def main(argv=None) -> None:
    main_of("adapruner", parse_args, run, markdown, argv)


if __name__ == "__main__":
    main()
