"""The compress stage: load -> calibrate -> prune -> recover -> (evaluate) -> save, atomically.

With recovery on, the pruned model is first kept in `<out>.checkpoints/pruned/` beside the
training checkpoints, so `--resume` after a crash skips pruning and continues training.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from saap_edge import __version__
from saap_edge.checkpoint import CHART_FILE, PLAN_FILE, REPORT_FILE, atomic_dir, check_output_dir, save_model, write_json
from saap_edge.config import HywiaSettings, PruneSettings, ReconstructSettings, RecoverSettings, RunSettings, SearchSettings
from saap_edge.distributed import processes
from saap_edge.errors import UserError
from saap_edge.memory import parse_max_memory
from saap_edge.files import read_json
from saap_edge.seeding import set_seed
from saap_edge.data import calibration_samples
from saap_edge.eval.ppl import evaluate_ppl
from saap_edge.models.load import check_positions, load_model
from saap_edge.prune import check_ratio, prune
from saap_edge.prune.methods import NEEDS_CALIBRATION
from saap_edge.prune.plan import PrunePlan
from saap_edge.reconstruct import reconstruct
from saap_edge.recover import RecoverRun, checkpoint_dir, clear_checkpoints, recover_model
from saap_edge.recover.distill import check_teacher, default_cache_dir
from saap_edge.quant.int4 import check_prunable_to_int4
from saap_edge.report import peak_memory_mib, plot_layers


@dataclass
class CompressJob:
    model: str
    out: Path
    prune: PruneSettings = field(default_factory=PruneSettings)
    reconstruct: ReconstructSettings = field(default_factory=ReconstructSettings)
    run: RunSettings = field(default_factory=RunSettings)
    overwrite: bool = False
    eval_ppl: list[str] = field(default_factory=list)  # datasets scored before and after
    eval_limit: int | None = 64  # windows per dataset for that quick check (None: all)
    recover: RecoverSettings | None = field(default_factory=RecoverSettings)  # None: --no-recover
    resume: bool = False  # continue an interrupted run from <out>.checkpoints
    save_every: int = 0  # recovery checkpoint interval in steps (0: about ten over the run)
    keep_checkpoints: bool = False  # keep <out>.checkpoints after success
    teacher: str | None = None  # --recover-loss kd: the dense model (default: --model itself)
    teacher_cache: Path | None = field(default_factory=default_cache_dir)  # None: teacher targets on the fly
    teacher_cache_mib: int = 4096
    curve_every: int = 0  # score the held-out recovery windows every N steps
    search: SearchSettings = field(default_factory=SearchSettings)  # --method adapruner
    hywia: HywiaSettings = field(default_factory=HywiaSettings)  # --method hywia
    memory_text: str | None = field(default=None, repr=False)  # the memory count to print once loading passed


def versions() -> dict:
    import transformers

    return {"saap_edge": __version__, "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def _quick_ppl(model, tokenizer, job: CompressJob, device) -> dict:
    return evaluate_ppl(
        model, tokenizer, job.eval_ppl, window=128, limit=job.eval_limit, data_dir=job.run.data_dir,
        device=device, progress=job.run.progress,
    )


def _prune_stage(job: CompressJob, s: PruneSettings, r: ReconstructSettings) -> tuple:
    """Load, calibrate, prune, reconstruct and score: (slim model, tokenizer, plan, report, device,
    the dense model when recovery distils from it and no other --teacher is given, else None)."""
    t0 = time.perf_counter()
    set_seed(s.seed)  # torch's generator starts differently in every process
    loaded = load_model(job.model, job.run.device, job.run.dtype, job.run.device_map, parse_max_memory(job.run.max_memory))
    model, tokenizer = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    lengths = {"--seq-len": s.seq_len, **({"--recon-seq-len": r.seq_len} if r.active else {})}
    if job.recover is not None:
        lengths["--recover-seq-len"] = job.recover.seq_len
    check_positions(model, lengths)
    _print_memory(job)
    check_ratio(model, s)
    if job.recover is not None and job.recover.recovery in ("qalora", "none"):
        check_prunable_to_int4(model.config, s.align, job.recover.group_size)
    timings = {"load_s": time.perf_counter() - t0}
    samples, calib_hash = None, None
    if tokenizer is None and (s.method in NEEDS_CALIBRATION or s.method == "adapruner" or r.active):
        raise UserError(f"{job.model}: transformers cannot rebuild this file's tokenizer, and calibration text needs one; "
                        "give the model's Hugging Face directory (or a GGUF with a standard llama / gpt2 tokenizer)")
    if s.method in NEEDS_CALIBRATION:
        samples, calib_hash = calibration_samples(tokenizer, s.calib, s.calib_samples, s.seq_len, s.seed, job.run.data_dir)
    recon_samples, recon_hash = None, None
    if r.active:  # drawn before the long estimation, so a calibration text too short fails at once
        recon_samples, recon_hash = calibration_samples(tokenizer, s.calib, r.samples, r.seq_len, s.seed, job.run.data_dir,
                                                        flag="--recon-samples")
    before = _quick_ppl(model, tokenizer, job, device) if job.eval_ppl else {}
    t1 = time.perf_counter()
    search_info = None
    if s.method == "adapruner":
        from saap_edge.prune.adapruner import search_and_prune

        storage = job.out.with_name(job.out.name + ".search.db")
        result, search_info = search_and_prune(model, tokenizer, s, job.search, r if r.active else None, recon_samples,
                                               storage, job.run.data_dir, job.run.progress)
    elif s.method == "hywia":
        from saap_edge.prune.methods import rank_hywia

        result = prune(model, samples, s, progress=job.run.progress, ranker=lambda st, ps: rank_hywia(st, ps, job.hywia))
    else:
        result = prune(model, samples, s, progress=job.run.progress)
    timings["prune_s"] = time.perf_counter() - t1
    plan = result.plan
    recon_info = {"method": "none"}
    if r.active:
        slim = _reconstruct_stage(model, result.model, plan, recon_samples, r, device, job.run.progress,
                                  parse_max_memory(job.run.max_memory) if job.run.device_map else None)
        recon_info = slim.info
        timings["reconstruct_s"] = recon_info["time_s"]
        plan.reconstruction = {**r.to_dict(), "source": s.calib, "sha256": recon_hash}
    keep_dense = job.recover is not None and job.recover.distills and job.teacher is None
    if job.run.device_map:  # both models spread over the devices again (slicing built the slim one on the CPU)
        from saap_edge.models.load import dispatch

        max_memory = parse_max_memory(job.run.max_memory)
        result.model = dispatch(result.model, max_memory)
        model = dispatch(model, max_memory) if keep_dense else model
    dense = model if keep_dense else None  # the teacher (recover/distill.py sets eval mode, no gradients)
    if dense is not None:
        dense.zero_grad(set_to_none=True)  # estimation's gradients are not the teacher's
    del model
    after = _quick_ppl(result.model, tokenizer, job, device) if job.eval_ppl else {}
    if calib_hash:
        plan.calibration = {"source": s.calib, "samples": s.calib_samples, "seq_len": s.seq_len, "sha256": calib_hash}
    plan.versions = versions()
    report = {
        "model": loaded.source,
        "settings": s.to_dict(),
        "reconstruction": recon_info,
        "params": plan.params,
        "per_layer": [dict(zip(("layer", "heads_before", "heads_after", "mlp_before", "mlp_after"), r)) for r in plan.summary_rows()],
        "ppl": {k: {"before": before[k], "after": after[k]} for k in after},
        "time_s": {**timings, "prune_total_s": time.perf_counter() - t0},
        "peak_memory_mib": peak_memory_mib(device),
        "device": str(device),
        "details": result.details,
        "versions": plan.versions,
    }
    if search_info is not None:
        report["search"] = search_info
    return result.model, tokenizer, plan, report, device, dense


def _reconstruct_stage(dense, slim, plan: PrunePlan, samples, r: ReconstructSettings, device, progress: bool,
                       mapped: dict | None = None):
    """Refit `slim` in place. On a GPU both models wait on the CPU while the stage moves one
    decoder layer of each at a time to the device (what lets a LLaMA-7B fit 24 GB). A model
    spread by --device-map (`mapped`: its budgets) leaves accelerate's hooks first; the caller
    spreads both again afterwards."""
    if mapped is not None:
        from saap_edge.models.load import undispatch

        undispatch(dense)
        undispatch(slim)
    if device.type == "cuda":
        dense.to("cpu")
        slim.to("cpu")
    try:
        return reconstruct(dense, slim, plan, samples, r, device=device, progress=progress)
    finally:
        if mapped is None:
            slim.to(device)


def _save(directory: Path, model, tokenizer, plan: PrunePlan, report: dict, title: str) -> None:
    save_model(directory, model, tokenizer)
    plan.save(directory / PLAN_FILE)
    write_json(directory / REPORT_FILE, report)
    plot_layers(plan, directory / CHART_FILE, title)
    if "search" in report:
        from saap_edge.prune.adapruner import write_search

        write_search(directory, report["search"])
    if plan.importance.get("blend"):
        from saap_edge.prune.hywia import BLEND_CHART, plot_blend

        plot_blend(plan.importance, directory / BLEND_CHART)


def _resume_pruned(pruned_dir: Path, job: CompressJob, s: PruneSettings) -> tuple:
    """The pruned model kept by an interrupted run, checked against the current settings."""
    if not (pruned_dir / PLAN_FILE).exists():
        raise UserError(f"--resume: no interrupted run to continue at {pruned_dir.parent}; run without --resume")
    plan = PrunePlan.load(pruned_dir / PLAN_FILE)
    diffs = [k for k, v in s.to_dict().items() if plan.settings.get(k) != v]
    done = plan.reconstruction or {"method": "none"}
    want = job.reconstruct.to_dict() if job.reconstruct.active else {"method": "none"}
    diffs += [f"reconstruct {k}" for k, v in want.items() if done.get(k) != v]
    if diffs:
        raise UserError(f"--resume: the interrupted run pruned with other settings ({', '.join(diffs)}); "
                        "rerun with its settings or without --resume")
    loaded = load_model(str(pruned_dir), job.run.device, job.run.dtype)
    report = read_json(pruned_dir / REPORT_FILE, "report")
    return loaded.model, loaded.tokenizer, plan, report, next(loaded.model.parameters()).device, None


def load_teacher(name: str, student, tokenizer, run: RunSettings, flag_given: bool):
    """The dense teacher for distillation, checked to speak the student's vocabulary."""
    try:
        loaded = load_model(name, run.device, run.dtype)
    except UserError as exc:
        hint = "" if flag_given else "; give the dense model with --teacher PATH"
        raise UserError(f"the teacher {name} cannot be loaded ({exc}){hint}") from exc
    check_teacher(loaded.model, student, loaded.tokenizer, tokenizer, name)
    return loaded.model


