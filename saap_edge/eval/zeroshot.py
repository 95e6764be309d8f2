"""Zero-shot multiple-choice accuracy (ARC, BoolQ, HellaSwag, PIQA, WinoGrande, OpenBookQA).

Protocol (the log-likelihood ranking of lm-evaluation-harness):

* Every item becomes one request per choice: a ``(context, continuation)`` pair of strings.
  Choice tasks score ``" " + choice`` after the query; WinoGrande scores the shared
  ``" " + continuation`` after each of its two context options (partial scoring).
* Whitespace at the end of a context moves to the front of its continuation. The context
  and context + continuation are tokenized (with the tokenizer's default special tokens,
  so a BOS is prepended where the tokenizer adds one) and the continuation tokens are the
  tokens of the whole string after the context's tokens. An empty context becomes the
  BOS (else EOS) token.
* A request longer than ``max_length + 1`` tokens loses its oldest tokens (left
  truncation); its log-likelihood is the sum of ``log p(token | everything before it)``
  over the continuation tokens, with log-softmax in float32 and sums in float64.
* ``acc``: the choice with the highest summed log-likelihood is the gold one.
  ``acc_norm``: the same with each log-likelihood divided by the length in characters of
  the choice text (the continuation without its leading delimiter space), as lm-eval's
  ``process_results`` does. Ties go to the first choice. Standard errors are
  ``sqrt(p (1 - p) / (n - 1))`` (``None`` for a single item).

Task files live in ``<data_dir>/tasks/`` (``--data-dir`` / ``$SAAP_EDGE_DATA_DIR``, as in
:mod:`saap_edge.data`); without a local file the task is read from the Hugging Face hub
and converted to the same item form. Two scorers share the :class:`Scorer` interface:
:class:`TorchScorer` (a transformers causal LM, batched) and :class:`LlamaCppScorer` (a
GGUF file run by llama.cpp, one request at a time, reusing the KV cache of a shared prefix).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saap_edge.data import DATA_DIR_ENV, resolve_data_dir
from saap_edge.errors import UserError
from saap_edge.files import read_text
from saap_edge.eval.ppl import model_device

DEFAULT_MAX_LENGTH = 2048


@dataclass(frozen=True)
class Item:
    """One multiple-choice question: request ``i`` scores ``continuations[i]`` after ``contexts[i]``."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class Request:
    """Token ids of one (context, continuation) pair; ``context`` is never empty."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


# ---------------------------------------------------------------------------- items


def _item(contexts: Sequence[str], continuations: Sequence[str], gold: Any, where: str) -> Item:
    """An Item, or a UserError naming ``where`` when the row is malformed."""
    n = len(continuations)
    if n < 2 or len(contexts) != n or not all(isinstance(s, str) for s in [*contexts, *continuations]):
        raise UserError(f"{where}: an item needs a text context and at least two text choices")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < n:
        raise UserError(f"{where}: gold {gold!r} is not a choice index in 0..{n - 1}")
    return Item(tuple(contexts), tuple(continuations), gold)


def choice_item(row: dict, where: str = "item") -> Item:
    """``{"query", "choices", "gold"}``: each ``" " + choice`` scored after the query."""
    choices = row.get("choices") or []
    return _item([row.get("query")] * len(choices), [" " + str(c) for c in choices], row.get("gold"), where)


def winogrande_item(row: dict, where: str = "item") -> Item:
    """``{"context_options", "continuation", "gold"}``: the continuation scored after each option."""
    options = row.get("context_options") or []
    return _item(options, [" " + str(row.get("continuation"))] * len(options), row.get("gold"), where)


def _read_jsonl(path: Path, make: Callable[[dict, str], Item]) -> list[Item]:
    items = []
    for number, line in enumerate(read_text(path, "task file").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: not JSON ({exc.msg})") from exc
        items.append(make(row if isinstance(row, dict) else {}, where))
    return items


def read_hellaswag(path: Path) -> list[Item]:
    """llama.cpp's HellaSwag text: 6 lines an item (context, gold index 0-3, four endings)."""
    lines = read_text(path, "task file").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise UserError(f"{path}: {len(lines)} lines is not a multiple of 6 (context, gold, four endings)")
    items = []
    for start in range(0, len(lines), 6):
        context, gold, *endings = (line.rstrip("\r") for line in lines[start : start + 6])
        where = f"{path} line {start + 2}"
        if not gold.strip().isdigit():
            raise UserError(f"{where}: gold {gold!r} is not a choice index in 0..3")
        items.append(_item([context] * 4, [" " + e for e in endings], int(gold), where))
    return items


