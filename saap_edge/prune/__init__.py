"""SAAP structured pruning: discovery -> estimation -> importance -> search -> slicing."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from saap_edge.config import PruneSettings
from saap_edge.errors import UserError
from saap_edge.prune.groups import discover, scored_kinds, total_params, unit_costs
from saap_edge.prune.methods import RANKERS
from saap_edge.prune.ranking import Statistics
from saap_edge.prune.plan import PrunePlan
from saap_edge.prune.search import candidates, check_feasible, search
from saap_edge.prune.slicing import apply_plan


@dataclass
class PruneResult:
    model: nn.Module
    plan: PrunePlan
    details: dict


def prunable_layers(n_layers: int, s: PruneSettings) -> list[int]:
    layers = list(range(s.keep_first, n_layers - s.keep_last))
    if not layers:
        raise UserError(
            f"no prunable layer: the model has {n_layers} layers and --keep-first {s.keep_first} "
            f"--keep-last {s.keep_last} keep them all; lower those settings"
        )
    return layers


def check_ratio(model: nn.Module, s: PruneSettings) -> None:
    """Fail fast, before any estimation, when --ratio cannot be reached under the constraints."""
    shapes = discover(model)
    layers = prunable_layers(len(shapes), s)
    free = [i for i in layers if shapes[i].n_kv == 0]
    if free:
        raise UserError(f"layer {free[0]} has no attention left (an attention-free layer of a pruned model); pruning "
                        "such layers again is not supported: keep them with --keep-first / --keep-last, or prune the dense model")
    zeros = {(i, k): torch.zeros(shapes[i].n_units(k)) for i in layers for k in scored_kinds("heads" in s.unit_set)}
    costs = unit_costs(model, shapes, layers)
    cands = candidates(zeros, shapes, costs, s.align, "modules" in s.unit_set)
    check_feasible(s.ratio, cands, total_params(model), shapes, costs)


def statistics(model: nn.Module, samples: torch.Tensor | None, s: PruneSettings, progress: bool = True) -> Statistics:
    """The lazily collected calibration statistics that `prune` ranks with (shareable)."""
    shapes = discover(model)
    return Statistics(model, samples, shapes, prunable_layers(len(shapes), s), progress, heads="heads" in s.unit_set)


def prune(
    model: nn.Module, samples: torch.Tensor | None, s: PruneSettings, progress: bool = True, stats: Statistics | None = None,
    ranker=None, slice_now: bool = True,
) -> PruneResult:
    """Rank units with `s.method` on the calibration samples [D, T], search, slice.
    `stats` lets several calls on the same model and samples share one estimation; `ranker`
    (stats, settings) -> Ranking replaces the method's default one (a method with settings of its own).
    `slice_now` False leaves the slicing to the caller (result.model None; the counts come from
    the slim model's sizes on the meta device): compress streams it layer by layer."""
    stats = stats or statistics(model, samples, s, progress)
    stats.use_heads("heads" in s.unit_set)
    ranking = (ranker or RANKERS[s.method])(stats, s)
    before = total_params(model)
    plan = search(ranking.keep, stats.shapes, stats.costs, before, s.ratio, ranking.allocation, s.align, ranking.cap,
                  modules="modules" in s.unit_set)
    slim = apply_plan(model, plan, device=None if slice_now else "meta")
    after = total_params(slim)
    slim = slim if slice_now else None
    plan.method, plan.ratio, plan.settings, plan.seed = s.method, s.ratio, s.to_dict(), s.seed
    plan.importance = ranking.record
    plan.params = {"before": before, "after": after, "removed_share": (before - after) / before}
    return PruneResult(slim, plan, ranking.details)
