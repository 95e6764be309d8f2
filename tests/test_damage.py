"""Damaged inputs never crash: every file a command reads, damaged each way that applies to
its kind, ends in exit 2 and one stderr line that names the file, with no traceback and
nothing left at --out.

The table is FILES (what each file is, where it sits in the workspace, which damages apply)
x READERS (the commands that read it); a new command or file type is one more entry.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import DATA_DIR, book_text, save_tiny32
from saap_edge.cli import main


# ------------------------------------------------------------------------------- damages

def _truncate_half(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _truncate_tail(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-7])


def _flip_header(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[0] ^= 0xFF  # the first byte: JSON's '{', the safetensors header length, GGUF's magic, ONNX's first tag
    p.write_bytes(bytes(data))


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _not_utf8(p: Path) -> None:
    p.write_bytes(b"\xff\xfe\xfa" + p.read_bytes())


def _missing(p: Path) -> None:
    p.unlink()


DAMAGES = {"truncated-half": _truncate_half, "truncated-tail": _truncate_tail, "flipped-header": _flip_header,
           "empty": _empty, "not-utf8": _not_utf8, "missing": _missing}
BINARY = ("truncated-half", "truncated-tail", "flipped-header", "empty", "missing")
JSON = ("truncated-half", "flipped-header", "empty", "not-utf8", "missing")
TEXT = ("empty", "not-utf8", "missing")  # a shorter text is still a text

# file kind -> (path in the workspace, damages that apply, commands that read it)
FILES = {
    "weights": ("pruned/model.safetensors", BINARY, ("recover", "export-gguf", "eval")),
    "config": ("pruned/config.json", JSON, ("recover", "export-onnx")),
    "tokenizer": ("pruned/tokenizer.json", JSON[:-1], ("recover",)),
    # (without a plan a directory is an unpruned model, which recover and export take as it is)
    "prune plan": ("pruned/prune_plan.json", JSON[:-1], ("recover", "export-gguf", "bench")),
    "report": ("pruned/report.json", JSON[:-1], ("recover", "export-gguf", "bench")),
    "adapter weights": ("rec.checkpoints/STEP/adapter_model.safetensors", BINARY, ("resume",)),
    "trainer state": ("rec.checkpoints/STEP/trainer_state.json", JSON[:-1], ("resume",)),
    "optimizer state": ("rec.checkpoints/STEP/optimizer.safetensors", BINARY, ("resume",)),
    "gguf": ("model.gguf", BINARY[:-1], ("run-gguf",)),
    "source gguf": ("stories260K.gguf", BINARY[:-1], ("compress-gguf",)),
    "onnx graph": ("onnx/model.onnx", BINARY, ("run-onnx",)),
    # raw tensor bytes with no header: a flipped byte inside them is a different weight, not a damage any reader can see
    "onnx weights": ("onnx/model.onnx.data", ("truncated-half", "truncated-tail", "empty", "missing"), ("run-onnx",)),
    "onnx config": ("onnx/config.json", JSON[:-1], ("run-onnx",)),
    "calibration text": ("calib.txt", TEXT, ("compress",)),
    "recovery data": ("alpaca.json", JSON, ("recover-alpaca",)),
    "perplexity text": ("ppl.txt", TEXT, ("eval",)),
    "task file": ("data/tasks/boolq.jsonl", JSON[:-1], ("eval-tasks",)),
    "hellaswag task file": ("data/tasks/hellaswag_val.txt", TEXT[:-1], ("eval-tasks",)),
}


def _commands(ws: Path, out: Path, data_dir: Path) -> dict[str, list[str]]:
    fast = ["--no-progress", "--eval-ppl", "none"]
    recover = ["recover", str(ws / "pruned"), "--out", str(out), "--recover-seq-len", "32", "--batch-size", "2", *fast]
    return {
        "compress": ["compress", "--model", str(ws / "dense"), "--calib", str(ws / "calib.txt"), "--calib-samples", "4",
                     "--recon-samples", "4", "--no-recover", "--keep-first", "1", "--out", str(out), *fast],
        "compress-gguf": ["compress", "--model", str(ws / "stories260K.gguf"), "--data-dir", str(data_dir), "--calib-samples", "4",
                          "--recon-samples", "4", "--no-recover", "--keep-first", "0", "--keep-last", "0", "--ratio", "0.15",
                          "--out", str(out), *fast],
        "recover": [*recover, "--recovery", "none"],
        "recover-alpaca": [*recover, "--recover-data", str(ws / "alpaca.json"), "--recover-steps", "1", "--recovery", "lora",
                           "--recover-loss", "lm", "--train", "lora"],
        "resume": [*recover, "--recover-data", str(ws / "book.txt"), "--recover-steps", "2", "--recovery", "lora",
                   "--recover-loss", "lm", "--train", "lora", "--resume"],
        "export-gguf": ["export", str(ws / "pruned"), "--format", "gguf", "--quant", "f32", "--out", str(out)],
        "export-onnx": ["export", str(ws / "pruned"), "--format", "onnx", "--quant", "f32", "--out", str(out)],
        "eval": ["eval", str(ws / "pruned"), "--ppl", str(ws / "ppl.txt"), "--limit", "2", "--window", "16"],
        "eval-tasks": ["eval", str(ws / "pruned"), "--tasks", "boolq", "hellaswag", "--limit", "2", "--data-dir", str(ws / "data")],
        "bench": ["bench", str(ws / "pruned"), "--runtimes", "torch", "--reps", "1", "--warmup", "0", "--new-tokens", "2",
                  "--prompt-tokens", "8", "--no-validate", "--no-progress", "--out", str(out)],
        "run-gguf": ["run", str(ws / "model.gguf"), "-n", "2"],
        "run-onnx": ["run", str(ws / "onnx"), "-n", "2"],
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_tokenizer) -> Path:
    """One of everything the commands read, made by the commands themselves."""
    ws = tmp_path_factory.mktemp("damage")
    save_tiny32(ws / "dense", tiny_tokenizer)
    (ws / "calib.txt").write_text(book_text(20_000))
    (ws / "book.txt").write_text(book_text(20_000))
    (ws / "ppl.txt").write_text(book_text(4_000))
    shutil.copy(DATA_DIR / "models" / "stories260K" / "stories260K.gguf", ws / "stories260K.gguf")
    (ws / "data" / "tasks").mkdir(parents=True)
    for name, lines in (("boolq.jsonl", 4), ("hellaswag_val.txt", 12)):
        head = (DATA_DIR / "tasks" / name).read_text(encoding="utf-8").split("\n")[:lines]
        (ws / "data" / "tasks" / name).write_text("\n".join(head) + "\n")
    (ws / "alpaca.json").write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": book_text(400)} for i in range(40)]))
    steps = [
        ["compress", "--model", str(ws / "dense"), "--calib", str(ws / "calib.txt"), "--calib-samples", "4", "--recon-samples", "4",
         "--no-recover", "--keep-first", "1", "--ratio", "0.2", "--out", str(ws / "pruned"), "--no-progress", "--eval-ppl", "none"],
        ["recover", str(ws / "pruned"), "--out", str(ws / "rec"), "--recover-data", str(ws / "book.txt"), "--recover-steps", "2",
         "--save-every", "2", "--keep-checkpoints", "--recovery", "lora", "--recover-loss", "lm", "--train", "lora",
         "--recover-seq-len", "32", "--batch-size", "2", "--no-progress", "--eval-ppl", "none"],
        ["export", str(ws / "pruned"), "--format", "gguf", "--quant", "f32", "--out", str(ws / "model.gguf")],
        ["export", str(ws / "pruned"), "--format", "onnx", "--quant", "f32", "--out", str(ws / "onnx")],
    ]
    for argv in steps:
        assert main(argv) == 0, argv
    return ws


CASES = [(kind, damage, command) for kind, (_, damages, commands) in FILES.items() for damage in damages for command in commands]


@pytest.mark.parametrize("kind, damage, command", CASES, ids=[f"{k}-{d}-{c}".replace(" ", "_") for k, d, c in CASES])
def test_damaged_file_gives_one_line_and_exit_2(workspace, tmp_path, data_dir, capsys, kind, damage, command):
    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws, symlinks=True)
    rel = FILES[kind][0]
    if "STEP" in rel:
        rel = rel.replace("STEP", sorted(p.name for p in (ws / "rec.checkpoints").glob("step-*"))[-1])
    target = ws / rel
    DAMAGES[damage](target)
    out = tmp_path / "out"
    if command == "resume":  # the interrupted run's checkpoints sit beside its --out
        (ws / "rec.checkpoints").rename(tmp_path / "out.checkpoints")
    capsys.readouterr()
    rc = main(_commands(ws, out, data_dir)[command])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, f"exit {rc}: {err[-3000:]}"
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert target.name in lines[0] or str(target.parent) in lines[0], lines[0]
    assert not out.exists() and not [p for p in tmp_path.glob(".out.*")], list(tmp_path.iterdir())


@pytest.mark.parametrize("command", sorted({c for _, _, commands in FILES.values() for c in commands}))
def test_every_command_of_the_table_runs_on_undamaged_files(workspace, tmp_path, data_dir, capsys, command):
    """The exits above come from the damage: on the same files, undamaged, every command succeeds."""
    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws, symlinks=True)
    out = tmp_path / "out"
    if command == "resume":
        (ws / "rec.checkpoints").rename(tmp_path / "out.checkpoints")
    rc = main(_commands(ws, out, data_dir)[command])
    assert rc == 0, capsys.readouterr().err[-3000:]


def test_compress_from_our_deci_gguf_rebuilds_its_tokenizer(workspace, tmp_path, capsys):
    """Our deci GGUF of the tiny model carries a BPE vocabulary that transformers' GGUF reader does
    not rebuild; saap_edge.tokenizer does, so compress calibrates on text and saves a tokenizer
    that tokenizes as llama.cpp does with the file."""
    from transformers import AutoTokenizer

    from runtime.llamacpp import LlamaCppVocab

    out = tmp_path / "out"
    rc = main(["compress", "--model", str(workspace / "model.gguf"), "--calib", str(workspace / "calib.txt"),
               "--calib-samples", "4", "--recon-samples", "4", "--no-recover", "--keep-first", "1", "--ratio", "0.1",
               "--out", str(out), "--no-progress", "--eval-ppl", "none"])
    assert rc == 0, capsys.readouterr().err
    text = book_text(300)
    with LlamaCppVocab(workspace / "model.gguf") as vocab:
        assert AutoTokenizer.from_pretrained(str(out))(text).input_ids == vocab.tokenize(text)


@pytest.mark.parametrize("argv", [
    ["compress", "--model", "DENSE", "--seq-len", "300"],
    ["compress", "--model", "DENSE", "--recon-seq-len", "300"],
    ["compress", "--model", "DENSE", "--recover-seq-len", "300"],
    ["recover", "PRUNED", "--recover-seq-len", "300"],
    ["eval", "PRUNED", "--ppl", "PPL", "--window", "300"],
], ids=["seq-len", "recon-seq-len", "compress-recover-seq-len", "recover-seq-len", "eval-window"])
def test_lengths_beyond_the_models_positions_are_refused_with_the_limit(workspace, tmp_path, capsys, argv):
    """The tiny models have 256 positions."""
    paths = {"DENSE": str(workspace / "dense"), "PRUNED": str(workspace / "pruned"), "PPL": str(workspace / "ppl.txt")}
    argv = [paths.get(a, a) for a in argv]
    out = tmp_path / "out"
    if argv[0] == "compress":
        argv += ["--out", str(out), "--calib", str(workspace / "calib.txt"), "--eval-ppl", "none", "--no-progress"]
    elif argv[0] == "recover":
        argv += ["--out", str(out)]
    rc = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "exceeds the model's 256 positions" in lines[0], lines
    assert not out.exists()
