"""Methods: SAAP and the baselines, each turning calibration statistics into keep-scores.

Every method returns a Ranking: keep-scores per (layer, kind) (higher = keep) and the
allocation the search uses. Baselines follow their papers within this framework:
- llm-pruner: Taylor importance summed over the coupled group (vectorize: |sum g*w| with the
  whole-set mean gradient; param_mix: sum |g*w - w^2 E[g^2]/2|), uniform ratio per layer;
- flap: fluctuation of each output projection's input feature (variance over tokens) times
  the squared column norm, standardised per module type, one global ranking (no bias
  compensation: LLaMA's o_proj / down_proj carry no bias to absorb it);
- wanda-sp: sum over the unit's output-projection columns of |W| x ||x_j||, uniform;
- magnitude: squared L2 norm of the unit's weights, uniform;
- random: seeded uniform scores, uniform.
"""

from __future__ import annotations

import torch

from saap_edge.config import METHOD_TABLE, METHODS, PruneSettings
from saap_edge.prune import importance as imp
from saap_edge.prune.groups import ATTN, HEAD, MEMBERS, decoder_layers, output_proj, submodule
from saap_edge.prune.hywia import rank_hywia
from saap_edge.prune.importance import Scores
from saap_edge.prune.ranking import Ranking, Statistics, weight_norm2


def rank_saap(st: Statistics, s: PruneSettings) -> Ranking:
    """SAAP: per-sample Taylor scores at two granularities, adaptive fusion (eq. 9), an
    indicator over samples (eq. 10 or a variant), optional cost weighting, standardisation
    (eq. 11) within the scope. Keep-score: higher keeps, except that `direction` high prunes
    the most volatile units first under the fluctuation indicator (the paper's wording)."""
    stats = st.taylor()
    iv = {k: v.abs() for k, v in st.only_kinds(stats.vector).items()}
    fused = imp.fuse(iv, st.only_kinds(stats.element), s.fusion, s.fusion_scope, log_term=False)
    norms = weight_norm2(st.model, st.shapes, st.layers, s.weight_norm, st.kinds) if s.indicator == "fluctuation" else {}
    raw = {k: imp.indicator(v, norms.get(k), s.indicator) / st.costs[k] ** s.cost_exponent for k, v in fused.items()}
    z = imp.standardize(raw, s.fusion_scope)
    flip = s.indicator == "fluctuation" and s.direction == "high"
    keep = {k: -v if flip else v for k, v in z.items()}
    return Ranking(keep, "global", {"calib_loss": sum(stats.losses) / len(stats.losses)}, cap=s.layer_cap)


def rank_llm_pruner(st: Statistics, s: PruneSettings) -> Ranking:
    mix = s.taylor == "param_mix"
    stats = st.taylor(with_param_mix=mix)
    if mix:
        keep = stats.param_mix
    else:  # |sum over the group of w * mean-gradient| = |mean over samples of the signed sums|
        keep = {k: v.double().mean(0).abs() for k, v in st.only_kinds(stats.vector).items()}
    return Ranking(keep, "uniform", {"calib_loss": sum(stats.losses) / len(stats.losses)})


def _output_columns(st: Statistics, feature) -> Scores:
    """Per-unit sum over the output projection's columns of feature(W, x-stats) (per column)."""
    blocks, shapes, inputs = decoder_layers(st.model), st.shapes, st.inputs()
    out: Scores = {}
    for i in st.layers:
        for kind in st.kinds:
            w = submodule(blocks[i], output_proj(kind)).weight.detach().double().cpu()
            per_column = feature(w, *inputs[(i, kind if kind != HEAD else ATTN)])
            out[(i, kind)] = per_column.reshape(shapes[i].n_units(kind), -1).sum(1)
    return out


def rank_flap(st: Statistics, s: PruneSettings) -> Ranking:

    def fluct(w, x_sum, x_sq, n):
        variance = (x_sq - x_sum * x_sum / n) / max(n - 1, 1)
        return variance * (w * w).sum(0)

    keep = imp.standardize(_output_columns(st, fluct), "global")
    return Ranking(keep, "global", {})


def rank_wanda_sp(st: Statistics, s: PruneSettings) -> Ranking:
    keep = _output_columns(st, lambda w, x_sum, x_sq, n: w.abs().sum(0) * x_sq.sqrt())
    return Ranking(keep, "uniform", {})


def rank_magnitude(st: Statistics, s: PruneSettings) -> Ranking:
    return Ranking(weight_norm2(st.model, st.shapes, st.layers, "group"), "uniform", {})


def rank_random(st: Statistics, s: PruneSettings) -> Ranking:
    gen = torch.Generator().manual_seed(s.seed)
    keep = {(i, k): torch.rand(st.shapes[i].n_units(k), generator=gen, dtype=torch.float64) for i in st.layers for k in MEMBERS}
    return Ranking(keep, "uniform", {})


RANKERS = {
    "saap": rank_saap,
    "llm-pruner": rank_llm_pruner,
    "flap": rank_flap,
    "wanda-sp": rank_wanda_sp,
    "magnitude": rank_magnitude,
    "random": rank_random,
    "hywia": rank_hywia,  # default HywiaSettings; compress passes its own (prune's `ranker`)
}
SEARCHED = {name for name, m in METHOD_TABLE.items() if m.searched}  # rank through a search, not one ranker
assert set(RANKERS) | SEARCHED == set(METHODS), "config.METHOD_TABLE and RANKERS must name the same methods"
