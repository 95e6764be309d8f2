"""Shared benchmark plumbing: a peak-RSS sampler, timing, JSON + Markdown output, and the tiny
model and sizes of the scripts' --smoke runs."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

from saap_edge.bench.probe import machine, run_child  # noqa: F401  (re-exported for the scripts)
from saap_edge.memory import PeakRSS  # noqa: F401  (re-exported for the scripts)
from saap_edge.outputs import write_file  # noqa: F401  (re-exported for the scripts)


@contextmanager
def timed(store: dict, key: str):
    t0 = time.perf_counter()
    yield
    store[key] = store.get(key, 0.0) + time.perf_counter() - t0


def cached_row(path: Path, make, keep=None) -> dict:
    """A benchmark row read from `path`, or made by `make()` and stored there (written whole)
    unless `keep(row)` says no, so an interrupted run resumes from its rows."""
    if path.exists():
        return json.loads(path.read_text())
    row = make()
    if keep is None or keep(row):
        store_row(path, row)
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
    p.add_argument("--smoke", action="store_true",
                   help="every row on the tiny random-weight model of benchmarks/harness.py (unless --model is given): 20%% "
                        "only, WikiText-2 only, 4 windows, 4 calibration and 16 reconstruction windows (and where the "
                        "script has them 4 items per task, 2 recovery steps): a check of this script; results "
                        "<name>_smoke.*, work files under <work>/smoke")


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


def store_row(path: Path, row: dict) -> dict:
    """Write `row` to `path` whole."""
    write_file(path, json.dumps(row, indent=1, default=str))
    return row


def read_row(a, key: str) -> dict:
    return json.loads((a.work / "rows" / f"{key}.json").read_text())


def load(model):
    """A model directory or name for scoring: float32 on the CPU."""
    from saap_edge.models.load import load_model

    return load_model(str(model), "cpu", "float32")


def score_ppl(a, loaded, limit: int) -> dict:
    """A loaded model on the test sets, `limit` windows each (0: all): {"ppl": {...}, "windows": {...}} for a row."""
    from saap_edge.eval.ppl import evaluate_ppl

    res = evaluate_ppl(loaded.model, loaded.tokenizer, a.datasets, window=128, limit=limit or None, data_dir=a.data_dir,
                       progress=False)
    return {"ppl": {k: v["ppl"] for k, v in res.items()}, "windows": {k: v["windows"] for k, v in res.items()}}


def task_columns(a, loaded) -> dict:
    """The seven zero-shot tasks of a loaded model, their average and its standard error."""
    t0 = time.perf_counter()
    tasks = zero_shot(loaded.model, loaded.tokenizer, a.data_dir, a.task_limit)
    return {"tasks": tasks, "average": task_average(tasks), "average_stderr": task_average_stderr(tasks),
            "tasks_s": time.perf_counter() - t0}


def method_row(a, key: str, make, tasks: bool = False, share_from: Path | None = None) -> dict | None:
    """One row of a method benchmark: skipped unless --only matches; taken from `share_from`'s
    rows (another benchmark's work folder, same protocol) when measured there; else cached
    under --work/rows or made by `make()`; with `tasks`, the zero-shot columns added."""
    if a.only and not key.startswith(tuple(a.only)):
        return None
    if share_from is not None:
        share_row(a, key, share_from)
    row = cached_row(a.work / "rows" / f"{key}.json", make)
    if tasks and "tasks" not in row:  # rows measured before the zero-shot columns existed
        row = add_tasks(a, row, a.work / "models" / key)
    print(f"[{time.strftime('%H:%M:%S')}] {key}: {row['ppl']} average {row.get('average')}", flush=True)
    return row


def share_row(a, key: str, other: Path) -> None:
    """Copy a row measured under the work folder `other` (and link its model, for the zero-shot columns)."""
    row, model = other / "rows" / f"{key}.json", other / "models" / key
    if (a.work / "rows" / f"{key}.json").exists() or not row.exists() or other.resolve() == a.work.resolve():
        return
    write_file(a.work / "rows" / f"{key}.json", row.read_text())
    if model.exists() and not (a.work / "models" / key).exists():
        (a.work / "models").mkdir(parents=True, exist_ok=True)
        (a.work / "models" / key).symlink_to(model.resolve(), target_is_directory=True)


def dense_rows(a, share_from: Path | None = None) -> list[dict]:
    row = method_row(a, "dense", lambda: dense_row(a), share_from=share_from)
    return [row] if row else []


def main_rows(a, methods, measure, share_from: Path | None = None) -> list[dict | None]:
    """Per ratio and (label, method): `measure(key, label, method, ratio)` on the full test sets, with the tasks."""
    return [method_row(a, f"main-{ratio:.2f}-{method}", lambda: measure(f"main-{ratio:.2f}-{method}", label, method, ratio),
                       tasks=True, share_from=share_from)
            for ratio in a.ratios for label, method in methods]


def recovered_rows(a, methods, share_from: Path | None = None) -> list[dict | None]:
    """Per ratio and (label, method): the main row's pruned model recovered (recover_and_score), with the tasks."""
    if a.no_recovered:
        return []
    rows = []
    for ratio in a.ratios:
        for label, method in methods:
            key, source = f"recovered-{ratio:.2f}-{method}-k{a.recover_steps}", f"main-{ratio:.2f}-{method}"
            rows.append(method_row(a, key, lambda: {**recover_and_score(a, key, read_row(a, source), a.limit),
                                                    "table": "recovered", "label": label + " + qalora"},
                                   tasks=True, share_from=share_from))
    return rows


def compress_and_score(a, key: str, job, limit: int) -> tuple[dict, dict]:
    """Run `job` (a CompressJob writing --work/models/<key>), then score its output on the test
    sets (`limit` windows each, 0: all): (row, compress report)."""
    from saap_edge.compress import compress

    job.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report = compress(job)
    wall = time.perf_counter() - t0
    row = {"key": key, "method": job.prune.method, "ratio": job.prune.ratio,
           "params": report.params["after"], "removed_share": report.params["removed_share"],
           **score_ppl(a, load(job.out), limit),
           "compress_s": wall, "time_s": report.time_s, "recovery": job.recover.recovery if job.recover else "none"}
    return row, report


def recover_and_score(a, key: str, source: dict, limit: int) -> dict:
    """The recovered row of `source` (a pruned row): `saap-edge recover` on its model (what compress
    does after pruning: --recover-steps of the default recovery, distilled from the dense model
    its report names), then the test sets."""
    from saap_edge.compress import RecoverJob, recover_dir
    from saap_edge.config import RecoverSettings, RunSettings

    out = a.work / "models" / key
    job = RecoverJob(str(a.work / "models" / source["key"]), out, RecoverSettings(steps=a.recover_steps),
                     RunSettings(device="cpu", data_dir=a.data_dir, progress=False), overwrite=True, eval_ppl=[])
    t0 = time.perf_counter()
    report = recover_dir(job)
    wall = time.perf_counter() - t0
    keep = ("method", "ratio", "params", "removed_share", "search", "hywia")
    return {**{k: source[k] for k in keep if k in source}, "key": key, "source": source["key"], **score_ppl(a, load(out), limit),
            "recovery": report.recovery["recovery"], "recover_s": wall, "heldout_ppl": report.recovery["heldout_ppl"]}


def add_tasks(a, row: dict, model_dir: Path) -> dict:
    """`row` with the seven zero-shot tasks of the model at `model_dir` (stored back under --work/rows)."""
    row.update(task_columns(a, load(model_dir)))
    return store_row(a.work / "rows" / f"{row['key']}.json", row)


def dense_row(a) -> dict:
    """The unpruned model on the same test sets and tasks."""
    loaded = load(a.model)
    return {"key": "dense", "table": "main", "label": "dense", "method": "dense", "ratio": 0.0,
            "params": sum(t.numel() for t in loaded.model.parameters()), "removed_share": 0.0,
            **score_ppl(a, loaded, a.limit), **task_columns(a, loaded), "recovery": "none"}


TASK_HEADERS = [TASK_COLUMNS[t][0] for t in TASKS] + ["Average"]


def task_cells(r: dict, task_stderr: bool = True) -> list[str]:
    """A row's seven task scores in % (each ± one standard error unless `task_stderr` is off)
    and their average ± its standard error: the cells under TASK_HEADERS."""
    def pct(metrics: dict, key: str) -> str:
        return f"{100 * metrics[key]:.1f}" + (f" ± {100 * metrics[key + '_stderr']:.1f}" if task_stderr else "")

    return ([pct(r["tasks"][t], TASK_COLUMNS[t][1]) for t in TASKS]
            + [f"{100 * r['average']:.2f} ± {100 * r['average_stderr']:.2f}"])


def quality_table(rows: list[dict], datasets: list[str]) -> str:
    """Markdown: ratio, variant, removed share, perplexities, the seven tasks and their average (± one standard error)."""
    from saap_edge.render import format_table

    head = ["ratio", "variant", "removed"] + datasets + TASK_HEADERS
    body = [[f"{r['ratio']:.0%}", r["label"], f"{r['removed_share']:.2%}"] + [r["ppl"][d] for d in datasets]
            + (task_cells(r) if "tasks" in r else ["-"] * len(TASK_HEADERS))
            for r in rows]
    return format_table(head, body)


def task_arguments(p) -> None:
    """Zero-shot and recovery arguments of the method benchmarks (adapruner, hywia)."""
    from saap_edge.config import CPU_RECOVER_STEPS

    p.add_argument("--task-limit", type=int, default=300, help="items of each zero-shot task (0: every item)")
    p.add_argument("--recover-steps", type=int, default=CPU_RECOVER_STEPS, help="recovery steps of the recovered rows")
    p.add_argument("--no-recovered", action="store_true", help="skip the recovered rows")
    p.add_argument("--ablation-ratios", type=float, nargs="+", default=[0.2], help="ratios of the ablation rows")


def write_results(out_dir: Path, name: str, data: dict, markdown: str) -> tuple[Path, Path]:
    """benchmarks/results/<name>.json and .md, each written to a temporary name then renamed."""
    paths = (out_dir / f"{name}.json", out_dir / f"{name}.md")
    for path, text in zip(paths, (json.dumps(data, indent=1, default=str) + "\n", markdown)):
        write_file(path, text)
    return paths


def main_of(name: str, parse_args, run, markdown, argv=None) -> None:
    """A benchmark's entry point: arguments, rows, then results/<name>.json and .md (<name>_smoke.* under --smoke)."""
    a = parse_args(argv)
    if a.smoke:
        name += "_smoke"
    data = run(a)
    paths = write_results(a.out, name, data, markdown(data))
    print(markdown(data))
    print("wrote", *paths)


def copy_chart(a, key: str, chart: str, name: str) -> None:
    """A chart the run wrote into --work/models/<key> copied to results/<name> (when present)."""
    src = a.work / "models" / key / chart
    if src.exists():
        write_file(a.out / name, src.read_bytes())


# ---------------------------------------------------------------------- --smoke

# The tiny model of the --smoke runs: LLaMA widths that int4 groups, GGUF blocks and the
# default alignment (32) divide, and 8 layers so the default --keep-first 3 / --keep-last 1
# leave four layers to prune. Random weights: the numbers check the scripts, not the methods.
SMOKE_MODEL = {"hidden": 128, "ffn": 256, "heads": 4, "kv_heads": 2, "layers": 8, "vocab": 1024, "seed": 0,
               "tokenizer_text_chars": 300_000}
# </s> ends a turn, as the tokenizer's eos token
SMOKE_CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                       "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
SMOKE_RECON_SAMPLES = 16  # the reconstruct stage's windows under --smoke (default 128)


def reconstruct_settings(a):
    """The reconstruct stage's default settings; under --smoke, SMOKE_RECON_SAMPLES windows."""
    from saap_edge.config import ReconstructSettings

    return ReconstructSettings(samples=SMOKE_RECON_SAMPLES) if getattr(a, "smoke", False) else ReconstructSettings()


def quality_smoke(a, p) -> None:
    """--smoke of the quality benchmarks (quality_arguments): 20% only, WikiText-2 only, 4 windows,
    4 calibration windows, and where the script has them 4 items per zero-shot task, 2 recovery
    steps, ablations at 20%; work files under <work>/smoke."""
    a.ratios, a.datasets, a.limit, a.ablation_limit, a.calib_samples = [0.2], ["wikitext2"], 4, 4, 4
    for key, value in (("task_limit", 4), ("recover_steps", 2), ("ablation_ratios", [0.2])):
        if hasattr(a, key):
            setattr(a, key, value)
    smoke_work(a, p)


def smoke_work(a, p) -> None:
    """--smoke: work files under <work>/smoke when --work is the parser `p`'s default (a --work the
    caller gives is used as it is), the teacher / pool caches inside them, and the tiny model in
    place of a --model left at the default SmolLM2."""
    import os

    from saap_edge.models.load import DEFAULT_MODEL

    if Path(a.work) == Path(p.get_default("work")):
        a.work = Path(a.work) / "smoke"
    os.environ["SAAP_EDGE_CACHE"] = str(Path(a.work).resolve() / "cache")
    if getattr(a, "model", None) == DEFAULT_MODEL:
        a.model = str(smoke_model(a.work, a.data_dir))


def smoke_model(work: Path, data_dir=None) -> Path:
    """The --smoke model: a random-weight LlamaForCausalLM of SMOKE_MODEL's shape (tied embedding,
    like SmolLM2) with a byte-level BPE tokenizer trained on the first characters of the book
    text and a chat template, saved as an HF directory <work>/tiny-llama (built once)."""
    import shutil

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from saap_edge.data import load_text

    out = Path(work) / "tiny-llama"
    spec = dict(SMOKE_MODEL, chat_template=SMOKE_CHAT_TEMPLATE)
    record = out / "smoke_model.json"
    if record.exists() and json.loads(record.read_text()) == spec:
        return out.resolve()
    s = SMOKE_MODEL
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=s["vocab"], special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([load_text("books", "train", data_dir)[: s["tokenizer_text_chars"]]], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = SMOKE_CHAT_TEMPLATE
    torch.manual_seed(s["seed"])
    config = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                         max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    LlamaForCausalLM(config).eval().save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "smoke_model.json").write_text(json.dumps(spec, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out.resolve()
