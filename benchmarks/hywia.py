"""HyWIA against the default SAAP and LLM-Pruner: SmolLM2-135M, full WikiText-2 and PTB test sets
and the seven zero-shot tasks, with the default reconstruction, without recovery training (rows:
`main`) and with it (rows: `recovered`), and the blend ablations on the first --ablation-limit
windows (rows: `ablation`): a fixed 50/50 blend, coarse only, fine only, and the learned blend
(the main row's model, rescored).

Protocol: every row is `saap-edge compress` run through its Python API with the default
reconstruction and --no-recover; a recovered row is `saap-edge recover` on that row's pruned
model with --recover-steps K (the CPU default of compress; QA-LoRA, kd loss from the dense
model, books). Each is scored on the test sets and on the first --task-limit items of each zero-shot task (torch
float32, standard errors from the item count). HyWIA: the default settings (fine = first
order, KL to the dense model under the soft mask, --hywia-steps steps of --hywia-batch
calibration windows). The dense, SAAP and LLM-Pruner rows are the AdaPruner benchmark's
(same protocol; read from --baselines when that benchmark has measured them, measured here
otherwise). Finished rows are cached under --work, so an interrupted run resumes.

    python benchmarks/hywia.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (add_tasks, cached_row, copy_chart, compress_and_score, dense_row, recover_and_score, machine, quality_arguments,  # noqa: E402
                     main_of, quality_table, task_arguments)

from saap_edge.compress import CompressJob, versions  # noqa: E402
from saap_edge.config import HywiaSettings, PruneSettings, ReconstructSettings, RunSettings  # noqa: E402
from saap_edge.report import format_table  # noqa: E402

METHODS = (("hywia", "hywia"), ("saap (default)", "saap"), ("llm-pruner (param_mix)", "llm-pruner"))
ABLATIONS = [("fixed 50/50 blend", "fixed"), ("coarse only", "coarse"), ("fine only", "fine"), ("learned blend", "learned")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    quality_arguments(p, "hywia")
    task_arguments(p)
    p.add_argument("--baselines", type=Path, default=Path("benchmarks/work/adapruner"),
                   help="work folder of benchmarks/adapruner.py whose dense / saap / llm-pruner rows this one shares")
    p.add_argument("--hywia-steps", type=int, default=HywiaSettings().steps)
    p.add_argument("--hywia-batch", type=int, default=HywiaSettings().batch)
    return p.parse_args(argv)


def _shared(a, key: str) -> None:
    """Copy a baseline row (and its model, for the zero-shot columns) measured by the AdaPruner benchmark."""
    row, model = a.baselines / "rows" / f"{key}.json", a.baselines / "models" / key
    if (a.work / "rows" / f"{key}.json").exists() or not row.exists() or a.baselines.resolve() == a.work.resolve():
        return
    (a.work / "rows").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(row, a.work / "rows" / f"{key}.json")
    if model.exists() and not (a.work / "models" / key).exists():
        (a.work / "models").mkdir(parents=True, exist_ok=True)
        (a.work / "models" / key).symlink_to(model.resolve(), target_is_directory=True)


def _row(a, key: str, table: str, label: str, method: str, ratio: float, limit: int, blend: str = "learned",
         tasks: bool = False, source: str | None = None) -> dict | None:
    if a.only and not key.startswith(tuple(a.only)):
        return None
    _shared(a, key)
    row = cached_row(a.work / "rows" / f"{key}.json",
                     lambda: _measure(a, key, table, label, method, ratio, limit, blend) if source is None else
                     _recovered(a, key, table, label, source, limit))
    if tasks and "tasks" not in row:
        row = add_tasks(a, row, a.work / "models" / key)
    print(f"[{time.strftime('%H:%M:%S')}] {key}: {row['ppl']} average {row.get('average')}", flush=True)
    return row


def _rescore(a, key: str, main: str, table: str, label: str, limit: int) -> dict:
    """A row of the model another row compressed with the same settings, scored on `limit` windows."""
    from saap_edge.eval.ppl import evaluate_ppl
    from saap_edge.models.load import load_model

    row = {k: v for k, v in json.loads((a.work / "rows" / f"{main}.json").read_text()).items()
           if k not in ("tasks", "average", "average_stderr", "tasks_s")}
    loaded = load_model(str(a.work / "models" / main), "cpu", "float32")
    res = evaluate_ppl(loaded.model, loaded.tokenizer, a.datasets, window=128, limit=limit or None, data_dir=a.data_dir,
                       progress=False)
    row.update(key=key, table=table, label=label, ppl={k: v["ppl"] for k, v in res.items()},
               windows={k: v["windows"] for k, v in res.items()}, same_model_as=main)
    return row


def _recovered(a, key: str, table: str, label: str, source: str, limit: int) -> dict:
    """`source`'s pruned model recovered (see harness.recover_and_score)."""
    row = recover_and_score(a, key, json.loads((a.work / "rows" / f"{source}.json").read_text()), limit)
    return {**row, "table": table, "label": label}


