"""The comparison report: SmolLM2-135M at 20% and 50%, quality like the paper's Tables I, X,
XI, XII and Fig. 6, with PNG charts (perplexity vs ratio like Fig. 5, calibration samples).

Rows (one model load, pruning in this process with shared calibration statistics):
  Table I    dense; every pruning method without recovery at 20% and 50%; the default
             method with QA-LoRA int4 recovery at both ratios
  Table X    fusion of the two Taylor granularities at 20%: element only, vector only,
             fixed sum, adaptive (homoscedastic-uncertainty weights, the default)
  Table XI   ranking statistic at 20%: bound (mean + std, default), the paper's fluctuation
             indicator, none (mean)
  Table XII  recovery at 20%: fp LoRA (merged into fp weights) vs QA-LoRA (int4 groups), with
             peak memory and tokens/s of each result in torch and llama.cpp (saap_edge.bench)
  Fig. 6     calibration samples 10 / 30 / 50 at 20%

Every pruned row is refit by the reconstruct stage with its default settings, as `compress`
does. Quality protocol: perplexity on the non-overlapping 128-token windows (all of them,
or the first --ppl-windows) of WikiText-2 and PTB test (text joined by blank lines); zero-shot accuracy on the first
--limit items of each of the seven tasks (local files, lm-eval-style log-likelihood
scoring, torch float32). Accuracy columns follow the LLM-Pruner / SAAP tables: acc for
BoolQ, PIQA, WinoGrande, ARC-e; length-normalised acc for HellaSwag, ARC-c, OBQA.
Calibration: --calib-samples x 128 tokens of `books`, seed 0. Recovery: `saap-edge recover`
with its defaults and --recover-steps K (books text, batch 8 x 128 tokens, lr 1e-4).
Each finished row is cached in --work/rows/, so an interrupted run resumes where it stopped.

    python benchmarks/report.py --data-dir ../shared/data
    python benchmarks/report.py --smoke --data-dir ../shared/data   # every row on a tiny model, 20% (report_smoke.*)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import TASK_COLUMNS, TASKS, machine, smoke_work, write_results  # noqa: E402
from harness import reconstruct_settings as recon  # noqa: E402
from harness import task_average as _average  # noqa: E402

from saap_edge.bench.probe import run_child  # noqa: E402
from saap_edge.bench.weights import torch_weights  # noqa: E402  (int4 projections count their logical weights)
from saap_edge.compress import versions  # noqa: E402
from saap_edge.config import PruneSettings  # noqa: E402
from saap_edge.render import format_table  # noqa: E402

METHODS = [  # Table I: (label, overrides)
    ("saap (default)", {"method": "saap"}),
    ("llm-pruner", {"method": "llm-pruner", "taylor": "param_mix"}),
    ("flap", {"method": "flap"}),
    ("wanda-sp", {"method": "wanda-sp"}),
    ("magnitude", {"method": "magnitude"}),
    ("random", {"method": "random"}),
]
FUSION = [("element only", {"fusion": "element"}), ("vector only", {"fusion": "vector"}),
          ("fixed sum", {"fusion": "sum"}), ("adaptive (default)", {})]
INDICATOR = [("bound: mean + std (default)", {}), ("fluctuation indicator (eq. 10)", {"indicator": "fluctuation", "direction": "low"}),
             ("none: mean", {"indicator": "none"})]
CALIB = [10, 30, 50]
CLI = [sys.executable, "-m", "saap_edge.cli"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument("--limit", type=int, default=100, help="items of each zero-shot task")
    p.add_argument("--ppl-windows", type=int, default=0, help="128-token windows per test set (0: the whole set)")
    p.add_argument("--calib-samples", type=int, default=50)
    p.add_argument("--recover-steps", type=int, default=60, help="K of the recovered rows (the CPU default of compress)")
    p.add_argument("--data-dir", default=os.environ.get("SAAP_EDGE_DATA_DIR"))
    p.add_argument("--work", type=Path, default=Path("benchmarks/work/report"))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--skip-bench", action="store_true", help="Table XII without memory / tokens/s rows")
    p.add_argument("--smoke", action="store_true",
                   help="every row on the tiny random-weight model of benchmarks/harness.py (unless --model is given), 20%% "
                        "only, 4 windows per test set, 4 items per task, 4 calibration and 16 reconstruction windows, 2 "
                        "recovery steps: a check of this script; results report_smoke.*, charts and work files under "
                        "<work>/smoke")
    a = p.parse_args(argv)
    a.name = "report"
    if a.smoke:
        a.name += "_smoke"
        a.ratios, a.limit, a.ppl_windows, a.calib_samples, a.recover_steps = [0.2], 4, 4, 4, 2
        smoke_work(a, p)
    return a


class Report:
    def __init__(self, a):
        from saap_edge.models.load import load_model

        self.a = a
        (a.work / "rows").mkdir(parents=True, exist_ok=True)
        self.loaded = load_model(a.model, "cpu", "float32")
        self.model, self.tok = self.loaded.model, self.loaded.tokenizer
        self.stats: dict[int, tuple] = {}
        self.recon_windows = None  # the reconstruct stage's calibration windows, drawn on first use
        self.data = {"benchmark": "report", "model": self.loaded.source, "machine": machine(), "versions": versions(),
                     "protocol": {"ppl_windows": a.ppl_windows, "window": 128, "task_limit": a.limit,
                                  "calib_samples": a.calib_samples, "recover_steps": a.recover_steps, "seed": 0},
                     "command": "python benchmarks/report.py " + " ".join(sys.argv[1:]), "rows": []}

    # ------------------------------------------------------------------ quality of one model
    def quality(self, model, tokenizer=None) -> dict:
        from saap_edge.eval.ppl import evaluate_ppl
        from saap_edge.eval.zeroshot import TorchScorer, evaluate_tasks

        tok = tokenizer or self.tok
        ppl = evaluate_ppl(model, tok, ["wikitext2", "ptb"], window=128, limit=self.a.ppl_windows or None,
                           data_dir=self.a.data_dir, progress=False)
        scorer = TorchScorer(model, tok, batch_size=16)
        tasks = evaluate_tasks(scorer, TASKS, self.a.data_dir, self.a.limit, progress=False)
        return {"ppl": {k: v["ppl"] for k, v in ppl.items()}, "tasks": tasks, "average": _average(tasks)}

    def row(self, key: str, make, relabel: dict | None = None) -> dict:
        """A row cached under `key` (rows with equal settings share one measurement)."""
        path = self.a.work / "rows" / f"{key}.json"
        if path.exists():
            row = json.loads(path.read_text())
        else:
            t0 = time.perf_counter()
            row = make()
            row["key"], row["wall_s"] = key, time.perf_counter() - t0
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(row, indent=1, default=str))
            tmp.replace(path)
        row = {**row, **(relabel or {})}
        print(f"[{time.strftime('%H:%M:%S')}] {key}: ppl {row.get('ppl')} avg {row.get('average')}", flush=True)
        self.data["rows"].append(row)
        write_results(self.a.out, self.a.name, self.data, markdown(self.data))
        return row

    # ------------------------------------------------------------------ pruning
    def samples(self, n: int):
        from saap_edge.data import calibration_samples
        from saap_edge.prune import statistics

        if n not in self.stats:
            samples, _ = calibration_samples(self.tok, "books", n, 128, 0, self.a.data_dir)
            self.stats[n] = (samples, statistics(self.model, samples, PruneSettings(), progress=False))
        return self.stats[n]

    def settings(self, ratio: float, overrides: dict, calib: int | None = None) -> PruneSettings:
        return PruneSettings(ratio=ratio, calib_samples=calib or self.a.calib_samples, **overrides).validate()

    def pruned(self, s: PruneSettings):
        """`compress`'s prune stage (rank, search, slice, refit) with the dense model kept for the next row."""
        from saap_edge.compress import prune_keeping_dense
        from saap_edge.data import calibration_samples

        samples, stats = self.samples(s.calib_samples)
        torch.manual_seed(0)
        r = recon(self.a)
        if self.recon_windows is None:  # one draw serves every row, as `samples` does
            self.recon_windows, _ = calibration_samples(self.tok, "books", r.samples, r.seq_len, 0, self.a.data_dir)
        return prune_keeping_dense(self.model, samples, s, r, self.recon_windows, stats=stats)

    def pruned_row(self, table: str, label: str, ratio: float, overrides: dict, calib: int | None = None) -> dict:
        s = self.settings(ratio, overrides, calib)

        def make():
            result = self.pruned(s)
            return {"table": table, "label": label, "ratio": ratio, "recovery": "none", "settings": s.to_dict(),
                    "params": result.plan.params["after"], "removed_share": result.plan.params["removed_share"],
                    **self.quality(result.model)}
        identity = [s.to_dict(), recon(self.a).to_dict(), self.a.ppl_windows]
        key = "pruned-" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
        return self.row(key, make, {"table": table, "label": label})

    # ------------------------------------------------------------------ recovery
    def recovered_row(self, table: str, ratio: float, recovery: str) -> dict:
        def make():
            from saap_edge.outputs import PLAN_FILE, save_model
            from saap_edge.models.load import load_model

            pruned_dir = self.a.work / f"pruned-{ratio:.2f}-{recon(self.a).method}"
            if not (pruned_dir / "config.json").exists():
                result = self.pruned(self.settings(ratio, {"method": "saap"}))
                save_model(pruned_dir, result.model, self.tok)
                result.plan.save(pruned_dir / PLAN_FILE)
            out = self.a.work / f"recovered-{ratio:.2f}-{recovery}"
            # the pruned directory holds no report.json naming its source: the teacher is given
            cmd = CLI + ["recover", str(pruned_dir), "--teacher", str(self.a.model), "--recovery", recovery,
                         "--recover-steps", str(self.a.recover_steps),
                         "--out", str(out), "--overwrite", "--eval-ppl", "--no-progress", "--device", "cpu"]
            cmd += ["--data-dir", self.a.data_dir] if self.a.data_dir else []
            child = run_child(cmd, self.a.work / f"recover-{ratio:.2f}-{recovery}.log")
            if child["rc"]:
                raise SystemExit(f"recover failed; see {self.a.work}/recover-{ratio:.2f}-{recovery}.log")
            loaded = load_model(str(out), "cpu", "float32")
            rec = json.loads((out / "report.json").read_text()).get("recovery", {})
            row = {"table": table, "label": f"saap (default) + {recovery}", "ratio": ratio, "recovery": recovery,
                   "params": torch_weights(loaded.model)["params"], "dir": str(out),
                   "recover_peak_rss_mib": child["peak_rss_mib"], "recover_wall_s": child["wall_s"],
                   "trainable_params": rec.get("trainable_params"), **self.quality(loaded.model, loaded.tokenizer)}
            if not self.a.skip_bench:
                row["bench"] = self.bench(out, recovery)
            return row
        digest = hashlib.sha256(json.dumps(recon(self.a).to_dict(), sort_keys=True).encode()).hexdigest()[:8]
        return self.row(f"recovered-{ratio:.2f}-{recovery}-k{self.a.recover_steps}-{digest}-{self.a.ppl_windows}", make, {"table": table})

    def bench(self, directory: Path, recovery: str) -> list[dict]:
        from saap_edge.bench import BenchModel, bench_row
        from saap_edge.config import BenchSettings

        s = BenchSettings(runtimes=("torch", "gguf-f16" if recovery == "lora" else "gguf-q4_1"), reps=3)
        work = self.a.work / "bench"
        work.mkdir(exist_ok=True)
        return [bench_row(BenchModel(directory.name, str(directory)), rt, work, s) for rt in s.runtimes]


