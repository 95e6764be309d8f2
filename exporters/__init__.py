"""Exporters: a saap-edge (or plain LLaMA) checkpoint -> a file a device runs.

`export` loads the checkpoint, writes the artifact under a temporary name, reads it back and
compares it with the torch model (exporters.validate), and only then renames it into place.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from saap_edge.errors import UserError

FORMATS = ("gguf", "onnx")
GGUF_QUANTS = ("q4_1", "f16", "f32")


@dataclass
class ExportJob:
    model: str = "saap-out"
    format: str = "gguf"
    quant: str = "q4_1"
    embed_type: str = "f16"
    out: Path | None = None
    validate: bool = True
    overwrite: bool = False
    device: str = "cpu"


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
        data = json.loads(plan.read_text())
        out.update(method=data.get("method"), ratio=data.get("ratio"),
                   plan_sha256=hashlib.sha256(plan.read_bytes()).hexdigest())
    q = getattr(model.config, "quantization", None)
    if q:
        out.update(int4_scheme=q["scheme"], int4_group_size=q["group_size"])
    report = directory / "report.json"
    if report.exists():
        rec = json.loads(report.read_text()).get("recovery")
        if rec:
            out["recovery"] = rec["recovery"]
    return out


def _source_gguf(directory: Path | None, loaded_source: dict) -> Path | None:
    """The GGUF the checkpoint came from, whose tokenizer metadata is copied verbatim."""
    if loaded_source.get("kind") in ("gguf", "alias"):
        return Path(loaded_source["path"])
    report = directory / "report.json" if directory else None
    if report and report.exists():
        src = json.loads(report.read_text()).get("model", {})
        if src.get("kind") in ("gguf", "alias") and Path(src.get("path", "")).exists():
            return Path(src["path"])
    return None


def _reference(model, quant: str):
    """The torch model the artifact represents: for Q4_1 from fp weights, the same weights
    quantized by our group quantizer at the Q4_1 block size."""
    from saap_edge.models.int4_linear import Int4Linear
    from saap_edge.quant.int4 import quantize_model

    if quant != "q4_1" or any(isinstance(m, Int4Linear) for m in model.modules()):
        return model
    ref = copy.deepcopy(model)
    quantize_model(ref, 32)
    return ref


def export(job: ExportJob) -> ExportResult:
    from saap_edge.models.load import load_model
    from saap_edge.recover import as_slim

    if job.format not in FORMATS:
        raise UserError(f"--format {job.format!r} is not one of {', '.join(FORMATS)}")
    if job.format == "onnx":
        raise UserError("--format onnx is not available in this version; use --format gguf")
    if job.quant not in GGUF_QUANTS:
        raise UserError(f"--quant {job.quant!r} is not one of {', '.join(GGUF_QUANTS)} for GGUF")
    source = Path(job.model)
    directory = source if source.is_dir() else None
    out = job.out or ((directory / f"model-{job.quant}.gguf") if directory else Path(f"{source.stem}-{job.quant}.gguf"))
    out = Path(out)
    if out.exists() and not job.overwrite:
        raise UserError(f"--out {out} exists; pass --overwrite or choose another --out")
    if not out.parent.exists() or not os.access(out.parent, os.W_OK):
        raise UserError(f"--out {out}: cannot write in {out.parent.resolve()}; choose a writable --out")
    t0 = time.perf_counter()
    loaded = load_model(job.model, job.device, "float32")
    model = as_slim(loaded.model)
    from exporters.gguf import write_gguf
    from exporters.validate import probe_tokens, validate_gguf

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        info = write_gguf(
            model, tmp, job.quant, job.embed_type,
            tokenizer_dir=directory if directory and (directory / "tokenizer_config.json").exists() else None,
            source_gguf=_source_gguf(directory, loaded.source),
            name=(directory.name if directory else source.stem), provenance=_provenance(directory, model),
        )
        result = {"arch": info.arch, "quant": job.quant, "embed_type": job.embed_type,
                  "int4_tensors": len(info.int4_tensors), "write_s": time.perf_counter() - t0}
        if job.validate:
            t1 = time.perf_counter()
            ids = probe_tokens(model.config.vocab_size, model.config.bos_token_id)
            result["validation"] = validate_gguf(_reference(model, job.quant), info, ids).to_dict()
            result["validate_s"] = time.perf_counter() - t1
        tmp.replace(out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return ExportResult(out, out.stat().st_size, result)