# ------------------------------------------------------------------- hub conversion


def _arc_row(row: dict) -> Item:
    choices = row["choices"]
    gold = choices["label"].index(row["answerKey"])
    return choice_item({"query": "Question: " + row["question"], "choices": choices["text"], "gold": gold})


def _boolq_row(row: dict) -> Item:
    query = f"Passage: {row['passage']}\nQuestion: {row['question']}?"
    gold = int(row["answer"]) if "answer" in row else int(row["label"])
    return choice_item({"query": query, "choices": ["no", "yes"], "gold": gold})


def _piqa_row(row: dict) -> Item:
    return choice_item({"query": f"Question: {row['goal']}\n", "choices": [row["sol1"], row["sol2"]],
                        "gold": int(row["label"])})


def _obqa_row(row: dict) -> Item:
    choices = row["choices"]
    gold = choices["label"].index(row["answerKey"])
    return choice_item({"query": row["question_stem"], "choices": choices["text"], "gold": gold})


def _winogrande_row(row: dict) -> Item:
    sentence = row["sentence"]
    blank = sentence.index("_")
    options = [sentence[:blank] + row["option1"], sentence[:blank] + row["option2"]]
    return winogrande_item({"context_options": options, "continuation": sentence[blank + 1 :].strip(),
                            "gold": int(row["answer"]) - 1})


def _hellaswag_clean(text: str) -> str:
    """HellaSwag's WikiHow markup removed: " [title]" becomes ". ", other [tags] go."""
    text = re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". "))
    return text.replace("  ", " ")


