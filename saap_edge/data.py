"""Text data for calibration and perplexity evaluation.

A *source* is either a dataset name from :data:`DATASETS` or a path to a local ``.txt``
file or a directory of ``.txt`` files. Named datasets are read from a local data
directory (``--data-dir`` / ``SAAP_EDGE_DATA_DIR``) when the files are there and
otherwise from the Hugging Face hub through ``datasets.load_dataset``.

Tokenizer contract: every function here only calls
``tokenizer(text, add_special_tokens=bool)["input_ids"]`` (or the same call without
``add_special_tokens``) and expects a flat list of ints back, so any Hugging Face
tokenizer works, and so does a tiny test tokenizer with that call signature.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saap_edge.errors import UserError
from saap_edge.files import read_text

DATA_DIR_ENV = "SAAP_EDGE_DATA_DIR"
CHUNK_CHARS = 200_000  # characters tokenized at a time by calibration_samples


@dataclass(frozen=True)
class DatasetSpec:
    """Where a named dataset lives locally and how to fetch it from the hub.

    ``local`` maps a split to a path (or glob) relative to the data dir.
    ``hub_args`` / ``hub_kwargs`` are passed to ``datasets.load_dataset`` with the split.
    ``rows`` says how a local line becomes a row, matching the hub's loader:
    ``"wikitext"`` keeps the line break and turns blank lines into ``""``;
    ``"strip"`` strips surrounding whitespace; ``"plain"`` only drops the line break.
    """

    local: dict[str, str]
    hub_args: tuple[str, ...]
    column: str
    rows: str = "plain"
    hub_splits: tuple[str, ...] = ("train", "validation", "test")
    hub_kwargs: dict[str, Any] = field(default_factory=dict)


DATASETS: dict[str, DatasetSpec] = {
    "wikitext2": DatasetSpec(
        # locally the validation split is the tokenized release (<unk>, @-@): AdaPruner's objective reads it
        local={"test": "text/wikitext2/wiki.test.raw", "validation": "text/wikitext2/wiki.valid.tokens"},
        hub_args=("wikitext", "wikitext-2-raw-v1"),
        column="text",
        rows="wikitext",
    ),
    "ptb": DatasetSpec(
        local={"test": "text/ptb/ptb.test.txt", "validation": "text/ptb/ptb.valid.txt"},
        hub_args=("ptb_text_only", "penn_treebank"),
        column="sentence",
        rows="strip",
    ),
    "books": DatasetSpec(  # book prose standing in for BookCorpus (calibration default)
        local={"train": "text/books/*.txt"},
        hub_args=("bookcorpus",),
        column="text",
        hub_splits=("train",),
    ),
}


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """Return ``data_dir``, else ``$SAAP_EDGE_DATA_DIR``, else ``None``."""
    chosen = data_dir if data_dir else os.environ.get(DATA_DIR_ENV)
    return Path(chosen).expanduser() if chosen else None


def _split_lines(text: str, style: str) -> list[str]:
    """Cut file text into rows, one per line, the way the hub loader would."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file's final line break does not start a new row
    if style == "wikitext":
        return [line + "\n" if line.strip() else "" for line in lines]
    if style == "strip":
        return [line.strip() for line in lines]
    return lines


def _read_rows(files: list[Path], style: str = "plain") -> list[str]:
    """Rows of the given text files, read in order (BOM and CRLF removed)."""
    rows: list[str] = []
    for path in files:
        rows.extend(_split_lines(read_text(path, "text"), style))
    if not any(row.strip() for row in rows):
        raise UserError(f"no text found in {', '.join(map(str, files))}: the file is empty")
    return rows


def _txt_files(path: Path) -> list[Path]:
    """The file itself, or the sorted ``*.txt`` files of a directory."""
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise UserError(f"no .txt files in directory {path}")
    return files


def _local_files(spec: DatasetSpec, split: str, data_dir: Path | None) -> tuple[list[Path], str]:
    """Local files of a named dataset's split (``[]`` if absent) and a description of where."""
    rel = spec.local.get(split)
    if rel is None:
        return [], f"(no local copy of split {split!r})"
    if data_dir is None:
        return [], f"<data-dir>/{rel} (no data dir set)"
    return sorted(data_dir.glob(rel)), str(data_dir / rel)