def compress(job: CompressJob) -> dict:
    """Run the whole stage; returns the report written to <out>/report.json."""
    rc = job.reconstruct.validate()
    s = job.prune.validate(reconstructs=rc.active)
    if s.method == "adapruner" and rc.active and rc.select == "local":
        # under local selection OBS picks the units and a uniform ranking only sets counts that
        # do not depend on it: every point of the search would give one model (measured: 16
        # trials, one perplexity). AdaPruner keeps its point's own units and refits them.
        rc = replace(rc, select="global")
        job = replace(job, reconstruct=rc)
    r = job.recover.validate() if job.recover is not None else None
    if s.method == "hywia":
        job.hywia.validate(s.calib_samples)
    check_output_dir(job.out, job.overwrite)
    procs = processes()
    job = _per_process(job, procs, s.method)
    memory = check_memory(job, s, r)
    t0 = time.perf_counter()
    trains = r is not None and r.recovery != "none"
    ckpt = checkpoint_dir(job.out) if trains else None
    pruned_dir = ckpt / "pruned" if ckpt else None
    if job.resume:
        if pruned_dir is None:
            raise UserError("--resume continues an interrupted recovery; this run has none (--no-recover / --recovery none)")
        model, tokenizer, plan, report, device, dense = _resume_pruned(pruned_dir, job, s)
    else:
        model, tokenizer, plan, report, device, dense = _prune_stage(job, s, rc)
        if pruned_dir is not None and procs.main:  # a fresh run: earlier checkpoints no longer apply
            clear_checkpoints(ckpt)
            ckpt.mkdir(parents=True)
            tmp = ckpt / ".pruned.tmp"
            tmp.mkdir()
            _save(tmp, model, tokenizer, plan, report, "pruned")
            tmp.rename(pruned_dir)
    title = f"{s.method} {plan.params['removed_share']:.1%} of {job.model}"
    if r is not None:
        if r.distills and dense is None:
            dense = load_teacher(job.teacher or job.model, model, tokenizer, job.run, job.teacher is not None)
        run = RecoverRun(ckpt_dir=ckpt, save_every=job.save_every, resume=job.resume, progress=job.run.progress,
                         data_dir=job.run.data_dir, teacher=dense, teacher_cache=job.teacher_cache,
                         teacher_cache_mib=job.teacher_cache_mib, curve_every=job.curve_every)
        recovered = recover_model(model, tokenizer, r, run)
        del dense, run
        model = recovered.model
        report["recovery"] = recovered.info
        if job.eval_ppl:
            for name, result in _quick_ppl(model, tokenizer, job, device).items():
                report["ppl"][name]["recovered"] = result
    report["time_s"]["total_s"] = time.perf_counter() - t0
    report["peak_memory_mib"] = peak_memory_mib(device)
    report["processes"] = procs.world
    report["memory_estimate"] = {st.stage: {**st.parts, "total": st.total} for st in memory}
    procs.barrier()  # every process is done with the checkpoints before they go
    if procs.main:
        with atomic_dir(job.out, job.overwrite) as tmp:
            _save(tmp, model, tokenizer, plan, report, title)
        if not job.keep_checkpoints:
            clear_checkpoints(ckpt)
    return report


