"""The recovery trainer: LM and/or distillation loss, AdamW, warm-up, checkpoints that resume exactly.

A small loop rather than transformers.Trainer: resuming must reproduce an uninterrupted run
bit for bit, checkpoints must hold no pickles (Trainer saves optimizer and RNG state with
torch.save), and a NaN loss must stop the run with the last good checkpoint named.

Determinism: the window order of epoch e is a permutation seeded with (seed, e); the global
RNG (LoRA dropout) is reseeded from (seed, step, micro-batch) before every micro-batch; so
step k sees the same data and the same dropout masks whether or not the run was interrupted
before it, and whichever process computes a micro-batch.

Several processes (saap_edge/distributed.py): the micro-batches of a step are dealt out
(micro m to process m mod N, so --grad-accum must be a multiple of N and the global batch,
batch_size x grad_accum, is the same for any N); after them the gradients of the trained
parameters are all-reduced (summed) and every process takes the same optimizer step, so the
parameters stay equal everywhere. This is DistributedDataParallel's arithmetic, written as
one all-reduce per step because the loop accumulates over micro-batches and trains a few
adapter tensors (nothing to overlap with the backward pass). Only process 0 writes
checkpoints; a checkpoint resumes under any process count that divides --grad-accum.

Losses (`s.loss`): lm, next-token cross-entropy; kd, KL to the dense teacher's
distribution (recover/distill.py); kd+lm, kd_weight * kd + (1 - kd_weight) * lm.

Checkpoint `step-NNNNNN/` (written to a temporary name, then renamed):
adapter_config.json + adapter_model.safetensors (peft's format, when LoRA trains),
params.safetensors (directly trained group offsets / scales / norms, float32 masters),
optimizer.safetensors (AdamW moments and step counts), trainer_state.json (step,
settings, data hash, losses: the same bytes for the same command), timing.json (the seconds
trained up to this checkpoint, a measurement kept apart so the state above stays reproducible).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from saap_edge.config import RecoverSettings
from saap_edge.distributed import processes
from saap_edge.errors import UserError
from saap_edge.files import DamagedFile, check_safetensors, read_json, reading
from saap_edge.eval.ppl import window_perplexity
from saap_edge.recover.adapters import save_adapters
from saap_edge.recover.data import RecoveryData
from saap_edge.recover.distill import Teacher, kd_loss
from saap_edge.recover.params import direct_parameters

STATE_FILE, OPTIMIZER_FILE, ADAPTER_WEIGHTS = "trainer_state.json", "optimizer.safetensors", "adapter_model.safetensors"
PARAMS_FILE, TIMING_FILE = "params.safetensors", "timing.json"
SCALE_LR_SHARE = 0.1
KEEP_CHECKPOINTS = 2
DAMAGED_FIX = "delete the checkpoint to resume from the one before"  # what to do about a damaged checkpoint file


class LossDiverged(UserError):
    """The loss became NaN or infinite; the run stopped and the last good checkpoint stays."""


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # mean loss of each optimizer step
    curve: list[list[float]] = field(default_factory=list)  # [step, held-out perplexity] every curve_every steps
    tokens: int = 0  # tokens trained on by this process
    train_s: float = 0.0  # seconds of training, across resumes (each checkpoint keeps the time before it)
    resumed_from: int = 0


def total_steps(s: RecoverSettings, n_train: int) -> int:
    if s.steps is not None:
        return s.steps
    per_step = s.batch_size * s.grad_accum
    return max(1, math.ceil((s.epochs or 1.0) * n_train / per_step))


def lr_at(step: int, s: RecoverSettings, n_steps: int) -> float:
    """Linear warm-up over `warmup` of the steps, then linear decay to 0 (HF's "linear")."""
    warm = int(s.warmup * n_steps)
    if step < warm:
        return s.lr * (step + 1) / warm
    return s.lr * max(0.0, (n_steps - step) / max(1, n_steps - warm))


@lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n_train: int) -> torch.Tensor:
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def window_indices(start: int, count: int, seed: int, n_train: int) -> torch.Tensor:
    """Training windows at positions start .. start + count of the endless seeded shuffle."""
    return torch.stack([_epoch_order(seed, i // n_train, n_train)[i % n_train] for i in range(start, start + count)])


def batch_start(step: int, micro: int, s: RecoverSettings) -> int:
    """Shuffle position of the first window of micro-batch `micro` of optimizer step `step`."""
    return (step * s.grad_accum + micro) * s.batch_size


def batch_indices(step: int, micro: int, s: RecoverSettings, n_train: int) -> torch.Tensor:
    """Windows of micro-batch `micro` of optimizer step `step`."""
    return window_indices(batch_start(step, micro, s), s.batch_size, s.seed, n_train)


def step_loss_of(model, batch: torch.Tensor, s: RecoverSettings, teacher: Teacher | None, start: int) -> torch.Tensor:
    """The training loss of one micro-batch (see the module doc)."""
    if s.loss == "lm":
        return model(input_ids=batch, labels=batch).loss
    out = model(input_ids=batch, labels=batch if s.loss == "kd+lm" else None)
    kd = kd_loss(out.logits, teacher.targets(start, len(batch)).to(batch.device), s.kd_temperature)
    if s.loss == "kd":
        return kd
    return s.kd_weight * kd + (1 - s.kd_weight) * out.loss


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    return sorted(p for p in ckpt_dir.glob("step-*") if (p / STATE_FILE).exists())


def latest_checkpoint(ckpt_dir: Path | None) -> Path | None:
    found = _checkpoints(ckpt_dir) if ckpt_dir and ckpt_dir.is_dir() else []
    return found[-1] if found else None


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return out


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def save_checkpoint(ckpt_dir: Path, model, optimizer, step: int, meta: dict, train_s: float | None = None) -> Path:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:06d}"
    tmp = ckpt_dir / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if isinstance(model, PeftModel):
        save_adapters(model, tmp)
    direct = direct_parameters(model)
    if direct:
        save_file({k: v.detach().cpu().contiguous() for k, v in direct.items()}, tmp / PARAMS_FILE)
    save_file(_optimizer_tensors(optimizer), tmp / OPTIMIZER_FILE)
    (tmp / STATE_FILE).write_text(json.dumps({**meta, "step": step}, indent=1) + "\n")
    if train_s is not None:
        (tmp / TIMING_FILE).write_text(json.dumps({"train_s": train_s}) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in _checkpoints(ckpt_dir)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def check_resumable(checkpoint: Path, s: RecoverSettings, data_sha256: str) -> dict:
    """The checkpoint's state, or a UserError listing what differs from the current settings."""
    state = read_json(checkpoint / STATE_FILE, "trainer state")
    if not isinstance(state.get("settings"), dict) or not isinstance(state.get("step"), int):
        raise DamagedFile(f"{checkpoint / STATE_FILE}: the trainer state lacks its settings or step; the checkpoint is "
                          "damaged: delete it to resume from the one before, or run without --resume")
    saved = state["settings"]
    defaults = RecoverSettings()  # a field newer than the checkpoint: it ran with the field's default
    diffs = [f"{k}: checkpoint {saved.get(k, getattr(defaults, k))!r}, now {getattr(s, k)!r}"
             for k in RecoverSettings.RESULT_FIELDS if saved.get(k, getattr(defaults, k)) != getattr(s, k)]
    if state.get("data_sha256") != data_sha256:
        diffs.append("recovery data: the token windows differ (other text or tokenizer)")
    if diffs:
        raise UserError(f"cannot resume from {checkpoint}: settings differ ({'; '.join(diffs)}); "
                        "rerun with the checkpoint's settings or without --resume")
    return state


def _trained_seconds(checkpoint: Path, state: dict) -> float:
    """Seconds trained up to `checkpoint`: its timing file; 0 for a checkpoint older than the file."""
    if (checkpoint / TIMING_FILE).exists():
        return float(read_json(checkpoint / TIMING_FILE, "training time").get("train_s", 0.0))
    return float(state.get("train_s", 0.0))


def _tensors(path: Path, what: str, device=None) -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file, checked whole before it is read."""
    check_safetensors(path, what)
    with reading(path, what, DAMAGED_FIX):
        return load_file(path, device=str(device) if device is not None else "cpu")


def _load_direct(model, path: Path) -> None:
    if not path.exists():
        raise UserError(f"cannot resume from {path.parent}: it holds no {PARAMS_FILE} (it trained other parameters)")
    saved = _tensors(path, "trained parameters")
    direct = direct_parameters(model)
    if set(saved) != set(direct):
        raise UserError(f"cannot resume from {path.parent}: it trained other parameters than this run")
    with torch.no_grad():
        for name, value in saved.items():
            direct[name].copy_(value)


def param_groups(model, s: RecoverSettings) -> list[dict]:
    """AdamW groups: LoRA adapters and full weight matrices at `lr`; offsets and norms at `group_lr`; scales at
    group_lr x SCALE_LR_SHARE (a scale is ~10x smaller than an offset, and Adam's step is
    about the learning rate whatever the gradient's size). Each group's `lr_share` is its
    rate relative to `lr`, so one schedule drives them all."""
    weights, direct, scales = [], [], []  # weights: LoRA adapters and (--train full) the fp weight matrices
    for name, p in model.named_parameters():
        if p.requires_grad:
            matrix = p.dim() == 2 and not name.endswith(("scales", "offsets"))
            (weights if "lora_" in name or matrix else scales if name.endswith("scales") else direct).append(p)
    rates = [(weights, s.lr), (direct, s.group_lr), (scales, s.group_lr * SCALE_LR_SHARE)]
    return [{"params": ps, "lr_share": rate / s.lr} for ps, rate in rates if ps]


def _heldout_ppl(model, data: RecoveryData) -> float:
    model.eval()
    return window_perplexity(model, data.heldout, progress=False)["ppl"]


@dataclass
class _Loop:
    """One optimizer step of the training loop: what every step reads, and the step itself."""
    model: Any
    optimizer: torch.optim.Optimizer
    data: RecoveryData
    s: RecoverSettings
    teacher: Teacher | None
    n_steps: int
    procs: Any
    device: torch.device
    trained: list = field(default_factory=list)

    def __post_init__(self):
        self.n_train = len(self.data.train)
        cuda = self.device.type == "cuda"
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step(self, step: int, last_good: Path | None) -> tuple[float, int]:
        """Step `step` (lr schedule, micro-batches, the processes' summed gradients, the update):
        (its loss, tokens trained). A non-finite loss on any process stops the run, naming the
        last good checkpoint."""
        s = self.s
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, s, self.n_steps) * group["lr_share"]
        step_loss, bad, tokens = 0.0, None, 0
        for micro in self.procs.share(s.grad_accum):
            torch.manual_seed((s.seed * 1_000_003 + step) * 1_009 + micro)
            batch = self.data.train[batch_indices(step, micro, s, self.n_train)].to(self.device)
            with self.autocast:
                loss = step_loss_of(self.model, batch, s, self.teacher, batch_start(step, micro, s))
            if not torch.isfinite(loss):
                bad = loss.item()
                break
            (loss / s.grad_accum).backward()
            step_loss += loss.item() / s.grad_accum
            tokens += batch.numel()
        if self.procs.parallel:  # the step's loss, whether any process diverged, and the summed gradients
            shared = torch.tensor([step_loss, 0.0 if bad is None else 1.0], dtype=torch.float64)
            self.procs.sum_(shared)
            step_loss, diverged = float(shared[0]), shared[1] > 0
            for p in self.trained:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.procs.sum_(*(p.grad for p in self.trained))
        else:
            diverged = bad is not None
        if diverged:
            where = f"{last_good} (step {int(last_good.name[5:])})" if last_good else "none was written yet"
            raise LossDiverged(
                f"recovery loss became {bad if bad is not None else 'NaN or inf (on another process)'} at step {step}; "
                f"training stopped. Last good checkpoint: {where}. Lower --lr (now {s.lr:g}) and resume or restart"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss, tokens


def _resume(model, optimizer, ckpt_dir: Path | None, s: RecoverSettings, data: RecoveryData, device,
            result: TrainResult) -> int:
    """Model, optimizer and result as the latest checkpoint in `ckpt_dir` left them; the step to go on from."""
    last = latest_checkpoint(ckpt_dir)
    if last is None:
        raise UserError(f"--resume: no checkpoint in {ckpt_dir}; run without --resume to start afresh")
    state = check_resumable(last, s, data.sha256)
    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, _tensors(last / ADAPTER_WEIGHTS, "adapter weights", device))
    if (last / PARAMS_FILE).exists() or direct_parameters(model):
        _load_direct(model, last / PARAMS_FILE)
    with reading(last / OPTIMIZER_FILE, "optimizer state", DAMAGED_FIX):
        _load_optimizer(optimizer, _tensors(last / OPTIMIZER_FILE, "optimizer state", device))
    result.resumed_from = state["step"]
    result.train_s = _trained_seconds(last, state)
    result.losses = list(state.get("losses", []))
    result.curve = list(state.get("curve", []))
    return state["step"]


def train(
    model,
    data: RecoveryData,
    s: RecoverSettings,
    ckpt_dir: Path | None = None,
    save_every: int = 0,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    teacher: Teacher | None = None,
    curve_every: int = 0,
) -> TrainResult:
    """Train the trainable parameters of `model` (a PeftModel or a model with direct
    parameters enabled) on `data.train` for the resolved number of steps.

    `save_every` > 0 writes a checkpoint every that many steps (and at the end) into
    `ckpt_dir`; `resume` continues from its latest checkpoint. `stop_after` ends the run
    after that step (as if it were killed there), for tests and time-boxed runs.
    `curve_every` > 0 scores the held-out windows every that many steps (result.curve).
    """
    if s.loss != "lm" and teacher is None:
        raise UserError(f"--recover-loss {s.loss} needs the dense teacher model; give --teacher PATH")
    device = next(p for p in model.parameters() if p.requires_grad).device
    procs = processes()
    if s.grad_accum % procs.world:
        raise UserError(f"{procs.world} processes do not divide the global batch of --grad-accum {s.grad_accum} "
                        f"micro-batches of {s.batch_size}; give --grad-accum a multiple of {procs.world} "
                        "(--batch-size times --grad-accum is the global batch) or launch fewer processes")
    n_steps = total_steps(s, len(data.train))
    optimizer = torch.optim.AdamW(param_groups(model, s), lr=s.lr, weight_decay=s.weight_decay)
    loop = _Loop(model, optimizer, data, s, teacher, n_steps, procs, device, [p for p in model.parameters() if p.requires_grad])
    meta = {"settings": s.to_dict(), "data_sha256": data.sha256, "total_steps": n_steps}
    result = TrainResult(steps=n_steps)
    start = _resume(model, optimizer, ckpt_dir, s, data, device, result) if resume else 0
    model.train()
    last_good = latest_checkpoint(ckpt_dir) if ckpt_dir else None
    bar = tqdm(range(start, n_steps), desc=f"recover {'+'.join(s.trained)} ({s.loss})",
               disable=not progress or not procs.main, initial=start, total=n_steps)
    before_s, t0 = result.train_s, time.perf_counter()
    try:
        for step in bar:
            step_loss, tokens = loop.step(step, last_good)
            result.losses.append(step_loss)
            result.tokens += tokens
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{result.tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
            done = step + 1
            if curve_every > 0 and (done % curve_every == 0 or done == n_steps):
                result.curve.append([done, _heldout_ppl(model, data)])
                model.train()
            if ckpt_dir is not None and save_every > 0 and (done % save_every == 0 or done == n_steps):
                if procs.main:
                    last_good = save_checkpoint(ckpt_dir, model, optimizer, done,
                                                {**meta, "losses": result.losses, "curve": result.curve},
                                                train_s=before_s + time.perf_counter() - t0)
                else:
                    last_good = ckpt_dir / f"step-{done:06d}"
            if stop_after is not None and done >= stop_after:
                break
    finally:
        bar.close()
        model.eval()
        result.train_s = before_s + time.perf_counter() - t0
    return result
