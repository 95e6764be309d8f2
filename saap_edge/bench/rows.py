"""`saap-edge bench`: memory, parameters and tokens/s of the dense and compressed models in each
runtime, laid out like Table III of the paper, with the memory-bandwidth roofline.

Every row runs in its own child process (saap_edge.bench.worker), so its peak RSS is its own;
on CUDA the torch rows report the allocator peak instead. Artifacts are exported once into
`<out>/artifacts/<model>/` with the usual read-back validation. A row that fails (a runtime
not installed, a width a quant type cannot hold) is kept with its reason; the others run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from saap_edge.config import BENCH_TABLE, BenchSettings
from saap_edge.errors import UserError
from saap_edge.files import read_json

DENSE = "dense"


@dataclass
class BenchModel:
    label: str
    source: str  # saap-edge / HF directory, .gguf file or alias


class RowFailed(Exception):
    pass


def artifact_for(model: BenchModel, runtime: str, work: Path, s: BenchSettings) -> Path | str:
    """The file the runtime runs: the source itself for torch, else an export (made once).

    The export runs as its own `saap-edge export` process, so an export that runs out of memory
    (the kernel ends the process) fails its row alone and the bench goes on."""
    from saap_edge.bench.probe import run_child

    r = BENCH_TABLE[runtime]
    fmt, quant, embed, graph, accuracy = r.format, r.quant, r.embed, r.graph, r.accuracy
    if fmt is None:
        return model.source
    suffix = ((f"-emb{embed}" if embed != "f16" else "") + ("-dynamo" if graph == "dynamo" else "")
              + {"int8": "-act8", "int8-head": "-head8"}.get(accuracy, ""))
    out = work / model.label / (f"model-{quant}{suffix}.gguf" if fmt == "gguf" else f"onnx-{quant}{suffix}")
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "saap_edge.cli", "export", str(model.source), "--format", fmt, "--quant", quant,
           "--embed-type", embed, "--out", str(out), "--overwrite", "--onnx-graph", graph or "fused",
           "--matmul-accuracy", accuracy or "fp32", "--no-progress", *([] if s.validate_exports else ["--no-validate"])]
    log = work / f"{model.label}-{runtime}.export.log"
    child = run_child(cmd, log, interval=0.1, env=_child_env())
    if child["rc"] != 0 or not out.exists():
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        why = "killed by the system (out of memory?)" if child["rc"] in (-9, 137) else (lines[-1][:300] if lines else "no output")
        raise RowFailed(f"export exited with {child['rc']}: {why} (peak RSS {child['peak_rss_mib']:,.0f} MiB; log: {log})")
    return out


def _child_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                         os.environ.get("PYTHONPATH", "")]))


def measure(runtime: str, artifact, s: BenchSettings, log: Path) -> dict:
    """Run the worker on one artifact; its JSON plus the child's peak RSS and wall time."""
    from saap_edge.bench.probe import run_child

    kind = BENCH_TABLE[runtime].runs_in
    # torch rows load saap_edge (and torch); device runtimes run runtime.bench, which never imports torch,
    # so their peak memory is the engine's alone
    module = ["saap_edge.bench.worker"] if kind == "torch" else ["runtime.bench"]
    cmd = [sys.executable, "-m", *module, str(artifact), "--prompt-tokens", str(s.prompt_tokens),
           "--new-tokens", str(s.new_tokens), "--reps", str(s.reps), "--warmup", str(s.warmup)]
    if kind == "torch":
        cmd += ["--device", s.device, "--dtype", "float16" if s.device.startswith("cuda") else "float32"]
    if s.threads:
        cmd += ["--threads", str(s.threads)]
    if kind == "onnxruntime":
        cmd += ["--provider", s.provider, "--engine", BENCH_TABLE[runtime].engine]
    child = run_child(cmd, log, env=_child_env())
    lines = log.read_text(errors="replace").strip().splitlines()
    if child["rc"] != 0 or not lines or not lines[-1].startswith("{"):
        raise RowFailed(f"{kind} exited with {child['rc']}: {lines[-1][:300] if lines else 'no output'} (log: {log})")
    result = json.loads(lines[-1])
    result["peak_rss_mib"] = child["peak_rss_mib"]
    result["peak_memory_mib"] = result.get("cuda_peak_mib", child["peak_rss_mib"])
    result["memory_kind"] = "CUDA allocator peak" if "cuda_peak_mib" in result else "peak RSS of the row's process"
    return result