def check_memory(job: "CompressJob", s: PruneSettings, r: RecoverSettings | None) -> list:
    """Count each stage's memory from the model's config (saap_edge/memory.py), print it, and
    refuse before loading a stage the devices cannot hold. Returns the stages counted."""
    from saap_edge.memory import Shape, estimation_memory, recovery_memory
    from saap_edge.models.load import model_config

    config = model_config(job.model)
    if config is None:
        return []
    try:
        shape = Shape.of(config)
    except (AttributeError, TypeError):  # not a LLaMA config: loading refuses it with the reason
        return []
    b = _weight_bytes(job)
    stages = [estimation_memory(shape, b, s.seq_len, s.calib_samples)]
    if r is not None and r.recovery != "none":
        stages.append(recovery_memory(shape, b, s.ratio, r.batch_size, r.seq_len, r.distills, r.rank,
                                      "lora" in r.trained, r.group_size or 32))
    return _gate(job, stages)


def _weight_bytes(job) -> int:
    """Bytes per weight of the run's --dtype on its --device."""
    from saap_edge.models.load import resolve_device, resolve_dtype

    return resolve_dtype(job.run.dtype, resolve_device(job.run.device)).itemsize


def _gate(job, stages: list) -> list:
    """Refuse stages the devices cannot hold; keep their description to print once loading passed."""
    from saap_edge.memory import available_bytes, check_fits, describe
    from saap_edge.models.load import resolve_device

    available = available_bytes(str(resolve_device(job.run.device)), parse_max_memory(job.run.max_memory))
    check_fits(stages, available, job.run.device_map)
    job.memory_text = describe(stages, available) if job.run.progress and processes().main else None
    return stages