def _measure(a, key: str, table: str, label: str, method: str, ratio: float, limit: int, blend: str) -> dict:
    main = f"main-{ratio:.2f}-hywia"
    if table == "ablation" and blend == "learned" and (a.work / "rows" / f"{main}.json").exists():
        return _rescore(a, key, main, table, label, limit)  # the main row's compress, same settings
    s = PruneSettings(method=method, ratio=ratio, calib_samples=a.calib_samples)
    h = HywiaSettings(blend=blend, steps=a.hywia_steps, batch=a.hywia_batch)
    job = CompressJob(a.model, a.work / "models" / key, s, ReconstructSettings(),
                      RunSettings(device="cpu", data_dir=a.data_dir, progress=False), overwrite=True, eval_ppl=[],
                      recover=None, hywia=h)
    row, report = compress_and_score(a, key, job, limit)
    row.update(table=table, label=label)
    if "hywia" in report["details"]:
        d = report["details"]["hywia"]
        row["hywia"] = {"learn_s": d["learn_s"], "curve": d["curve"], "blend": d["blend"], "blend_mode": d["blend_mode"],
                        "prune_s": report["time_s"]["prune_s"]}
    return row


def run(a: argparse.Namespace) -> dict:
    rows = []
    if not a.only or "dense".startswith(tuple(a.only)):
        _shared(a, "dense")
        rows.append(cached_row(a.work / "rows" / "dense.json", lambda: dense_row(a)))
    for ratio in a.ratios:
        for label, method in METHODS:
            rows.append(_row(a, f"main-{ratio:.2f}-{method}", "main", label, method, ratio, a.limit, tasks=True))
    for ratio in a.ratios:
        copy_chart(a, f"main-{ratio:.2f}-hywia", "hywia_blend.png", f"hywia_blend_{ratio:.2f}.png")
    if not a.no_ablations:
        for ratio in a.ablation_ratios:
            for label, blend in ABLATIONS:
                rows.append(_row(a, f"ablation-{ratio:.2f}-{blend}", "ablation", label, "hywia", ratio, a.ablation_limit, blend))
    if not a.no_recovered:
        for ratio in a.ratios:
            for label, method in METHODS:
                rows.append(_row(a, f"recovered-{ratio:.2f}-{method}-k{a.recover_steps}", "recovered", label + " + qalora",
                                 method, ratio, a.limit, tasks=True, source=f"main-{ratio:.2f}-{method}"))
    h = HywiaSettings(steps=a.hywia_steps, batch=a.hywia_batch)
    return {"benchmark": "hywia", "model": a.model, "command": "python benchmarks/hywia.py " + " ".join(sys.argv[1:]),
            "protocol": {"calib_samples": a.calib_samples, "hywia": h.to_dict(), "reconstruction": ReconstructSettings().to_dict(),
                         "task_limit": a.task_limit, "recover_steps": a.recover_steps},
            "machine": machine(), "versions": versions(), "rows": [r for r in rows if r]}


def markdown(data: dict) -> str:
    rows = data["rows"]
    if not rows:
        return "# HyWIA: no rows measured\n"
    datasets = list(rows[0]["ppl"])
    p, h = data["protocol"], data["protocol"]["hywia"]
    out = [f"# HyWIA on {data['model']}", "",
           f"Every row: `compress` with the default reconstruction, {p['calib_samples']} calibration windows of 128 tokens "
           f"of books. HyWIA: fine = {h['fine']} order, {h['loss']} loss under the soft keep-mask, {h['steps']} steps of "
           f"{h['batch']} windows, temperature {h['t_start']} -> {h['t_end']}. Recovered rows: {p['recover_steps']} steps of "
           f"QA-LoRA (kd loss from the dense model, books) on the row's pruned model (`saap-edge recover`), as `compress` does on a CPU. Zero-shot: the first {p['task_limit']} items of each "
           "task (or the whole set if smaller), torch float32, acc for BoolQ, PIQA, WinoGrande, ARC-e, acc_norm for "
           f"HellaSwag, ARC-c, OBQA; ± is one standard error. Made by `{data['command']}`; {data['machine']['cores']} CPU cores.",
           ""]
    for table, title in (("main", "Full test sets, no recovery"), ("recovered", "Full test sets, recovered")):
        sel = [r for r in rows if r["table"] == table]
        if sel:
            n = ", ".join(f"{d} {k}" for d, k in sel[0]["windows"].items())
            out += [f"## {title} ({n} windows)", "", quality_table(sel, datasets), ""]
    sel = [r for r in rows if r["table"] == "ablation"]
    if sel:
        n = ", ".join(f"{d} {k}" for d, k in sel[0]["windows"].items())
        body = []
        for r in sel:
            hy = r.get("hywia", {})
            coarse = [b["coarse"] for b in hy.get("blend", [])]
            body.append([f"{r['ratio']:.0%}", r["label"], f"{r['removed_share']:.2%}"] + [r["ppl"][d] for d in datasets]
                        + [f"{min(coarse):.2f} .. {max(coarse):.2f}" if coarse else "-", hy.get("learn_s"), hy.get("prune_s")])
        head = ["ratio", "blend", "removed"] + datasets + ["coarse weight (min .. max over layers)", "fusion learning s",
                                                            "prune s (estimation + learning + search)"]
        out += [f"## Blend ablations (first test windows only, no recovery; {n} windows)", "", format_table(head, body), ""]
    return "\n".join(out)


def main(argv=None) -> None:
    main_of("hywia", parse_args, run, markdown, argv)


if __name__ == "__main__":
    main()
