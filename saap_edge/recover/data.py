"""Recovery text: where it comes from and how it becomes training windows.

A source is one of
- a named dataset of saap_edge.data (books, wikitext2, ptb; local copy or hub),
- a local ``.txt`` file or a folder of ``.txt`` files (plain text),
- a local ``.json`` / ``.jsonl`` file in Alpaca format (records with ``instruction``,
  optional ``input``, ``output``; the paper's recovery data),
- a hub dataset name (``yahma/alpaca-cleaned``): Alpaca columns or a ``text`` column.

Alpaca records are rendered with the Stanford Alpaca prompt and end with the EOS token.
All documents are tokenized, joined and cut into non-overlapping windows of ``seq_len``
tokens (packing; every token is a target); a seeded share is held out for perplexity.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saap_edge.data import DATASETS, load_rows
from saap_edge.errors import UserError
from saap_edge.files import read_text

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{context}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
TEXT_SUFFIXES = {".txt", ".text", ".md"}
JSON_SUFFIXES = {".json", ".jsonl"}


def alpaca_text(record: dict) -> str:
    """An Alpaca record as prompt + response (the template of Stanford Alpaca)."""
    extra = str(record.get("input") or "").strip()
    prompt = ALPACA_PROMPT.format(
        context=", paired with an input that provides further context" if extra else "",
        instruction=str(record["instruction"]).strip(),
        input_block=f"### Input:\n{extra}\n\n" if extra else "",
    )
    return prompt + str(record["output"]).strip()


def _alpaca_records(records: list, origin: str) -> list[str]:
    if not records:
        raise UserError(f"recovery data {origin} is empty: no records")
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict) or "instruction" not in r or "output" not in r), None)
    if bad is not None:
        raise UserError(
            f"recovery data {origin}: record {bad} is not in Alpaca format (needs 'instruction' and 'output', "
            "optional 'input'); give a .txt file or folder for plain text"
        )
    return [alpaca_text(r) for r in records]


def _json_documents(path: Path) -> list[str]:
    text = read_text(path, "recovery data")
    if not text.strip():
        raise UserError(f"recovery data {path} is empty")
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"recovery data {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if isinstance(records, dict):
        records = records.get("data") or records.get("train") or [records]
    if not isinstance(records, list):
        raise UserError(f"recovery data {path}: expected a list of Alpaca records")
    return _alpaca_records(records, str(path))


def _hub_documents(name: str) -> list[str]:
    try:
        from datasets import load_dataset

        ds = load_dataset(name, split="train")
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        raise UserError(
            f"recovery data {name!r} is not a local file or folder, nor a known dataset "
            f"({', '.join(DATASETS)}), and the hub failed ({reason})"
        ) from exc
    if {"instruction", "output"} <= set(ds.column_names):
        return _alpaca_records(list(ds), name)
    if "text" in ds.column_names:
        return [t for t in ds["text"] if t and t.strip()]
    raise UserError(f"hub dataset {name!r} has neither Alpaca columns (instruction, output) nor a 'text' column")


def recovery_documents(source: str, data_dir: str | os.PathLike | None) -> tuple[list[str], str]:
    """The documents of `source` and their kind ("text" or "alpaca")."""
    if source in DATASETS:
        return ["\n".join(load_rows(source, "train", data_dir))], "text"
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in TEXT_SUFFIXES | JSON_SUFFIXES)
        if not files:
            raise UserError(f"recovery data folder {path} holds no .txt, .json or .jsonl files")
        docs, kinds = [], set()
        for f in files:
            d, k = recovery_documents(str(f), data_dir)
            docs += d
            kinds.add(k)
        return docs, "+".join(sorted(kinds))
    if path.is_file():
        if path.suffix in JSON_SUFFIXES:
            return _json_documents(path), "alpaca"
        if path.suffix in TEXT_SUFFIXES or not path.suffix:
            text = read_text(path, "recovery data")
            if not text.strip():
                raise UserError(f"recovery data {path} is empty")
            return [text], "text"
        raise UserError(
            f"recovery data {path}: unknown format {path.suffix!r}; give .txt (plain text), "
            ".json / .jsonl (Alpaca records) or a folder of them"
        )
    if source.startswith((".", "/", "~")) or Path(source).suffix:
        raise UserError(f"recovery data {source}: no such file or folder")
    return _hub_documents(source), "alpaca-or-text"


@dataclass
class RecoveryData:
    train: torch.LongTensor  # [n_train, seq_len]
    heldout: torch.LongTensor  # [n_heldout, seq_len]
    kind: str
    sha256: str  # of all windows, in order, before the split

    def describe(self) -> dict:
        return {"kind": self.kind, "train_windows": len(self.train), "heldout_windows": len(self.heldout),
                "seq_len": self.train.shape[1], "sha256": self.sha256}


def recovery_windows(
    tokenizer: Any, source: str, seq_len: int, heldout: int, seed: int, data_dir, max_tokens: int | None = None,
    generated: torch.Tensor | None = None,
) -> RecoveryData:
    """Token windows of the recovery source; `heldout` windows (seeded pick) kept apart.

    `max_tokens` stops tokenizing once that many tokens are gathered (a CPU run needs only a
    few hundred thousand tokens of a multi-megabyte corpus). A source naming generated text
    (`generated[:TOKENS]`, alone or as `books+generated`) takes its windows from `generated`
    [n, seq_len] (recover/generate.py: sampled from the dense model), after the text's.
    """
    from saap_edge.recover.generate import GENERATED, split_sources

    parts = split_sources(source)
    text_parts = [p for p in parts if p.split(":", 1)[0] != GENERATED]
    blocks, kinds = [], []
    for part in text_parts:
        windows, kind = _text_windows(tokenizer, part, seq_len, data_dir, max_tokens)
        blocks.append(windows)
        kinds.append(kind)
    if len(text_parts) < len(parts):
        if generated is None:
            raise UserError(f"--recover-data {source!r} names generated text, which is sampled from the dense model; "
                            "run it through compress or recover with the dense model at hand (--teacher)")
        if generated.shape[1] != seq_len:
            raise UserError(f"the generated windows are {generated.shape[1]} tokens long, not --recover-seq-len {seq_len}")
        blocks.append(generated.numpy().astype(np.int64))
        kinds.append(GENERATED)
    windows = np.concatenate(blocks) if blocks else np.zeros((0, seq_len), dtype=np.int64)
    n = len(windows)
    if n < heldout + 1:
        raise UserError(
            f"recovery data {source} gives {n * seq_len} tokens: fewer than {heldout + 1} windows of {seq_len}; "
            "give more text or lower --recover-seq-len"
        )
    digest = hashlib.sha256(windows.tobytes()).hexdigest()
    order = np.random.default_rng(seed).permutation(n)
    held = np.sort(order[:heldout])
    train = np.sort(order[heldout:])
    return RecoveryData(torch.from_numpy(windows[train]), torch.from_numpy(windows[held]), "+".join(kinds), digest)


def _text_windows(tokenizer: Any, source: str, seq_len: int, data_dir, max_tokens: int | None) -> tuple[np.ndarray, str]:
    """Non-overlapping windows [n, seq_len] of the tokenized documents of one text source, and
    the source's kind."""
    docs, kind = recovery_documents(source, data_dir)
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for doc in docs:
        ids.extend(int(i) for i in tokenizer(doc)["input_ids"])
        if kind != "text" and eos is not None:
            ids.append(int(eos))
        if max_tokens and len(ids) >= max_tokens:
            break
    n = len(ids) // seq_len
    return np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len), kind
