"""HyWIA: hybrid-grained importance fused by attention, learned end to end.

Our reading of Liu et al., "Toward Adaptive Large Language Models Structured Pruning via
Hybrid-grained Weight Importance Assessment" (AAAI 2025, arXiv 2403.10799), whose method
section and code are not public to us:

- Granularities, per calibration sample, from the Taylor statistics estimation collects:
    coarse  C = |sum over the unit's weights of g*w|     (the group judged as one vector)
    fine    F = sum over the unit's weights of |g*w|      (first order, each weight judged alone)
              or of |g*w - (g*w)^2 / 2|                    (second order, SAAP's element form)
  Each goes through the indicator over samples (--indicator: mean + std by default) and is
  divided by its mean over the scope (--fusion-scope), so the two share one scale.
- Attention fusion, per layer and unit kind: each granularity's scores over that layer's
  units are summarised into a key (FEATURES of their distribution, standardised over every
  layer, kind and granularity); a learned query per kind attends over the two keys after a
  small shared projection, and a softmax gives the blend (alpha_coarse, alpha_fine). The fused
  score alpha_c C + alpha_f F, divided by the unit cost ** --cost-exponent and standardised
  in the scope, is the keep-score. Parameters: hidden x len(FEATURES) + kinds x hidden.
- End to end: with the model's weights frozen, the fusion parameters minimise the calibration
  loss (KL to the dense model, or LM loss) of the model under a soft keep-mask: the search
  picks the units the current keep-scores would remove at the target ratio, the threshold
  sits between the last unit taken and the first left, and each removable unit (a KV group,
  a query-head slot, an MLP alignment block) is kept by sigmoid((score - threshold) / T),
  T annealed geometrically. Masks multiply the input features of o_proj and down_proj, which
  is exactly what slicing does when a mask is 0. The learned keep-scores then go through the
  standard search and slicing like any method's.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from saap_edge.config import HywiaSettings, PruneSettings
from saap_edge.errors import UserError
from saap_edge.prune import importance as imp
from saap_edge.prune.estimate import only_grads_for
from saap_edge.prune.groups import ATTN, MLP, LayerShape, decoder_layers, output_proj, submodule, total_params
from saap_edge.prune.importance import Key, Scores
from saap_edge.prune.ranking import Ranking, weight_norm2
from saap_edge.prune.search import candidates, global_pool, take_lowest

GRANULARITIES = ("coarse", "fine")
FEATURES = ("log mean", "spread (std / mean)", "log peak (max / mean)", "top-10% share", "sample spread",
            "entropy")


# ---------------------------------------------------------------------------- granular scores


def granular_scores(st, s: PruneSettings, h: HywiaSettings) -> tuple[dict[str, Scores], dict[str, Scores]]:
    """Per granularity: per-sample scores [D, U] and per-unit scores [U] (after the indicator,
    divided by their mean over the scope)."""

    stats = st.taylor()
    per_sample = {
        "coarse": {k: v.double().abs() for k, v in st.only_kinds(stats.vector).items()},
        "fine": {k: v.double() for k, v in st.only_kinds(stats.first if h.fine == "first" else stats.element).items()},
    }
    norms = weight_norm2(st.model, st.shapes, st.layers, s.weight_norm, st.kinds) if s.indicator == "fluctuation" else {}
    unit = {}
    for g, scores in per_sample.items():
        raw = {k: imp.indicator(v, norms.get(k), s.indicator) for k, v in scores.items()}
        unit[g] = _normalise(raw, s.fusion_scope)
    return per_sample, unit


def _normalise(scores: Scores, scope: str) -> Scores:
    """Each score divided by the mean of its scope (one positive constant per scope, so any
    later standardisation in that scope sees the same order and z-scores)."""
    out: Scores = {}
    for keys in imp.group_keys(scores, scope).values():
        mean = float(torch.cat([scores[k].reshape(-1) for k in keys]).double().mean())
        mean = mean if mean > 0 and math.isfinite(mean) else 1.0
        for k in keys:
            out[k] = scores[k].double() / mean
    return out


def features(unit: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
    """FEATURES of one layer-and-kind's scores of one granularity: unit [U] (normalised),
    per_sample [D, U] (raw)."""
    u = unit.double().clamp_min(0)
    mean = u.mean().clamp_min(1e-30)
    top = max(1, math.ceil(0.1 * u.numel()))
    share = u / u.sum().clamp_min(1e-30)
    entropy = -(share * share.clamp_min(1e-30).log()).sum() / math.log(max(u.numel(), 2))
    ps = per_sample.double()
    sample_spread = (ps.std(0, unbiased=False) / ps.mean(0).abs().clamp_min(1e-30)).mean()
    return torch.stack([mean.log(), u.std(unbiased=False) / mean, (u.max() / mean).log(),
                        u.topk(top).values.sum() / u.sum().clamp_min(1e-30), sample_spread, entropy])


def keys_of(per_sample: dict[str, Scores], unit: dict[str, Scores]) -> dict[Key, torch.Tensor]:
    """Key [granularity, feature] per (layer, kind), each feature standardised over every layer,
    kind and granularity."""
    raw = {k: torch.stack([features(unit[g][k], per_sample[g][k]) for g in GRANULARITIES]) for k in unit["coarse"]}
    flat = torch.cat(list(raw.values()))
    mean, std = flat.mean(0), flat.std(0, unbiased=False).clamp_min(1e-12)
    return {k: ((v - mean) / std).float() for k, v in raw.items()}


# ---------------------------------------------------------------------------- attention fusion


class AttentionFusion(nn.Module):
    """Blend weights per (layer, kind): softmax over granularities of q_kind . tanh(W key_g) / sqrt(H).
    The queries start at zero, so the first blend is 50/50 everywhere."""

    def __init__(self, kinds: tuple[str, ...], n_features: int, hidden: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.kinds = list(kinds)
        self.project = nn.Parameter(torch.randn(hidden, n_features, generator=gen) / math.sqrt(n_features))
        self.queries = nn.Parameter(torch.zeros(len(kinds), hidden))

    def forward(self, keys: dict[Key, torch.Tensor]) -> dict[Key, torch.Tensor]:
        scale = 1 / math.sqrt(self.project.shape[0])
        out = {}
        for key, k in keys.items():
            q = self.queries[self.kinds.index(key[1])]
            logits = torch.tanh(k @ self.project.T) @ q * scale  # one logit per granularity
            out[key] = torch.softmax(logits, dim=0)
        return out


def fixed_blend(keys: dict[Key, torch.Tensor], blend: str) -> dict[Key, torch.Tensor]:
    weights = {"fixed": (0.5, 0.5), "coarse": (1.0, 0.0), "fine": (0.0, 1.0)}[blend]
    return {k: torch.tensor(weights, dtype=torch.float32) for k in keys}


def keep_scores(unit: dict[str, Scores], blend: dict[Key, torch.Tensor], costs, s: PruneSettings) -> Scores:
    """Fused keep-scores: blend of the normalised granular scores, over cost ** exponent,
    standardised in the scope (differentiable in the blend)."""
    raw = {k: (blend[k][0].double() * unit["coarse"][k] + blend[k][1].double() * unit["fine"][k])
           / costs[k] ** s.cost_exponent for k in unit["coarse"]}
    return imp.standardize(raw, s.fusion_scope)


# ---------------------------------------------------------------------------- soft keep-mask


class SoftMask:
    """Per-unit keep-masks applied as forward pre-hooks that scale the input features of o_proj
    (per query head) and down_proj (per channel); a mask of 0 is what slicing does."""

    def __init__(self, model: nn.Module, shapes: list[LayerShape], layers: list[int]):
        self.shapes, self.on = shapes, True
        self.masks: dict[int, dict[str, torch.Tensor]] = {}
        blocks = decoder_layers(model)
        self.handles = []
        for i in layers:
            for kind in (ATTN, MLP):
                module = submodule(blocks[i], output_proj(kind))
                self.handles.append(module.register_forward_pre_hook(self._hook(i, kind)))

    def _hook(self, layer: int, kind: str):
        def hook(module, args):
            mask = self.masks.get(layer, {}).get(kind)
            if not self.on or mask is None:
                return None
            x = args[0]
            per_feature = mask.repeat_interleave(self.shapes[layer].head_dim) if kind == ATTN else mask
            return (x * per_feature.to(device=x.device, dtype=x.dtype),)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def soft_masks(keep: Scores, shapes: list[LayerShape], costs, total: int, s: PruneSettings, temperature: float,
               modules: bool = False) -> tuple[dict[int, dict[str, torch.Tensor]], float]:
    """Per layer: keep-masks of its query heads (ATTN) and MLP channels (MLP), and the threshold.

    The search's candidates at the current (detached) scores decide which units are removable
    and which the plan would take; a candidate's score is the mean of its units' keep-scores
    (as the search scores it), differentiable; candidates the layer cap keeps out stay at 1."""
    detached = {k: v.detach() for k, v in keep.items()}
    cands = candidates(detached, shapes, costs, s.align, modules)
    target = int(round(s.ratio * total))
    pool = global_pool(cands, target, shapes, costs, s.layer_cap)
    chosen = set(take_lowest(pool, target, shapes, costs))  # what search_global takes, from the pool computed once
    taken = [c.score for c in chosen]
    left = [c.score for c in pool if c not in chosen]
    hi = max(taken) if taken else min(left) - 1.0
    lo = min(left) if left else hi + 1.0
    threshold = (hi + lo) / 2
    in_pool = set(pool)
    masks: dict[int, dict[str, torch.Tensor]] = {}
    for c in cands:
        if c not in in_pool:
            continue
        shape = shapes[c.layer]
        layer = masks.setdefault(c.layer, {ATTN: torch.ones(shape.n_heads, dtype=torch.float64),
                                           MLP: torch.ones(shape.ffn, dtype=torch.float64)})
        units = torch.tensor(c.units)
        m = torch.sigmoid((keep[(c.layer, c.kind)][units].mean() - threshold) / temperature)
        if c.kind == ATTN:
            heads = torch.arange(c.units[0] * shape.n_rep, (c.units[0] + 1) * shape.n_rep)
        else:
            heads = units
        target_kind = MLP if c.kind == MLP else ATTN
        factor = torch.ones_like(layer[target_kind]).index_put((heads,), m.expand(len(heads)))
        layer[target_kind] = layer[target_kind] * factor
    return masks, threshold


# ---------------------------------------------------------------------------- learning


@contextmanager
def _masked(model, shapes, layers):
    mask = SoftMask(model, shapes, layers)
    try:
        yield mask
    finally:
        mask.remove()


def _loss(model, batch: torch.Tensor, mask: SoftMask, h: HywiaSettings) -> torch.Tensor:
    if h.loss == "lm":
        return model(input_ids=batch, labels=batch).loss
    mask.on = False
    with torch.no_grad():
        teacher = F.log_softmax(model(input_ids=batch).logits.float(), dim=-1)
    mask.on = True
    student = F.log_softmax(model(input_ids=batch).logits.float(), dim=-1)
    return F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")


def learn_blend(st, s: PruneSettings, h: HywiaSettings, unit: dict[str, Scores], keys: dict[Key, torch.Tensor],
                progress: bool = True) -> tuple[AttentionFusion, list[dict]]:
    """Fit the fusion parameters end to end; returns them and the curve (loss per step)."""
    model, samples = st.model, st.samples
    fusion = AttentionFusion(st.kinds, len(FEATURES), h.hidden, s.seed)
    optimizer = torch.optim.Adam(fusion.parameters(), lr=h.lr)
    total = total_params(model)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(s.seed)
    order = torch.randperm(samples.shape[0], generator=gen)
    per_epoch = samples.shape[0] // h.batch
    curve = []
    was_training = model.training
    model.eval()
    try:
        with only_grads_for(model, []), _masked(model, st.shapes, st.layers) as mask:
            for step in tqdm(range(h.steps), desc="hywia fusion", disable=not progress):
                temperature = h.t_start * (h.t_end / h.t_start) ** (step / max(h.steps - 1, 1))
                blend = fusion(keys)
                keep = keep_scores(unit, blend, st.costs, s)
                mask.masks, threshold = soft_masks(keep, st.shapes, st.costs, total, s, temperature, "modules" in s.unit_set)
                start = (step % per_epoch) * h.batch
                batch = samples[order[start : start + h.batch]].to(device)
                loss = _loss(model, batch, mask, h)
                if not torch.isfinite(loss):
                    raise UserError(f"HyWIA's fusion loss is {loss.item()} at step {step + 1} of {h.steps}; lower "
                                    f"--hywia-lr ({h.lr}) or use --dtype float32")
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                curve.append({"step": step + 1, "loss": loss.item(), "temperature": temperature, "threshold": threshold})
    finally:
        model.train(was_training)  # only_grads_for has left no gradient on any model weight
    return fusion, curve


def rank_hywia(st, s: PruneSettings, h: HywiaSettings | None = None):
    """The HyWIA ranking (see the module docstring): a Ranking with the blend in its record."""
    h = (h or HywiaSettings()).validate(st.samples.shape[0])
    per_sample, unit = granular_scores(st, s, h)
    keys = keys_of(per_sample, unit)
    t0 = time.perf_counter()
    curve: list[dict] = []
    if h.blend == "learned":
        fusion, curve = learn_blend(st, s, h, unit, keys, st.progress)
        with torch.no_grad():
            blend = {k: v.detach() for k, v in fusion(keys).items()}
    else:
        blend = fixed_blend(keys, h.blend)
    keep = {k: v.detach() for k, v in keep_scores(unit, blend, st.costs, s).items()}
    if any(not torch.isfinite(v).all() for v in keep.values()):
        raise UserError("HyWIA's fused scores are not finite; use --dtype float32 or other calibration text")
    record = {"blend_mode": h.blend, "fine": h.fine, "granularities": list(GRANULARITIES),
              "blend": [{"layer": k[0], "kind": k[1], "coarse": float(v[0]), "fine": float(v[1])}
                        for k, v in sorted(blend.items())]}
    stats = st.taylor()
    details = {"calib_loss": sum(stats.losses) / len(stats.losses),
               "hywia": {**record, "settings": h.to_dict(), "curve": curve, "learn_s": time.perf_counter() - t0}}
    return Ranking(keep, "global", details, cap=s.layer_cap, record=record)
