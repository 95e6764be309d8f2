"""The recover stage (SAAP section IV-C): int4 groups + QA-LoRA, merged into the offsets.

    pruned model --quantize_model--> Int4Linear projections (round to nearest, G)
                 --attach--> group-pooled LoRA adapters (peft) --train--> adapters
                 --merge--> offsets += adapter; codes and scales unchanged: an int4 model

`--train` may add (or use instead of LoRA) the group offsets, the group scales and the
RMSNorm weights themselves (recover/params.py); `--recover-loss kd` / `kd+lm` learns from
the dense model the student was pruned from (recover/distill.py).

The order (`--recover-order`) of qalora:

    quantize-distil: quantize (rtn | gptq) -> train the int4 groups' parts (above)
    distil-quantize: train the fp model (--train full: every weight, float32; or LoRA merged
                     into the fp weights) -> quantize (rtn | gptq) -> --offset-steps of the
                     offsets on the same loss (prune -> distil -> quantize: Harma et al.)

`lora` trains plain LoRA on the fp projections and merges into the fp weights; `none`
quantizes to int4 (round-to-nearest or GPTQ) and trains nothing.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from torch import nn

from saap_edge.config import RecoverSettings
from saap_edge.eval.ppl import window_perplexity
from saap_edge.models.int4_linear import weight_cache
from saap_edge.quant.gptq import gptq_model
from saap_edge.quant.int4 import quantize_model
from saap_edge.seeding import set_seed
from saap_edge.recover.adapters import attach, lora_config, merge, trainable_parameters
from saap_edge.recover.data import recovery_windows
from saap_edge.errors import UserError
from saap_edge.recover.distill import CHUNK, Teacher, default_cache_dir
from saap_edge.prune.slicing import as_slim  # noqa: F401  (re-exported: recovery takes a plain model too)
from saap_edge.recover.generate import generated_tokens, generated_windows
from saap_edge.recover.params import enable_direct, freeze
from saap_edge.recover.train import latest_checkpoint, total_steps, train, window_indices
from saap_edge.memory import peak_memory_mib


def checkpoint_dir(out: Path) -> Path:
    """Where a run writing `out` keeps its resumable checkpoints (a sibling folder)."""
    out = Path(out).resolve()
    return out.parent / f"{out.name}.checkpoints"


@dataclass
class RecoverRun:
    """Where and how one recovery runs (not part of what decides its result)."""

    ckpt_dir: Path | None = None
    save_every: int = 0  # 0: about ten checkpoints over the run
    resume: bool = False
    progress: bool = True
    data_dir: str | None = None
    stop_after: int | None = None
    teacher: nn.Module | None = None  # the dense model, for --recover-loss kd / kd+lm (on the fly)
    teacher_key: str | None = None  # or: the teacher cache entry its teacher pass filled (no teacher in memory)
    teacher_pass: dict = field(default_factory=dict)  # what that pass did (report: recovery.teacher)
    teacher_cache: Path | None = field(default_factory=default_cache_dir)  # None: no cache (targets on the fly)
    teacher_cache_mib: int = 4096
    curve_every: int = 0  # score the held-out windows every N steps (report: recovery.heldout_curve)
    generated_key: str | None = None  # the cache entry of the generated recovery text the teacher pass wrote


@dataclass
class Recovered:
    model: nn.Module
    info: dict = field(default_factory=dict)


def recover_model(model: nn.Module, tokenizer, s: RecoverSettings, run: RecoverRun) -> Recovered:
    """Quantize and/or train `model` (changed in place) as `s.recovery` and `s.order` say; see the module doc."""
    device = next(model.parameters()).device
    s = s.validate().resolved(device.type)
    t0 = time.perf_counter()
    model = as_slim(model)
    info: dict = {"recovery": s.recovery, "settings": s.to_dict(), "device": str(device)}
    data = None
    if s.reads_text:
        data = recovery_data(tokenizer, s, run)
        info["data"] = {"source": s.data, **data.describe(), **({"generated_key": run.generated_key}
                                                                 if run.generated_key else {})}
    if s.recovery == "none":
        info.update(_quantize(model, s, data, run), trainable_params=0, time_s=time.perf_counter() - t0)
        return Recovered(model.eval(), info)
    if s.recovery == "lora":
        return _train_stage(model, s, run, data, info, device, t0)
    if s.order == "quantize-distil":
        info.update(_quantize(model, s, data, run))
        # the held-out scores read each weight once or twice: no dequantized copies kept beside training
        with weight_cache(model, False):
            return _train_stage(model, s, run, data, info, device, t0)
    return _distil_then_quantize(model, s, run, data, info, device, t0)


def recovery_data(tokenizer, s: RecoverSettings, run: RecoverRun, teacher: nn.Module | None = None):
    """The run's training and held-out windows; generated text (`--recover-data generated`)
    comes from the cache entry `run.generated_key`, or is sampled from `teacher` (or
    `run.teacher`) now and cached."""
    tokens = generated_tokens(s.data)
    generated = None
    if tokens is not None:
        model = teacher if teacher is not None else run.teacher
        if model is None and run.generated_key is None:
            raise UserError(f"--recover-data {s.data!r} is sampled from the dense model, which this run does not load; "
                            "give --teacher PATH")
        generated, run.generated_key = generated_windows(model if run.generated_key is None else None, tokens,
                                                         s.seq_len, s.seed, run.teacher_cache, run.generated_key,
                                                         run.progress)
    return recovery_windows(tokenizer, s.data, s.seq_len, s.heldout, s.seed, run.data_dir, s.max_tokens, generated)


def _quantize(model: nn.Module, s: RecoverSettings, data, run: RecoverRun) -> dict:
    """The projections become int4 groups by `s.quantizer`; returns what the report records."""
    if s.quantizer == "rtn":
        return {"group_size": quantize_model(model, s.group_size), "quantizer": "rtn"}
    samples = data.train[window_indices(0, min(s.quant_samples, len(data.train)), s.seed, len(data.train))]
    gptq = gptq_model(model, samples, s.group_size, batch_size=s.batch_size, progress=run.progress)
    return {"group_size": gptq["group_size"], "quantizer": "gptq",
            "gptq": {k: v for k, v in gptq.items() if k != "errors"}}


def _distil_then_quantize(model: nn.Module, s: RecoverSettings, run: RecoverRun, data, info: dict, device,
                          t0: float) -> Recovered:
    """distil-quantize: train the fp model (full weights in float32, or LoRA merged into the fp
    weights), quantize it, then (`offset_steps`) train the int4 offsets on the same loss."""
    dtype = next(model.parameters()).dtype
    if "full" in s.trained:
        model.float()  # the weights themselves are the float32 masters
    fp = _train_stage(model, replace(s, recovery="lora"), run, data, {**info}, device, t0,
                      kind_note="the fp model before int4")
    model = fp.model.to(dtype)
    info.update({k: v for k, v in fp.info.items() if k not in ("recovery", "settings")})
    info["recovery"] = s.recovery
    t1 = time.perf_counter()
    info.update(_quantize(model, s, data, run))
    info["quantize_s"] = time.perf_counter() - t1
    heldout = info["heldout_ppl"]
    heldout["distilled"] = heldout["after"]
    heldout["quantized"] = heldout["after"] = window_perplexity(model, data.heldout, progress=False)["ppl"]
    if s.offset_steps:
        post_dir = run.ckpt_dir / "offsets" if run.ckpt_dir else None
        if fp.info["resumed_from"] < fp.info["steps"]:
            clear_checkpoints(post_dir)  # a pass after an earlier, unfinished distillation does not resume
        post = replace(run, ckpt_dir=post_dir, resume=run.resume and latest_checkpoint(post_dir) is not None)
        with weight_cache(model, False):
            done = _train_stage(model, s.offsets_pass(), post, data, {}, device, t1, kind_note="offsets after int4")
        model = done.model
        info["offsets_pass"] = {k: v for k, v in done.info.items() if k not in ("losses",)}
        info["heldout_ppl"]["after"] = done.info["heldout_ppl"]["after"]
    info["trained"] = list(s.trained) + (["offsets"] if s.offset_steps else [])
    info.update(time_s=time.perf_counter() - t0, peak_memory_mib=peak_memory_mib(device))
    return Recovered(model.eval(), info)


def _train_stage(model: nn.Module, s: RecoverSettings, run: RecoverRun, data, info: dict, device, t0: float,
                 kind_note: str = "") -> Recovered:
    """Train what `s.trained` names (adapters / direct parts) on `data`, merge, score."""
    n_steps = total_steps(s, len(data.train))
    heldout_before = window_perplexity(model, data.heldout, progress=False)["ppl"]
    model.requires_grad_(False)
    trainee = model
    if "lora" in s.trained:
        # the adapters' initial A matrices come from torch's global generator, which torch seeds
        # differently in every process: seed it, or two runs of one command train differently
        set_seed(s.seed)
        kind = "qalora" if s.quantized_first else "lora"
        trainee = attach(model, lora_config(kind, s.rank, s.alpha, s.dropout, info.get("group_size")))
    enable_direct(trainee, s.trained)
    info["trained"] = list(s.trained)
    info["trainable_params"] = trainable_parameters(trainee)
    teacher = None  # train() refuses a distilling run without one
    if s.distills and (run.teacher is not None or run.teacher_key is not None):
        teacher = _teacher(run.teacher, data, s, run)
    save_every = run.save_every or max(1, n_steps // 10)
    if run.progress:
        device_note = "the paper's 2 epochs" if s.epochs else f"{n_steps} steps"
        print(f"recovery{' (' + kind_note + ')' if kind_note else ''}: {s.recovery} training {'+'.join(s.trained)} on "
              f"{s.loss} loss, {n_steps} optimizer steps of {s.batch_size * s.grad_accum} x {s.seq_len} tokens "
              f"({device_note}{'; a short CPU budget, raise --recover-steps for more' if device.type == 'cpu' else ''})",
              flush=True)
    result = train(trainee, data, s, run.ckpt_dir, save_every if run.ckpt_dir else 0, run.resume, run.progress, run.stop_after,
                   teacher=teacher, curve_every=run.curve_every)
    heldout_adapter = window_perplexity(trainee, data.heldout, progress=False)["ppl"]
    freeze(trainee)
    merged = merge(trainee) if "lora" in s.trained else trainee
    merged.eval()
    heldout_after = window_perplexity(merged, data.heldout, progress=False)["ppl"]
    if teacher is not None:
        info["teacher"] = {**teacher.describe(), **run.teacher_pass}
    info.update(
        steps=n_steps, resumed_from=result.resumed_from, tokens_trained=result.tokens, train_s=result.train_s,
        tokens_per_s=result.tokens / max(result.train_s, 1e-9),
        loss_first=result.losses[0] if result.losses else None, loss_last=result.losses[-1] if result.losses else None,
        losses=result.losses, heldout_curve=result.curve,
        heldout_ppl={"before": heldout_before, "adapter": heldout_adapter, "after": heldout_after},
        time_s=time.perf_counter() - t0, peak_memory_mib=peak_memory_mib(device),
    )
    return Recovered(merged, info)


def _teacher(model: nn.Module | None, data, s: RecoverSettings, run: RecoverRun, chunk: int = CHUNK) -> Teacher:
    n_train = len(data.train)
    return Teacher(
        model, data.train, lambda start, count: window_indices(start, count, s.seed, n_train),
        s.kd_temperature, s.kd_topk, {"data_sha256": data.sha256, "heldout": s.heldout, "seed": s.seed},
        run.teacher_cache, run.teacher_cache_mib, s.batch_size, key=run.teacher_key if model is None else None,
        chunk=chunk,
    )


def teacher_pass(teacher: nn.Module, tokenizer, s: RecoverSettings, run: RecoverRun) -> str | None:
    """The teacher alone samples the generated recovery text (when the data names it; its key
    goes to RecoverRun.generated_key) and computes the top-k targets of every micro-batch the
    run will train on into the teacher cache; returns that entry's key (RecoverRun.teacher_key),
    None when the run does not distil. The student is not in memory meanwhile, so the two
    never share a device."""
    device = next(teacher.parameters()).device
    s = s.validate().resolved(device.type)
    data = recovery_data(tokenizer, s, run, teacher)  # generated text is sampled now, by the teacher alone
    if not (s.distills and s.kd_topk > 0):
        return None  # the pass only wrote the generated text
    # the offsets pass after distil-quantize trains on the same windows from the start again
    positions = max(total_steps(s, len(data.train)), s.offset_steps) * s.batch_size * s.grad_accum
    cached = _teacher(teacher, data, s, run, chunk=min(CHUNK, positions))
    t0 = time.perf_counter()
    cached.precompute(positions, run.progress)
    run.teacher_pass = {"pass": "before training (the student trains alone)", "positions": positions,
                        "cache_chunks_written": cached.computed, "pass_s": time.perf_counter() - t0}
    return cached.key


def clear_checkpoints(ckpt_dir: Path | None) -> None:
    if ckpt_dir is not None and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir, ignore_errors=True)


__all__ = ["RecoverRun", "Recovered", "recover_model", "teacher_pass", "checkpoint_dir", "as_slim", "clear_checkpoints",
           "latest_checkpoint"]