# ---------------------------------------------------------------------- Markdown and charts

def _quality_cells(r: dict) -> list:
    return [f"{r['ppl']['wikitext2']:.1f}", f"{r['ppl']['ptb']:.1f}"] + \
        [f"{100 * r['tasks'][t][TASK_COLUMNS[t][1]]:.1f}" for t in TASKS] + [f"{100 * r['average']:.2f}"]


QUALITY_HEADERS = ["WikiText-2", "PTB"] + [TASK_COLUMNS[t][0] for t in TASKS] + ["Average"]


def markdown(d: dict) -> str:
    p = d["protocol"]
    rows = d["rows"]
    out = ["# SmolLM2-135M: SAAP against the baselines (Tables I, X, XI, XII, Fig. 6 layout)", "",
           f"Perplexity: {'all' if not p['ppl_windows'] else 'the first ' + str(p['ppl_windows'])} windows of {p['window']} tokens "
           "of each test set; pruned rows refit by the reconstruct stage (defaults). Zero-shot: first "
           f"{p['task_limit']} items of each task (`--limit {p['task_limit']}`; standard error of an accuracy near 50% "
           f"is about {50 / p['task_limit'] ** 0.5:.0f} points, so differences below ~10 points on one task are noise), "
           "torch float32, acc for BoolQ, PIQA, WinoGrande, ARC-e and acc_norm for HellaSwag, ARC-c, OBQA. Calibration "
           f"{p['calib_samples']} x 128 tokens of book text, seed 0. Recovered rows: {p['recover_steps']} steps of "
           "book text on the CPU (the paper trains two epochs of Alpaca on a GPU).", ""]
    sections = [("Table I: pruning methods, no recovery, and SAAP with recovery", "I"),
                ("Table X: fusion of the two granularities (20%)", "X"),
                ("Table XI: ranking statistic (20%)", "XI"),
                ("Fig. 6: calibration samples (20%)", "F6")]
    for title, table in sections:
        sel = [r for r in rows if r["table"] == table or (table == "I" and r["table"] == "XII" and r["recovery"] == "qalora")]
        if table == "I":
            sel = [r for r in rows if r["table"] == "dense"] + sel
        if not sel:
            continue
        head = ["ratio", "method", "recovery", "params"] + QUALITY_HEADERS
        body = [[f"{r['ratio']:.0%}", r["label"] if table != "F6" else f"{r['settings']['calib_samples']} samples",
                 r["recovery"], f"{r['params'] / 1e6:.1f}M"] + _quality_cells(r) for r in sel]
        out += [f"## {title}", "", format_table(head, body), ""]
    rec = [r for r in rows if r["table"] == "XII"]
    if rec:
        head = ["ratio", "recovery", "trainable", "WikiText-2", "PTB", "Average", "runtime", "artifact MiB",
                "peak memory MiB", "decode tok/s"]
        body = []
        for r in rec:
            for b in r.get("bench") or [{}]:
                ok = b.get("status") == "ok"
                body.append([f"{r['ratio']:.0%}", r["recovery"], f"{(r.get('trainable_params') or 0) / 1e6:.2f}M",
                             f"{r['ppl']['wikitext2']:.1f}", f"{r['ppl']['ptb']:.1f}", f"{100 * r['average']:.2f}",
                             b.get("runtime", "-"), f"{b['artifact_bytes'] / 2**20:.1f}" if ok and b.get("artifact_bytes") else "-",
                             f"{b['peak_memory_mib']:.0f}" if ok else "-",
                             f"{b['decode_tok_s']['median']:.1f}" if ok else b.get("reason", "-")])
        out += ["## Table XII: recovery, fp LoRA vs QA-LoRA int4 (20%)", "", format_table(head, body), ""]
    out += [f"Command: `{d['command']}`. Machine: {d['machine']}.", ""]
    return "\n".join(out)


