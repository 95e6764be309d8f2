"""Exporters: a saap-edge (or plain LLaMA) checkpoint -> a file a device runs.

`export` loads the checkpoint, writes the artifact under a temporary name, reads it back and
compares it with the torch model (exporters.validate), and only then renames it into place.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from saap_edge.outputs import REPORT_FILE, remove_stale, replace_path
from saap_edge.errors import UserError
from saap_edge.files import read_json
from saap_edge.run_report import RunReport

FORMATS = ("gguf", "onnx")
GGUF_QUANTS = ("q4_1", "f16", "f32")
ONNX_GRAPHS = ("fused", "dynamo")
# The embedding / output matrix when --embed-type is not given: 8-bit blocks of 32 next to int4
# projections, where it costs at most 0.5% perplexity against f16 in that runtime on the full
# WikiText-2 test set (benchmarks/results/export_quality.md); f16 next to f16 / f32 projections.
DEFAULT_EMBED = {("gguf", "q4_1"): "q8_0", ("onnx", "int4"): "int8"}
# MatMulNBits' activations in the fused ONNX graph when --matmul-accuracy is not given: float32 in
# every decoder layer, int8 where the final hidden state meets the 8-bit output matrix (+0.11%
# perplexity against float32 there, 1.25x the decode speed on SmolLM2 pruned 20%); int8 in every
# layer costs +1.6% and stays an option (benchmarks/results/export_quality.md)
DEFAULT_ACCURACY = {"int8": "int8-head"}  # by embedding type; fp32 otherwise


@dataclass
class ExportJob:
    model: str = "saap-out"
    format: str = "gguf"
    quant: str | None = None  # None: q4_1 for GGUF, int4 for ONNX
    embed_type: str | None = None  # None: DEFAULT_EMBED for int4 projections, else f16
    out: Path | None = None
    validate: bool = True
    overwrite: bool = False
    device: str = "cpu"
    onnx_graph: str = "fused"  # ONNX: fused (exporters.onnx_fused) or dynamo (exporters.onnx)
    matmul_accuracy: str | None = None  # ONNX fused: MatMulNBits activations, fp32, int8-head or int8 (None: DEFAULT_ACCURACY)
    progress: bool = True  # a bar over the decoder layers as they are written
    tokenizer_pre: str | None = None  # GGUF: llama.cpp's pre-tokenizer name (None: recognised from the tokenizer)


@dataclass
class ExportResult:
    path: Path
    bytes: int
    info: dict = field(default_factory=dict)


def _provenance(directory: Path | None, model) -> dict:
    out = {"exporter": "saap-edge"}
    if directory is None:
        return out
    plan = directory / "prune_plan.json"
    if plan.exists():
        data = read_json(plan, "prune plan")
        out.update(method=data.get("method"), ratio=data.get("ratio"),
                   plan_sha256=hashlib.sha256(plan.read_bytes()).hexdigest())
    q = getattr(model.config, "quantization", None)
    if q:
        out.update(int4_scheme=q["scheme"], int4_group_size=q["group_size"])
    report = RunReport.read_if_any(directory / REPORT_FILE)
    if report is not None and report.recovery:
        out["recovery"] = report.recovery["recovery"]
    return out


def _source_gguf(directory: Path | None, loaded_source: dict) -> Path | None:
    """The GGUF the checkpoint came from, whose tokenizer metadata is copied verbatim."""
    if loaded_source.get("kind") in ("gguf", "alias"):
        return Path(loaded_source["path"])
    report = RunReport.read_if_any(directory / REPORT_FILE) if directory else None
    if report is not None:
        src = report.model
        if src.get("kind") in ("gguf", "alias") and Path(src.get("path", "")).exists():
            return Path(src["path"])
    return None


def _reference(model, quant: str):
    """The torch model the artifact represents: for Q4_1 from fp weights, the same weights
    quantized by our group quantizer at the Q4_1 block size, in place (the artifact is written:
    the export no longer needs the fp weights, and a second copy of a 7B model is 25 GiB)."""
    from saap_edge.models.int4_linear import Int4Linear
    from saap_edge.quant.int4 import quantize_model

    if quant != "q4_1" or any(isinstance(m, Int4Linear) for m in model.modules()):
        return model
    quantize_model(model, 32)
    return model


def default_out(job: ExportJob, source: Path, directory: Path | None) -> Path:
    if job.out is not None:
        return Path(job.out)
    if job.format == "onnx":
        name = f"onnx-{job.quant}"
        return (directory / name) if directory else Path(f"{source.stem}-{name}")
    return (directory / f"model-{job.quant}.gguf") if directory else Path(f"{source.stem}-{job.quant}.gguf")


def _check_job(job: ExportJob) -> ExportJob:
    if job.format not in FORMATS:
        raise UserError(f"--format {job.format!r} is not one of {', '.join(FORMATS)}")
    from exporters.gguf import EMBED_TYPES as GGUF_EMBED_TYPES
    from exporters.onnx import ONNX_EMBED_TYPES, ONNX_QUANTS

    allowed = GGUF_QUANTS if job.format == "gguf" else ONNX_QUANTS
    if job.quant is None:
        job.quant = allowed[0]
    if job.quant not in allowed:
        raise UserError(f"--quant {job.quant!r} is not one of {', '.join(allowed)} for {job.format.upper()}")
    embeds = GGUF_EMBED_TYPES if job.format == "gguf" else ONNX_EMBED_TYPES
    if job.embed_type is None:
        job.embed_type = DEFAULT_EMBED.get((job.format, job.quant), "f16")
    if job.embed_type not in embeds:
        raise UserError(f"--embed-type {job.embed_type!r} is not one of {', '.join(embeds)} for {job.format.upper()}")
    if job.format == "onnx" and job.onnx_graph not in ONNX_GRAPHS:
        raise UserError(f"--onnx-graph {job.onnx_graph!r} is not one of {', '.join(ONNX_GRAPHS)}")
    if job.matmul_accuracy is None:
        fused_int4 = job.format == "onnx" and job.onnx_graph == "fused" and job.quant == "int4"
        job.matmul_accuracy = DEFAULT_ACCURACY.get(job.embed_type, "fp32") if fused_int4 else "fp32"
    if job.matmul_accuracy != "fp32" and (job.format != "onnx" or job.onnx_graph != "fused"):
        raise UserError(f"--matmul-accuracy {job.matmul_accuracy} applies to the fused ONNX graph only; "
                        "drop it or use --format onnx --onnx-graph fused")
    if job.matmul_accuracy == "int8-head" and job.embed_type != "int8":
        raise UserError("--matmul-accuracy int8-head applies to an 8-bit output matrix; add --embed-type int8 "
                        "or use --matmul-accuracy fp32 / int8")
    return job


def plan_export(job: ExportJob) -> list:
    """`export --dry-run`: the host memory of the export from config.json alone (memory.export_memory:
    streamed, the artifact, the largest tensor and 2 GiB for writers and readers), refused when it
    does not fit."""
    from saap_edge.memory import Devices, artifact_bytes, check_fits, describe, export_memory, host_available, model_shape

    job = _check_job(copy.copy(job))
    shape = model_shape(job.model)
    group = shape.group_size
    stages = [export_memory(shape, artifact_bytes(shape, job.quant, job.embed_type, group or 32), group,
                            streamed=streams(job, Path(job.model)))]
    devices = Devices(None, host_available())
    print(describe(stages, devices))
    check_fits(stages, devices, None)
    return stages


def streams(job: ExportJob, source: Path) -> bool:
    """Whether the export reads its checkpoint module by module (saap_edge.models.stream): a local
    directory of safetensors files, on the CPU, for a writer that reads one module at a time
    (GGUF, the fused ONNX graph). The host then holds the artifact and one module, not the model.
    Otherwise (a GGUF or hub source, the traced ONNX graph) the model is loaded whole."""
    return (source.is_dir() and any(source.glob("*.safetensors")) and job.device == "cpu"
            and (job.format == "gguf" or job.onnx_graph == "fused"))


def _int4(job: ExportJob) -> bool:
    return (job.format, job.quant) in (("gguf", "q4_1"), ("onnx", "int4"))


def export(job: ExportJob) -> ExportResult:
    from saap_edge.models.int4_linear import weight_cache
    from saap_edge.models.load import load_model
    from saap_edge.models.stream import stream_model
    from saap_edge.prune.slicing import as_slim

    job = _check_job(copy.copy(job))
    source = Path(job.model)
    directory = source if source.is_dir() else None
    out = default_out(job, source, directory)
    if out.exists() and not job.overwrite:
        raise UserError(f"--out {out} exists; pass --overwrite or choose another --out")
    if not out.parent.exists() or not os.access(out.parent, os.W_OK):
        raise UserError(f"--out {out}: cannot write in {out.parent.resolve()}; choose a writable --out")
    t0 = time.perf_counter()
    if streams(job, source):
        loaded = stream_model(source, int4=_int4(job), group_size=32 if job.format == "gguf" else None)
        model = loaded.model
    else:
        loaded = load_model(job.model, job.device, "float32")
        model = as_slim(loaded.model)
    remove_stale(out.resolve())
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        # int4 layers dequantize tensor by tensor and keep nothing: the host holds the checkpoint,
        # the artifact and one float layer, not a float copy of the model
        with weight_cache(model, False):
            if job.format == "onnx":
                result = _export_onnx(job, model, loaded, directory, tmp)
            else:
                result = _export_gguf(job, model, loaded, directory, source, tmp)
        result["write_s"] = time.perf_counter() - t0 - result.get("validate_s", 0.0)
        replace_path(tmp, out)
    finally:
        _remove(tmp)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.is_dir() else out.stat().st_size
    if job.format == "gguf":  # Ollama's file beside it: template, stops and sampling of the model
        from exporters.modelfile import write_modelfile

        gen = getattr(model, "generation_config", None)
        result["modelfile"] = str(write_modelfile(out, gen.to_dict() if gen is not None else None))
    if directory is not None and (directory / REPORT_FILE).is_file() and out.resolve().parent == directory.resolve():
        from saap_edge.card import write_card

        write_card(directory)  # the card lists the new file and how to run it
    return ExportResult(out, size, result)


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _export_gguf(job: ExportJob, model, loaded, directory: Path | None, source: Path, tmp: Path) -> dict:
    from exporters.gguf import write_gguf
    from exporters.token_check import check_gguf_tokenizer
    from exporters.validate import probe_tokens, validate_gguf

    info = write_gguf(
        model, tmp, job.quant, job.embed_type,
        tokenizer_dir=directory if directory and (directory / "tokenizer_config.json").exists() else None,
        source_gguf=_source_gguf(directory, loaded.source),
        name=(directory.name if directory else source.stem), provenance=_provenance(directory, model),
        progress=job.progress, tokenizer_pre=job.tokenizer_pre, tokenizer=loaded.tokenizer,
    )
    result = {"arch": info.arch, "quant": job.quant, "embed_type": job.embed_type,
              "int4_tensors": len(info.int4_tensors)}
    if job.validate:
        t1 = time.perf_counter()
        result["tokenizer_check"] = _check_tokenizer(loaded.tokenizer, lambda tok: [check_gguf_tokenizer(tmp, tok)])
        ids = probe_tokens(model.config.vocab_size, model.config.bos_token_id)
        result["validation"] = validate_gguf(_reference(model, job.quant), info, ids).to_dict()
        result["validate_s"] = time.perf_counter() - t1
    return result


def _check_tokenizer(tokenizer, check) -> list[dict]:
    """The artifact's runtimes tokenize as the source tokenizer does (exporters.token_check); a
    model without a tokenizer (token ids only) has nothing to check."""
    if tokenizer is None:
        return []
    return [c.to_dict() | {"summary": c.describe()} for c in check(tokenizer)]


def _export_onnx(job: ExportJob, model, loaded, directory: Path | None, tmp: Path) -> dict:
    from exporters.onnx import export_onnx
    from exporters.onnx_fused import export_onnx_fused
    from exporters.token_check import check_onnx_tokenizer
    from exporters.validate import probe_tokens, validate_onnx
    from saap_edge.models.int4_linear import Int4Linear
    from saap_edge.quant.int4 import quantize_model

    if job.quant == "int4" and not any(isinstance(m, Int4Linear) for m in model.modules()):
        # fp checkpoint: the same group quantizer as recovery, at its default group size (in
        # place: the export loaded the model for itself)
        quantize_model(model, None)
    if job.onnx_graph == "fused":
        info = export_onnx_fused(model, tmp, job.quant, job.embed_type, tokenizer=loaded.tokenizer,
                                 provenance=_provenance(directory, model), accuracy=job.matmul_accuracy,
                                 progress=job.progress)
    else:
        info = export_onnx(model, tmp, job.quant, job.embed_type, tokenizer=loaded.tokenizer,
                           provenance=_provenance(directory, model))
    group = (getattr(model.config, "quantization", None) or {}).get("group_size")
    graph = "fused decoder, GroupQueryAttention" if job.onnx_graph == "fused" else "traced decoder"
    kv = "per-layer KV heads" if len({h for h, _ in info.kv}) > 1 else "uniform KV heads"
    result = {"arch": f"{graph} with past ({kv})", "graph": job.onnx_graph,
              "quant": job.quant, "embed_type": job.embed_type, "int4_tensors": len(info.int4_tensors),
              "matmul_accuracy": info.accuracy,
              "group_size": group if job.quant == "int4" else None}
    if job.validate:
        t1 = time.perf_counter()
        result["tokenizer_check"] = _check_tokenizer(loaded.tokenizer, lambda tok: check_onnx_tokenizer(tmp, tok))
        ids = probe_tokens(model.config.vocab_size, model.config.bos_token_id)
        result["validation"] = validate_onnx(model, info, ids, in_place=True).to_dict()
        result["validate_s"] = time.perf_counter() - t1
    return result