def _check_recover_memory(job: "RecoverJob", r: RecoverSettings) -> list:
    """check_memory for `saap-edge recover`: the student is the input itself, the teacher the
    dense model it will load (--teacher, else the source its report records, else the input)."""
    from saap_edge.memory import Shape, recovery_memory
    from saap_edge.models.load import model_config

    config = model_config(job.source)
    if config is None or r.recovery == "none":
        return []
    try:
        shape = Shape.of(config)
        teacher = None
        if r.distills:
            report = Path(job.source) / REPORT_FILE
            recorded = (read_json(report, "report").get("model") or {}) if report.exists() else {}
            name = job.teacher or recorded.get("path") or recorded.get("model") or job.source
            teacher_config = model_config(name)
            teacher = Shape.of(teacher_config) if teacher_config is not None else None
    except (AttributeError, TypeError):  # not a LLaMA config: loading refuses it with the reason
        return []
    return _gate(job, [recovery_memory(shape, _weight_bytes(job), 0.0, r.batch_size, r.seq_len, r.distills, r.rank,
                                       "lora" in r.trained, r.group_size or 32, teacher)])


def _print_memory(job) -> None:
    """The memory count, printed once the cheap checks after loading have passed (so a refused
    run's stderr stays its one error line)."""
    import sys

    text = getattr(job, "memory_text", None)
    if text:
        print(text, file=sys.stderr, flush=True)


def _per_process(job, procs, method: str):
    """The job as this process runs it: its own GPU, and no shared teacher cache (processes would
    write it at once; each computes its micro-batches' targets). One process: unchanged."""
    if not procs.parallel:
        return job
    if job.run.device_map:
        raise UserError("--device-map spreads one model over every GPU; with several processes each process takes one "
                        "GPU: use one or the other")
    if method in ("adapruner", "hywia"):
        raise UserError(f"--method {method} runs in one process (its search / fusion learning is not split over "
                        "processes); run it without accelerate launch")
    return replace(job, run=replace(job.run, device=procs.device(job.run.device)), teacher_cache=None)


@dataclass
class RecoverJob:
    """`saap-edge recover DIR`: the recovery stage alone on a pruned (or any LLaMA) directory."""

    source: str
    out: Path
    recover: RecoverSettings = field(default_factory=RecoverSettings)
    run: RunSettings = field(default_factory=RunSettings)
    overwrite: bool = False
    eval_ppl: list[str] = field(default_factory=list)
    eval_limit: int | None = 64
    resume: bool = False
    save_every: int = 0
    keep_checkpoints: bool = False
    teacher: str | None = None  # --recover-loss kd: the dense model (default: the source recorded in report.json,
    # or the input itself when it is not a pruned directory)
    teacher_cache: Path | None = field(default_factory=default_cache_dir)
    teacher_cache_mib: int = 4096
    curve_every: int = 0
    memory_text: str | None = field(default=None, repr=False)  # the memory count to print once loading passed


