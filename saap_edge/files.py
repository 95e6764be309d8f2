"""Reading the user's files: whatever is damaged ends in one line that names the file and what is
wrong with it (a UserError, exit 2), never in a traceback from the parser underneath.

Every file a command reads goes through one of these: `read_text` (UTF-8 text), `read_json`,
`check_safetensors` (the header parses and the data covers the file), `check_model_dir` (every
JSON and safetensors file of a Hugging Face directory, before transformers reads it) and the
`reading` context, which turns a parser's failure into that one line. The libraries underneath
(safetensors, tokenizers, gguf, onnx, onnxruntime, llama.cpp) each raise their own exception
types with messages that rarely name the file, so the wrapping is ours.
"""

from __future__ import annotations

import json
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from saap_edge.errors import UserError

JSON_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "adapter_config.json", "prune_plan.json", "report.json",
              "trainer_state.json", "timing.json", "model.safetensors.index.json", "genai_config.json")


class DamagedFile(UserError):
    """A file the command needs is missing, truncated, not in its format, or not UTF-8."""


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


@contextmanager
def reading(path: str | Path, what: str, fix: str = "restore it or make it again"):
    """Any failure while the block parses `path` becomes one DamagedFile line naming it."""
    try:
        yield
    except UserError:
        raise
    except FileNotFoundError as exc:
        raise DamagedFile(f"{path}: the {what} is missing ({Path(exc.filename or path).name}); {fix}") from exc
    except Exception as exc:  # noqa: BLE001 - any parser failure here means a damaged file
        raise DamagedFile(f"{path}: the {what} cannot be read ({_reason(exc)}); the file is damaged or incomplete: {fix}") from exc


def read_text(path: str | Path, what: str = "text file") -> str:
    """The text of `path` (UTF-8, BOM removed); a binary or non-UTF-8 file is named with the
    offset of its first bad byte."""
    path = Path(path)
    if not path.is_file():
        raise DamagedFile(f"{path}: the {what} is missing")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DamagedFile(f"{path}: the {what} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                          "give a plain-text file") from exc


def read_json(path: str | Path, what: str = "JSON file", kind: type | None = dict) -> Any:
    """The parsed JSON of `path`; `kind` (dict by default) is the type its top level must have."""
    path = Path(path)
    text = read_text(path, what)
    if not text.strip():
        raise DamagedFile(f"{path}: the {what} is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DamagedFile(f"{path}: the {what} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                          "the file is damaged or incomplete") from exc
    if kind is not None and not isinstance(data, kind):
        raise DamagedFile(f"{path}: the {what} holds a JSON {type(data).__name__}, not a {kind.__name__}")
    return data


def check_safetensors(path: str | Path, what: str = "weights") -> None:
    """The safetensors header parses and the tensors it lists cover the file exactly (a
    truncated or padded file is refused before any tensor is read)."""
    path = Path(path)
    if not path.is_file():
        raise DamagedFile(f"{path}: the {what} file is missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DamagedFile(f"{path}: the {what} file is {size} bytes, too short for a safetensors header; "
                              "the file is damaged or incomplete")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise DamagedFile(f"{path}: the {what} file's header claims {n} bytes but the file has {size}; "
                              "the file is damaged or incomplete")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except Exception as exc:  # noqa: BLE001 - a header that is not the documented JSON
        raise DamagedFile(f"{path}: the {what} file's safetensors header is damaged ({_reason(exc)})") from exc
    if 8 + n + end != size:
        raise DamagedFile(f"{path}: the {what} file's tensors need {8 + n + end} bytes but the file has {size}; "
                          "the file is damaged or incomplete")


def check_model_dir(path: str | Path) -> None:
    """Every JSON file and every safetensors file of a model directory reads, before any
    library parses them."""
    path = Path(path)
    for name in JSON_FILES:
        if (path / name).exists():
            read_json(path / name, name)
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors(weights, weights.name)
