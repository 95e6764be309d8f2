"""The compress stage: load -> calibrate -> prune -> recover -> (evaluate) -> save, atomically.

With recovery on, the pruned model is first kept in `<out>.checkpoints/pruned/` beside the
training checkpoints, so `--resume` after a crash skips pruning and continues training.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field, replace
from typing import Any
from pathlib import Path

import torch

from saap_edge import __version__
from saap_edge.card import write_card
from saap_edge.outputs import CHART_FILE, PLAN_FILE, REPORT_FILE, atomic_dir, check_output_dir, save_model
from saap_edge.config import (
    METHOD_TABLE, HywiaSettings, PruneSettings, ReconstructSettings, RecoverSettings, RunSettings, SearchSettings,
)
from saap_edge.distributed import processes
from saap_edge.errors import UserError
from saap_edge.memory import parse_max_memory
from saap_edge.seeding import set_seed
from saap_edge.data import calibration_samples
from saap_edge.eval.ppl import evaluate_ppl
from saap_edge.models.load import check_positions, load_model
from saap_edge.prune import check_ratio, prune
from saap_edge.prune.plan import PrunePlan
from saap_edge.reconstruct import reconstruct
from saap_edge.recover import RecoverRun, checkpoint_dir, clear_checkpoints, recover_model
from saap_edge.recover.distill import check_teacher, default_cache_dir
from saap_edge.quant.int4 import check_prunable_to_int4
from saap_edge.memory import peak_memory_mib, stage_peak
from saap_edge.render import plot_layers
from saap_edge.run_report import RunReport


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


@dataclass
class Pruned:
    """What the prune stage hands on: the slim model (reconstructed), its tokenizer and plan, the
    run report so far and the device the model is on."""
    model: Any
    tokenizer: Any
    plan: PrunePlan
    report: RunReport
    device: Any


def _prune_stage(job: CompressJob, s: PruneSettings, r: ReconstructSettings) -> Pruned:
    """Load, calibrate, prune, reconstruct and score. The dense model is used up by the slicing;
    a distilling recovery loads its teacher again."""
    t0 = time.perf_counter()
    set_seed(s.seed)  # torch's generator starts differently in every process
    loaded = load_model(job.model, job.run.device, job.run.dtype, job.run.device_map, parse_max_memory(job.run.max_memory))
    model, tokenizer = loaded.model, loaded.tokenizer
    loaded.model = None  # the slicing frees the dense model layer by layer: nothing else may hold it
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
    method = METHOD_TABLE[s.method]
    if tokenizer is None and (method.calibrates or method.searched or r.active):
        raise UserError(f"{job.model}: transformers cannot rebuild this file's tokenizer, and calibration text needs one; "
                        "give the model's Hugging Face directory (or a GGUF with a standard llama / gpt2 tokenizer)")
    if method.calibrates:
        samples, calib_hash = calibration_samples(tokenizer, s.calib, s.calib_samples, s.seq_len, s.seed, job.run.data_dir)
    recon_samples, recon_hash = None, None
    if r.active:  # drawn before the long estimation, so a calibration text too short fails at once
        recon_samples, recon_hash = calibration_samples(tokenizer, s.calib, r.samples, r.seq_len, s.seed, job.run.data_dir,
                                                        flag="--recon-samples")
    before = _quick_ppl(model, tokenizer, job, device) if job.eval_ppl else {}
    t1 = time.perf_counter()
    search_info = None
    streams = not job.run.device_map  # slicing streamed layer by layer into the refit (one device)
    measured: dict = {}
    with stage_peak(measured, "estimation", device):
        result, search_info = _rank(job, model, tokenizer, samples, s, r, recon_samples, streams)
    timings["prune_s"] = time.perf_counter() - t1
    plan = result.plan
    recon_info = {"method": "none"}
    if streams:
        result.model = None  # a search's own sliced copy: the stream below slices the dense model itself
        t2 = time.perf_counter()
        with stage_peak(measured, "slice + reconstruct", device):
            slim, recon_info = _slice_stage(model, plan, recon_samples, r, device, job.run)
        timings["slice_s"] = time.perf_counter() - t2  # with the refit when it runs (the two are one stream)
        if r.active:
            timings["reconstruct_s"] = recon_info["time_s"]
        result.model = slim
    elif r.active:
        slim = _reconstruct_stage(model, result.model, plan, recon_samples, r, device, job.run.progress,
                                  parse_max_memory(job.run.max_memory))
        recon_info = slim.info
        timings["reconstruct_s"] = recon_info["time_s"]
    if r.active:
        plan.reconstruction = {**r.to_dict(), "source": s.calib, "sha256": recon_hash}
    if job.run.device_map:  # spread over the devices again (slicing built the slim model on the CPU)
        from saap_edge.models.load import dispatch

        result.model = dispatch(result.model, parse_max_memory(job.run.max_memory))
    del model
    _free(device)
    if not job.run.device_map:
        result.model.to(device)  # the dense model has left the card: the slim one takes its place
    after = _quick_ppl(result.model, tokenizer, job, device) if job.eval_ppl else {}
    if calib_hash:
        plan.calibration = {"source": s.calib, "samples": s.calib_samples, "seq_len": s.seq_len, "sha256": calib_hash}
    plan.versions = versions()
    report = RunReport(
        model=loaded.source,
        settings=s.to_dict(),
        reconstruction=recon_info,
        params=plan.params,
        per_layer=[dict(zip(("layer", "heads_before", "heads_after", "mlp_before", "mlp_after"), r)) for r in plan.summary_rows()],
        ppl={k: {"before": before[k], "after": after[k]} for k in after},
        time_s={**timings, "prune_total_s": time.perf_counter() - t0},
        peak_memory_mib=peak_memory_mib(device),
        device=str(device),
        memory_measured=measured,
        details=result.details,
        versions=plan.versions,
        search=search_info,
    )
    return Pruned(result.model, tokenizer, plan, report, device)


def _rank(job, model, tokenizer, samples, s: PruneSettings, r: ReconstructSettings, recon_samples, streams: bool):
    """Estimation, ranking and search by `s.method`: (PruneResult, the search's record or None).
    With `streams` the slicing is left to the slice stage (result.model None)."""
    method = METHOD_TABLE[s.method]
    if method.searched:
        from saap_edge.adapruner import search_and_prune

        storage = job.out.with_name(job.out.name + ".search.db")
        return search_and_prune(model, tokenizer, s, getattr(job, method.settings), r if r.active else None, recon_samples,
                                storage, job.run.data_dir, job.run.progress)
    ranker = None
    if method.settings:  # a method with settings of its own: its ranker gets them
        from saap_edge.prune.methods import RANKERS

        own = getattr(job, method.settings)
        ranker = lambda st, ps: RANKERS[s.method](st, ps, own)  # noqa: E731
    return prune(model, samples, s, progress=job.run.progress, ranker=ranker, slice_now=not streams), None


def _slice_stage(dense, plan: PrunePlan, samples, r: ReconstructSettings, device, run: RunSettings):
    """Slice `dense` into the slim model of `plan`, layer by layer, refitting each layer as it
    comes when reconstruction is on; the dense model is used up (each of its layers is freed
    once sliced). On a GPU the slim model is built on the host and each of its layers visits
    the card for its refit, so dense and slim never share the card. Returns (slim, info)."""
    from saap_edge.prune.slicing import empty_slim, fill_outer, slice_streamed

    home = torch.device("cpu") if device.type == "cuda" else device
    dense.to(home)  # on a GPU the dense model waits on the host; its layers visit the card one at a time
    _free(device)
    if not r.active:
        return slice_streamed(dense, plan, home), {"method": "none"}
    slim = empty_slim(dense, plan, home)
    fill_outer(dense, slim)
    out = reconstruct(dense, slim, plan, samples, r, device=device, progress=run.progress, streamed=True,
                      solve_dtype=run.solve_dtype)
    return out.model, out.info


def prune_keeping_dense(dense, samples, s: PruneSettings, r: ReconstructSettings, recon_samples, stats=None,
                        progress: bool = False):
    """The prune stage for a caller that keeps the dense model for more plans (benchmarks that
    compare many methods on one loaded model and share its calibration statistics): rank,
    search, slice a copy, and refit it from the intact dense model. The slim model equals the
    one compress's streamed stage (`_slice_stage`) builds while it uses the dense model up
    (tests/test_reconstruct.py holds the two equal). Returns the PruneResult, refit record in
    `details["reconstruction"]`."""
    result = prune(dense, samples, s, progress=progress, stats=stats)
    result.details["reconstruction"] = {"method": "none"}
    if r.active:
        out = reconstruct(dense, result.model, result.plan, recon_samples, r, progress=progress)
        result.model, result.details["reconstruction"] = out.model, out.info
        result.plan.reconstruction = r.to_dict()
    return result


def _free(device) -> None:
    """Give the memory of freed tensors back (CUDA's cache; the C heap on Linux)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reconstruct_stage(dense, slim, plan: PrunePlan, samples, r: ReconstructSettings, device, progress: bool,
                       mapped: dict | None = None):
    """Refit `slim` in place, for models spread by --device-map (`mapped`: its budgets): both
    leave accelerate's hooks and wait on the CPU while the stage moves one decoder layer of
    each at a time to the device; the caller spreads the slim one again afterwards."""
    from saap_edge.models.load import undispatch

    undispatch(dense)
    undispatch(slim)
    dense.to("cpu")
    slim.to("cpu")
    return reconstruct(dense, slim, plan, samples, r, device=device, progress=progress)


def _save(directory: Path, model, tokenizer, plan: PrunePlan, report: RunReport, title: str, name: str) -> None:
    """Everything an output directory holds, written into `directory` (a temporary sibling of the
    output, renamed after); `name`: the output's own name, which the model card uses."""
    save_model(directory, model, tokenizer)
    plan.save(directory / PLAN_FILE)
    report.write(directory / REPORT_FILE)
    plot_layers(plan, directory / CHART_FILE, title)
    if report.search is not None:
        from saap_edge.render import write_search

        write_search(directory, report.search)
    write_card(directory, name)
    if plan.importance.get("blend"):
        from saap_edge.render import BLEND_CHART, plot_blend

        plot_blend(plan.importance, directory / BLEND_CHART)


def _resume_pruned(pruned_dir: Path, job: CompressJob, s: PruneSettings) -> Pruned:
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
    report = RunReport.read(pruned_dir / REPORT_FILE)
    return Pruned(loaded.model, loaded.tokenizer, plan, report, next(loaded.model.parameters()).device)


def _check_student_groups(student, r: RecoverSettings) -> None:
    """A group size the student cannot take fails before the teacher's long pass."""
    if r.recovery == "qalora":
        from saap_edge.quant.int4 import check_group_size, choose_group_size, quantized_in_features

        widths = quantized_in_features(student)
        check_group_size(r.group_size or choose_group_size(widths), widths)


def _teacher_pass_stage(name: str, flag_given: bool, rs: RunSettings, student_config, tokenizer, r: RecoverSettings,
                        run: RecoverRun, student_dir: Path, device, report: RunReport):
    """The teacher pass, for a student that has left memory (it is on disk in `student_dir`):
    the teacher `name` alone computes every target the run will read into the teacher cache
    (RecoverRun.teacher_key), leaves, and the student is loaded again; the two never share the
    card (nor, on a CPU run, the host). Returns the student."""
    from types import SimpleNamespace

    from saap_edge.recover import teacher_pass

    t0 = time.perf_counter()
    teacher = load_teacher(name, SimpleNamespace(config=student_config), tokenizer, rs, flag_given)
    run.teacher_key = teacher_pass(teacher, tokenizer, r, run)
    del teacher
    _free(device)
    report.time_s["teacher_pass_s"] = time.perf_counter() - t0
    return load_model(str(student_dir), rs.device, rs.dtype, rs.device_map, parse_max_memory(rs.max_memory)).model


def _uses_teacher_pass(run: RecoverRun, r: RecoverSettings) -> bool:
    """Whether the teacher's targets are computed before training (a cache to hold them), or on
    the fly by a teacher beside the student (--teacher-cache off, several processes, --kd-topk 0)."""
    return run.teacher_cache is not None and ((r.distills and r.kd_topk > 0) or _generates(r))


def _generates(r: RecoverSettings) -> bool:
    """Does the recovery text include text sampled from the dense model (`generated`)?"""
    from saap_edge.recover.generate import generated_tokens

    return r.reads_text and generated_tokens(r.data) is not None


def load_teacher(name: str, student, tokenizer, run: RunSettings, flag_given: bool):
    """The dense teacher for distillation, checked to speak the student's vocabulary."""
    try:
        loaded = load_model(name, run.device, run.dtype)
    except UserError as exc:
        hint = "" if flag_given else "; give the dense model with --teacher PATH"
        raise UserError(f"the teacher {name} cannot be loaded ({exc}){hint}") from exc
    check_teacher(loaded.model, student, loaded.tokenizer, tokenizer, name)
    return loaded.model


def dry_run(job: CompressJob) -> list:
    """`compress --dry-run`: the memory plan of every stage from config.json alone (no weights,
    no tokenizer); printed, and a UserError naming the stage and the flags when one does not fit."""
    job, s, r = _validated(job)
    return check_memory(job, s, r, dry_run=True)


def _validated(job: CompressJob) -> tuple:
    """(job, prune settings, recover settings or None), every setting checked."""
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
    return job, s, r


def compress(job: CompressJob) -> RunReport:
    """Run the whole stage; returns the report written to <out>/report.json."""
    job, s, r = _validated(job)
    rc = job.reconstruct
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
        pruned = _resume_pruned(pruned_dir, job, s)
    else:
        pruned = _prune_stage(job, s, rc)
        if pruned_dir is not None and procs.main:  # a fresh run: earlier checkpoints no longer apply
            clear_checkpoints(ckpt)
            ckpt.mkdir(parents=True)
            tmp = ckpt / ".pruned.tmp"
            tmp.mkdir()
            _save(tmp, pruned.model, pruned.tokenizer, pruned.plan, pruned.report, "pruned", pruned_dir.name)
            tmp.rename(pruned_dir)
        procs.barrier()  # the pruned model is on disk for every process
    model, tokenizer, plan, report, device = pruned.model, pruned.tokenizer, pruned.plan, pruned.report, pruned.device
    pruned.model = None  # the stages below replace the model: nothing else may hold it
    title = f"{s.method} {plan.params['removed_share']:.1%} of {job.model}"
    if r is not None:
        run = RecoverRun(ckpt_dir=ckpt, save_every=job.save_every, resume=job.resume, progress=job.run.progress,
                         data_dir=job.run.data_dir, teacher_cache=job.teacher_cache,
                         teacher_cache_mib=job.teacher_cache_mib, curve_every=job.curve_every)
        measured = report.memory_measured
        name, given = job.teacher or job.model, job.teacher is not None
        if r.distills:
            _check_student_groups(model, r)
        if _uses_teacher_pass(run, r):
            config = model.config
            del model  # the student waits on disk (pruned_dir) while the teacher has the device
            _free(device)
            with stage_peak(measured, "teacher pass", device):
                model = _teacher_pass_stage(name, given, job.run, config, tokenizer, r, run, pruned_dir, device, report)
        elif r.distills or _generates(r):
            run.teacher = load_teacher(name, model, tokenizer, job.run, given)
        with stage_peak(measured, "recovery", device):
            recovered = recover_model(model, tokenizer, r, run)
        del run
        model = recovered.model
        report.recovery = recovered.info
        if job.eval_ppl:
            report.add_recovered_ppl(_quick_ppl(model, tokenizer, job, device))
    report.time_s["total_s"] = time.perf_counter() - t0
    report.close(peak_memory_mib(device), procs.world, memory)
    procs.barrier()  # every process is done with the checkpoints before they go
    if procs.main:
        with atomic_dir(job.out, job.overwrite) as tmp:
            _save(tmp, model, tokenizer, plan, report, title, job.out.name)
        if not job.keep_checkpoints:
            clear_checkpoints(ckpt)
    return report


def planned_device(run: RunSettings, dry_run: bool = False) -> str:
    """The device a run computes on, without touching it: --device, or for auto CUDA when
    torch sees a GPU (a dry run also when --max-memory names one)."""
    if run.device != "auto":
        return run.device
    if torch.cuda.is_available():
        return "cuda"
    gpus = [k for k in (parse_max_memory(run.max_memory) or {}) if isinstance(k, int)]
    return "cuda" if dry_run and gpus else "cpu"


def _solve_bytes(run: RunSettings, device: str) -> int:
    from saap_edge.reconstruct import work_dtype

    return work_dtype(torch.device(device.split(":")[0]), run.solve_dtype).itemsize


def _weight_bytes(run: RunSettings, device: str) -> int:
    """Bytes per weight of the run's --dtype on `device`."""
    from saap_edge.models.load import resolve_dtype

    return resolve_dtype(run.dtype, torch.device(device)).itemsize


def _shape_of(name: str, dry_run: bool):
    """The sizes of --model `name` from its config alone; None when it cannot be read that way
    (a run then loads and reports the reason; a dry run refuses it)."""
    from saap_edge.memory import model_shape

    try:
        return model_shape(name)
    except UserError:
        if dry_run:
            raise
        return None


def check_memory(job: "CompressJob", s: PruneSettings, r: RecoverSettings | None, dry_run: bool = False) -> list:
    """Plan each stage's memory on the card and the host from the model's config
    (saap_edge/memory.py), and refuse before loading a stage the devices cannot hold. Returns
    the stages planned."""
    from saap_edge.memory import compress_stages

    shape = _shape_of(job.model, dry_run)
    if shape is None:
        return []
    device = planned_device(job.run, dry_run)
    teacher = _shape_of(job.teacher, dry_run) if job.teacher and r is not None and r.distills else None
    cache = job.teacher_cache_mib if job.teacher_cache is not None else None
    stages = compress_stages(shape, _weight_bytes(job.run, device), s, job.reconstruct, r, device.split(":")[0], cache,
                             teacher, solve_bytes=_solve_bytes(job.run, device))
    return _gate(job, stages, device, dry_run)


def _gate(job, stages: list, device: str, dry_run: bool) -> list:
    """Refuse stages the devices cannot hold; keep their description to print once loading passed
    (a dry run prints it at once)."""
    from saap_edge.memory import check_fits, describe, devices_for

    devices = devices_for(device, parse_max_memory(job.run.max_memory), job.run.device_map, probe=not dry_run)
    text = describe(stages, devices)
    if dry_run:
        print(text, flush=True)
    check_fits(stages, devices, job.run.device_map)
    job.memory_text = text if job.run.progress and processes().main and not dry_run else None
    return stages


def _check_recover_memory(job: "RecoverJob", r: RecoverSettings, dry_run: bool = False) -> list:
    """check_memory for `saap-edge recover`: the student is the input itself, the teacher the
    dense model it will load (--teacher, else the source its report records, else the input)."""
    from saap_edge.memory import recovery_stages

    if r.recovery == "none":
        return []
    shape = _shape_of(job.source, dry_run)
    if shape is None:
        return []
    teacher = None
    if r.distills:
        recorded = RunReport.read_if_any(Path(job.source) / REPORT_FILE)
        name = job.teacher or (recorded and recorded.source_name()) or job.source
        teacher = _shape_of(name, False)
    device = planned_device(job.run, dry_run)
    cache = job.teacher_cache_mib if job.teacher_cache is not None else None
    stages = recovery_stages(shape, teacher, _weight_bytes(job.run, device), 0.0, r, device.split(":")[0], cache)
    return _gate(job, stages, device, dry_run)


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


def _recorded_source(recorded: str | None, source: str) -> str:
    """The dense model a pruned directory was made from (report.json's `model`), for distillation."""
    if not recorded:
        raise UserError(f"{source} records no source model (report.json); give the dense teacher with --teacher PATH")
    return recorded


def recover_dry_run(job: RecoverJob) -> list:
    """`recover --dry-run`: the memory plan of the recovery stages from config.json alone."""
    return _check_recover_memory(job, job.recover.validate(), dry_run=True)


def recover_dir(job: RecoverJob) -> RunReport:
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
        report = RunReport.read_if_any(source / REPORT_FILE) or RunReport()
    else:
        plan = PrunePlan.keep_all(discover(model))
        params = total_params(model)
        plan.params = {"before": params, "after": params, "removed_share": 0.0}
        report = RunReport()
    recorded_model = report.source_name()
    report.model = report.model or loaded.source
    report.params = report.params or plan.params
    report.settings = report.settings or {"method": plan.method or "none", "ratio": plan.ratio or 0.0}
    before = _quick_ppl(model, tokenizer, job, device) if job.eval_ppl else {}
    ckpt = checkpoint_dir(job.out) if r.recovery != "none" else None
    if ckpt is not None and not job.resume and procs.main:
        clear_checkpoints(ckpt)
    run = RecoverRun(ckpt_dir=ckpt, save_every=job.save_every, resume=job.resume, progress=job.run.progress,
                     data_dir=job.run.data_dir, teacher_cache=job.teacher_cache,
                     teacher_cache_mib=job.teacher_cache_mib, curve_every=job.curve_every)
    measured = report.memory_measured
    if r.distills or _generates(r):
        # a pruned directory learns from the model it was pruned from; any other model from
        # its own fp weights (int4 recovery of an unpruned model)
        name = job.teacher or (_recorded_source(recorded_model, job.source) if pruned_input else job.source)
        _check_student_groups(model, r)
        if _uses_teacher_pass(run, r):
            config = model.config
            loaded.model = None
            del model  # the student is the input directory on disk: it comes back after the pass
            _free(device)
            with stage_peak(measured, "teacher pass", device):
                model = _teacher_pass_stage(name, job.teacher is not None, job.run, config, tokenizer, r, run, source,
                                            device, report)
        else:
            run.teacher = load_teacher(name, model, tokenizer, job.run, job.teacher is not None)
    with stage_peak(measured, "recovery", device):
        recovered = recover_model(model, tokenizer, r, run)
    del run
    report.recovery = recovered.info
    if job.eval_ppl:
        report.add_recovered_ppl(_quick_ppl(recovered.model, tokenizer, job, device), before)
    report.time_s["recover_total_s"] = time.perf_counter() - t0
    report.close(peak_memory_mib(device), procs.world, memory)
    procs.barrier()
    if procs.main:
        with atomic_dir(job.out, job.overwrite) as tmp:
            _save(tmp, recovered.model, tokenizer, plan, report, f"{report.settings['method']} + {r.recovery}",
                  job.out.name)
        if not job.keep_checkpoints:
            clear_checkpoints(ckpt)
    return report