def _hellaswag_row(row: dict) -> Item:
    context = _hellaswag_clean(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    endings = [" " + _hellaswag_clean(e) for e in row["endings"]]
    return _item([context] * len(endings), endings, int(row["label"]), "hellaswag hub row")


# ---------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class TaskSpec:
    """Local file under ``<data_dir>/tasks/`` and its reader; hub dataset, split and row converter."""

    file: str
    read: Callable[[Path], list[Item]]
    hub_args: tuple[str, ...]
    hub_split: str
    convert: Callable[[dict], Item]


def _jsonl(make: Callable[[dict, str], Item]) -> Callable[[Path], list[Item]]:
    return lambda path: _read_jsonl(path, make)


TASKS: dict[str, TaskSpec] = {
    "arc_easy": TaskSpec("arc_easy.jsonl", _jsonl(choice_item), ("allenai/ai2_arc", "ARC-Easy"), "test", _arc_row),
    "arc_challenge": TaskSpec("arc_challenge.jsonl", _jsonl(choice_item), ("allenai/ai2_arc", "ARC-Challenge"), "test",
                              _arc_row),
    "boolq": TaskSpec("boolq.jsonl", _jsonl(choice_item), ("google/boolq",), "validation", _boolq_row),
    "hellaswag": TaskSpec("hellaswag_val.txt", read_hellaswag, ("Rowan/hellaswag",), "validation", _hellaswag_row),
    "piqa": TaskSpec("piqa.jsonl", _jsonl(choice_item), ("ybisk/piqa",), "validation", _piqa_row),
    "winogrande": TaskSpec("winogrande.jsonl", _jsonl(winogrande_item), ("allenai/winogrande", "winogrande_xl"),
                           "validation", _winogrande_row),
    "openbookqa": TaskSpec("openbook_qa.jsonl", _jsonl(choice_item), ("allenai/openbookqa", "main"), "test", _obqa_row),
}
TASK_ALIASES = {"arc-e": "arc_easy", "arc-c": "arc_challenge", "obqa": "openbookqa", "openbook_qa": "openbookqa"}


def task_names(names: Sequence[str]) -> list[str]:
    """Canonical task names in the order given, without repeats; ``all`` is the seven tasks."""
    out: list[str] = []
    for name in names:
        key = name.strip().lower()
        expanded = list(TASKS) if key == "all" else [TASK_ALIASES.get(key, key)]
        if expanded[0] not in TASKS:
            known = ", ".join([*TASKS, *TASK_ALIASES, "all"])
            raise UserError(f"unknown task {name!r}; known tasks: {known}")
        out.extend(t for t in expanded if t not in out)
    return out


def _hub_items(name: str, spec: TaskSpec, looked_for: str) -> list[Item]:
    """The task's items from the Hugging Face hub, or a UserError saying how to fix it."""
    try:
        from datasets import load_dataset

        rows = load_dataset(*spec.hub_args, split=spec.hub_split)
        return [spec.convert(dict(row)) for row in rows]
    except Exception as exc:  # network, missing package, missing dataset, changed schema...
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        raise UserError(
            f"cannot load task {name!r}: no local file at {looked_for} and the hub failed ({reason}); "
            f"set --data-dir or {DATA_DIR_ENV} to a folder holding tasks/{spec.file}"
        ) from exc


def load_task(name: str, data_dir: str | os.PathLike | None = None, limit: int | None = None) -> list[Item]:
    """Items of one task (the first ``limit`` of them): the local file if present, else the hub."""
    name = task_names([name])[0]
    spec, root = TASKS[name], resolve_data_dir(data_dir)
    path = root / "tasks" / spec.file if root is not None else None
    if path is not None and path.is_file():
        items = spec.read(path)
    else:
        items = _hub_items(name, spec, str(path) if path else f"<data-dir>/tasks/{spec.file} (no data dir set)")
    if not items:
        raise UserError(f"task {name!r} has no items ({path or 'hub'})")
    if limit is not None and not 1 <= limit <= len(items):
        raise UserError(f"--limit {limit} exceeds the {len(items)} items of task {name}" if limit > 0
                        else f"--limit must be >= 1, got {limit}")
    return items[:limit] if limit is not None else items


def load_tasks(names: Sequence[str], data_dir: str | os.PathLike | None = None,
               limit: int | None = None) -> dict[str, list[Item]]:
    """Items of every named task (aliases and ``all`` resolved), keyed by canonical name."""
    return {name: load_task(name, data_dir, limit) for name in task_names(names)}


# ---------------------------------------------------------------------------- scorers


def _sum_logprobs(logits: torch.Tensor, targets: Sequence[int]) -> float:
    """Sum of log-softmax(logits[i])[targets[i]]: float32 softmax, float64 sum."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(-1, torch.as_tensor(targets, device=logits.device)[:, None])
    return float(picked.double().sum())


class Scorer(ABC):
    """Turns (context, continuation) strings into token requests and scores them.

    Subclasses set ``max_length`` (most tokens one forward pass sees) and
    ``fallback_token`` (the context of an empty context), and implement ``encode`` and
    ``_score`` (sum of continuation log-probs of each ``(tokens, n_continuation)`` window).
    """

    max_length: int
    fallback_token: int | None

    @abstractmethod
    def encode(self, text: str, special: bool) -> list[int]:
        """Token ids of ``text``; with ``special`` the tokenizer's default special tokens (BOS)."""

    @abstractmethod
    def _score(self, windows: list[tuple[list[int], int]], progress: bool) -> list[float]:
        """Log-likelihood of the last ``n`` tokens of each window given the tokens before."""

    def encode_pair(self, context: str, continuation: str) -> Request:
        """The lm-eval split: whole string tokenized, continuation = tokens after the context's."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx = self.encode(context, True)
        whole = self.encode(context + continuation, True) if ctx else []
        cont = whole[len(ctx):] if len(whole) > len(ctx) else self.encode(continuation, False)
        if not ctx:
            if self.fallback_token is None:
                raise UserError("an empty context needs a BOS or EOS token, and the tokenizer has neither")
            ctx = [self.fallback_token]
        if not cont:
            raise UserError(f"continuation {continuation!r} has no tokens to score")
        return Request(tuple(ctx), tuple(cont))

    def window(self, request: Request) -> tuple[list[int], int]:
        """(tokens, n_continuation) with the oldest tokens cut so at most max_length are fed."""
        tokens = [*request.context, *request.continuation][-(self.max_length + 1):]
        n = len(request.continuation)
        if n >= len(tokens):
            raise UserError(f"a continuation of {n} tokens does not fit the {self.max_length}-token context")
        return tokens, n

    def loglikelihoods(self, requests: Sequence[Request], progress: bool = False) -> list[float]:
        """Summed log-probability of each request's continuation given its context."""
        return self._score([self.window(r) for r in requests], progress)

    def loglikelihood(self, context: str, continuation: str) -> float:
        return self.loglikelihoods([self.encode_pair(context, continuation)])[0]

    def close(self) -> None:
        """Free what the scorer holds outside Python (nothing for torch)."""


class TorchScorer(Scorer):
    """A transformers causal LM; requests of similar length share a right-padded forward pass."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, batch_size: int = 8,
                 device: str | torch.device | None = None, max_length: int = DEFAULT_MAX_LENGTH):
        if batch_size < 1 or max_length < 1:
            raise UserError(f"--batch-size ({batch_size}) and --max-length ({max_length}) must be >= 1")
        config = getattr(model, "config", None)
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.device = torch.device(device) if device is not None else model_device(model)
        self.max_length = min(max_length, getattr(config, "max_position_embeddings", None) or max_length)
        ids = [getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None),
               getattr(config, "bos_token_id", None)]
        self.fallback_token = next((int(i) for i in ids if isinstance(i, int)), None)
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    def encode(self, text: str, special: bool) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this TorchScorer has no tokenizer: pass token requests to loglikelihoods")
        return [int(i) for i in self.tokenizer(text, add_special_tokens=special)["input_ids"]]

    def _score(self, windows: list[tuple[list[int], int]], progress: bool) -> list[float]:
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
        out = [0.0] * len(windows)
        with tqdm(total=len(windows), desc="loglikelihood", disable=not progress, leave=False) as bar:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                for i, value in zip(chunk, self._batch([windows[i] for i in chunk])):
                    out[i] = value
                bar.update(len(chunk))
        return out

    @torch.inference_mode()
    def _batch(self, windows: list[tuple[list[int], int]]) -> list[float]:
        """One forward over right-padded inputs; only the continuation positions' logits are read."""
        inputs = [tokens[:-1] for tokens, _ in windows]
        width = max(map(len, inputs))
        ids = torch.zeros(len(inputs), width, dtype=torch.long)
        for row, x in enumerate(inputs):
            ids[row, : len(x)] = torch.as_tensor(x)
        first = min(len(x) - n for x, (_, n) in zip(inputs, windows))  # earliest logit needed
        keep = width - first
        ids = ids.to(self.device)
        if self._keeps_logits:
            logits = self.model(input_ids=ids, logits_to_keep=keep).logits
        else:
            logits = self.model(input_ids=ids).logits[:, first:]
        return [_sum_logprobs(logits[row, len(x) - n - first : len(x) - first], tokens[-n:])
                for row, (x, (tokens, n)) in enumerate(zip(inputs, windows))]


class LlamaCppScorer(Scorer):
    """A GGUF file run by llama-cpp-python, as a device would run the exported artifact.

    Requests are evaluated one at a time, in order; the KV cache of the longest prefix
    shared with the previous request is kept (the choices of one item share the context).
    ``llama_kwargs`` go to ``llama_cpp.Llama`` (e.g. ``n_threads``, ``type_k``).
    """

    def __init__(self, path: str | os.PathLike, max_length: int = DEFAULT_MAX_LENGTH, **llama_kwargs: Any):
        try:
            import llama_cpp
        except ImportError as exc:
            raise UserError("scoring a .gguf file needs llama-cpp-python: pip install llama-cpp-python") from exc
        path = Path(path)
        if max_length < 1:
            raise UserError(f"--max-length must be >= 1, got {max_length}")
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist")
        try:
            self.llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=max_length, verbose=False, **llama_kwargs)
        except ValueError as exc:
            raise UserError(f"llama.cpp cannot load {path}: {str(exc).splitlines()[0]}") from exc
        meta = self.llm.metadata
        trained = int(meta.get(f"{meta.get('general.architecture')}.context_length", max_length))
        self.max_length = min(max_length, trained, self.llm.n_ctx())
        self.add_bos = _adds_bos(self.llm)
        bos, eos = self.llm.token_bos(), self.llm.token_eos()
        self.fallback_token = bos if bos >= 0 else eos if eos >= 0 else None

    def encode(self, text: str, special: bool) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=special and self.add_bos, special=False))

    def _score(self, windows: list[tuple[list[int], int]], progress: bool) -> list[float]:
        return [self._one(tokens, n) for tokens, n in tqdm(windows, desc="loglikelihood", disable=not progress,
                                                            leave=False)]

    def _one(self, tokens: list[int], n: int) -> float:
        inputs = tokens[:-1]
        cached = [int(t) for t in self.llm.input_ids[: self.llm.n_tokens]]
        shared = 0
        while shared < min(len(cached), len(inputs) - 1) and cached[shared] == inputs[shared]:
            shared += 1
        self.llm.n_tokens = shared  # eval() drops the KV cache from here on
        self.llm.eval(inputs[shared:])
        logits = torch.from_numpy(np.array(self.llm.scores[len(inputs) - n : len(inputs)], dtype=np.float32))
        return _sum_logprobs(logits, tokens[-n:])

    def close(self) -> None:
        self.llm.close()  # before interpreter shutdown, where llama.cpp's finalizer fails


