"""The compress stage: load -> calibrate -> prune -> (evaluate) -> save, atomically."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from saap_edge import __version__
from saap_edge.checkpoint import CHART_FILE, PLAN_FILE, REPORT_FILE, atomic_dir, check_output_dir, save_model, write_json
from saap_edge.config import PruneSettings, RunSettings
from saap_edge.data import calibration_samples
from saap_edge.eval.ppl import evaluate_ppl
from saap_edge.models.load import load_model
from saap_edge.prune import check_ratio, prune
from saap_edge.prune.methods import NEEDS_CALIBRATION
from saap_edge.report import peak_memory_mib, plot_layers


@dataclass
class CompressJob:
    model: str
    out: Path
    prune: PruneSettings = field(default_factory=PruneSettings)
    run: RunSettings = field(default_factory=RunSettings)
    overwrite: bool = False
    eval_ppl: list[str] = field(default_factory=list)  # datasets scored before and after
    eval_limit: int | None = 64  # windows per dataset for that quick check (None: all)


def versions() -> dict:
    import transformers

    return {"saap_edge": __version__, "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def _quick_ppl(model, tokenizer, job: CompressJob, device) -> dict:
    return evaluate_ppl(
        model, tokenizer, job.eval_ppl, window=128, limit=job.eval_limit, data_dir=job.run.data_dir,
        device=device, progress=job.run.progress,
    )


def compress(job: CompressJob) -> dict:
    """Run the whole stage; returns the report written to <out>/report.json."""
    s = job.prune.validate()
    check_output_dir(job.out, job.overwrite)
    t0 = time.perf_counter()
    loaded = load_model(job.model, job.run.device, job.run.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    check_ratio(model, s)
    timings = {"load_s": time.perf_counter() - t0}
    samples, calib_hash = None, None
    if s.method in NEEDS_CALIBRATION:
        samples, calib_hash = calibration_samples(tokenizer, s.calib, s.calib_samples, s.seq_len, s.seed, job.run.data_dir)
    before = _quick_ppl(model, tokenizer, job, device) if job.eval_ppl else {}
    t1 = time.perf_counter()
    result = prune(model, samples, s, progress=job.run.progress)
    timings["prune_s"] = time.perf_counter() - t1
    del model
    after = _quick_ppl(result.model, tokenizer, job, device) if job.eval_ppl else {}
    plan = result.plan
    plan.calibration = {"source": s.calib, "samples": s.calib_samples, "seq_len": s.seq_len, "sha256": calib_hash} if calib_hash else {}
    plan.versions = versions()
    report = {
        "model": loaded.source,
        "settings": s.to_dict(),
        "params": plan.params,
        "per_layer": [dict(zip(("layer", "heads_before", "heads_after", "mlp_before", "mlp_after"), r)) for r in plan.summary_rows()],
        "ppl": {k: {"before": before[k], "after": after[k]} for k in after},
        "time_s": {**timings, "total_s": time.perf_counter() - t0},
        "peak_memory_mib": peak_memory_mib(device),
        "device": str(device),
        "details": result.details,
        "versions": plan.versions,
    }
    with atomic_dir(job.out, job.overwrite) as tmp:
        save_model(tmp, result.model, tokenizer)
        plan.save(tmp / PLAN_FILE)
        write_json(tmp / REPORT_FILE, report)
        plot_layers(plan, tmp / CHART_FILE, f"{s.method} {plan.params['removed_share']:.1%} of {job.model}")
    return report