def charts(d: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = d["rows"]
    dense = next((r for r in rows if r["table"] == "dense"), None)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, ds in zip(axes, ("wikitext2", "ptb")):
        for label, _ in METHODS:
            pts = sorted((r["ratio"], r["ppl"][ds]) for r in rows if r["table"] == "I" and r["label"] == label)
            if pts:
                pts = ([(0.0, dense["ppl"][ds])] if dense else []) + pts
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_yscale("log")
        ax.set_xlabel("share of parameters removed")
        ax.set_ylabel(f"{ds} perplexity (log)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "report_ppl_vs_ratio.png", dpi=110)
    plt.close(fig)
    cal = sorted((r["settings"]["calib_samples"], r["ppl"]["wikitext2"], 100 * r["average"]) for r in rows if r["table"] == "F6")
    if cal:
        fig, ax = plt.subplots(figsize=(4.5, 3.4))
        ax.plot([c[0] for c in cal], [c[1] for c in cal], marker="o", color="C0")
        ax.set_xlabel("calibration samples")
        ax.set_ylabel("WikiText-2 perplexity", color="C0")
        ax2 = ax.twinx()
        ax2.plot([c[0] for c in cal], [c[2] for c in cal], marker="s", color="C1")
        ax2.set_ylabel("average accuracy (%)", color="C1")
        fig.tight_layout()
        fig.savefig(out_dir / "report_calibration.png", dpi=110)
        plt.close(fig)


def main(argv=None) -> int:
    a = parse_args(argv)
    r = Report(a)
    if a.smoke:
        r.data["protocol"]["recon_samples"] = recon(a).samples
    r.row("dense", lambda: {"table": "dense", "label": "dense", "ratio": 0.0, "recovery": "none",
                            "params": sum(p.numel() for p in r.model.parameters()), **r.quality(r.model)})
    for ratio in a.ratios:
        for label, overrides in METHODS:
            r.pruned_row("I", label, ratio, overrides)
    for label, overrides in FUSION:
        r.pruned_row("X", label, 0.2, overrides)
    for label, overrides in INDICATOR:
        r.pruned_row("XI", label, 0.2, overrides)
    for n in CALIB:
        r.pruned_row("F6", f"{n} samples", 0.2, {}, calib=n)
    r.recovered_row("XII", 0.2, "qalora")
    r.recovered_row("XII", 0.2, "lora")
    for ratio in a.ratios:
        if ratio != 0.2:
            r.recovered_row("I", ratio, "qalora")
    charts(r.data, a.work if a.smoke else a.out)
    write_results(a.out, a.name, r.data, markdown(r.data))
    print(markdown(r.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