def file_weights(runtime: str, artifact) -> dict:
    from saap_edge.bench.weights import artifact_bytes, gguf_weights, onnx_weights

    fmt = BENCH_TABLE[runtime].format
    if fmt is None:
        return {}
    info = gguf_weights(Path(artifact)) if fmt == "gguf" else onnx_weights(Path(artifact))
    return {**info, "artifact_bytes": artifact_bytes(Path(artifact))}


def row_memory(model: BenchModel, runtime: str, s: BenchSettings):
    """The planned peak of one row (saap_edge/memory.py): for torch, the model as the worker loads
    it (float32 on the CPU, float16 on a GPU; int4 groups stay int4, with the float32 copy their
    evaluation keeps) and one pass of the prompt; for an artifact row, its export and then the
    artifact in the runtime. None when the model's config cannot be read alone."""
    from saap_edge.memory import GIB, StageMemory, artifact_bytes, eval_memory, export_memory, model_shape

    try:
        shape = model_shape(model.source)
    except UserError:  # not a config the plan reads alone: the row runs unplanned
        return None
    group = shape.group_size
    r = BENCH_TABLE[runtime]
    fmt, quant, embed, graph = r.format, r.quant, r.embed, r.graph
    if fmt is None:
        cuda = s.device.startswith("cuda")
        b = 2 if cuda else 4
        weights = shape.int4_bytes(group, b) + shape.params() * b if group else shape.params() * b
        st = eval_memory(shape, weights, 1, s.prompt_tokens + s.new_tokens, b)
        st.stage = f"{model.label} {runtime}"
        if not cuda:
            return StageMemory(st.stage, {}, st.card, "skip the row (--runtimes) or use a machine with more RAM")
        return StageMemory(st.stage, st.card, {"loading": weights}, "lower --prompt-tokens")
    art = artifact_bytes(shape, quant, embed, group or 32)
    # the row's export streams a safetensors directory (exporters.streams; bench exports on the CPU)
    source = Path(model.source)
    export = export_memory(shape, art, group, streamed=source.is_dir() and any(source.glob("*.safetensors"))
                           and (fmt == "gguf" or graph == "fused"))
    return StageMemory(f"{model.label} {runtime}", {}, {"export (its peak)": export.host_total + GIB},
                       "skip the row (--runtimes), export it on a larger machine, or use a machine with more RAM")


def _skip_reason(st, s: BenchSettings) -> str | None:
    """Why a row's plan `st` (row_memory) cannot fit this machine, in one line (None: it fits, or
    it could not be planned)."""
    from saap_edge.memory import Devices, check_fits, devices_for

    if st is None:
        return None
    devices = devices_for(s.device, None) if s.device.startswith("cuda") else Devices(None, _host())
    try:
        check_fits([st], devices, None)
    except UserError as exc:
        return f"skipped before loading: {exc}"
    return None


def _host() -> int:
    from saap_edge.memory import host_available

    return host_available()


