"""Shared benchmark plumbing: a peak-RSS sampler, timing, and JSON + Markdown output."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

from saap_edge.bench.probe import machine, run_child  # noqa: F401  (re-exported for the scripts)
from saap_edge.report import PeakRSS  # noqa: F401  (re-exported for the scripts)


@contextmanager
def timed(store: dict, key: str):
    t0 = time.perf_counter()
    yield
    store[key] = store.get(key, 0.0) + time.perf_counter() - t0


def cached_row(path: Path, make, keep=None) -> dict:
    """A benchmark row read from `path`, or made by `make()` and stored there (written whole,
    then renamed) unless `keep(row)` says no, so an interrupted run resumes from its rows."""
    if path.exists():
        return json.loads(path.read_text())
    row = make()
    if keep is None or keep(row):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(row, indent=1, default=str))
        tmp.replace(path)
    return row


def quality_arguments(p, name: str) -> None:
    """The arguments the pruning-quality benchmarks share: model, ratios, test sets and how much
    of them, calibration size, data, which rows, where rows and results go."""
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument("--datasets", nargs="+", default=["wikitext2", "ptb"])
    p.add_argument("--limit", type=int, default=0, help="128-token windows per dataset (0: the whole test set)")
    p.add_argument("--ablation-limit", type=int, default=256, help="windows per dataset for the ablation rows (0: all)")
    p.add_argument("--calib-samples", type=int, default=50)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--only", nargs="*", default=None, help="run only rows whose key starts with one of these (e.g. main-0.20)")
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--work", type=Path, default=Path("benchmarks/work") / name)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")


# The seven zero-shot tasks of the paper's tables, with the column and the metric each reports.
TASKS = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
TASK_COLUMNS = {"boolq": ("BoolQ", "acc"), "piqa": ("PIQA", "acc"), "hellaswag": ("HellaS", "acc_norm"),
                "winogrande": ("WinoG", "acc"), "arc_easy": ("ARC-e", "acc"), "arc_challenge": ("ARC-c", "acc_norm"),
                "openbookqa": ("OBQA", "acc_norm")}


def task_average(tasks: dict) -> float:
    """Unweighted mean over the seven tasks of each task's reported metric."""
    return sum(tasks[t][TASK_COLUMNS[t][1]] for t in TASKS) / len(TASKS)


def task_average_stderr(tasks: dict) -> float:
    """Standard error of that mean (the tasks' items are independent samples)."""
    return sum(tasks[t][TASK_COLUMNS[t][1] + "_stderr"] ** 2 for t in TASKS) ** 0.5 / len(TASKS)


def zero_shot(model, tokenizer, data_dir, limit: int) -> dict:
    """The seven tasks scored in torch (first `limit` items of each, or all of a smaller set)."""
    from saap_edge.eval.zeroshot import TorchScorer, evaluate_tasks, load_task

    out = {}
    scorer = TorchScorer(model, tokenizer, batch_size=16)
    for task in TASKS:
        n = min(limit, len(load_task(task, data_dir))) if limit else None
        out.update(evaluate_tasks(scorer, [task], data_dir, n, progress=False))
    out.pop("average", None)
    return out


def write_results(out_dir: Path, name: str, data: dict, markdown: str) -> tuple[Path, Path]:
    """benchmarks/results/<name>.json and .md, each written to a temporary name then renamed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = (out_dir / f"{name}.json", out_dir / f"{name}.md")
    for path, text in zip(paths, (json.dumps(data, indent=1, default=str) + "\n", markdown)):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return paths