def _hub_rows(name: str, spec: DatasetSpec, split: str, looked_for: str) -> list[str]:
    """Rows of a named dataset from the Hugging Face hub, or a UserError saying how to fix it."""
    if split not in spec.hub_splits:
        raise UserError(f"dataset {name!r} has no split {split!r}; known splits: "
                        f"{', '.join(spec.hub_splits)}")
    try:
        from datasets import load_dataset

        dataset = load_dataset(*spec.hub_args, split=split, **spec.hub_kwargs)
        return [str(row) for row in dataset[spec.column]]
    except Exception as exc:  # network, missing package, missing dataset...
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        raise UserError(
            f"cannot load dataset {name!r} split {split!r}: no local file at {looked_for} "
            f"and the hub failed ({reason}); set --data-dir or {DATA_DIR_ENV} to a folder "
            f"holding {spec.local.get(split, 'the files')}"
        ) from exc


def load_rows(source: str, split: str, data_dir: str | os.PathLike | None) -> list[str]:
    """Rows of text of ``source`` (a dataset name, a .txt file or a folder of .txt files).

    Named datasets come from the local data dir when their files are there, else from
    the hub. For paths, ``split`` is ignored and each line is one row.
    """
    spec = DATASETS.get(source)
    if spec is None:
        path = Path(source).expanduser()
        if not path.exists():
            raise UserError(f"unknown dataset {source!r}: not a file or folder; known names: "
                            f"{', '.join(DATASETS)}")
        return _read_rows(_txt_files(path))
    files, looked_for = _local_files(spec, split, resolve_data_dir(data_dir))
    if files:
        return _read_rows(files, spec.rows)
    return _hub_rows(source, spec, split, looked_for)


def load_text(source: str, split: str, data_dir: str | os.PathLike | None) -> str:
    """Rows joined by blank lines (``"\\n\\n"``), the LLM-Pruner / SAAP perplexity protocol."""
    return "\n\n".join(load_rows(source, split, data_dir))


def _tokenize_prefix(tokenizer: Any, text: str, min_tokens: int) -> list[int]:
    """Token ids of ``text``, tokenized in ~CHUNK_CHARS pieces until ``min_tokens`` are reached.

    Pieces end at a line break where possible, so words are not cut. Only the first
    piece uses the tokenizer's default special tokens (e.g. BOS); the rest are tokenized
    with ``add_special_tokens=False``, so no special token lands in the middle.
    """
    ids: list[int] = []
    start = 0
    while start < len(text) and len(ids) < min_tokens:
        end = min(start + CHUNK_CHARS, len(text))
        if end < len(text):
            newline = text.rfind("\n", start + 1, end)
            end = newline + 1 if newline > start else end
        piece = text[start:end]
        out = tokenizer(piece) if start == 0 else tokenizer(piece, add_special_tokens=False)
        ids.extend(int(i) for i in out["input_ids"])
        start = end
    return ids


def calibration_samples(
    tokenizer: Any,
    source: str,
    n_samples: int,
    seq_len: int,
    seed: int,
    data_dir: str | os.PathLike | None,
    split: str = "train",
    flag: str = "--calib-samples",
) -> tuple[torch.LongTensor, str]:
    """Draw ``n_samples`` calibration windows of ``seq_len`` tokens.

    The rows of ``source`` are joined by ``"\\n"`` (the prose keeps its line layout),
    tokenized (only as far as ``4 * n_samples * seq_len`` tokens, in chunks, see
    :func:`_tokenize_prefix`), cut into non-overlapping ``seq_len`` windows, and
    ``n_samples`` distinct windows are picked with ``numpy.random.default_rng(seed)``
    and kept in the order drawn. The result is deterministic for a fixed seed and text.

    Returns the ``[n_samples, seq_len]`` LongTensor and the sha256 hex digest of its
    int64 bytes. ``flag`` names the setting that asked for the samples in error messages.
    """
    if n_samples < 1 or seq_len < 1:
        raise UserError(f"{flag} ({n_samples}) and the window length ({seq_len}) must be >= 1")
    needed = n_samples * seq_len
    text = "\n".join(load_rows(source, split, data_dir))
    ids = _tokenize_prefix(tokenizer, text, max(4 * needed, needed))
    n_windows = len(ids) // seq_len
    if n_windows < n_samples:
        raise UserError(
            f"calibration source {source!r} holds {n_windows} windows of {seq_len} tokens "
            f"({len(ids)} tokens) but {flag} asks for {n_samples}; lower {flag} or give more text"
        )
    windows = np.asarray(ids[: n_windows * seq_len], dtype=np.int64).reshape(n_windows, seq_len)
    chosen = np.random.default_rng(seed).choice(n_windows, size=n_samples, replace=False)
    samples = np.ascontiguousarray(windows[chosen])
    digest = hashlib.sha256(samples.tobytes()).hexdigest()
    return torch.from_numpy(samples), digest
