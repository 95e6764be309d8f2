"""Outputs: every file and directory a command writes, written whole or not at all (a temporary
name beside the target, renamed when complete). Training checkpoints are recover/train.py's.

The compressed model directory:

Layout: config.json (per-layer lists) + model.safetensors + slim.py (for trust_remote_code)
+ tokenizer files + prune_plan.json + report.json + layers.png.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from saap_edge.errors import UserError

PLAN_FILE, REPORT_FILE, CHART_FILE = "prune_plan.json", "report.json", "layers.png"


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output directory that holds results or cannot be written."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} already holds results; pass --overwrite or choose another --out")
    parent = out.resolve().parent
    if not parent.exists():
        raise UserError(f"--out {out}: the parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"--out {out}: cannot write in {parent}; choose a writable --out")


@contextmanager
def atomic_dir(out: Path, overwrite: bool):
    """Yield a temporary sibling directory; on success it replaces `out`, on failure it goes."""
    check_output_dir(out, overwrite)
    out = out.resolve()
    remove_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_path(tmp, out)


def remove_stale(out: Path) -> None:
    """Temporary siblings of `out` left by a run that was killed (its process is gone)."""
    for sibling in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = sibling.name.rpartition("-")
        if not kind.endswith((".tmp", ".old")) or not pid.isdigit() or _alive(int(pid)):
            continue
        if sibling.is_dir():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def replace_path(tmp: Path, out: Path) -> None:
    """Move a finished file or directory `tmp` onto `out`; an existing `out` goes only after."""
    if not out.is_dir():
        tmp.replace(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def written_whole(path: Path):
    """A temporary name beside `path` for the block to write; renamed onto `path` when the block
    ends, removed if it fails, so no reader ever sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_file(path: Path, data: str | bytes) -> None:
    """`data` (UTF-8 text or bytes) into `path` whole or not at all (its folder made if missing)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with written_whole(path) as tmp:
        tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data, encoding="utf-8")


def write_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """`tensors` as a safetensors file at `path`, written whole or not at all."""
    from safetensors.torch import save_file

    with written_whole(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def write_json(path: Path, data: dict) -> None:
    write_file(path, json.dumps(data, indent=1, default=str) + "\n")


def save_model(directory: Path, model, tokenizer) -> None:
    """Weights as safetensors (no pickles), config with per-layer sizes, tokenizer files."""
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        save_tokenizer(tokenizer, directory)


def save_tokenizer(tokenizer, directory: Path) -> None:
    """tokenizer.json and its configs, and a SentencePiece tokenizer's `tokenizer.model` (llama.cpp's
    converter and saap-edge's GGUF writer read the pieces' scores from it). Only a real `.model`
    file is carried: transformers would otherwise copy whatever `vocab_file` names (a whole GGUF
    for a tokenizer it read from one)."""
    fast = getattr(tokenizer, "is_fast", False)
    tokenizer.save_pretrained(str(directory), legacy_format=False if fast else None)
    vocab_file = getattr(tokenizer, "vocab_file", None)
    if fast and vocab_file and Path(vocab_file).suffix == ".model" and Path(vocab_file).is_file():
        target = Path(directory) / "tokenizer.model"
        if Path(vocab_file).resolve() != target.resolve():
            write_file(target, Path(vocab_file).read_bytes())