def bench_row(model: BenchModel, runtime: str, work: Path, s: BenchSettings) -> dict:
    row = {"model": model.label, "source": model.source, "runtime": runtime, "status": "ok"}
    t0 = time.perf_counter()
    skip = _skip_reason(row_memory(model, runtime, s), s)
    if skip:
        print(f"bench: {model.label} {runtime}: {skip}", file=sys.stderr, flush=True)
        return {**row, "status": "skipped", "reason": skip, "row_s": 0.0}
    try:
        artifact = artifact_for(model, runtime, work, s)
        row["artifact"] = str(artifact)
        row.update(file_weights(runtime, artifact))
        row.update(measure(runtime, artifact, s, work / f"{model.label}-{runtime}.log"))
    except (UserError, RowFailed, ImportError, OSError) as exc:
        row.update(status="failed", reason=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    row["row_s"] = time.perf_counter() - t0
    return row


def add_derived(data: dict) -> None:
    """Ratios to the dense row of the same runtime, and the bandwidth roofline."""
    bw = data["bandwidth"]["gbs"] * 1e9
    dense = {r["runtime"]: r for r in data["rows"] if r["model"] == DENSE and r["status"] == "ok"}
    for r in data["rows"]:
        if r["status"] != "ok":
            continue
        if r.get("bytes_per_token"):
            r["roofline_tok_s"] = bw / r["bytes_per_token"]
            r["roofline_share"] = r["decode_tok_s"]["median"] / r["roofline_tok_s"]
        d = dense.get(r["runtime"])
        if d is not None:
            r["vs_dense"] = {k: _ratio(r, d, k) for k in ("params", "artifact_bytes", "peak_memory_mib", "bytes_per_token")}
            r["vs_dense"]["prefill_tok_s"] = r["prefill_tok_s"]["median"] / d["prefill_tok_s"]["median"]
            r["vs_dense"]["decode_tok_s"] = r["decode_tok_s"]["median"] / d["decode_tok_s"]["median"]
            if r.get("bytes_per_token") and d.get("bytes_per_token"):
                # a memory-bound decode speeds up by the ratio of bytes read per token
                r["vs_dense"]["ideal_decode"] = d["bytes_per_token"] / r["bytes_per_token"]
    data["targets"] = targets(data["rows"])


def _ratio(r: dict, d: dict, key: str) -> float | None:
    return r[key] / d[key] if r.get(key) and d.get(key) else None


def targets(rows: list[dict]) -> list[dict]:
    """The two CPU targets of the bench: int4 memory vs dense fp16 weights, and the Q4_1 /
    dense F16 decode ratio vs the ratio of bytes read per token (the ideal for a memory-bound
    decode)."""
    ok = {(r["model"], r["runtime"]): r for r in rows if r["status"] == "ok"}
    out = []
    dense_f16 = ok.get((DENSE, "gguf-f16"))
    for (model, runtime), r in ok.items():
        if model == DENSE or not runtime.startswith("gguf-q4_1") or dense_f16 is None:
            continue
        out.append(_size_target(f"{model} {runtime}: int4 weights stored", "whole file", r, dense_f16))
        out.append(_ideal_target(f"{model} {runtime}: decode speed-up over dense F16", r, dense_f16, 0.90))
    out += _onnx_targets(ok, dense_f16)
    return out


def _size_target(what: str, files: str, r: dict, dense_f16: dict) -> dict:
    """The row's stored weights (tensor bytes, the tokenizer aside: the dense reference is weights
    too) against the dense model's parameters at two bytes each (bar 30%); the files' share is named."""
    fp16 = 2 * dense_f16["params"]
    share = r.get("weight_bytes", r["artifact_bytes"]) / fp16
    return {"target": f"{what} <= 30% of the dense fp16 weights ({files}: {r['artifact_bytes'] / fp16:.1%})",
            "measured": share, "bar": 0.30, "met": share <= 0.30}


def _ideal_target(what: str, r: dict, dense: dict, bar: float) -> dict:
    """Decode speed-up over `dense` against the ratio of weight bytes read per token (the ideal for
    a memory-bound decode)."""
    ideal = dense["bytes_per_token"] / r["bytes_per_token"]
    got = r["decode_tok_s"]["median"] / dense["decode_tok_s"]["median"]
    return {"target": f"{what} >= {bar:.0%} of the bytes-read ideal ({ideal:.2f}x)", "measured": got / ideal,
            "speedup": got, "ideal": ideal, "bar": bar, "met": got / ideal >= bar}


def _onnx_targets(ok: dict, dense_f16: dict | None) -> list[dict]:
    """The ONNX int4 rows of each pruned model: decode against llama.cpp Q4_1 of the same model in
    the same run (bar 0.9x), folder size against the dense fp16 weights (bar 30%), and the
    speed-up over the dense model in the same runtime against the bytes-read ideal (bar 95%)."""
    out = []
    for (model, runtime), r in ok.items():
        if model == DENSE or not runtime.startswith("onnx-int4"):
            continue
        # llama.cpp's Q4_1 file with the same embedding / output matrix (8-bit or f16) when the run has it
        same, other = ("gguf-q4_1-embq8", "gguf-q4_1") if "-emb8" in runtime else ("gguf-q4_1", "gguf-q4_1-embq8")
        cpp_name = same if (model, same) in ok else other
        cpp = ok.get((model, cpp_name))
        if cpp is not None:
            ratio = r["decode_tok_s"]["median"] / cpp["decode_tok_s"]["median"]
            out.append({"target": f"{model} {runtime}: decode >= 0.9x llama.cpp Q4_1 ({cpp_name}) in the same run",
                        "measured": ratio, "bar": 0.9, "met": ratio >= 0.9})
        if dense_f16 is not None:
            out.append(_size_target(f"{model} {runtime}: weights stored", "model files", r, dense_f16))
        dense = ok.get((DENSE, runtime))
        if dense is not None and r.get("bytes_per_token") and dense.get("bytes_per_token"):
            out.append(_ideal_target(f"{model} {runtime}: decode speed-up over the dense {runtime}", r, dense, 0.95))
    return out


def default_models(models: list[str], dense: str | None) -> list[BenchModel]:
    """The dense model first (label `dense`), then each compressed directory by its name."""
    if not models:
        if not Path("saap-out").is_dir():
            raise UserError("no model to benchmark: give saap-edge output directories (e.g. `saap-edge bench saap-out`) "
                            "or run `saap-edge compress` first")
        models = ["saap-out"]
    for m in models:
        if not Path(m).exists():
            raise UserError(f"{m}: no such directory or file to benchmark")
    if dense is None:
        report = Path(models[0]) / "report.json"
        src = read_json(report, "report").get("model", {}) if report.exists() else {}
        dense = src.get("model") or "smollm2-135m"
    return [BenchModel(DENSE, dense)] + [BenchModel(_label(m), m) for m in models]


def _label(path: str) -> str:
    p = Path(path)
    plan = p / "prune_plan.json"
    ratio = read_json(plan, "prune plan").get("ratio") if plan.exists() else None
    return f"{p.name} ({ratio:.0%} pruned)" if ratio is not None else p.name


def plan_bench(models: list[BenchModel], s: BenchSettings) -> list:
    """`bench --dry-run`: every row's planned peak from the configs alone; a UserError naming the
    rows that would be skipped."""
    from saap_edge.memory import Devices, describe

    s.validate()
    planned = [(f"{m.label} {r}", row_memory(m, r, s)) for m in models for r in s.runtimes]
    stages = [st for _, st in planned if st is not None]
    print(describe(stages, Devices(None, _host())))
    skipped = [label for label, st in planned if _skip_reason(st, s)]
    if skipped:
        raise UserError(f"rows that do not fit this machine and would be skipped: {', '.join(skipped)}; drop them from "
                        "--runtimes or run on a machine with more memory")
    return stages


def run_bench(models: list[BenchModel], s: BenchSettings, out: Path, progress: bool = True,
              artifacts: Path | None = None) -> dict:
    """Measure every (model, runtime) row; results/charts are rewritten after each row.
    Exported artifacts and row logs go to `artifacts` (default `<out>/artifacts`)."""
    from saap_edge.bench.probe import cuda_bandwidth_gbs, machine, memory_bandwidth_gbs
    from saap_edge.render import write_bench_outputs
    from saap_edge.compress import versions

    s.validate()
    out.mkdir(parents=True, exist_ok=True)
    work = artifacts or out / "artifacts"
    work.mkdir(parents=True, exist_ok=True)
    bw = cuda_bandwidth_gbs() if s.device.startswith("cuda") else memory_bandwidth_gbs(threads=s.threads)
    data = {"settings": s.to_dict(), "bandwidth": bw, "machine": machine(s.device), "versions": versions(),
            "models": [m.__dict__ for m in models], "rows": []}
    pairs = [(m, r) for m in models for r in s.runtimes]
    for model, runtime in tqdm(pairs, desc="bench", disable=not progress):
        data["rows"].append(bench_row(model, runtime, work, s))
        add_derived(data)
        write_bench_outputs(data, out)
    return data