def _adds_bos(llm: Any) -> bool:
    """Whether llama.cpp's tokenizer prepends BOS by default for this model."""
    model = getattr(llm, "_model", None)
    if model is not None and hasattr(model, "add_bos_token"):
        return bool(model.add_bos_token())
    return str(llm.metadata.get("tokenizer.ggml.add_bos_token", "true")).lower() == "true"


# ---------------------------------------------------------------------------- metrics


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _stderr(p: float, n: int) -> float | None:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None


def _choice_text(continuation: str) -> str:
    return continuation[1:] if continuation.startswith(" ") else continuation


def metrics(items: Sequence[Item], lls: Sequence[Sequence[float]]) -> dict[str, float | int | None]:
    """acc / acc_norm (log-likelihood per character of the choice, see the module docstring), stderrs, n."""
    hits = [_argmax(ll) == item.gold for item, ll in zip(items, lls)]
    norm_hits = [_argmax([v / max(len(_choice_text(c)), 1) for v, c in zip(ll, item.continuations)]) == item.gold
                 for item, ll in zip(items, lls)]
    n = len(items)
    acc, acc_norm = sum(hits) / n, sum(norm_hits) / n
    return {"acc": acc, "acc_stderr": _stderr(acc, n), "acc_norm": acc_norm,
            "acc_norm_stderr": _stderr(acc_norm, n), "n": n}


def score_tasks(scorer: Scorer, tasks: dict[str, list[Item]], progress: bool = True) -> dict[str, dict]:
    """Metrics of each task (all requests scored in one pass) plus an unweighted ``average``."""
    pairs = [pair for items in tasks.values() for item in items for pair in zip(item.contexts, item.continuations)]
    lls = iter(scorer.loglikelihoods([scorer.encode_pair(c, x) for c, x in pairs], progress))
    results: dict[str, dict] = {}
    for name, items in tasks.items():
        results[name] = metrics(items, [[next(lls) for _ in item.continuations] for item in items])
    scored = list(results.values())
    results["average"] = {"acc": sum(r["acc"] for r in scored) / len(scored),
                          "acc_norm": sum(r["acc_norm"] for r in scored) / len(scored),
                          "n": sum(r["n"] for r in scored)}
    return results


def evaluate_tasks(scorer: Scorer, tasks: Sequence[str], data_dir: str | os.PathLike | None = None,
                   limit: int | None = None, progress: bool = True) -> dict[str, dict]:
    """Zero-shot accuracy of ``scorer`` on the named tasks: ``{task: metrics, "average": ...}``."""
    return score_tasks(scorer, load_tasks(tasks, data_dir, limit), progress)
