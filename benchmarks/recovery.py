"""Recovery quality: what each loss and each trainable part recovers in int4, and whether
pruning + int4 beats quantizing the dense model harder at equal bytes.

Sections (every row is a child process, so its peak RSS and wall time are its own):

1. Grid, at equal steps (--steps K, 40): --recover-loss lm | kd | kd+lm crossed with --train
   lora (QA-LoRA) | offsets | offsets,scales,norms (--grid-trains for others), on the
   model pruned 20% by the default method with the default reconstruction. Scored on the
   first --grid-limit (256) WikiText-2 test windows: the whole set for every row would add
   an hour on 2 cores.
2. Main rows on the full WikiText-2 and PTB test sets: the grid's best at the CPU default
   budget (--default-steps, 60) and at a 30-minute CPU budget (--long-steps, 300), the
   same at 50%, pruned 20% int4 round-to-nearest (no training); then, as references, the
   previous default (lm + QA-LoRA), dense fp32 and pruned 20% fp32.
3. Equal bytes (llama.cpp): the dense model exported as F16 GGUF and quantized by llama.cpp's
   own quantizer (Q4_1, Q3_K_M, Q2_K, and Q3_K_M / Q2_K with a Q4_1 or Q4_0 embedding) beside
   our int4 artifacts (the embedding / output matrix f16 as exported by default, and Q4_1):
   MiB, perplexity on the first --llama-limit WikiText-2 windows through llama.cpp, decode
   tok/s (128-token prompt, 64 greedy steps, median of 3, all rows in one process run one
   after another), and which artifacts are on the Pareto front of size against perplexity.
4. WikiText-2 against training tokens: the full-test-set rows of one setting (trained set,
   data, ratio) at 60, 300 and 600 steps, with the line in log(steps) through them.
5. Zero-shot: the seven tasks (first --task-limit items of each, the protocol of
   benchmarks/adapruner.py and hywia.py) for dense, pruned 20% fp32 and the generated-text rows.
6. Equal CPU time: each kind of order-table row timed for a few steps (cost probes), then the
   distil-quantize rows given the steps that fill the CPU time of 60 offsets steps (and 300 for
   the generated-text one, on the full test sets), beside quantize-distil offsets at 60 / 300.

Protocol: 128-token non-overlapping windows of the raw test text joined by blank lines;
recovery on `books`, 128-token windows, batch 8, AdamW (lr 1e-4 for LoRA; 1e-3 for
offsets and norms, 1e-4 for scales), warm-up 10% then linear
decay, seed 0 (QA-LoRA rank 8, alpha 16, dropout 0.05); kd: T = 1, top-64 teacher tokens + a
tail bucket, kd+lm weight 0.5. The teacher's targets are cached under --work and shared by
every kd row. Rows are cached under --work/rows, so an interrupted run continues (a row
interrupted mid-training resumes from its last checkpoint).

    python benchmarks/recovery.py --data-dir ../shared/data
    python benchmarks/recovery.py --smoke --data-dir ../shared/data   # a few rows, tiny model (recovery_smoke.*)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (TASK_HEADERS, cached_row, load, machine, run_child, smoke_work, task_cells,  # noqa: E402
                     task_columns, write_results)

from saap_edge.compress import versions  # noqa: E402
from saap_edge.render import format_table, save_figure  # noqa: E402

CLI = [sys.executable, "-m", "saap_edge.cli"]
LOSSES = ("lm", "kd", "kd+lm")
TRAINS = ("lora", "offsets", "offsets,scales,norms")  # --grid-trains adds offsets,scales etc.
# llama.cpp's quantizer on the dense model: (file stem, label, file type, embedding type or None for
# the type's own choice). The embedding is tied to the output and is a fifth of SmolLM2-135M's
# weights, so a smaller embedding type is the first thing a user shrinking the file would try
# (Q4_0 is the smallest whose 32-wide blocks divide SmolLM2's 576; k-quants need 256).
LLAMA_QUANTS = (
    ("Q4_1", "dense Q4_1 (llama.cpp quantizer)", "Q4_1", None),
    ("Q3_K_M", "dense Q3_K_M (llama.cpp quantizer)", "Q3_K_M", None),
    ("Q2_K", "dense Q2_K (llama.cpp quantizer)", "Q2_K", None),
    ("Q3_K_M-embQ4_1", "dense Q3_K_M, Q4_1 embeddings (llama.cpp quantizer)", "Q3_K_M", "Q4_1"),
    ("Q2_K-embQ4_1", "dense Q2_K, Q4_1 embeddings (llama.cpp quantizer)", "Q2_K", "Q4_1"),
    ("Q2_K-embQ4_0", "dense Q2_K, Q4_0 embeddings (llama.cpp quantizer)", "Q2_K", "Q4_0"),
)
# our artifacts in that table, when their model directories exist
LLAMA_OF = ("main-best", "main-best-long", "main-0.5-default", "gen-0.2-300", "gen-0.2-600", "gen-0.5-300")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=40, help="K: optimizer steps of every grid row")
    p.add_argument("--default-steps", type=int, default=60, help="the CPU default budget (the demo's)")
    p.add_argument("--long-steps", type=int, default=300, help="steps of the 30-minute CPU budget row")
    p.add_argument("--grid-trains", nargs="+", default=list(TRAINS), help="--train values crossed with the losses")
    p.add_argument("--grid-limit", type=int, default=256, help="WikiText-2 windows scoring the grid")
    p.add_argument("--llama-limit", type=int, default=256, help="WikiText-2 windows scored through llama.cpp")
    p.add_argument("--datasets", nargs="+", default=["wikitext2", "ptb"])
    p.add_argument("--data-dir", default=os.environ.get("SAAP_EDGE_DATA_DIR"))
    p.add_argument("--work", type=Path, default=Path("benchmarks/work/recovery"))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--only", nargs="*", default=None, help="run only rows whose key starts with one of these (grid, order, main, llama); results go to "
                        "recovery_<these>.json / .md")
    p.add_argument("--cached-only", action="store_true", help="write results from the cached rows; run nothing")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: its own)")
    p.add_argument("--task-limit", type=int, default=300, help="items of each zero-shot task (0: every item)")
    p.add_argument("--smoke", action="store_true",
                   help="the tiny random-weight model of benchmarks/harness.py (unless --model is given), 2 steps, 4 "
                        "windows for every score, the rows grid kd / offsets, main-best-long, main-dense, the llama.cpp "
                        "table and one equal-CPU-time row with its cost probes (or those --only names): a check of this script; results recovery_smoke.*, charts and work "
                        "files under <work>/smoke")
    a = p.parse_args(argv)
    if a.smoke:
        a.steps = a.default_steps = a.long_steps = 2
        a.grid_trains, a.grid_limit, a.llama_limit, a.task_limit = ["offsets"], 4, 4, 4
        a.only = a.only or [f"grid-kd-{a.grid_trains[0]}-", "main-best-long", "main-dense", "llama", "zeroshot-main-best-long",
                            "cost-qd-offsets-rtn", "cost-dq-full-rtn", "equal-dq-full-rtn"]
        smoke_work(a, p)
    return a


def _common(a) -> list[str]:
    return ["--no-progress", "--device", "cpu"] + (["--data-dir", a.data_dir] if a.data_dir else [])


class Bench:
    def __init__(self, a):
        self.a = a
        (a.work / "rows").mkdir(parents=True, exist_ok=True)
        (a.work / "models").mkdir(exist_ok=True)
        self.rows: dict[str, dict] = {}
        self.missing: list[str] = []

    def row_path(self, key: str) -> Path:
        return self.a.work / "rows" / f"{key.replace('/', '_').replace(',', '+')}.json"

    def measures(self, key: str) -> bool:
        """Does this run measure row `key` (not --cached-only, and --only, if given, names it)?"""
        return not self.a.cached_only and (not self.a.only or key.startswith(tuple(self.a.only)))

    def cached(self, key: str, make) -> dict | None:
        path = self.row_path(key)
        if not path.exists() and not self.measures(key):
            self.missing.append(key)
            return None
        row = cached_row(path, lambda: {"key": key, **make()}, keep=lambda r: "failed" not in r)
        print(f"[{time.strftime('%H:%M:%S')}] {key}: {row.get('ppl', row.get('failed'))}", flush=True)
        self.rows[key] = row
        return row

    def pruned(self, ratio: float) -> Path:
        out = self.a.work / f"pruned-{ratio}"
        if not (out / "config.json").exists():
            run = run_child(CLI + ["compress", "--model", self.a.model, "--ratio", str(ratio), "--no-recover", "--eval-ppl",
                                   "--out", str(out), "--overwrite"] + _common(self.a), log=self.a.work / f"prune-{ratio}.log")
            if run["rc"]:
                raise SystemExit(f"pruning failed: see {self.a.work / f'prune-{ratio}.log'}")
        return out

    def evaluate(self, model: str, limit: int | None, datasets) -> dict:
        # one file per model: rows run by two jobs side by side never read each other's scores
        name = Path(model).name
        js, log = self.a.work / f"eval-{name}.json", self.a.work / f"eval-{name}.log"
        cmd = CLI + ["eval", model, "--ppl", *datasets, "--json", str(js)] + _common(self.a)
        run = run_child(cmd + (["--limit", str(limit)] if limit else []), log=log)
        if run["rc"]:
            return {"failed": f"eval exit {run['rc']}, see {log}"}
        ppl = json.loads(js.read_text())["ppl"]
        return {"ppl": {k: v["ppl"] for k, v in ppl.items()}, "windows": {k: v["windows"] for k, v in ppl.items()},
                "eval_wall_s": run["wall_s"]}

    def recover(self, pruned: Path, name: str, recovery: str, loss: str = "lm", train: str = "lora", steps: int = 0,
                extra: tuple[str, ...] = (), curve: bool = True) -> tuple[Path, dict]:
        out = self.a.work / "models" / name
        cmd = CLI + ["recover", str(pruned), "--out", str(out), "--overwrite", "--recovery", recovery, "--eval-ppl",
                     "--teacher-cache", str(self.a.work / "teacher-cache")] + _common(self.a) + list(extra)
        if recovery != "none":
            cmd += ["--recover-loss", loss, "--train", train, "--recover-steps", str(steps),
                    "--heldout-every", str(max(1, steps // 10) if curve else 0)]
            if any(out.with_name(out.name + ".checkpoints").glob("step-*")):  # a row interrupted mid-training goes on
                cmd.append("--resume")
        run = run_child(cmd, log=self.a.work / f"{name}.log")
        if run["rc"]:
            return out, {"failed": f"recover exit {run['rc']}, see {self.a.work / (name + '.log')}"}
        rec = json.loads((out / "report.json").read_text())["recovery"]
        info = {"recovery": recovery, "loss": loss, "train": train, "steps": rec.get("steps", 0), "flags": list(extra),
                "order": rec.get("settings", {}).get("order"), "quantizer": rec.get("quantizer"),
                "offsets_pass_s": (rec.get("offsets_pass") or {}).get("train_s"),
                "quantize_s": rec.get("quantize_s") or (rec.get("gptq") or {}).get("time_s"),
                "data": rec.get("data"),
                "trainable_params": rec.get("trainable_params", 0), "train_s": rec.get("train_s"),
                "heldout_ppl": rec.get("heldout_ppl"), "heldout_curve": rec.get("heldout_curve"),
                "teacher": rec.get("teacher"), "recover_wall_s": run["wall_s"], "peak_rss_mib": run["peak_rss_mib"],
                "model_mib": sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20}
        return out, info

    def grid_row(self, pruned: Path, loss: str, train: str) -> dict | None:
        key = f"grid-{loss}-{train}-{self.a.steps}"

        def make():
            out, info = self.recover(pruned, key, "qalora", loss, train, self.a.steps)
            if "failed" in info:
                return info
            row = {"table": "grid", "label": f"{loss} / {train}", **info, **self.evaluate(str(out), self.a.grid_limit, ["wikitext2"])}
            shutil.rmtree(out, ignore_errors=True)  # only the numbers are kept
            return row

        return self.cached(key, make)

    def order_row(self, pruned: Path, key: str, label: str, train: str, extra: tuple[str, ...], steps: int) -> dict | None:
        """A row of the order table: kd recovery of the 20% model trained / quantized as `extra`
        says, scored like the grid (first --grid-limit WikiText-2 windows)."""

        def make():
            out, info = self.recover(pruned, key, "qalora", "kd", train, steps, extra)
            if "failed" in info:
                return info
            row = {"table": "order", "label": label, **info, **self.evaluate(str(out), self.a.grid_limit, ["wikitext2"])}
            shutil.rmtree(out, ignore_errors=True)
            return row

        return self.cached(key, make)

    def cost_probe(self, pruned: Path, suffix: str, train: str, extra: tuple[str, ...]) -> dict | None:
        """Seconds per optimizer step and fixed seconds (GPTQ, the offsets pass) of one kind of row."""
        key = f"cost-{suffix}"

        def make():
            out, info = self.recover(pruned, key, "qalora", "kd", train, PROBE_STEPS, extra, curve=False)
            shutil.rmtree(out, ignore_errors=True)
            if "failed" in info:
                return info
            return {"table": "cost", **info, "step_s": info["train_s"] / PROBE_STEPS,
                    "fixed_s": (info.get("quantize_s") or 0) + (info.get("offsets_pass_s") or 0)}

        return self.cached(key, make)

    def equal_row(self, pruned: Path, suffix: str, label: str, train: str, extra: tuple[str, ...], budget: int,
                  ref: dict, cost: dict) -> dict | None:
        """A row at the CPU time of `budget` offsets steps; scored like the order table at the default
        budget, on the full test sets beyond it (where its reference row was scored)."""
        key, steps = f"equal-{suffix}-{budget}", equal_steps(budget, ref, cost)
        full = budget == self.a.long_steps and budget != self.a.default_steps

        def make():
            if steps < 1:
                return {"table": "equal", "label": label, "budget": budget, "steps": 0,
                        "infeasible": "its fixed costs alone take longer than the budget"}
            out, info = self.recover(pruned, key, "qalora", "kd", train, steps, extra)
            if "failed" in info:
                return info
            scored = self.evaluate(str(out), None if full else self.a.grid_limit, self.a.datasets if full else ["wikitext2"])
            shutil.rmtree(out, ignore_errors=True)
            return {"table": "equal", "label": label, "budget": budget, "full_test": full, **info, **scored}

        return self.cached(key, make)

    def main_row(self, key: str, label: str, model_of) -> dict | None:
        def make():
            model, info = model_of()
            if "failed" in info:
                return info
            return {"table": "main", "label": label, "model_dir": str(model), **info,
                    **self.evaluate(str(model), None, self.a.datasets)}

        return self.cached(key, make)


# The order table (--recover-order, --quantizer, --train full, generated text): kd loss, 20% pruned.
# (key suffix, label, --train, extra flags)
DQ = ("--recover-order", "distil-quantize")
DQ_GPTQ_OFF = DQ + ("--quantizer", "gptq", "--offset-steps", "10")  # then GPTQ and a 10-step offsets pass
DQ_LORA64 = DQ + ("--quantizer", "gptq", "--rank", "64", "--lora-alpha", "128")  # LoRA r64 fp, then GPTQ
ORDER_ROWS = (
    ("qd-offsets-rtn", "quantize-distil: int4 RTN, then offsets", "offsets", ()),
    ("dq-full-rtn", "distil-quantize: full fp, then int4 RTN", "full", DQ),
    ("dq-full-gptq-off", "distil-quantize: full fp, then int4 GPTQ + 10 offset steps", "full", DQ_GPTQ_OFF),
    ("qd-offsets-gptq", "quantize-distil: int4 GPTQ, then offsets", "offsets", ("--quantizer", "gptq")),
    ("dq-full-gptq", "distil-quantize: full fp, then int4 GPTQ", "full", DQ + ("--quantizer", "gptq")),
    ("dq-lora64-gptq", "distil-quantize: LoRA r64 fp, then int4 GPTQ", "lora", DQ_LORA64),
    ("dq-full-gptq-gen", "distil-quantize: full fp on books + 200k generated tokens, then int4 GPTQ", "full",
     DQ + ("--quantizer", "gptq", "--recover-data", "books+generated:200000")),
    ("qd-offsets-rtn-gen", "quantize-distil: int4 RTN, then offsets on 200k generated tokens", "offsets",
     ("--recover-data", "generated:200000")),
)


# Teacher-written text at the budgets the targets name: kd into the int4 offsets (the order table's best),
# scored on the full test sets. (key, label, ratio, steps, --train); 300 steps is about 30 CPU-minutes here, 600
# about 60; a step of offsets, scales and norms costs what a step of offsets does (the grid's train s).
GEN = ("--recover-data", "generated:200000")
GEN_ROWS = (
    ("gen-0.2-60", "pruned 20% + int4, kd / offsets on 200k generated tokens, 60 steps", 0.2, 60, "offsets"),
    ("gen-0.2-300", "pruned 20% + int4, kd / offsets on 200k generated tokens, 300 steps", 0.2, 300, "offsets"),
    ("gen-0.2-600", "pruned 20% + int4, kd / offsets on 200k generated tokens, 600 steps", 0.2, 600, "offsets"),
    ("gen-0.5-300", "pruned 50% + int4, kd / offsets on 200k generated tokens, 300 steps", 0.5, 300, "offsets"),
    ("gen-osn-0.2-300", "pruned 20% + int4, kd / offsets, scales, norms on 200k generated tokens, 300 steps", 0.2, 300,
     "offsets,scales,norms"),
)


# Equal CPU time. The order table gives each row the same optimizer steps; a step of full fp training
# costs more than a step of offsets, and GPTQ and the offsets pass are fixed costs on top. A cost probe
# times PROBE_STEPS steps of each kind (no held-out curve, so train_s is the steps alone) and its fixed
# costs; a row at the CPU time of B offsets steps then gets steps = (B x offsets step - fixed) / its step.
# The data source does not change a step's cost (same batch shapes; the teacher's targets are cached), so
# the books probes price the generated-text rows too. (probe suffix, --train, extra flags)
PROBE_STEPS = 8
COST_PROBES = (
    ("qd-offsets-rtn", "offsets", ()),
    ("dq-full-rtn", "full", DQ),
    ("dq-full-gptq-off", "full", DQ_GPTQ_OFF),
    ("dq-lora64-gptq", "lora", DQ_LORA64),
)
EQUAL_REF = "qd-offsets-rtn"
# (key suffix, label, probe that prices it, --train, extra flags, budgets: "default" is --default-steps offsets
# steps, "long" --long-steps; a "long" row is scored on the full test sets, as the long reference rows are)
EQUAL_ROWS = (
    ("dq-full-rtn", "distil-quantize: full fp, then int4 RTN", "dq-full-rtn", "full", DQ, ("default",)),
    ("dq-full-gptq-off", "distil-quantize: full fp, then int4 GPTQ + 10 offset steps", "dq-full-gptq-off", "full",
     DQ_GPTQ_OFF, ("default",)),
    ("dq-lora64-gptq", "distil-quantize: LoRA r64 fp, then int4 GPTQ", "dq-lora64-gptq", "lora",
     DQ_LORA64, ("default",)),
    ("dq-full-gptq-off-gen", "distil-quantize: full fp on 200k generated tokens, then int4 GPTQ + 10 offset steps",
     "dq-full-gptq-off", "full", DQ_GPTQ_OFF + GEN, ("default", "long")),
)


def equal_refs(budget: int) -> list[str]:
    """The reference rows at `budget`: 20% quantize-distil RTN offsets trained exactly `budget` steps
    (books and generated text in the order table, generated text among GEN_ROWS)."""
    return [f"order-qd-offsets-rtn-{budget}", f"order-qd-offsets-rtn-gen-{budget}",
            *(key for key, _, ratio, steps, train in GEN_ROWS if ratio == 0.2 and steps == budget and train == "offsets")]


def equal_steps(budget: int, ref: dict, cost: dict) -> int:
    """Optimizer steps of a row priced by `cost` whose training + fixed costs take the CPU time of
    `budget` steps of `ref` (0: its fixed costs alone exceed that time)."""
    return max(0, math.floor((budget * ref["step_s"] - cost["fixed_s"]) / cost["step_s"]))


def best_grid(rows: list[dict]) -> list[dict]:
    ok = [r for r in rows if r.get("table") == "grid" and "ppl" in r]
    return sorted(ok, key=lambda r: r["ppl"]["wikitext2"])


# One setting (ratio, trained set, data) at several budgets: the main rows of the curve of
# WikiText-2 against training tokens, and of what a missed target's curve predicts.
SETTINGS = (
    ("20%, kd / offsets, books", ("main-best", "main-best-long")),
    ("20%, kd / offsets, 200k generated tokens", ("gen-0.2-60", "gen-0.2-300", "gen-0.2-600")),
    ("20%, kd / offsets, scales, norms, 200k generated tokens", ("gen-osn-0.2-300",)),
    ("50%, kd / offsets, books", ("main-0.5-default",)),
    ("50%, kd / offsets, 200k generated tokens", ("gen-0.5-300",)),
)
TOKENS_PER_STEP = 8 * 128  # batch 8 windows of 128 tokens

# The zero-shot rows: (row key, label of a model that is not a recovered row's)
ZEROSHOT_OF = ("main-dense", "main-pruned", "main-best-long", "gen-0.2-60", "gen-0.2-300", "gen-0.2-600")


def zeroshot_rows(b: Bench, p20: Path) -> None:
    """The seven tasks, first --task-limit items each, for dense, pruned 20% fp32 and the
    recovered rows of ZEROSHOT_OF whose model directories are kept (scored in this process,
    torch float32, as benchmarks/adapruner.py and hywia.py score theirs)."""
    a = b.a
    fixed = {"main-dense": (a.model, "dense fp32"), "main-pruned": (str(p20), "pruned 20% fp32 (reconstructed)")}
    gen_labels = {key: label for key, label, *_ in GEN_ROWS}
    for key in ZEROSHOT_OF:
        r, kept = b.rows.get(key), a.work / "models" / key
        if key in fixed:
            model, label = fixed[key]
        elif r and r.get("model_dir"):
            model, label = r["model_dir"], r["label"]
        elif key in gen_labels and (kept / "config.json").exists():  # recovered, its row still being scored
            model, label = str(kept), gen_labels[key]
        else:
            continue

        def make(model=model, label=label):
            if not (model == a.model or Path(model).exists()):
                return {"failed": f"{model} is gone"}
            return {"table": "zeroshot", "label": label, "model": str(model), "task_limit": a.task_limit,
                    **task_columns(a, load(model))}

        b.cached(f"zeroshot-{key}", make)


# ------------------------------------------------------------------ llama.cpp at equal bytes


def _llama_ppl_and_speed(path: Path, w, threads: int | None) -> dict:
    """Perplexity of the windows through llama.cpp, and decode tok/s (median of 3)."""
    import statistics

    import llama_cpp
    import numpy as np

    from export_quality import nll_sum

    llm = llama_cpp.Llama(str(path), n_ctx=256, n_batch=128, logits_all=True, verbose=False, n_threads=threads)
    total = 0.0
    t0 = time.perf_counter()
    for row in w:
        llm.reset()
        llm.eval(row.tolist())
        total += nll_sum(np.asarray(llm.scores[: len(row)], dtype=np.float32), row)
    ppl_s = time.perf_counter() - t0
    speeds = []
    for rep in range(4):  # the first is a warm-up
        llm.reset()
        llm.eval(w[rep % len(w)].tolist())
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t1 = time.perf_counter()
        for _ in range(64):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if rep:
            speeds.append(64 / (time.perf_counter() - t1))
    llm.close()
    return {"ppl": float(np.exp(total / (w.shape[0] * (w.shape[1] - 1)))), "windows": int(w.shape[0]),
            "decode_tok_s": statistics.median(speeds), "ppl_s": ppl_s, "mib": path.stat().st_size / 2**20}


def _embedding_width(path: Path) -> int:
    """The row length of a GGUF file's token embedding (the model's hidden size)."""
    import gguf

    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")
    return int(tensor.shape[0])  # GGUF lists the fastest-varying dimension first


def _block_size(type_name: str) -> int:
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0]


def llama_rows(b: Bench) -> dict | None:
    a = b.a
    ours = {k: r for k, r in b.rows.items() if k in LLAMA_OF and r.get("model_dir") and Path(r["model_dir"]).exists()}

    def make():
        import llama_cpp

        work = a.work / "gguf"
        work.mkdir(exist_ok=True)
        f16 = work / "dense-f16.gguf"
        if not f16.exists():
            run = run_child(CLI + ["export", a.model, "--format", "gguf", "--quant", "f16", "--no-validate", "--out", str(f16)],
                            log=work / "export-dense.log")
            if run["rc"]:
                return {"failed": f"dense F16 export failed, see {work / 'export-dense.log'}"}
        files = {"dense F16 (llama.cpp)": f16}
        width = _embedding_width(f16)
        for stem, label, q, embed in LLAMA_QUANTS:
            path = work / f"dense-{stem}.gguf"
            if embed and width % _block_size(embed):  # llama.cpp aborts rather than fall back for a forced type
                continue
            if not path.exists():
                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{q}")
                if embed:  # the tied embedding is also the output matrix
                    params.token_embedding_type = params.output_tensor_type = getattr(llama_cpp, f"GGML_TYPE_{embed}")
                tmp = path.with_suffix(".tmp")
                if llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), params) != 0:
                    return {"failed": f"llama.cpp could not quantize to {stem}"}
                tmp.rename(path)
            files[label] = path
        for key, r in ours.items():
            # the default export keeps the tied embedding / output matrix f16; llama.cpp's
            # quantizer also quantizes it, so ours is measured with a Q4_1 one as well
            for embed, extra in (("f16", []), ("q4_1", ["--embed-type", "q4_1", "--no-validate"])):
                path = work / f"{key}-emb{embed}.gguf"
                if not path.exists():
                    run = run_child(CLI + ["export", r["model_dir"], "--format", "gguf", "--out", str(path), "--overwrite"] + extra,
                                    log=work / f"export-{key}-{embed}.log")
                    if run["rc"]:
                        return {"failed": f"export of {key} failed, see {work / f'export-{key}-{embed}.log'}"}
                files[f"saap-edge: {r['label']}" + ("" if embed == "f16" else ", Q4_1 embeddings")] = path
        from export_quality import windows  # the same WikiText-2 windows export_quality scores

        w = windows(Path(ours[next(iter(ours))]["model_dir"]), SimpleNamespace(windows=a.llama_limit, window=128, data_dir=a.data_dir))
        out = {}
        for label, path in files.items():
            out[label] = _llama_ppl_and_speed(path, w, a.threads)
            print(f"  {label}: {out[label]}", flush=True)
        return {"table": "llama", "threads": a.threads, "artifacts": sorted(ours), "entries": out}

    # One table per window count, measured in one process; it is measured again when a run that
    # measures it (not --cached-only, and --only names it) has artifacts it lacks; any other run
    # shows the cached table as it is.
    key = f"llama-{a.llama_limit}"
    path = b.row_path(key)
    if path.exists() and b.measures(key) and not set(ours) <= set(json.loads(path.read_text()).get("artifacts", ())):
        path.unlink()
    return b.cached(key, make) if ours or path.exists() else None


# ------------------------------------------------------------------ output


def _fmt(x, nd=1):
    return None if x is None else round(x, nd)


def markdown(data: dict) -> str:
    p = data["protocol"]
    out = [f"# Recovery: {data['model']} pruned by the default method (SAAP + reconstruction), then int4\n",
           f"Machine: {data['device']}. {p['text']}\n"]
    grid = [r for r in data["rows"] if r.get("table") == "grid"]
    if grid:
        out.append(f"## Grid at equal steps ({p['steps']} steps x 8 x 128 tokens), 20% pruned\n")
        out.append(f"WikiText-2 test, first {p['grid_limit']} windows of 128 tokens. Held-out: 16 windows of the "
                   "recovery text, before -> after.\n")
        rows = [[r["loss"], r["train"], _fmt(r["ppl"]["wikitext2"]) if "ppl" in r else "failed",
                 f"{r['heldout_ppl']['before']:.1f} -> {r['heldout_ppl']['after']:.1f}" if r.get("heldout_ppl") else None,
                 r.get("trainable_params"), _fmt(r.get("train_s"), 0), round(r.get("peak_rss_mib") or 0)] for r in grid]
        out.append(format_table(["loss", "trained", "WikiText-2 PPL", "held-out PPL", "trainable params", "train s",
                                 "peak RSS MiB"], rows) + "\n")
    order = [r for r in data["rows"] if r.get("table") == "order"]
    if order:
        base = next((r for r in order if r["key"].startswith("order-qd-offsets-rtn") and r.get("train_s")), None)
        out.append(f"## Order, quantizer, trained set and data: kd recovery at {p['default_steps']} steps, 20% pruned\n")
        out.append(f"WikiText-2 test, first {p['grid_limit']} windows of 128 tokens. Equal optimizer steps (8 x 128 "
                   "tokens each); \"CPU time\" is the row's training + quantizing seconds and its ratio to the first "
                   "row's, so a row's steps-equivalent budget reads off it. Held-out: 16 windows of the recovery text "
                   "(before training -> the int4 result).\n")
        rows = []
        for r in order:
            cpu = _cpu_s(r)
            rows.append([r["label"], _fmt(r["ppl"]["wikitext2"]) if "ppl" in r else "failed",
                         f"{r['heldout_ppl']['before']:.1f} -> {r['heldout_ppl']['after']:.1f}" if r.get("heldout_ppl") else None,
                         r.get("trainable_params"), _fmt(cpu, 0),
                         f"{cpu / ((base['train_s'] or 1)):.2f}x" if base else None, round(r.get("peak_rss_mib") or 0)])
        out.append(format_table(["row", "WikiText-2 PPL", "held-out PPL", "trainable params", "CPU time s", "vs first",
                                 "peak RSS MiB"], rows) + "\n")
    out.extend(equal_time_section(data))
    main = [r for r in data["rows"] if r.get("table") == "main"]
    if main:
        out.append(f"## Full test sets ({', '.join(f'{k}: {v} windows' for k, v in p['full_windows'].items())})\n")
        rows = [[r["label"], *[_fmt(r.get("ppl", {}).get(ds)) for ds in p["datasets"]], r.get("trainable_params"),
                 _fmt(r.get("train_s"), 0), round(r.get("peak_rss_mib") or 0) or None, _fmt(r.get("model_mib"))] for r in main]
        out.append(format_table(["row", *[f"{ds} PPL" for ds in p["datasets"]], "trainable params", "train s",
                                 "peak RSS MiB", "safetensors MiB"], rows) + "\n")
        out.append("\n".join(data.get("targets", [])) + "\n")
    curves = curve_rows(data["rows"])
    if curves:
        out.append("## WikiText-2 against training tokens (full test sets)\n")
        out.append(f"One setting at several budgets; a step is {TOKENS_PER_STEP} tokens (8 windows of 128), with the "
                   "learning-rate schedule (warm-up 10%, then linear decay) stretched to each row's steps. Chart: "
                   "recovery_tokens.png.\n")
        body = [[name, r["steps"], f"{r['steps'] * TOKENS_PER_STEP:,}", _fmt(r["ppl"].get("wikitext2")),
                 _fmt(r["ppl"].get("ptb")), _fmt(r.get("train_s"), 0)] for name, pts in curves for r in pts]
        out.append(format_table(["setting", "steps", "training tokens", "WikiText-2 PPL", "PTB PPL", "train s"], body) + "\n")
        fits = [f"- {name}: {log_fit(pts)[1]:.1f} WikiText-2 PPL per e-fold of steps (least squares through "
                f"{len(pts)} points)." for name, pts in curves if len(pts) > 1]
        if fits:
            out.append("\n".join(fits) + "\n")
    llama = next((r for r in data["rows"] if r.get("table") == "llama"), None)
    if llama:
        out.append("## Equal bytes: pruning + int4 against llama.cpp's quantizer on the dense model\n")
        out.append(f"Perplexity through llama.cpp on the first {p['llama_limit']} WikiText-2 windows; decode: 128-token "
                   f"prompt then 64 greedy steps, median of 3 after a warm-up, one process, threads: "
                   f"{llama['threads'] or 'llama.cpp default'}.\n")
        rows = [[label, _fmt(e["mib"]), _fmt(e["ppl"]), _fmt(e["decode_tok_s"])]
                for label, e in sorted(llama["entries"].items(), key=lambda kv: kv[1]["mib"])]
        out.append(format_table(["artifact", "MiB", "WikiText-2 PPL", "decode tok/s"], rows) + "\n")
        out.append("\n".join(data.get("verdict", [])) + "\n")
    zs = [r for r in data["rows"] if r.get("table") == "zeroshot"]
    if zs:
        out.append("## Zero-shot: the seven tasks\n")
        out.append(f"First {p.get('task_limit')} items of each task (or the whole set if smaller), torch float32, acc for "
                   "BoolQ, PIQA, WinoGrande, ARC-e, acc_norm for HellaSwag, ARC-c, OBQA, in %; ± is one standard error "
                   "(benchmarks/adapruner.py's protocol).\n")
        body = [[r["label"]] + task_cells(r, task_stderr=False) + [_fmt(r.get("tasks_s"), 0)] for r in zs]
        out.append(format_table(["model"] + TASK_HEADERS + ["s"], body) + "\n")
    if data.get("missing"):
        out.append("Not measured in this run: " + ", ".join(data["missing"]) + "\n")
    out.append(f"Command: `{data['command']}`\n")
    return "\n".join(out)


def _cpu_s(r: dict) -> float:
    return (r.get("train_s") or 0) + (r.get("quantize_s") or 0) + (r.get("offsets_pass_s") or 0)


def equal_time_section(data: dict) -> list[str]:
    """The cost probes, then per budget the rows at equal CPU time beside the offsets reference."""
    p, rows = data["protocol"], data["rows"]
    by_key = {r["key"]: r for r in rows}
    costs = [r for r in rows if r.get("table") == "cost" and "step_s" in r]
    equal = [r for r in rows if r.get("table") == "equal"]
    if not equal:
        return []
    out = ["## Equal CPU time: the order table's settings at the CPU time of B offsets steps, 20% pruned\n",
           f"Each kind of row was first timed for {PROBE_STEPS} optimizer steps (no held-out curve), with its fixed costs "
           "(GPTQ's statistics and rounding, the offsets pass); a row then trains the steps that fill the CPU time of B "
           "quantize-distil offsets steps: steps = (B x offsets step s - fixed s) / its step s. The probes ran one "
           "after another, each at one thread (OMP_NUM_THREADS=1); the first steps' warm-up is in every probe alike. The "
           "last column is the training + quantizing seconds each row measured as it ran: a row run beside other jobs "
           "measures more than the budget it was priced at.\n"]
    out.append(format_table(["cost probe", "s per step", "fixed s", "step vs offsets"],
                            [[r["key"].removeprefix("cost-"), _fmt(r["step_s"], 2), _fmt(r["fixed_s"], 0),
                              f"{r['step_s'] / costs[0]['step_s']:.2f}x"] for r in costs]) + "\n")
    for budget in sorted({r["budget"] for r in equal}):
        at = [r for r in equal if r["budget"] == budget]
        full = any(r.get("full_test") for r in at)
        # references scored on the same windows: the order table's (first grid_limit) or the full test sets'
        refs = [by_key[k] for k in equal_refs(budget) if k in by_key and "ppl" in by_key[k]
                and by_key[k].get("table") == ("main" if full else "order")]
        sets = p["datasets"] if full else ["wikitext2"]
        scored = "full test sets" if full else f"first {p['grid_limit']} WikiText-2 windows"
        out.append(f"### B = {budget} ({scored})\n")
        body = [["reference: " + r["label"], r["steps"], *[_fmt(r["ppl"].get(ds)) for ds in sets], _fmt(_cpu_s(r), 0)]
                for r in refs]
        body += [[r["label"], r["steps"], *([_fmt(r["ppl"].get(ds)) for ds in sets] if "ppl" in r else
                                            [r.get("infeasible") or r.get("failed")] * len(sets)),
                  _fmt(_cpu_s(r), 0) if "ppl" in r else None] for r in at]
        out.append(format_table(["row", "steps", *[f"{ds} PPL" for ds in sets], "CPU time s"], body) + "\n")
    return out


def targets(main: list[dict]) -> list[str]:
    lines = []
    goals = [("main-best", 100, "20% + int4, the demo's default budget (books)"),
             ("main-best-long", 90, "20% + int4, 30-minute CPU budget (books)"),
             ("gen-0.2-60", 100, "20% + int4, the demo's default budget (generated text)"),
             ("gen-0.2-300", 90, "20% + int4, 30-minute CPU budget (generated text)"),
             ("gen-0.2-600", 80, "20% + int4, 60-minute CPU budget (generated text)"),
             ("gen-osn-0.2-300", 90, "20% + int4, 30-minute CPU budget (generated text, offsets + scales + norms)"),
             ("main-0.5-default", 400, "50% + int4, the demo's default budget (books)"),
             ("gen-0.5-300", 400, "50% + int4, 30-minute CPU budget (generated text)")]
    by_key = {r["key"]: r for r in main if "ppl" in r}
    for key, goal, what in goals:
        r = by_key.get(key)
        if r:
            got = r["ppl"]["wikitext2"]
            line = f"- Target {what}: WikiText-2 <= {goal}; measured {got:.1f} " + (
                "(met)." if got <= goal else f"(missed by {got - goal:.1f}).")
            # the same setting at this budget and the smaller ones
            keys = next((ks for _, ks in SETTINGS if key in ks), (key,))
            points = [by_key[k] for k in keys[: keys.index(key) + 1] if k in by_key]
            if got > goal and len(points) > 1:
                line += " " + _predict(points, goal)
            lines.append(line)
    return lines


def log_fit(points: list[dict]) -> tuple[float, float]:
    """Least squares WikiText-2 PPL = c + m ln(steps) through rows of one setting: (c, m)."""
    import numpy as np

    x = np.log([r["steps"] for r in points])
    y = np.array([r["ppl"]["wikitext2"] for r in points])
    m, c = np.polyfit(x, y, 1)
    return float(c), float(m)


def _predict(points: list[dict], goal: float) -> str:
    """What a line in log(steps) through rows of one setting predicts: the steps (and CPU time
    at the last row's rate) to reach `goal`, and the perplexity at twice the last budget. A line
    through two or three points is a crude curve; it is what the measurements support, no more."""
    last = points[-1]
    c, m = log_fit(points)
    through = ", ".join(f"{r['steps']} ({r['ppl']['wikitext2']:.1f})" for r in points)
    if m >= 0:
        return f"No improvement with steps through {through}: the curve predicts no budget that reaches it."
    steps = math.exp((goal - c) / m)
    rate = (last.get("train_s") or 0) / last["steps"]  # s per step
    at_double = c + m * math.log(2 * last["steps"])
    return (f"A line in log(steps) through {through} ({m:.1f} PPL per e-fold of steps) reaches it at about "
            f"{steps:,.0f} steps ({steps * rate / 3600:,.1f} hours at the last row's measured rate) and predicts "
            f"{at_double:.1f} at {2 * last['steps']} steps.")


def curve_rows(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """SETTINGS with their measured full-test-set rows, fewest steps first."""
    by_key = {r["key"]: r for r in rows if r.get("table") == "main" and "ppl" in r}
    out = [(name, sorted((by_key[k] for k in keys if k in by_key), key=lambda r: r["steps"])) for name, keys in SETTINGS]
    return [(name, pts) for name, pts in out if pts]


def dominated_by(entries: dict, label: str) -> list[str]:
    """The artifacts no larger than `label`'s with lower perplexity, or smaller with no higher
    (what puts it off the Pareto front of size against perplexity)."""
    x = entries[label]
    return [k for k, y in entries.items() if k != label and (
        (y["mib"] <= x["mib"] and y["ppl"] < x["ppl"]) or (y["mib"] < x["mib"] and y["ppl"] <= x["ppl"]))]


def verdict(llama: dict | None) -> list[str]:
    """Each of our artifacts: on the Pareto front or not (and by which dense quant, the smallest
    that dominates it); then the target's verdict."""
    if not llama:
        return []
    e = llama["entries"]
    dense = {k: v for k, v in e.items() if not k.startswith("saap-edge")}
    smallest_dense = min(dense.values(), key=lambda v: v["mib"]) if dense else None
    lines, front = [], []
    for label in sorted(e, key=lambda k: e[k]["mib"]):
        if not label.startswith("saap-edge"):
            continue
        x, over = e[label], dominated_by(e, label)
        if not over:
            front.append(label)
            alone = smallest_dense is not None and x["mib"] < smallest_dense["mib"]
            lines.append(f"- {label} ({x['mib']:.1f} MiB, PPL {x['ppl']:.1f}): on the front"
                         + (f"; it is smaller than every dense quant here (the smallest: {smallest_dense['mib']:.1f} MiB)"
                            if alone else "") + ".")
        else:
            by = min(over, key=lambda k: e[k]["mib"])
            lines.append(f"- {label} ({x['mib']:.1f} MiB, PPL {x['ppl']:.1f}): off the front; {by} is "
                         f"{e[by]['mib']:.1f} MiB at PPL {e[by]['ppl']:.1f}.")
    lines.append("- Target at least one saap-edge artifact on llama.cpp's Pareto front: "
                 + (f"met by {len(front)} ({'; '.join(front)})." if front else "missed: a dense quant dominates each of ours."))
    return lines


def _short(label: str) -> str:
    """A chart label: 'ours 20%, 300 st, Q4_1 emb' or 'dense Q2_K'."""
    if not label.startswith("saap-edge"):
        return label.replace(" (llama.cpp quantizer)", "").replace(" (llama.cpp)", "")
    ratio = label.split("pruned ", 1)[1].split(" ", 1)[0]
    steps = label.split(" steps", 1)[0].rsplit(" ", 1)[1]
    return (f"ours {ratio}, {steps} st" + (", gen" if "generated" in label else "")
            + (", Q4_1 emb" if "Q4_1 embeddings" in label else ""))


def plots(data: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    curves = [r for r in data["rows"] if r.get("heldout_curve")]
    best = best_grid(data["rows"])[:2]
    chosen = best + [r for r in curves if r.get("key") in ("main-best", "main-best-long")]
    if chosen:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for r in chosen:
            steps, ppl = zip(*r["heldout_curve"])
            ax.plot(steps, ppl, marker=".", label=f"{r['loss']} / {r['train']}, {r['steps']} steps"
                    + (" (grid)" if r.get("table") == "grid" else ""))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("held-out perplexity (books, 16 windows)")
        ax.set_title("Recovery of the 20% pruned int4 model")
        ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, out_dir / "recovery_curve.png", dpi=120)
        made.append("recovery_curve.png")
    curves = curve_rows(data["rows"])
    if curves:
        import numpy as np

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, ratio in zip(axes, ("20%", "50%")):
            for name, pts in curves:
                if not name.startswith(ratio):
                    continue
                x = [r["steps"] * TOKENS_PER_STEP for r in pts]
                line, = ax.plot(x, [r["ppl"]["wikitext2"] for r in pts], marker="o", label=name.split(", ", 1)[1])
                if len(pts) > 1:  # the least-squares line in log(steps), drawn to twice the last budget
                    c, m = log_fit(pts)
                    steps = np.geomspace(pts[0]["steps"], 2 * pts[-1]["steps"], 30)
                    ax.plot(steps * TOKENS_PER_STEP, c + m * np.log(steps), linestyle=":", color=line.get_color())
            ax.set_xscale("log")
            ax.set_xlabel("training tokens")
            ax.set_ylabel("WikiText-2 perplexity (full test set)")
            ax.set_title(f"pruned {ratio} + int4")
            if ax.lines:
                ax.legend(fontsize=8)
        fig.suptitle("Recovery against training tokens (dotted: the line in log(steps))")
        fig.tight_layout()
        save_figure(fig, out_dir / "recovery_tokens.png", dpi=120)
        made.append("recovery_tokens.png")
    llama = next((r for r in data["rows"] if r.get("table") == "llama"), None)
    if llama:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for label, e in llama["entries"].items():
            mark = "o" if label.startswith("saap-edge") else "s"
            for ax, y in zip(axes, ("ppl", "decode_tok_s")):
                ax.scatter(e["mib"], e[y], marker=mark)
                ax.annotate(_short(label), (e["mib"], e[y]), fontsize=7)
        axes[0].set_ylabel("WikiText-2 perplexity (llama.cpp)")
        axes[0].set_yscale("log")
        axes[1].set_ylabel("decode tok/s (llama.cpp)")
        for ax in axes:
            ax.set_xlabel("file size (MiB)")
        fig.suptitle("Pruning + int4 (circles) vs llama.cpp quantizing the dense model (squares)")
        fig.tight_layout()
        save_figure(fig, out_dir / "recovery_equal_bytes.png", dpi=120)
        made.append("recovery_equal_bytes.png")
    return made


def main(argv=None) -> int:
    a = parse_args(argv)
    b = Bench(a)
    if a.smoke:  # the rows of the full test sets scored on the first --grid-limit windows too
        full_sets = b.evaluate
        b.evaluate = lambda model, limit, datasets: full_sets(model, limit or a.grid_limit, datasets)
    p20 = b.pruned(0.2)
    for train in a.grid_trains:
        for loss in LOSSES:
            b.grid_row(p20, loss, train)
    for suffix, label, train, extra in ORDER_ROWS:
        b.order_row(p20, f"order-{suffix}-{a.default_steps}", label, train, extra, a.default_steps)
    costs = {suffix: b.cost_probe(p20, suffix, train, extra) for suffix, train, extra in COST_PROBES}
    ref = costs.get(EQUAL_REF)
    for suffix, label, probe, train, extra, budgets in EQUAL_ROWS:
        for budget in ({"default": a.default_steps, "long": a.long_steps}[name] for name in budgets):
            if ref and "step_s" in ref and costs.get(probe) and "step_s" in costs[probe]:
                b.equal_row(p20, suffix, label, train, extra, budget, ref, costs[probe])
            else:
                b.missing.append(f"equal-{suffix}-{budget} (no cost probe)")
    for key, label, ratio, steps, train in GEN_ROWS:
        b.main_row(key, label, lambda ratio=ratio, key=key, steps=steps, train=train:
                   b.recover(b.pruned(ratio), key, "qalora", "kd", train, steps, GEN))
    ranked = best_grid(list(b.rows.values()))
    if ranked:  # the grid's best at the default budget, at the 30-minute budget, and at 50%
        best = ranked[0]
        how = f"{best['loss']} / {best['train']}"
        b.main_row("main-best", f"pruned 20% + int4, {how}, {a.default_steps} steps (grid best)",
                   lambda: b.recover(p20, "main-best", "qalora", best["loss"], best["train"], a.default_steps))
        b.main_row("main-best-long", f"pruned 20% + int4, {how}, {a.long_steps} steps",
                   lambda: b.recover(p20, "main-best-long", "qalora", best["loss"], best["train"], a.long_steps))
        b.main_row("main-0.5-default", f"pruned 50% + int4, {how}, {a.default_steps} steps",
                   lambda: b.recover(b.pruned(0.5), "main-0.5-default", "qalora", best["loss"], best["train"], a.default_steps))
    b.main_row("main-rtn", "pruned 20% + int4 RTN, no training", lambda: b.recover(p20, "main-rtn", "none"))
    llama = llama_rows(b)
    # references last: the same protocol as benchmarks/prune_quality.py, which measured them too
    b.main_row("main-lm-lora", f"pruned 20% + int4, lm / lora, {a.default_steps} steps (previous default)",
               lambda: b.recover(p20, "main-lm-lora", "qalora", "lm", "lora", a.default_steps))
    b.main_row("main-dense", "dense fp32", lambda: (a.model, {}))
    b.main_row("main-pruned", "pruned 20% fp32 (reconstructed)", lambda: (p20, {}))
    zeroshot_rows(b, p20)
    rows = list(b.rows.values())
    full = next((r["windows"] for r in rows if r.get("table") == "main" and "windows" in r), {})
    data = {
        "model": a.model, "device": machine(), "versions": versions(),
        "protocol": {"steps": a.steps, "default_steps": a.default_steps, "long_steps": a.long_steps, "grid_limit": a.grid_limit,
                     "llama_limit": a.llama_limit, "task_limit": a.task_limit,
                     "datasets": a.datasets, "full_windows": full, "text": __doc__.split("Protocol: ", 1)[1].split("\n\n")[0]},
        "command": "python benchmarks/recovery.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "rows": rows, "missing": b.missing,
    }
    data["targets"] = targets([r for r in rows if r.get("table") == "main"])
    data["verdict"] = verdict(llama)
    data["plots"] = plots(data, a.work if a.smoke else a.out)
    # a partial run (--only) writes its own results files beside the full run's
    write_results(a.out, "recovery_smoke" if a.smoke else "recovery" + "".join(f"_{o}" for o in a.only or []), data,
                  markdown(data))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
