"""AdaPruner against the default SAAP and LLM-Pruner: SmolLM2-135M, full WikiText-2 and PTB test
sets and the seven zero-shot tasks, with the default reconstruction, without recovery training
(rows: `main`) and with it (rows: `recovered`), and the search ablations of the paper on the
first --ablation-limit windows (rows: `ablation`): TPE vs random search at the same number of
trials, data-only search (metric fixed) and metric-only search (windows fixed).

Protocol: every row is `saap-edge compress` run through its Python API with the default
reconstruction (so AdaPruner's trials are scored on the refit model, as the final one is),
--no-recover or --recover-steps K (the CPU default; QA-LoRA, kd loss, books), then scored on
the test sets and on the first --task-limit items of each zero-shot task (torch float32,
standard errors from the item count). A recovered AdaPruner row reuses its unrecovered row's
finished search (the study database is copied: same model, pool, objective and space). AdaPruner: a pool of --pool-size windows of 128 tokens
of books (seed 0), --calib-samples windows a point, --trials completed trials with
--startup random ones first, objective = perplexity on the first 32 windows of WikiText-2's
*validation* split. Its pool statistics are cached (under $SAAP_EDGE_CACHE), so the first
AdaPruner row pays for them and later rows reuse them; both are reported. Finished rows are
cached under --work, so an interrupted run resumes.

    python benchmarks/adapruner.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (TASK_COLUMNS, TASKS, cached_row, machine, quality_arguments, task_average,  # noqa: E402
                     task_average_stderr, write_results, zero_shot)

from saap_edge.compress import CompressJob, compress, versions  # noqa: E402
from saap_edge.config import (CPU_RECOVER_STEPS, PruneSettings, ReconstructSettings, RecoverSettings,  # noqa: E402
                              RunSettings, SearchSettings)
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
    p.add_argument("--task-limit", type=int, default=300, help="items of each zero-shot task (0: every item)")
    p.add_argument("--recover-steps", type=int, default=CPU_RECOVER_STEPS, help="recovery steps of the recovered rows")
    p.add_argument("--no-recovered", action="store_true", help="skip the recovered rows")
    p.add_argument("--ablation-ratios", type=float, nargs="+", default=[0.2],
                   help="ratios of the ablation rows (each is a full search)")
    return p.parse_args(argv)


def _row(a, key: str, table: str, label: str, method: str, ratio: float, limit: int, search: dict | None = None,
         recover: bool = False, tasks: bool = False, reuse: str | None = None) -> dict | None:
    """One row, cached under --work/rows; `reuse` names a row whose finished search this one copies."""
    if a.only and not key.startswith(tuple(a.only)):
        return None
    db = a.work / "models" / f"{key}.search.db"
    if reuse and not db.exists() and (a.work / "models" / f"{reuse}.search.db").exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(a.work / "models" / f"{reuse}.search.db", db)
    row = cached_row(a.work / "rows" / f"{key}.json",
                     lambda: _measure(a, key, table, label, method, ratio, limit, search, recover))
    if tasks and "tasks" not in row:  # rows measured before the zero-shot columns existed
        row = _add_tasks(a, row)
    print(f"[{time.strftime('%H:%M:%S')}] {key}: {row['ppl']} average {row.get('average')}", flush=True)
    return row


def _add_tasks(a, row: dict) -> dict:
    from saap_edge.models.load import load_model

    loaded = load_model(str(a.work / "models" / row["key"]), "cpu", "float32")
    t0 = time.perf_counter()
    row["tasks"] = zero_shot(loaded.model, loaded.tokenizer, a.data_dir, a.task_limit)
    row["average"], row["average_stderr"] = task_average(row["tasks"]), task_average_stderr(row["tasks"])
    row["tasks_s"] = time.perf_counter() - t0
    path = a.work / "rows" / f"{row['key']}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(row, indent=1, default=str))
    tmp.replace(path)
    return row


def _measure(a, key: str, table: str, label: str, method: str, ratio: float, limit: int, search: dict | None,
             recover: bool) -> dict:
    """Compress with `method` (recovered or not), then score the output on the test sets."""
    out = a.work / "models" / key
    out.parent.mkdir(parents=True, exist_ok=True)
    s = PruneSettings(method=method, ratio=ratio, calib_samples=a.calib_samples)
    q = SearchSettings(pool_size=a.pool_size, trials=a.trials, startup=a.startup, **(search or {}))
    rec = RecoverSettings(steps=a.recover_steps) if recover else None
    job = CompressJob(a.model, out, s, ReconstructSettings(), RunSettings(device="cpu", data_dir=a.data_dir, progress=False),
                      overwrite=True, eval_ppl=[], recover=rec, search=q)
    t0 = time.perf_counter()
    report = compress(job)
    wall = time.perf_counter() - t0
    loaded = load_model(str(out), "cpu", "float32")
    res = evaluate_ppl(loaded.model, loaded.tokenizer, a.datasets, window=128, limit=limit or None, data_dir=a.data_dir,
                       progress=False)
    row = {"key": key, "table": table, "label": label, "method": method, "ratio": ratio,
           "params": report["params"]["after"], "removed_share": report["params"]["removed_share"],
           "ppl": {k: v["ppl"] for k, v in res.items()}, "windows": {k: v["windows"] for k, v in res.items()},
           "compress_s": wall, "time_s": report["time_s"], "recovery": "qalora" if recover else "none"}
    if "search" in report:
        sr = report["search"]
        row["search"] = {"best": sr["best"], "pool_s": sr["pool_s"], "pool_cached": sr["pool_cache"]["cached"],
                         "search_s": sr["time_s"], "trial_s": sr["trial_s"], "trials": len(sr["trials"]),
                         "settings": sr["settings"], "curve": [[t["number"], t["value"]] for t in sr["trials"]]}
    return row


METHODS = (("adapruner", "adapruner"), ("saap (default)", "saap"), ("llm-pruner (param_mix)", "llm-pruner"))


def _dense(a) -> dict:
    from saap_edge.models.load import load_model

    loaded = load_model(a.model, "cpu", "float32")
    res = evaluate_ppl(loaded.model, loaded.tokenizer, a.datasets, window=128, limit=a.limit or None, data_dir=a.data_dir,
                       progress=False)
    params = sum(t.numel() for t in loaded.model.parameters())
    tasks = zero_shot(loaded.model, loaded.tokenizer, a.data_dir, a.task_limit)
    return {"key": "dense", "table": "main", "label": "dense", "method": "dense", "ratio": 0.0, "params": params,
            "removed_share": 0.0, "ppl": {k: v["ppl"] for k, v in res.items()}, "windows": {k: v["windows"] for k, v in res.items()},
            "tasks": tasks, "average": task_average(tasks), "average_stderr": task_average_stderr(tasks), "recovery": "none"}


def run(a: argparse.Namespace) -> dict:
    rows = [] if a.only and not "dense".startswith(tuple(a.only)) else [cached_row(a.work / "rows" / "dense.json", lambda: _dense(a))]
    for ratio in a.ratios:
        for label, method in METHODS:
            rows.append(_row(a, f"main-{ratio:.2f}-{method}", "main", label, method, ratio, a.limit, tasks=True))
    if not a.no_ablations:
        for ratio in a.ablation_ratios:
            for label, overrides in ABLATIONS:
                name = label.split(" ")[0].lower().rstrip(",")
                rows.append(_row(a, f"ablation-{ratio:.2f}-{name}-{overrides.get('space', 'both')}", "ablation", label,
                                 "adapruner", ratio, a.ablation_limit, overrides,
                                 reuse=f"main-{ratio:.2f}-adapruner" if not overrides else None))
    if not a.no_recovered:
        for ratio in a.ratios:
            for label, method in METHODS:
                rows.append(_row(a, f"recovered-{ratio:.2f}-{method}-k{a.recover_steps}", "recovered", label + " + qalora",
                                 method, ratio, a.limit, recover=True, tasks=True, reuse=f"main-{ratio:.2f}-{method}"))
    return {"benchmark": "adapruner", "model": a.model, "command": "python benchmarks/adapruner.py " + " ".join(sys.argv[1:]),
            "protocol": {"pool_size": a.pool_size, "calib_samples": a.calib_samples, "trials": a.trials,
                         "startup": a.startup, "objective": "wikitext2 validation, 32 windows of 128 tokens",
                         "reconstruction": ReconstructSettings().to_dict(), "task_limit": a.task_limit,
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
           "QA-LoRA (kd loss, books), as `compress` does on a CPU. Zero-shot: the first "
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
            head = ["ratio", "variant", "removed"] + datasets + [TASK_COLUMNS[t][0] for t in TASKS] + ["Average"]
            body = [[f"{r['ratio']:.0%}", r["label"], f"{r['removed_share']:.2%}"] + [r["ppl"][d] for d in datasets]
                    + ([_pct(r["tasks"][t], TASK_COLUMNS[t][1]) for t in TASKS]
                       + [f"{100 * r['average']:.2f} ± {100 * r['average_stderr']:.2f}"] if "tasks" in r else ["-"] * 8)
                    for r in sel]
            out += [f"## {title} ({n} windows)", "", format_table(head, body), ""]
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


def _pct(metrics: dict, key: str) -> str:
    return f"{100 * metrics[key]:.1f} ± {100 * metrics[key + '_stderr']:.1f}"


def main(argv=None) -> None:
    a = parse_args(argv)
    data = run(a)
    paths = write_results(a.out, "adapruner", data, markdown(data))
    print(markdown(data))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
