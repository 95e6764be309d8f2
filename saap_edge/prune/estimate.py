"""Estimation: run the calibration samples through the model and collect per-unit statistics.

Gradient statistics (Taylor scores) are taken one sample at a time. Each projection weight of
a prunable layer carries a post-accumulate-grad hook that folds its gradient into per-unit
sums (fp32) and frees it at once, so no full copy of the gradients is ever held: peak memory
is the model, the activations of one sample and one parameter's gradient.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from saap_edge.distributed import processes
from saap_edge.errors import UserError
from saap_edge.prune.groups import HEAD, MEMBERS, OUTPUT_PROJ, LayerShape, decoder_layers, submodule, unit_reduce
from saap_edge.prune.importance import Key, Scores


@dataclass
class TaylorStats:
    """Per-sample Taylor sums. vector[k][d] is the signed sum of g*w (I_V is its magnitude);
    element[k][d] the sum of |g*w - (g*w)^2/2|; first[k][d] the sum of |g*w| (first-order
    element-wise, HyWIA's fine granularity). param_mix[k] is LLM-Pruner's element-wise score
    over the whole set (mean gradient, mean squared gradient), only when asked for."""

    vector: Scores
    element: Scores
    first: Scores = field(default_factory=dict)
    param_mix: Scores = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)


@contextmanager
def only_grads_for(model: nn.Module, params: list[nn.Parameter]):
    """Gradients only for `params` during the block; the old flags come back afterwards."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
            p.grad = None


def _members(model: nn.Module, shapes: list[LayerShape], layers: list[int], heads: bool = False):
    """(name, weight, axis, targets) for every coupled projection of the given layers; targets
    are the (key, n_units) its gradient folds into: its unit kind, and the query heads (HEAD)
    for q_proj / o_proj when `heads`."""
    blocks = decoder_layers(model)
    for i in layers:
        for kind, members in MEMBERS.items():
            for path, axis, part in members:
                weight = submodule(blocks[i], path).weight
                targets = [((i, kind), shapes[i].n_units(kind))]
                if heads and part == "q":
                    targets.append(((i, HEAD), shapes[i].n_heads))
                yield f"layer {i} {path}", weight, axis, targets


class _TaylorHooks:
    """Folds each gradient into per-unit sums for sample `self.sample`, then frees it."""

    def __init__(self, n_samples: int, with_mix: bool):
        self.n_samples, self.with_mix, self.sample = n_samples, with_mix, 0
        self.vector: Scores = {}
        self.element: Scores = {}
        self.first: Scores = {}
        self.grad_sum: dict[int, torch.Tensor] = {}
        self.grad_sq: dict[int, torch.Tensor] = {}
        self.bad: str | None = None

    def make(self, name: str, axis: str, targets: list[tuple[Key, int]]):
        for key, n_units in targets:
            for store in (self.vector, self.element, self.first):
                store.setdefault(key, torch.zeros(self.n_samples, n_units, dtype=torch.float32))

        def hook(param: nn.Parameter) -> None:
            grad = param.grad.float()
            param.grad = None
            if self.bad is None and not torch.isfinite(grad).all():
                self.bad = name
            gw = grad * param.detach().float()
            element = (gw - 0.5 * gw * gw).abs()
            for key, n_units in targets:
                self.vector[key][self.sample] += unit_reduce(gw, axis, n_units).cpu()
                self.element[key][self.sample] += unit_reduce(element, axis, n_units).cpu()
                self.first[key][self.sample] += unit_reduce(gw.abs(), axis, n_units).cpu()
            if self.with_mix:  # LLM-Pruner param_mix needs whole-set element-wise gradients
                pid = id(param)
                self.grad_sum[pid] = self.grad_sum.get(pid, 0) + grad
                self.grad_sq[pid] = self.grad_sq.get(pid, 0) + grad * grad

        return hook


@torch.no_grad()
def _locate_nonfinite(model: nn.Module, ids: torch.Tensor) -> str:
    """Where NaN/inf comes from: a weight that holds it, else the first layer that outputs it."""
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            return f"NaN or inf in the weight {name}; the model file is damaged"
    found: list[int] = []
    hooks = [
        block.register_forward_hook(lambda m, a, out, i=i: found.append(i) if not torch.isfinite(out[0] if isinstance(out, tuple) else out).all() else None)
        for i, block in enumerate(decoder_layers(model))
    ]
    try:
        model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    where = f"decoder layer {found[0]} is the first to output NaN or inf" if found else "the logits overflow"
    return f"{where}; try --dtype float32 or other calibration text"


def backward_each(model: nn.Module, samples: torch.Tensor, hooked: list[tuple[nn.Parameter, object]], set_sample,
                  bad, what: str, desc: str, progress: bool) -> list[float]:
    """Forward + backward each sample [D, T] with `hooked` (weight, post-accumulate-grad hook)
    registered and only those weights taking gradients; `set_sample(d)` runs before sample d,
    `bad()` names a weight whose gradient was not finite. Returns the losses."""
    device = next(model.parameters()).device
    procs = processes()  # several processes: this one takes samples d = rank, rank + N, ...
    if samples.shape[0] < procs.world:
        raise UserError(f"{samples.shape[0]} {what}s for {procs.world} processes: each process needs at least one; "
                        "give more samples or launch fewer processes")
    handles, losses, error = [], torch.zeros(samples.shape[0], dtype=torch.float64), None
    with only_grads_for(model, [w for w, _ in hooked]):
        try:
            for weight, hook in hooked:
                handles.append(weight.register_post_accumulate_grad_hook(hook))
            for d in tqdm(procs.share(samples.shape[0]), desc=desc, disable=not progress or not procs.main):
                set_sample(d)
                ids = samples[d : d + 1].to(device)
                loss = model(input_ids=ids, labels=ids).loss
                if not torch.isfinite(loss):
                    raise UserError(f"loss is {loss.item()} on {what} {d}: {_locate_nonfinite(model, ids)}")
                loss.backward()
                losses[d] = loss.item()
                if bad():
                    raise UserError(f"NaN or inf in the gradients of {bad()} ({what} {d}); try --dtype float32 or other "
                                    "calibration text")
        except UserError as exc:
            error = exc
        finally:
            for h in handles:
                h.remove()
    procs.agree(error)
    procs.sum_(losses)
    return losses.tolist()


def _param_mix(model, shapes, layers, hooks: _TaylorHooks, n: int) -> Scores:
    """LLM-Pruner's param_mix: sum |w * g_mean - w^2 * mean(g^2) / 2| over each unit's weights."""
    scores: Scores = {}
    for _, weight, axis, [(key, n_units)] in _members(model, shapes, layers):
        w = weight.detach().float()
        g_mean, g2_mean = hooks.grad_sum.pop(id(weight)) / n, hooks.grad_sq.pop(id(weight)) / n
        salience = (w * g_mean - 0.5 * w * w * g2_mean).abs()
        scores[key] = scores.get(key, 0) + unit_reduce(salience, axis, n_units).double().cpu()
    return scores


def collect_taylor(
    model: nn.Module,
    samples: torch.Tensor,
    shapes: list[LayerShape],
    layers: list[int],
    with_param_mix: bool = False,
    progress: bool = True,
    heads: bool = False,
) -> TaylorStats:
    """Forward + backward each calibration sample [D, T] and gather per-unit Taylor sums
    (per query head too when `heads`)."""
    hooks = _TaylorHooks(samples.shape[0], with_param_mix)
    hooked = [(weight, hooks.make(name, axis, targets)) for name, weight, axis, targets in _members(model, shapes, layers, heads)]
    losses = backward_each(model, samples, hooked, lambda d: setattr(hooks, "sample", d), lambda: hooks.bad,
                           "calibration sample", "importance", progress)
    # several processes: each filled its own samples' rows (the rest are 0) -> the sum is the whole
    procs = processes()
    procs.sum_(*(t for store in (hooks.vector, hooks.element, hooks.first) for t in store.values()))
    procs.sum_(*hooks.grad_sum.values(), *hooks.grad_sq.values())
    mix = _param_mix(model, shapes, layers, hooks, samples.shape[0]) if with_param_mix else {}
    return TaylorStats(hooks.vector, hooks.element, hooks.first, mix, losses)


@torch.inference_mode()
def collect_inputs(
    model: nn.Module, samples: torch.Tensor, layers: list[int], progress: bool = True
) -> dict[Key, tuple[torch.Tensor, torch.Tensor, int]]:
    """Per input feature of each output projection (o_proj, down_proj): (sum x, sum x^2, tokens),
    accumulated in float64 over all calibration tokens. FLAP and Wanda-sp read these."""
    device = next(model.parameters()).device
    stats: dict[Key, list] = {}
    blocks = decoder_layers(model)

    def make(key: Key):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            entry = stats.setdefault(key, [0, 0, 0])
            entry[0] = entry[0] + x.sum(0).cpu()
            entry[1] = entry[1] + (x * x).sum(0).cpu()
            entry[2] += x.shape[0]

        return hook

    handles = [
        submodule(blocks[i], OUTPUT_PROJ[kind]).register_forward_pre_hook(make((i, kind)))
        for i in layers
        for kind in OUTPUT_PROJ
    ]
    procs = processes()
    try:
        for d in tqdm(procs.share(samples.shape[0]), desc="activations", disable=not progress or not procs.main):
            model(input_ids=samples[d : d + 1].to(device))
    finally:
        for h in handles:
            h.remove()
    if procs.parallel:  # every process sums every key (a process may have had no sample)
        for key in [(i, kind) for i in layers for kind in OUTPUT_PROJ]:
            width = submodule(blocks[key[0]], OUTPUT_PROJ[key[1]]).in_features
            entry = stats.setdefault(key, [torch.zeros(width, dtype=torch.float64)] * 2 + [0])
            sums = [torch.as_tensor(entry[0], dtype=torch.float64).clone(), torch.as_tensor(entry[1], dtype=torch.float64).clone(),
                    torch.tensor([float(entry[2])], dtype=torch.float64)]
            procs.sum_(*sums)
            stats[key] = [sums[0], sums[1], int(sums[2].item())]
    return {k: (v[0], v[1], v[2]) for k, v in stats.items()}