def _recorded_source(report: dict, source: str) -> str:
    """The dense model a pruned directory was made from (report.json), for distillation."""
    recorded = report.get("model") or {}
    given = recorded.get("path") or recorded.get("model")
    if not given:
        raise UserError(f"{source} records no source model (report.json); give the dense teacher with --teacher PATH")
    return given


def recover_dir(job: RecoverJob) -> dict:
    """Recover `job.source` into `job.out` (model, plan, report with a `recovery` section)."""
    from saap_edge.prune.groups import discover, total_params

    r = job.recover.validate()
    check_output_dir(job.out, job.overwrite)
    if Path(job.out).resolve() == Path(job.source).resolve():
        raise UserError(f"--out {job.out} is the input directory; choose another --out")
    procs = processes()
    job = _per_process(job, procs, "recover")
    memory = _check_recover_memory(job, r)
    t0 = time.perf_counter()
    loaded = load_model(job.source, job.run.device, job.run.dtype, job.run.device_map, parse_max_memory(job.run.max_memory))
    model, tokenizer = loaded.model, loaded.tokenizer
    if getattr(model.config, "quantization", None):
        raise UserError(f"{job.source} is already an int4 checkpoint; recover its pruned fp directory instead")
    check_positions(model, {"--recover-seq-len": r.seq_len})
    _print_memory(job)
    device = next(model.parameters()).device
    source = Path(loaded.source["path"])
    pruned_input = source.is_dir() and (source / PLAN_FILE).exists()
    if pruned_input:
        plan = PrunePlan.load(source / PLAN_FILE)
        report = read_json(source / REPORT_FILE, "report") if (source / REPORT_FILE).exists() else {}
    else:
        plan = PrunePlan.keep_all(discover(model))
        params = total_params(model)
        plan.params = {"before": params, "after": params, "removed_share": 0.0}
        report = {}
    source_report = dict(report)
    report.setdefault("model", loaded.source)
    report.setdefault("params", plan.params)
    report.setdefault("settings", {"method": plan.method or "none", "ratio": plan.ratio or 0.0})
    report.setdefault("ppl", {})
    report.setdefault("time_s", {})
    before = _quick_ppl(model, tokenizer, job, device) if job.eval_ppl else {}
    ckpt = checkpoint_dir(job.out) if r.recovery != "none" else None
    if ckpt is not None and not job.resume and procs.main:
        clear_checkpoints(ckpt)
    teacher = None
    if r.distills:
        # a pruned directory learns from the model it was pruned from; any other model from
        # its own fp weights (int4 recovery of an unpruned model)
        name = job.teacher or (_recorded_source(source_report, job.source) if pruned_input else job.source)
        teacher = load_teacher(name, model, tokenizer, job.run, job.teacher is not None)
    run = RecoverRun(ckpt_dir=ckpt, save_every=job.save_every, resume=job.resume, progress=job.run.progress,
                     data_dir=job.run.data_dir, teacher=teacher, teacher_cache=job.teacher_cache,
                     teacher_cache_mib=job.teacher_cache_mib, curve_every=job.curve_every)
    recovered = recover_model(model, tokenizer, r, run)
    del teacher, run
    report["recovery"] = recovered.info
    for name, result in (_quick_ppl(recovered.model, tokenizer, job, device) if job.eval_ppl else {}).items():
        # "before" (the dense model) is kept from the pruning report only if scored the same way
        old = report["ppl"].get(name, {})
        same = old.get("after", {}).get("windows") == before[name]["windows"] and old["after"].get("window") == before[name]["window"]
        report["ppl"][name] = {"before": old["before"] if same else None, "after": before[name], "recovered": result}
    report["time_s"]["recover_total_s"] = time.perf_counter() - t0
    report["peak_memory_mib"] = peak_memory_mib(device)
    report["processes"] = procs.world
    report["memory_estimate"] = {st.stage: {**st.parts, "total": st.total} for st in memory}
    procs.barrier()
    if procs.main:
        with atomic_dir(job.out, job.overwrite) as tmp:
            _save(tmp, recovered.model, tokenizer, plan, report, f"{report['settings']['method']} + {r.recovery}")
        if not job.keep_checkpoints:
            clear_checkpoints(ckpt)
    return report
