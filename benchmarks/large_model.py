"""LLaMA-7B-class models through every saap-edge stage within one 24 GB card's worth of memory:
the CPU proof, with random weights, plus a counted time estimate for one RTX 3090.

1. Models: random-weight LLaMA Hugging Face directories (safetensors, bfloat16) built here on
   the meta device and filled tensor by tensor (seeded normal(0, 0.02), norm weights 1), so the
   host never holds two copies: LLaMA-7B widths with 4 layers (`7b-4l`), LLaMA-3-8B widths with
   4 layers (`8b-4l`, 8 KV heads, vocabulary 128256, rope theta 500000) and the full 32-layer
   LLaMA-7B (`7b-32l`). Their tokenizer is a byte-level BPE of 32000 tokens trained here on the
   book text of the data folder (ids stay below both vocabularies), saved into each directory.
2. Stages: the real CLI, one subprocess per stage, in bfloat16 on the CPU (`--device cpu --dtype
   bfloat16` where the command has the flags, `--no-progress` where it has that one). Each stage's
   wall time, peak RSS (the process and its children, sampled every 0.1 s), exit code and last
   stderr lines are recorded; a failed stage is recorded and the next ones still run. Per
   4-layer shape: compress --dry-run (the memory plan), compress (the defaults with small
   budgets, stated in the results), export gguf and onnx (each after its --dry-run plan), eval
   (WikiText-2, 8 windows) and bench (torch and llama.cpp Q4_1 rows against the dense model).
   For `7b-32l` only compress --dry-run and compress, the peak set against 24 GiB. The
   compress report's time per stage and planned (and, where the report has it, measured) memory
   per stage go into the results.
3. Estimate: the time of each stage of `saap-edge compress` with its defaults for LLaMA-7B at
   20% on one RTX 3090, from FLOPs and bytes counted from the code, with the rates and the
   achieved shares stated.

Results: benchmarks/results/large_model.json and .md (a shape run later replaces only its own
section; `--smoke` writes large_model_smoke.*). Work files: benchmarks/work/large_model/.
Not part of the test suite (pytest collects tests/ only).

    python benchmarks/large_model.py                      # 7b-4l and 8b-4l, then the estimate
    python benchmarks/large_model.py --shape 7b-32l       # the full 32-layer LLaMA-7B (compress)
    python benchmarks/large_model.py --smoke              # a tiny shape through every stage (minutes)
    python benchmarks/large_model.py --estimate           # the RTX 3090 estimate alone (instant)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
NAME = "large_model"
GIB, MIB = 2**30, 2**20
CARD_BUDGET = 24 * GIB  # one RTX 3090 / 4090
SAMPLE_S = 0.1  # RSS sampling interval
TAIL = 15  # stderr lines kept per stage
TOKENIZER_VOCAB = 32000
SEED = 0


# --------------------------------------------------------------------------------------------
# Shapes

@dataclass(frozen=True)
class Spec:
    title: str
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    layers: int
    rope_theta: float
    max_positions: int
    rms_eps: float
    # how compress runs on it
    ratio: float
    keep_first: int
    keep_last: int
    every_stage: bool  # export, eval and bench too (else compress --dry-run and compress only)

    def params(self) -> int:
        hd = self.hidden // self.heads
        attn = 2 * self.hidden * self.heads * hd + 2 * self.hidden * self.kv_heads * hd
        layer = attn + 3 * self.hidden * self.ffn + 2 * self.hidden
        return self.layers * layer + 2 * self.vocab * self.hidden + self.hidden  # untied embedding and head


SHAPES = {
    "7b-4l": Spec("LLaMA-7B widths, 4 layers", 4096, 11008, 32, 32, 32000, 4, 10000.0, 2048, 1e-6,
                  0.2, 0, 0, True),
    "8b-4l": Spec("LLaMA-3-8B widths, 4 layers", 4096, 14336, 32, 8, 128256, 4, 500000.0, 8192, 1e-5,
                  0.2, 0, 0, True),
    "7b-32l": Spec("LLaMA-7B, all 32 layers", 4096, 11008, 32, 32, 32000, 32, 10000.0, 2048, 1e-6,
                   0.2, 3, 1, False),  # the defaults keep the first 3 and the last layer
    # a minute-scale check of this script (GQA as in the 8B shape); the embedding dominates its
    # parameters, so 3% of all of them is ~28% of its two layers
    "smoke": Spec("hidden 256, 2 layers, vocabulary 32000 (a check of this script)", 256, 1024, 4, 2, 32000, 2, 10000.0, 2048, 1e-6,
                  0.03, 0, 0, True),
}
DEFAULT_SHAPES = ["7b-4l", "8b-4l"]

# compress with its defaults except these (the budgets a 2-core CPU can pay; stated in the results)
SMALL_BUDGETS = ["--calib-samples", "4", "--recon-samples", "16", "--recover-steps", "2", "--batch-size", "2",
                 "--eval-ppl", "none"]
# the 32-layer model on 2 cores (bf16 matmuls run at ~20 GFLOPS here): shorter windows too, which
# lower only the activation terms (well under 1 GiB at the defaults); the weights and the refit's
# Gram / OBS work, which set the peaks, are the defaults' own
FULL_7B_BUDGETS = ["--calib-samples", "2", "--seq-len", "32", "--recon-samples", "8", "--recon-seq-len", "64",
                   "--recover-steps", "1", "--batch-size", "1", "--recover-seq-len", "16", "--eval-ppl", "none",
                   "--solve-dtype", "float32"]
FULL_7B_NOTE = ("the 32-layer model: calibration 2 windows of 32 tokens, refit 8 windows of 64, recovery 1 step of 1 "
                "window of 16 tokens (its 16 held-out windows are 16 tokens long too); these lower only time and the "
                "activation terms, not the weights or the refit work that set the peaks. Its refit solves run in "
                "float32 (--solve-dtype float32, the GPU default; float64 took 4-5 min a layer on these 2 cores), so "
                "its refit work is the GPU plan's")
BUDGETS = {"7b-32l": FULL_7B_BUDGETS}
NO_REFIT = ["--reconstruct", "none", "--select", "global"]  # --no-refit
BUDGET_NOTE = ("calibration windows 50 -> 4 (--calib-samples), refit windows 128 -> 16 (--recon-samples), recovery "
               "2 optimizer steps (--recover-steps; default 2 epochs on a GPU, 60 steps on a CPU) of 2 windows "
               "(--batch-size, default 8), quick perplexity checks off (--eval-ppl none, default WikiText-2 64 "
               "windows); the recovery still holds out its default 16 windows for perplexity (the CLI has no flag "
               "for that count)")


def llama_config(spec: Spec):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.ffn, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, max_position_embeddings=spec.max_positions,
        rope_theta=spec.rope_theta, rms_norm_eps=spec.rms_eps, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2,
    )


# --------------------------------------------------------------------------------------------
# Part 1: the tokenizer and the random-weight models (each run in its own subprocess, measured)

def book_files(data_dir: Path) -> list[Path]:
    files = sorted((data_dir / "text" / "books").glob("*.txt"))
    if not files:
        raise SystemExit(f"large_model: no book text under {data_dir / 'text' / 'books'}; give --data-dir")
    return files


def build_tokenizer(out: Path, data_dir: Path, vocab: int = TOKENIZER_VOCAB) -> None:
    """A byte-level BPE trained on the book text (every byte in its alphabet, so any text
    encodes), wrapped as transformers' fast tokenizer with <s> / </s>; written whole."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    files = book_files(data_dir)
    tok.train_from_iterator((f.read_text(encoding="utf-8-sig") for f in files), trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    wrapped.save_pretrained(tmp)
    info = {"vocab": tok.get_vocab_size(), "asked": vocab, "trained_on": [f.name for f in files],
            "bos_token_id": wrapped.bos_token_id, "eos_token_id": wrapped.eos_token_id}
    (tmp / "large_model_tokenizer.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(json.dumps(info))


def tensor_seed(name: str, seed: int) -> int:
    """A seed per tensor name: the weights do not depend on the order they are filled in."""
    return seed * 1_000_003 + zlib.crc32(name.encode())


def build_model(shape: str, out: Path, tokenizer_dir: Path, seed: int = SEED) -> None:
    """A random-weight LlamaForCausalLM in bfloat16, saved with safetensors. Built on the meta
    device, given uninitialised CPU storage, then filled tensor by tensor: one copy of the
    weights, never a float32 one. Written to a temporary folder and renamed when complete."""
    import torch
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    spec = SHAPES[shape]
    config = llama_config(spec)
    t0 = time.perf_counter()
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16)  # still on the meta device: no memory
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(tensor_seed(name, seed)))
        # to_empty also emptied the rotary buffer (not saved; rebuilt so the model in memory is whole)
        model.model.rotary_emb = LlamaRotaryEmbedding(config=config, device="cpu")
    fill_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
    tokenizer.save_pretrained(tmp)
    info = {"shape": shape, "spec": asdict(spec), "params": params, "weight_bytes": params * 2, "dtype": "bfloat16",
            "seed": seed, "init": "normal(0, 0.02) per tensor, norm weights 1",
            "tokenizer_vocab": len(tokenizer), "fill_s": fill_s, "build_s": time.perf_counter() - t0}
    (tmp / "large_model_build.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(json.dumps(info))


def built_info(directory: Path, shape: str) -> dict | None:
    """The build record of a model directory made for this shape and seed, else None."""
    path = directory / "large_model_build.json"
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    return info if info.get("spec") == asdict(SHAPES[shape]) and info.get("seed") == SEED else None


# --------------------------------------------------------------------------------------------
# Part 2: the stage runner

def tree_rss(proc: psutil.Process) -> int:
    """RSS of `proc` and all its children (pages two processes share count twice)."""
    total = 0
    try:
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total


def rel(path) -> str:
    """`path` relative to the repository root when it is under it (readable command lines)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


def cli() -> list[str]:
    """The installed console script beside this Python, else the module."""
    script = Path(sys.executable).with_name("saap-edge")
    return [str(script)] if script.exists() else [sys.executable, "-m", "saap_edge.cli"]


def shown(cmd: list[str]) -> str:
    """The command line as a reader would type it."""
    parts = list(cmd)
    if parts[:1] == cli()[:1] and parts[0].endswith("saap-edge"):
        parts[0] = "saap-edge"
    elif parts[0] == sys.executable:
        parts[0] = "python"
    return shlex.join(parts)


def run_stage(name: str, cmd: list[str], logs: Path, env: dict, timeout: float = 0, keep_stdout: bool = False) -> dict:
    """Run one command as a subprocess (its own session, cwd the repository root): wall time,
    peak RSS of the process tree sampled every SAMPLE_S s, exit code, the last stderr lines
    (and its whole stdout when `keep_stdout`). Never raises: a failure is a row."""
    logs.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out_log, err_log = logs / f"{slug}.stdout", logs / f"{slug}.stderr"
    row = {"stage": name, "command": shown(cmd), "stdout_log": rel(out_log), "stderr_log": rel(err_log)}
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {row['command']}", flush=True)
    t0, peak, rc, timed_out = time.perf_counter(), 0, None, False
    try:
        with open(out_log, "w") as out, open(err_log, "w") as err:
            proc = psutil.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT, start_new_session=True)
            while rc is None:
                peak = max(peak, tree_rss(proc))
                try:
                    rc = proc.wait(timeout=SAMPLE_S)
                except psutil.TimeoutExpired:
                    if timeout and time.perf_counter() - t0 > timeout:
                        timed_out = True
                        _stop(proc)
    except OSError as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    row.update(wall_s=time.perf_counter() - t0, peak_rss_mib=peak / MIB, rc=rc, timed_out=timed_out)
    stderr = err_log.read_text(errors="replace").splitlines() if err_log.exists() else []
    stdout = out_log.read_text(errors="replace") if out_log.exists() else ""
    row["stderr_tail"] = stderr[-TAIL:]
    row["stdout"] = stdout if keep_stdout else "\n".join(stdout.splitlines()[-TAIL:])
    if keep_stdout:
        row["stderr"] = "\n".join(stderr)
    row["status"] = "ok" if rc == 0 else ("timeout" if timed_out else "failed")
    print(f"    {row['status']} rc={rc} {row['wall_s']:.1f} s, peak RSS {row['peak_rss_mib']:,.0f} MiB", flush=True)
    if row["status"] != "ok":
        for line in row["stderr_tail"][-5:]:
            print(f"    | {line}", flush=True)
    return row


def _stop(proc: psutil.Popen) -> None:
    """End the stage's process group (this script started it): SIGTERM, then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except psutil.TimeoutExpired:
            continue


# --------------------------------------------------------------------------------------------
# Memory plans printed by --dry-run, and the compress report

_SIZE = r"([\d.]+) (GiB|MiB)"


def _mib(number: str, unit: str) -> float:
    return float(number) * (1024 if unit == "GiB" else 1)


def parse_plan(text: str) -> dict:
    """The stages of a printed memory plan (saap_edge.memory.describe): {stage: {card, host,
    total} MiB} (a CPU run plans one total per stage, host and card in one)."""
    stages = {}
    for line in text.splitlines():
        m = re.match(r"^  (\S.*?): card " + _SIZE + r" \(.*\); host " + _SIZE + r" \(", line)
        if m:
            card, host = _mib(m.group(2), m.group(3)), _mib(m.group(4), m.group(5))
            stages[m.group(1)] = {"card": card, "host": host, "total": card + host}
            continue
        m = re.match(r"^  (\S.*?): " + _SIZE + r" \(", line)
        if m:
            stages[m.group(1)] = {"total": _mib(m.group(2), m.group(3))}
    return stages


def plan_of(row: dict) -> dict:
    return parse_plan(row.get("stdout", "") + "\n" + row.get("stderr", "\n".join(row.get("stderr_tail", []))))


def _trim(value, depth: int = 0):
    """A report section without its long lists (losses, per-layer logs)."""
    if isinstance(value, dict):
        return {k: _trim(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list) and len(value) > 40:
        return f"({len(value)} entries)"
    return value


def read_report(out: Path) -> dict | None:
    path = out / "report.json"
    if not path.exists():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"error": f"report.json unreadable: {exc}"}
    recon = report.get("reconstruction") or {}
    keep = {k: report[k] for k in ("params", "time_s", "memory_estimate", "memory_measured", "peak_memory_mib", "device",
                                    "per_layer") if k in report}
    keep["reconstruction"] = {k: v for k, v in recon.items() if k != "layers"}
    if report.get("recovery"):
        keep["recovery"] = _trim({k: v for k, v in report["recovery"].items() if k not in ("losses", "heldout_curve")})
    return keep


def planned_total(estimate: dict | None) -> float | None:
    """The largest stage of a report's memory_estimate, card + host (MiB)."""
    if not estimate:
        return None
    totals = [(st.get("card", {}).get("total", 0) + st.get("host", {}).get("total", 0)) / MIB for st in estimate.values()]
    return max(totals) if totals else None


# --------------------------------------------------------------------------------------------
# Part 3: the stages of one shape

def run_shape(shape: str, a: argparse.Namespace, env: dict, tokenizer_dir: Path, previous: dict | None = None) -> dict:
    """Every stage of one shape (see the module doc). `a.after_compress` with the `previous`
    section of this shape: its build and compress rows stand, and the stages after compress run
    again on its output."""
    spec = SHAPES[shape]
    if a.after_compress:
        return _after_compress(shape, spec, a, env, previous)
    work = a.work / shape
    logs = work / "logs"
    dense, out = work / "dense", work / f"saap-{spec.ratio:.2f}"
    cache = work / "teacher-cache"
    section = {"shape": shape, "title": spec.title, "command": a.command, "spec": asdict(spec), "params": spec.params(),
               "weight_bytes_bf16": spec.params() * 2, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "stages": []}
    rows = section["stages"]
    timeout = a.stage_timeout

    def stage(name, cmd, **kw):
        row = run_stage(name, cmd, logs, env, timeout, **kw)
        rows.append(row)
        return row

    info = None if a.rebuild else built_info(dense, shape)
    if info is None:
        row = stage("build random weights", [sys.executable, rel(__file__), "--build-model", shape, "--model-dir",
                                             rel(dense), "--tokenizer-dir", rel(tokenizer_dir)])
        info = built_info(dense, shape) if row["status"] == "ok" else None
    else:
        rows.append({"stage": "build random weights", "status": "cached", "rc": 0, "command": "(built earlier: "
                     f"{rel(dense)}/large_model_build.json)", "wall_s": info.get("build_s"), "peak_rss_mib": None})
    rows[-1]["planned_mib"] = spec.params() * 2 / MIB  # the weights, once
    section["build"] = info

    run_flags = ["--device", "cpu", "--dtype", "bfloat16", "--no-progress"]
    compress = cli() + ["compress", "--model", rel(dense), "--out", rel(out), "--ratio", f"{spec.ratio:g}",
                        "--keep-first", str(spec.keep_first), "--keep-last", str(spec.keep_last),
                        *BUDGETS.get(shape, SMALL_BUDGETS), *(NO_REFIT if a.no_refit else []),
                        "--teacher-cache", rel(cache), "--data-dir", str(a.data_dir), *run_flags]
    section["compress_flags"] = compress[len(cli()) + 1:]
    dry = stage("compress --dry-run", compress + ["--dry-run"], keep_stdout=True)
    dry["plan"] = plan_of(dry)
    # a fresh output and teacher cache: later stages never read an earlier run's files, and the
    # teacher pass runs (and is measured) every time
    for path in (out, out.with_name(out.name + ".checkpoints"), cache):
        shutil.rmtree(path, ignore_errors=True)
    row = stage("compress", compress)
    report = read_report(out)
    section["report"] = report
    row["planned_mib"] = planned_total((report or {}).get("memory_estimate")) or max(
        (v["total"] for v in dry["plan"].values()), default=None)
    if spec.every_stage:
        _later_stages(stage, section, out, dense, work, a)
    return section


def _after_compress(shape: str, spec: Spec, a: argparse.Namespace, env: dict, previous: dict | None) -> dict:
    work = a.work / shape
    out = work / f"saap-{spec.ratio:.2f}"
    if not previous or not (out / "report.json").exists():
        raise SystemExit(f"large_model: --after-compress needs an earlier compress of {shape} (results and {rel(out)}); "
                         "run without it first")
    keep = ("build random weights", "compress --dry-run", "compress")
    section = {**previous, "stages": [r for r in previous["stages"] if r["stage"] in keep],
               "after_compress": {"command": a.command, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}}

    def stage(name, cmd, **kw):
        row = run_stage(name, cmd, work / "logs", env, a.stage_timeout, **kw)
        section["stages"].append(row)
        return row

    _later_stages(stage, section, out, work / "dense", work, a, exports_only=not spec.every_stage)
    return section


def _later_stages(stage, section: dict, out: Path, dense: Path, work: Path, a: argparse.Namespace,
                  exports_only: bool = False) -> None:
    """export (gguf, onnx) with their dry runs, eval and bench of the compressed output (the
    exports alone for a shape whose first run compresses only: the 32-layer 7B)."""
    run_flags = ["--device", "cpu", "--dtype", "bfloat16", "--no-progress"]
    for fmt in ("gguf", "onnx"):
        export = cli() + ["export", rel(out), "--format", fmt]
        plan = stage(f"export {fmt} --dry-run", export + ["--dry-run"], keep_stdout=True)
        plan["plan"] = plan_of(plan)
        row = stage(f"export {fmt}", export + ["--overwrite"])
        row["planned_mib"] = max((v["total"] for v in plan["plan"].values()), default=None)
    if exports_only:
        return
    eval_json = work / "eval.json"
    eval_json.unlink(missing_ok=True)
    stage("eval", cli() + ["eval", rel(out), "--ppl", "wikitext2", "--limit", "8", "--data-dir", str(a.data_dir),
                           "--json", rel(eval_json), *run_flags])
    section["eval"] = json.loads(eval_json.read_text()) if eval_json.exists() else None
    bench_dir = work / "bench"
    shutil.rmtree(bench_dir, ignore_errors=True)
    stage("bench", cli() + ["bench", rel(out), "--dense", rel(dense), "--runtimes", "torch", "gguf-q4_1-embq8",
                            "--reps", "1", "--warmup", "0", "--new-tokens", "8", "--prompt-tokens", "32",
                            "--out", rel(bench_dir), "--device", "cpu", "--no-progress"])
    section["bench"] = read_bench(bench_dir / "bench.json")


def read_bench(path: Path) -> list[dict] | None:
    if not path.exists():
        return None
    rows = []
    for r in json.loads(path.read_text()).get("rows", []):
        rows.append({k: r.get(k) for k in ("model", "runtime", "status", "reason", "params", "artifact_bytes",
                                           "peak_memory_mib", "memory_kind")}
                    | {"prefill_tok_s": (r.get("prefill_tok_s") or {}).get("median"),
                       "decode_tok_s": (r.get("decode_tok_s") or {}).get("median")})
    return rows


# --------------------------------------------------------------------------------------------
# Part 4: the RTX 3090 time estimate of `saap-edge compress` (LLaMA-7B, 20%, the defaults)

RTX3090 = {"name": "NVIDIA GeForce RTX 3090 (24 GB)", "bf16_tflops": 71.0, "fp32_tflops": 35.6, "fp64_tflops": 0.56,
           "memory_gbs": 936.0}
ASSUMED = {
    "bf16_share": 0.40,  # of the bf16 tensor-core peak, the model's GEMMs (training and forward alike)
    "fp32_share": 0.50,  # of the fp32 peak (no TF32: torch's default), Gram products and cuSOLVER / cuBLAS solves
    "fp64_share": 0.50,
    "memory_share": 0.70,  # of 936 GB/s, elementwise kernels
    "pcie_gbs": 12.0,  # host <-> card copies from pageable memory (PCIe 4.0 x16)
    "disk_gbs": 2.0,  # safetensors reads and writes (NVMe)
}
LLAMA_7B = dict(hidden=4096, ffn=11008, heads=32, layers=32, vocab=32000, head_dim=128)
# bytes moved per projection weight and micro-batch: forward, backward (the dequantize again; the
# offsets' gradient comes from group sums of the input, no weight-sized tensor: int4_linear.py)
INT4_BYTES_PER_WEIGHT_STEP = (31, 31)
HOOK_BYTES_PER_WEIGHT = 85  # fp32 elementwise traffic of the estimation's gradient hook, per weight and sample


def _rates(share: dict) -> dict:
    return {"bf16": RTX3090["bf16_tflops"] * 1e12 * share["bf16_share"],
            "fp32": RTX3090["fp32_tflops"] * 1e12 * share["fp32_share"],
            "fp64": RTX3090["fp64_tflops"] * 1e12 * share["fp64_share"],
            "memory": RTX3090["memory_gbs"] * 1e9 * share["memory_share"],
            "pcie": share["pcie_gbs"] * 1e9, "disk": share["disk_gbs"] * 1e9}


def estimate(ratio: float = 0.2, share: dict | None = None) -> dict:
    """Counted work per stage of `saap-edge compress --model LLaMA-7B --ratio 0.2` on one RTX
    3090 with every default (read from saap_edge.config), and the seconds it takes at the
    assumed rates. Each item takes max(FLOPs / achieved rate, bytes / achieved bandwidth) plus
    its PCIe and disk transfers; items run one after another (separate kernels)."""
    from saap_edge.config import PruneSettings, ReconstructSettings, RecoverSettings

    share = {**ASSUMED, **(share or {})}
    rate = _rates(share)
    p, rc, r = PruneSettings(), ReconstructSettings(), RecoverSettings()
    eval_windows = 64  # compress --eval-limit default (saap_edge/cli.py)
    H, F, L, V, hd = (LLAMA_7B[k] for k in ("hidden", "ffn", "layers", "vocab", "head_dim"))
    layer = 4 * H * H + 3 * H * F + 2 * H
    n_dense = L * layer + 2 * V * H + H
    n_slim = (1 - ratio) * n_dense
    prunable = L - p.keep_first - p.keep_last
    # the share each prunable layer loses, spread alike over heads and channels (the real plan
    # differs per layer; the refit sizes below depend on it only through K and the removed count)
    lost = ratio * n_dense / (prunable * (4 * H * H + 3 * H * F))
    heads_kept = round(LLAMA_7B["heads"] * (1 - lost))
    ffn_kept = round(F * (1 - lost) / p.align) * p.align
    k_o, k_d = heads_kept * hd, ffn_kept
    rm_o, rm_d = H - k_o, F - k_d
    proj_slim = n_slim - 2 * V * H  # the int4 projections of the student
    group = 32  # pruned MLP widths are multiples of --align 32: G = 32 unless every width divides by 64
    int4_bytes = proj_slim * (0.5 + 4 / group) + 2 * V * H * 2
    items: list[dict] = []

    def item(stage, what, formula, flops=0.0, kind="bf16", nbytes=0.0, pcie=0.0, disk=0.0):
        compute = flops / rate[kind] if flops else 0.0
        memory = nbytes / rate["memory"] if nbytes else 0.0
        s = max(compute, memory) + pcie / rate["pcie"] + disk / rate["disk"]
        items.append({"stage": stage, "item": what, "formula": formula, "flops": flops, "precision": kind if flops else None,
                      "bytes": nbytes, "pcie_bytes": pcie, "disk_bytes": disk, "seconds": s,
                      "bound": "compute" if compute >= memory and flops else ("memory" if nbytes else "transfer")})

    w_dense, w_slim = n_dense * 2, n_slim * 2
    # estimation
    t_e = p.calib_samples * p.seq_len
    item("estimation", "load the dense model", "bf16 weights from disk, then to the card", disk=w_dense, pcie=w_dense)
    item("estimation", "forward + backward", f"6 x {n_dense / 1e9:.2f}B params x {p.calib_samples} x {p.seq_len} tokens",
         6 * n_dense * t_e)
    item("estimation", "attention scores", f"3 x 4 x {p.seq_len} x {H} x {L} layers per token", 12 * p.seq_len * H * L * t_e)
    hooked = prunable * (4 * H * H + 3 * H * F)
    item("estimation", "gradient hooks (per-unit Taylor sums)",
         f"{HOOK_BYTES_PER_WEIGHT} B x {hooked / 1e9:.2f}B hooked weights x {p.calib_samples} samples",
         nbytes=HOOK_BYTES_PER_WEIGHT * hooked * p.calib_samples)
    # slice + reconstruct
    t_r = rc.samples * rc.seq_len
    batches = math.ceil(rc.samples / rc.batch_size)
    n2 = H * H + F * F  # squared input widths of o_proj and down_proj (the Gram and H^-1 sizes)
    item("slice + reconstruct", "dense model back to the host", "bf16 weights card -> host", pcie=w_dense)
    item("slice + reconstruct", "dense layers on the pruned stream",
         f"2 x {L * layer / 1e9:.2f}B layer params x {rc.samples} x {rc.seq_len} tokens", 2 * L * layer * t_r)
    item("slice + reconstruct", "slim output projections (advance the stream)",
         f"2 x {H} x ({k_o} + {k_d}) x {prunable} layers x tokens (+ full widths in the kept layers)",
         2 * t_r * H * ((k_o + k_d) * prunable + (H + F) * (L - prunable)))
    item("slice + reconstruct", "Gram accumulation X^T X", f"2 x tokens x ({H}^2 + {F}^2) x {prunable} layers, fp32",
         2 * t_r * n2 * prunable, "fp32")
    item("slice + reconstruct", "Gram sums in float64", f"{batches} batches x n^2 adds, 36 B each, x {prunable} layers",
         batches * n2 * prunable, "fp64", nbytes=36 * batches * n2 * prunable)
    item("slice + reconstruct", "OBS: Cholesky + inverse", f"(n^3/3 + n^3) for n = {H}, {F}, x {prunable} layers, fp32",
         (4 / 3) * (H**3 + F**3) * prunable, "fp32")
    item("slice + reconstruct", "OBS: 16 block downdates",
         f"2 n (n + out) x removed ({rm_o} o_proj, {rm_d} down_proj columns) over 16 steps, fp32",
         2 * ((H * H + H * H) * rm_o + (F * F + H * F) * rm_d) * prunable, "fp32",
         nbytes=16 * 8 * n2 * prunable)
    item("slice + reconstruct", "refit: W cross_K, Cholesky of K, solve",
         f"2 out n K + K^3/3 + 2 K^2 out for K = {k_o}, {k_d}, fp32",
         sum(2 * H * n * k + k**3 / 3 + 2 * k * k * H for n, k in ((H, k_o), (F, k_d))) * prunable, "fp32")
    item("slice + reconstruct", "output errors (sliced and refit)", "2 calls x 2 out (n^2 + K^2 + n K), fp32",
         sum(2 * 2 * H * (n * n + k * k + n * k) for n, k in ((H, k_o), (F, k_d))) * prunable, "fp32")
    # per layer (streams on the host, moved batch by batch): attention: the stream up, o_proj's
    # input down, both up again to advance, the result down (5 S); MLP the same with down_proj's
    # wider input Z (3 S + 2 Z); each dense and slim layer up to the card and back
    s_bytes, z_bytes = t_r * H * 2, t_r * F * 2
    slim_layers = layer * ((L - prunable) + prunable * (1 - lost))
    item("slice + reconstruct", "streams and layers over PCIe",
         f"(8 S + 2 Z) x {L} layers, S = tokens x {H} x 2 B, Z = tokens x {F} x 2 B; layers up and back",
         pcie=(8 * s_bytes + 2 * z_bytes) * L + 2 * 2 * (layer * L + slim_layers))
    # teacher pass
    n_windows = (r.max_tokens or 2_000_000) // r.seq_len - r.heldout
    steps = math.ceil(2 * n_windows / (r.batch_size * r.grad_accum))
    t_k = steps * r.batch_size * r.grad_accum * r.seq_len
    item("teacher pass", "save the pruned model, reload the teacher", "slim bf16 to disk; dense bf16 from disk to the card",
         disk=w_slim + w_dense, pcie=w_dense + w_slim)
    item("teacher pass", "teacher forward", f"2 x {n_dense / 1e9:.2f}B x {steps} steps x {r.batch_size} x {r.seq_len} tokens",
         2 * n_dense * t_k)
    item("teacher pass", "attention scores", f"4 x {r.seq_len} x {H} x {L} per token", 4 * r.seq_len * H * L * t_k)
    item("teacher pass", "top-k targets to the cache", f"{r.kd_topk} x 8 B per position", disk=t_k * r.kd_topk * 8)
    # recovery
    item("recovery", "reload the student, quantize", "slim bf16 from disk to the card; round to int4 (~30 B a weight)",
         disk=w_slim, pcie=w_slim, nbytes=30 * proj_slim)
    # forward 2, input gradient 2, and for the projections the offsets' gradient from group sums
    # (2 / G); the frozen embedding and output matrix take no weight gradient
    item("recovery", "forward + backward", f"(4 + 2 / {group}) x {n_slim / 1e9:.2f}B x {t_k / 1e6:.2f}M tokens (2 epochs)",
         (4 + 2 / group) * n_slim * t_k)
    item("recovery", "attention scores", f"3 x 4 x {r.seq_len} x {H} x {L} per token", 12 * r.seq_len * H * L * t_k)
    fwd, bwd = INT4_BYTES_PER_WEIGHT_STEP
    item("recovery", "int4 dequantize (forward, again in backward) and offset gradients",
         f"({fwd} + {bwd}) B x {proj_slim / 1e9:.2f}B projection weights x {steps} micro-batches",
         nbytes=(fwd + bwd) * proj_slim * steps)
    trained = proj_slim / group
    item("recovery", "AdamW on the offsets", f"~32 B x {trained / 1e6:.0f}M fp32 offsets x {steps} steps",
         nbytes=32 * trained * steps)
    item("recovery", "held-out perplexity before / after", f"2 x 2 x {n_slim / 1e9:.2f}B x {r.heldout} x {r.seq_len}",
         4 * n_slim * r.heldout * r.seq_len)
    item("recovery", "checkpoints (~10) and the int4 result", "offsets + AdamW state 12 B each; int4 model",
         disk=10 * trained * 12 + int4_bytes)
    # quick perplexity checks
    t_q = eval_windows * 128
    item("quick perplexity checks", "WikiText-2 before / after / recovered",
         f"2 x ({n_dense / 1e9:.2f} + 2 x {n_slim / 1e9:.2f})B x {eval_windows} x 128 tokens",
         2 * (n_dense + 2 * n_slim) * t_q)

    stages: dict[str, float] = {}
    for it in items:
        stages[it["stage"]] = stages.get(it["stage"], 0.0) + it["seconds"]
    total = sum(stages.values())
    return {"device": RTX3090, "assumed": share, "ratio": ratio, "model": {**LLAMA_7B, "params": n_dense,
            "slim_params": n_slim, "kept_heads": heads_kept, "kept_ffn": ffn_kept, "int4_group": group},
            "defaults": {"calib_samples": p.calib_samples, "seq_len": p.seq_len, "keep_first": p.keep_first,
                         "keep_last": p.keep_last, "recon_samples": rc.samples, "recon_seq_len": rc.seq_len,
                         "recon_batch": rc.batch_size, "recovery_windows": n_windows, "epochs": 2, "steps": steps,
                         "batch_size": r.batch_size, "recover_seq_len": r.seq_len, "max_tokens": r.max_tokens,
                         "kd_topk": r.kd_topk, "heldout": r.heldout, "eval_windows": eval_windows},
            "items": items, "stages_s": stages, "total_s": total, "within_2h": total <= 7200}


def estimate_summary(ratio: float = 0.2) -> dict:
    """The estimate, the bf16 share at which it takes 2 h, and two what-ifs."""
    base = estimate(ratio)
    lo, hi = 0.05, 1.0
    if estimate(ratio, {"bf16_share": hi})["total_s"] > 7200:
        breakeven = None
    else:
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if estimate(ratio, {"bf16_share": mid})["total_s"] > 7200 else (lo, mid)
        breakeven = hi
    rec = {it["item"]: it["seconds"] for it in base["items"] if it["stage"] == "recovery"}
    dequant = rec["int4 dequantize (forward, again in backward) and offset gradients"]
    fused = dequant * (2 * 2.625) / sum(INT4_BYTES_PER_WEIGHT_STEP)  # read 0.625 + write 2 bytes, each pass
    base["breakeven_bf16_share"] = breakeven
    base["what_if"] = {"fused_dequantize_s": base["total_s"] - dequant + fused}
    return base


# --------------------------------------------------------------------------------------------
# Part 5: Markdown

def _f(x, fmt="{:,.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _bytes(n: float) -> str:
    return f"{n / 1e12:,.1f} TB" if n >= 1e12 else f"{n / 1e9:,.1f} GB"


def _measured(m) -> str:
    """A report's memory_measured entry: its *_mib numbers named, else the entry as JSON."""
    if m is None:
        return "-"
    if isinstance(m, dict) and any(k.endswith("_mib") for k in m):
        return ", ".join(f"{k[:-4].replace('_', ' ')} {v:,.0f} MiB" for k, v in m.items()
                         if k.endswith("_mib") and isinstance(v, (int, float)))
    if isinstance(m, (int, float)):
        return f"{m:,.0f}"
    return json.dumps(m, separators=(",", ":"))[:120]


def _fits(mib) -> str:
    return "-" if mib is None else ("yes" if mib * MIB <= CARD_BUDGET else "**no**")


def shape_markdown(s: dict) -> list[str]:
    spec = s["spec"]
    gqa = f"{spec['heads']} heads / {spec['kv_heads']} KV heads"
    out = [f"## {s['shape']}: {s['title']}", "",
           f"hidden {spec['hidden']}, MLP {spec['ffn']}, {gqa}, vocabulary {spec['vocab']} (untied), "
           f"{spec['layers']} layers, rope theta {spec['rope_theta']:g}, {spec['max_positions']} positions: "
           f"{s['params'] / 1e9:.3f}B parameters, {s['weight_bytes_bf16'] / GIB:.2f} GiB of bf16 weights. "
           f"Compress: `--ratio {spec['ratio']:g} --keep-first {spec['keep_first']} --keep-last {spec['keep_last']}`"
           + (f" (the defaults 3 and 1 would keep every layer of a {spec['layers']}-layer model)" if spec["layers"] <= 4
              else " (the defaults)")
           + f" with the small budgets above. Run {s['when']}.", "",
           "| stage | wall s | peak RSS MiB | planned peak MiB | within 24 GiB | rc |", "|---|---|---|---|---|---|"]
    for r in s["stages"]:
        peak = r.get("peak_rss_mib")
        rc = r.get("rc") if r.get("status") != "cached" else "cached"
        if r.get("status") == "timeout":
            rc = f"{rc} (timeout)"
        out.append(f"| {r['stage']} | {_f(r.get('wall_s'))} | {_f(peak, '{:,.0f}')} | {_f(r.get('planned_mib'), '{:,.0f}')} | "
                   f"{_fits(peak)} | {rc} |")
    out += ["", "Peak RSS: the stage's process and its children, sampled every 0.1 s (pages they share count twice). "
            "Planned: the compress report's memory_estimate (largest stage, card + host: on a CPU the host is both), "
            "else the dry run's; the export dry runs' plan; the build's is the bf16 weights once.", ""]
    if spec["layers"] >= 32:
        comp = next((r for r in s["stages"] if r["stage"] == "compress"), None)
        if comp and comp.get("peak_rss_mib"):
            gib = comp["peak_rss_mib"] / 1024
            out += [f"**Against one 24 GiB card:** compress peaked at {gib:.2f} GiB of RSS, "
                    f"{gib / 24:.0%} of 24 GiB ({'fits' if gib <= 24 else 'does not fit'}; rc {comp.get('rc')}).", ""]
    dry = next((r for r in s["stages"] if r["stage"] == "compress --dry-run"), None)
    if dry and (dry.get("stdout") or dry.get("stderr")):
        text = "\n".join(x for x in [dry.get("stdout", "").strip(), dry.get("stderr", "").strip()] if x)
        out += ["The plan (`compress --dry-run`):", "", "```", text, "```", ""]
    rep = s.get("report")
    if rep and "error" not in rep:
        params = rep.get("params", {})
        if params:
            out.append(f"Parameters {params.get('before', 0) / 1e9:.3f}B -> {params.get('after', 0) / 1e9:.3f}B "
                       f"({params.get('removed_share', 0):.2%} removed; random weights, so which units go means nothing).")
        if rep.get("time_s"):
            out.append("report.json time_s: " + ", ".join(f"{k} {v:.1f}" for k, v in rep["time_s"].items()
                                                         if isinstance(v, (int, float))) + ".")
        est, meas = rep.get("memory_estimate") or {}, rep.get("memory_measured") or {}
        if est:
            out += ["", "| compress stage | planned card MiB | planned host MiB | planned total MiB | measured (report) |",
                    "|---|---|---|---|---|"]
            for name, st in est.items():
                card, host = st.get("card", {}).get("total", 0) / MIB, st.get("host", {}).get("total", 0) / MIB
                m = meas.get(name) if isinstance(meas, dict) else None
                out.append(f"| {name} | {card:,.0f} | {host:,.0f} | {card + host:,.0f} | {_measured(m)} |")
            if not meas:
                out.append("")
                out.append("(this report has no memory_measured section)")
        extra = []
        if rep.get("reconstruction", {}).get("peak_rss_mib"):
            extra.append(f"reconstruction peak RSS {rep['reconstruction']['peak_rss_mib']:,.0f} MiB")
        if rep.get("peak_memory_mib"):
            extra.append(f"report peak_memory_mib {rep['peak_memory_mib']:,.0f}")
        if extra:
            out.append("")
            out.append("; ".join(extra) + ".")
        out.append("")
    elif rep:
        out += [rep["error"], ""]
    if s.get("eval"):
        ppl = s["eval"].get("ppl", {}).get("wikitext2", {})
        out += [f"eval: WikiText-2 perplexity {_f(ppl.get('ppl'), '{:,.0f}')} over {ppl.get('windows')} windows "
                f"(random weights: about the vocabulary size is expected).", ""]
    if s.get("bench"):
        out += ["| bench model | runtime | status | prefill tok/s | decode tok/s | peak MiB |", "|---|---|---|---|---|---|"]
        for b in s["bench"]:
            status = b["status"] if b["status"] == "ok" else f"{b['status']}: {(b.get('reason') or '')[:100]}"
            out.append(f"| {b['model']} | {b['runtime']} | {status} | {_f(b.get('prefill_tok_s'))} | "
                       f"{_f(b.get('decode_tok_s'))} | {_f(b.get('peak_memory_mib'), '{:,.0f}')} |")
        out.append("")
    failed = [r for r in s["stages"] if r.get("status") in ("failed", "timeout")]
    for r in failed:
        out += [f"**{r['stage']} failed** (rc {r.get('rc')}{', timed out' if r.get('timed_out') else ''}); last stderr lines:",
                "", "```", *(r.get("stderr_tail") or [r.get("error", "(none)")]), "```", ""]
    out += ["Commands:", "", "```", *[r["command"] for r in s["stages"]], "```", ""]
    return out


def estimate_markdown(e: dict) -> list[str]:
    a, d, m = e["assumed"], e["device"], e["model"]
    rate = _rates(a)
    dd = e["defaults"]
    out = ["## Estimate: `saap-edge compress` of LLaMA-7B at 20% on one RTX 3090", "",
           f"Counted, not measured. Rates of the {d['name']}: bf16 tensor cores {d['bf16_tflops']:g} TFLOPS peak, "
           f"fp32 {d['fp32_tflops']:g} TFLOPS (no TF32, torch's default), fp64 {d['fp64_tflops']:g} TFLOPS, "
           f"{d['memory_gbs']:g} GB/s. Assumed achieved shares: **{a['bf16_share']:.0%} of the bf16 peak for the "
           f"model's GEMMs** (training and forward alike, {rate['bf16'] / 1e12:.1f} TFLOPS), {a['fp32_share']:.0%} "
           f"of fp32 for the refit's products and solves ({rate['fp32'] / 1e12:.1f} TFLOPS), {a['fp64_share']:.0%} "
           f"of fp64, {a['memory_share']:.0%} of the bandwidth for elementwise kernels ({rate['memory'] / 1e9:.0f} "
           f"GB/s); host <-> card {a['pcie_gbs']:g} GB/s (pageable copies over PCIe 4.0 x16), disk {a['disk_gbs']:g} GB/s. "
           "Each item takes max(FLOPs / rate, bytes / bandwidth) plus its transfers; items add up (separate kernels).", "",
           f"The defaults (saap_edge/config.py, cli.py): {dd['calib_samples']} calibration windows x {dd['seq_len']} "
           f"tokens, first {dd['keep_first']} and last {dd['keep_last']} layers kept, refit on {dd['recon_samples']} "
           f"windows x {dd['recon_seq_len']} (batches of {dd['recon_batch']}), recovery on --max-tokens "
           f"{dd['max_tokens']:,} tokens = {dd['recovery_windows']:,} windows of {dd['recover_seq_len']} after "
           f"{dd['heldout']} held out, 2 epochs = {dd['steps']:,} steps of {dd['batch_size']} windows (the teacher "
           f"pass computes the top-{dd['kd_topk']} targets of every one), quick checks {dd['eval_windows']} "
           f"WikiText-2 windows x 3 models. LLaMA-7B: {m['params'] / 1e9:.3f}B parameters; 20% of all of them "
           f"removed leaves {m['slim_params'] / 1e9:.3f}B (the paper's table reports 5.26B). Refit sizes assume each "
           f"pruned layer loses the same share of heads and MLP channels: {m['kept_heads']} of 32 heads, "
           f"{m['kept_ffn']} of {m['ffn']} channels; int4 groups of {m['int4_group']}. The recovery text is assumed "
           "to fill the 2M-token cap (the hub's BookCorpus does; the offline books folder holds about 1M tokens, "
           "which would halve the teacher pass and recovery).", "",
           "| stage | item | count | work | s |", "|---|---|---|---|---|"]
    for it in e["items"]:
        work = []
        if it["flops"]:
            work.append(f"{it['flops']:.3g} FLOP {it['precision']}")
        for key, where in (("bytes", "memory"), ("pcie_bytes", "PCIe"), ("disk_bytes", "disk")):
            if it[key]:
                work.append(f"{_bytes(it[key])} {where}")
        out.append(f"| {it['stage']} | {it['item']} | {it['formula']} | {', '.join(work)} ({it['bound']}) | "
                   f"{it['seconds']:,.1f} |")
    out += ["", "| stage | s | share |", "|---|---|---|"]
    for name, s in e["stages_s"].items():
        out.append(f"| {name} | {s:,.0f} | {s / e['total_s']:.1%} |")
    out.append(f"| **total** | **{e['total_s']:,.0f} ({e['total_s'] / 3600:.2f} h)** | |")
    verdict = "within" if e["within_2h"] else "**over**"
    be = e.get("breakeven_bf16_share")
    out += ["", f"Total {e['total_s'] / 3600:.2f} h: {verdict} 2 h at these shares. "
            + (f"It reaches 2 h at {be:.0%} of the bf16 peak (everything else as assumed)." if be else
               "Even 100% of the bf16 peak does not bring it to 2 h (the memory-bound items alone are too long).")]
    w = e.get("what_if")
    if w:
        out += ["", "Where the time goes: the teacher pass and recovery are 2 epochs of 4M tokens through a 6.7B / "
                f"{m['slim_params'] / 1e9:.1f}B model. In recovery, models/int4_linear.py dequantizes each projection "
                f"in unfused torch ops (unpack, widen to fp32, scale, offset, narrow: {INT4_BYTES_PER_WEIGHT_STEP[0]} B "
                f"a weight forward, {INT4_BYTES_PER_WEIGHT_STEP[1]} B again in the backward pass; the offsets' gradient "
                "comes from group sums of the input, grad^T x_g, 1/G of a weight-gradient GEMM), so it is not "
                "negligible: a fused dequantize (0.625 B read, 2 B written per pass) would make the total "
                f"{w['fused_dequantize_s'] / 3600:.2f} h. The attention terms are under 1% of the GEMMs; the estimation's "
                "6 x params counts weight gradients for every layer (only the prunable layers' are taken), an upper "
                "bound. In float64 (the CPU's work dtype) the refit solves alone would take "
                f"{sum(it['flops'] for it in e['items'] if it['precision'] == 'fp32' and 'Gram' not in it['item']) / rate['fp64']:,.0f} s."]
    return out + [""]


def markdown(data: dict) -> str:
    m = data["machine"]
    out = ["# Large models: every stage within one 24 GB card's worth of memory", "",
           f"Command: `{data['command']}`. Machine: {m['cores']} CPU cores, {m['ram_gib']:.0f} GiB RAM, no GPU; "
           f"saap-edge {data['versions'].get('saap-edge')}, torch {data['versions'].get('torch')}, transformers "
           f"{data['versions'].get('transformers')}.", "",
           "**Protocol.** Random-weight LLaMA directories built by this script (normal(0, 0.02) per tensor, seed "
           f"{SEED}, norm weights 1; bf16 safetensors; a byte-level BPE of {TOKENIZER_VOCAB} tokens trained on the "
           "book text as their tokenizer), so perplexities and which units are pruned mean nothing: the run proves "
           "that each stage of the real CLI completes and how much memory and time it takes at these widths. Every "
           "stage is a `saap-edge` subprocess on the CPU in bfloat16 (`--device cpu --dtype bfloat16` where the "
           "command has the flags; export streams the checkpoint one module at a time in float32, bench's torch rows run float32), its peak RSS "
           "sampled every 0.1 s. compress runs with its defaults except the budgets a 2-core CPU can pay: "
           f"{BUDGET_NOTE}; for {FULL_7B_NOTE}. Its teacher cache is emptied first, so the teacher pass runs. The sizes that set the "
           "peak memory (widths, vocabulary, layers, dtype, sequence lengths) are the real ones; the sample "
           "counts, which set the time, are not. The dry-run rows show an interpreter's own footprint (torch and "
           "transformers imported, no weights). eval: WikiText-2, 8 windows of 128. bench: torch and llama.cpp "
           "Q4_1 (Q8_0 embedding) rows, dense and compressed, 32 prompt tokens, 8 new tokens, 1 run, no warm-up.", ""]
    for name in [k for k in SHAPES if k in data["shapes"]]:
        out += shape_markdown(data["shapes"][name])
    if data.get("estimate"):
        out += estimate_markdown(data["estimate"])
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Entry point

def machine() -> dict:
    return {"cores": os.cpu_count(), "ram_gib": psutil.virtual_memory().total / GIB,
            "available_gib_at_start": psutil.virtual_memory().available / GIB}


def versions() -> dict:
    out = {}
    for pkg in ("saap-edge", "torch", "transformers", "accelerate", "safetensors", "tokenizers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def default_data_dir() -> Path:
    return Path(os.environ.get("SAAP_EDGE_DATA_DIR") or ROOT.parent / "shared" / "data")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", choices=[k for k in SHAPES if k != "smoke"],
                   help=f"model shape, repeatable (default: {' '.join(DEFAULT_SHAPES)})")
    p.add_argument("--smoke", action="store_true", help="a tiny shape (hidden 256, 2 layers, vocabulary 32000) through "
                                                        "every stage, to check this script; results large_model_smoke.*")
    p.add_argument("--estimate", action="store_true", help="only the RTX 3090 estimate (also part of every other run)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results folder")
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / NAME, help="models, outputs, logs")
    p.add_argument("--data-dir", type=Path, default=default_data_dir(),
                   help="the offline data folder (default: $SAAP_EDGE_DATA_DIR, else ../shared/data)")
    p.add_argument("--stage-timeout", type=float, default=0, help="seconds before a stage is stopped (default: none)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the model directories even if built already")
    p.add_argument("--no-refit", action="store_true",
                   help="compress with --reconstruct none --select global (slicing still streamed): the whole pipeline of "
                        "the 32-layer model in the time 2 cores have; the refit's own peak is then measured separately")
    p.add_argument("--after-compress", action="store_true",
                   help="keep each shape's last compress (results and output) and run export, eval and bench again "
                        "(the exports alone for the 32-layer shape)")
    # internal: the builders, run as measured subprocesses of this script
    p.add_argument("--build-model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--build-tokenizer", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--tokenizer-dir", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.build_tokenizer:
        build_tokenizer(a.build_tokenizer, a.data_dir)
        return 0
    if a.build_model:
        build_model(a.build_model, a.model_dir, a.tokenizer_dir)
        return 0
    shapes = list(dict.fromkeys((a.shape or []) + (["smoke"] if a.smoke else [])))
    if not shapes and not a.estimate:
        shapes = list(DEFAULT_SHAPES)
    a.work, a.data_dir = a.work.resolve(), a.data_dir.resolve()
    name = NAME + ("_smoke" if shapes == ["smoke"] else "")
    command = "python benchmarks/large_model.py " + " ".join(sys.argv[1:] if argv is None else argv)
    a.command = command.strip()
    path = a.out / f"{name}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(command=command, machine=machine(), versions=versions(), budgets=SMALL_BUDGETS, budget_note=BUDGET_NOTE)
    data.setdefault("shapes", {})
    if shapes:
        env = dict(os.environ, PYTHONUNBUFFERED="1", SAAP_EDGE_CACHE=str(a.work / "cache"),
                   SAAP_EDGE_DATA_DIR=str(a.data_dir))
        tokenizer_dir = a.work / f"tokenizer-{TOKENIZER_VOCAB}"
        if not (tokenizer_dir / "large_model_tokenizer.json").exists():
            row = run_stage("train the tokenizer", [sys.executable, rel(__file__), "--build-tokenizer", rel(tokenizer_dir),
                                                    "--data-dir", str(a.data_dir)], a.work / "logs", env)
            data["tokenizer_build"] = row
            if row["status"] != "ok":
                print("large_model: the tokenizer could not be trained; see", row["stderr_log"], file=sys.stderr)
                return 1
        data["tokenizer"] = json.loads((tokenizer_dir / "large_model_tokenizer.json").read_text())
        for shape in shapes:
            data["shapes"][shape] = run_shape(shape, a, env, tokenizer_dir, data["shapes"].get(shape))
            write(a.out, name, data)  # after each shape, so a long run leaves its finished shapes
    data["estimate"] = estimate_summary()
    paths = write(a.out, name, data)
    print(markdown(data))
    print("wrote", *map(rel, paths))
    return 0


def write(out_dir: Path, name: str, data: dict) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = (out_dir / f"{name}.json", out_dir / f"{name}.md")
    for path, text in zip(paths, (json.dumps(data, indent=1, default=str) + "\n", markdown(data))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return paths


if __name__ == "__main__":
    sys.exit(main())
