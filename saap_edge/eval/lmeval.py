"""lm-evaluation-harness over our offline task files.

People compare zero-shot accuracy with lm-eval (PyPI `lm-eval`). Its own task configs read the
Hugging Face hub; these write local ones instead: every item of our task files, exactly as
:mod:`saap_edge.eval.zeroshot` reads them, becomes a JSON line, and a task config
`saap_<task>` tells lm-eval to score it the same way (query + " " + choice; WinoGrande's
partial scoring as lm-eval's multiple-input form). `lm_eval --model hf --model_args
pretrained=DIR,trust_remote_code=True --include_path CONFIGS --tasks saap_arc_easy,...` then
runs any saap-edge directory (pruned ones load through their own modeling file), and
`saap-edge eval --tasks ... --scorer lm-eval` calls it from here. Only the configs and the
item conversion are ours: lm-eval's own scoring runs unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from saap_edge.errors import UserError
from saap_edge.outputs import write_file
from saap_edge.eval.zeroshot import Item, load_tasks

PREFIX = "saap_"
# lm-eval's acc_norm divides by the length of its choices; for WinoGrande the choices are the
# two contexts (the continuation is shared), so only acc is comparable there (lm-eval's own
# winogrande task reports acc only too).
ACC_ONLY = {"winogrande"}


def _row(task: str, item: Item) -> dict:
    if task == "winogrande":
        return {"context_options": list(item.contexts), "continuation": item.continuations[0][1:], "gold": item.gold}
    return {"query": item.contexts[0], "choices": [c[1:] for c in item.continuations], "gold": item.gold}


def _config(task: str, data: Path) -> str:
    if task == "winogrande":  # an int from doc_to_text: lm-eval's multiple-input form
        text, choice, target = "{{gold}}", "{{context_options}}", "{{continuation}}"
    else:
        text, choice, target = "{{query}}", "{{choices}}", "{{gold}}"
    metrics = ["acc"] + ([] if task in ACC_ONLY else ["acc_norm"])
    lines = [f"task: {PREFIX}{task}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
             f"    test: {json.dumps(str(data))}", "output_type: multiple_choice", "test_split: test",
             f"doc_to_text: {json.dumps(text)}", f"doc_to_choice: {json.dumps(choice)}", f"doc_to_target: {json.dumps(target)}",
             'target_delimiter: " "', "metric_list:"]
    for m in metrics:
        lines += [f"  - metric: {m}", "    aggregation: mean", "    higher_is_better: true"]
    return "\n".join(lines + ["metadata:", "  version: 1.0", ""])


def write_task_configs(names, data_dir, folder: str | os.PathLike, limit: int | None = None) -> list[str]:
    """Task configs and item files for lm-eval's --include_path in `folder`; returns the task names."""
    folder = Path(folder)
    tasks = load_tasks(names, data_dir, limit)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for task, items in tasks.items():
        data = folder / f"{PREFIX}{task}.jsonl"
        for path, text in ((data, "".join(json.dumps(_row(task, it)) + "\n" for it in items)),
                           (folder / f"{PREFIX}{task}.yaml", _config(task, data.resolve()))):
            write_file(path, text)
        written.append(f"{PREFIX}{task}")
    return written


def evaluate_lm_eval(model: str | os.PathLike, names, data_dir, folder: str | os.PathLike, limit: int | None = None,
                     batch_size: int = 8, device: str = "cpu", samples: bool = False) -> dict[str, dict]:
    """Our tasks scored by lm-eval's `hf` model on `model` (a local directory): ``{task: metrics}``
    in :func:`saap_edge.eval.zeroshot.metrics`'s form (plus ``loglikelihoods`` per item with
    `samples`). lm-eval runs in a child process: loading a directory with trust_remote_code
    registers its modeling file's classes with transformers' Auto classes, which would then
    shadow saap_edge's own in this process."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("--scorer lm-eval needs lm-eval: pip install 'lm-eval>=0.4.13,<0.5'")
    tasks = write_task_configs(names, data_dir, folder, limit)
    request = {"model": str(model), "tasks": tasks, "folder": str(folder), "batch_size": batch_size, "device": device,
               "samples": samples}
    run = subprocess.run([sys.executable, "-m", "saap_edge.eval.lmeval", json.dumps(request)], capture_output=True,
                         text=True)
    lines = run.stdout.strip().splitlines()
    if run.returncode != 0 or not lines:
        last = (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"lm-eval failed on {model}: {last[:300]}")
    return json.loads(lines[-1])


def _simple_evaluate(request: dict) -> dict[str, dict]:
    """The child process's side of evaluate_lm_eval."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks, samples = request["tasks"], request["samples"]
    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": request["model"], "trust_remote_code": True, "dtype": "float32"},
        tasks=tasks, task_manager=TaskManager(include_path=request["folder"], include_defaults=False),
        batch_size=request["batch_size"], device=request["device"], log_samples=samples,
        bootstrap_iters=100,  # > 0 turns standard errors on; a mean's is closed-form (no bootstrap)
    )
    results = {}
    for name in tasks:
        r = out["results"][name]
        n = out["n-samples"][name]["effective"]
        entry = {"acc": r["acc,none"], "acc_stderr": _number(r.get("acc_stderr,none")), "n": n}
        if "acc_norm,none" in r:
            entry.update(acc_norm=r["acc_norm,none"], acc_norm_stderr=_number(r.get("acc_norm_stderr,none")))
        if samples:
            ordered = sorted(out["samples"][name], key=lambda s: s["doc_id"])
            entry["loglikelihoods"] = [[float(resp[0][0]) for resp in s["resps"]] for s in ordered]
        results[name[len(PREFIX):]] = entry
    return results


def _number(value) -> float | None:
    return value if isinstance(value, (int, float)) else None  # lm-eval writes "N/A" where it has none


if __name__ == "__main__":  # the child process of evaluate_lm_eval: one JSON request in, one JSON line out
    import sys

    print(json.dumps(_simple_evaluate(json.loads(sys.argv[1]))))
