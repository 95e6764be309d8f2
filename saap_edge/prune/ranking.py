"""What every pruning method reads and returns: the calibration statistics a model and sample set
give (collected once, on first use, and shared by the methods that read them), the Ranking each
method returns, and the weight norms several methods share."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from saap_edge.prune.estimate import collect_inputs, collect_taylor
from saap_edge.prune.groups import HEAD, MEMBERS, LayerShape, decoder_layers, kind_members, output_proj, scored_kinds, submodule, unit_costs, unit_reduce
from saap_edge.prune.importance import Scores


class Statistics:
    """Calibration statistics of one model and sample set, collected once on first use, so
    that methods (and benchmark variants) sharing a statistic share its cost."""

    def __init__(self, model: nn.Module, samples, shapes: list[LayerShape], layers: list[int], progress: bool = True,
                 heads: bool = False):
        self.model, self.samples, self.shapes, self.layers, self.progress = model, samples, shapes, layers, progress
        self.heads = heads  # score query heads (HEAD units) too
        self.kinds = scored_kinds(heads)
        self.costs = unit_costs(model, shapes, layers)
        self._taylor = None
        self._inputs = None

    def use_heads(self, heads: bool) -> None:
        """Whether the next rankings score query heads (HEAD units). Statistics collected without
        them are collected again when they are wanted; rankings without them never see them."""
        self.heads = self.heads or heads
        self.kinds = scored_kinds(heads)

    def only_kinds(self, scores: Scores) -> Scores:
        """`scores` restricted to the unit kinds the ranking uses."""
        return {k: v for k, v in scores.items() if k[1] in self.kinds}

    def taylor(self, with_param_mix: bool = False):
        missing_heads = self.heads and self._taylor is not None and not any(k[1] == HEAD for k in self._taylor.vector)
        if self._taylor is None or (with_param_mix and not self._taylor.param_mix) or missing_heads:
            with_param_mix = with_param_mix or bool(self._taylor and self._taylor.param_mix)
            self._taylor = collect_taylor(self.model, self.samples, self.shapes, self.layers, with_param_mix,
                                          self.progress, self.heads)
        return self._taylor

    def use_taylor(self, stats) -> None:
        """Rank from Taylor statistics collected elsewhere (AdaPruner's pooled windows)."""
        self._taylor = stats

    def inputs(self):
        if self._inputs is None:
            self._inputs = collect_inputs(self.model, self.samples, self.layers, self.progress)
        return self._inputs


@dataclass
class Ranking:
    keep: Scores
    allocation: str  # "global" or "uniform"
    details: dict
    cap: float = 1.0  # global allocation: most of a layer's units (per kind) one plan may remove
    record: dict = field(default_factory=dict)  # what the plan keeps about the ranking (HyWIA's blend)


def weight_norm2(model: nn.Module, shapes: list[LayerShape], layers: list[int], extent: str, kinds=tuple(MEMBERS)) -> Scores:
    """||W_unit||^2 per unit: over every coupled weight ("group") or the output projection's
    columns only ("out", FLAP's choice)."""
    blocks = decoder_layers(model)
    out: Scores = {}
    for i in layers:
        for kind in kinds:
            paths = [m for m in kind_members(kind) if extent == "group" or m[0] == output_proj(kind)]
            total = 0
            for path, axis, _ in paths:
                w = submodule(blocks[i], path).weight.detach().double()
                total = total + unit_reduce(w * w, axis, shapes[i].n_units(kind)).cpu()
            out[(i, kind)] = total
    return out
