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
    python benchmarks/hywia.py --smoke --data-dir ../shared/data   # every row on a tiny model (hywia_smoke.*)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (compress_and_score, copy_chart, dense_rows, load, machine, main_of, main_rows,  # noqa: E402
                     method_row, quality_arguments, quality_smoke, quality_table, read_row, reconstruct_settings,
                     recovered_rows, score_ppl, task_arguments)

from saap_edge.compress import CompressJob, versions  # noqa: E402
from saap_edge.config import HywiaSettings, PruneSettings, RunSettings  # noqa: E402
from saap_edge.render import format_table  # noqa: E402

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
    a = p.parse_args(argv)
    if a.smoke:  # and 4 fusion-learning steps of 2 windows; no rows shared unless --baselines is given
        quality_smoke(a, p)
        a.hywia_steps, a.hywia_batch = 4, 2
        a.baselines = None if a.baselines == p.get_default("baselines") else a.baselines
    return a


def _rescore(a, key: str, main: str, table: str, label: str, limit: int) -> dict:
    """A row of the model another row compressed with the same settings, scored on `limit` windows."""
    row = {k: v for k, v in read_row(a, main).items() if k not in ("tasks", "average", "average_stderr", "tasks_s")}
    return {**row, "key": key, "table": table, "label": label, **score_ppl(a, load(a.work / "models" / main), limit),
            "same_model_as": main}


def _measure(a, key: str, table: str, label: str, method: str, ratio: float, limit: int, blend: str = "learned") -> dict:
    main = f"main-{ratio:.2f}-hywia"
    if table == "ablation" and blend == "learned" and (a.work / "rows" / f"{main}.json").exists():
        return _rescore(a, key, main, table, label, limit)  # the main row's compress, same settings
    s = PruneSettings(method=method, ratio=ratio, calib_samples=a.calib_samples)
    h = HywiaSettings(blend=blend, steps=a.hywia_steps, batch=a.hywia_batch)
    job = CompressJob(a.model, a.work / "models" / key, s, reconstruct_settings(a),
                      RunSettings(device="cpu", data_dir=a.data_dir, progress=False), overwrite=True, eval_ppl=[],
                      recover=None, hywia=h)
    row, report = compress_and_score(a, key, job, limit)
    row.update(table=table, label=label)
    if "hywia" in (report.details or {}):
        d = report.details["hywia"]
        row["hywia"] = {"learn_s": d["learn_s"], "curve": d["curve"], "blend": d["blend"], "blend_mode": d["blend_mode"],
                        "prune_s": report.time_s["prune_s"]}
    return row


def run(a: argparse.Namespace) -> dict:
    rows = dense_rows(a, a.baselines) + main_rows(a, METHODS, lambda key, label, method, ratio:
                                                  _measure(a, key, "main", label, method, ratio, a.limit), a.baselines)
    for ratio in a.ratios:
        copy_chart(a, f"main-{ratio:.2f}-hywia", "hywia_blend.png", f"hywia{'_smoke' if a.smoke else ''}_blend_{ratio:.2f}.png")
    if not a.no_ablations:
        for ratio in a.ablation_ratios:
            for label, blend in ABLATIONS:
                key = f"ablation-{ratio:.2f}-{blend}"
                rows.append(method_row(a, key, lambda: _measure(a, key, "ablation", label, "hywia", ratio,
                                                                a.ablation_limit, blend)))
    rows += recovered_rows(a, METHODS, a.baselines)
    h = HywiaSettings(steps=a.hywia_steps, batch=a.hywia_batch)
    return {"benchmark": "hywia", "model": a.model, "command": "python benchmarks/hywia.py " + " ".join(sys.argv[1:]),
            "protocol": {"calib_samples": a.calib_samples, "hywia": h.to_dict(), "reconstruction": reconstruct_settings(a).to_dict(),
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
