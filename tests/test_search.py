"""Search: share of total parameters, layer constraints, ranking direction, determinism."""

import pytest
import torch

from conftest import tiny_llama
from saap_edge.config import PruneSettings
from saap_edge.errors import UserError
from saap_edge.prune import prune
from saap_edge.prune.groups import ATTN, HEAD, MLP, MODULE, discover, total_params, unit_costs
from saap_edge.prune.slicing import apply_plan
from saap_edge.prune.search import search


def _scores(shapes, layers, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {(i, k): torch.rand(shapes[i].n_units(k), generator=g, dtype=torch.float64) for i in layers for k in (ATTN, MLP)}


@pytest.mark.parametrize("allocation", ["global", "uniform"])
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.35])
def test_plan_reaches_ratio_under_constraints(allocation, ratio):
    model = tiny_llama(n_heads=8, n_kv=4, layers=6, ffn=160)
    shapes, layers = discover(model), [1, 2, 3, 4]
    total = total_params(model)
    costs = unit_costs(model, shapes, layers)
    plan = search(_scores(shapes, layers), shapes, costs, total, ratio, allocation, align=32)
    removed = sum(
        (s.n_kv - len(lp.kv_groups)) * costs.get((i, ATTN), 0) + (s.ffn - len(lp.channels)) * costs.get((i, MLP), 0)
        for i, (s, lp) in enumerate(zip(shapes, plan.layers))
    )
    assert removed >= ratio * total - 1
    biggest_step = max(costs[(i, MLP)] * 32 for i in layers) + max(costs[(i, ATTN)] for i in layers)
    if allocation == "global":
        assert removed - ratio * total <= biggest_step
    for i, lp in enumerate(plan.layers):
        assert len(lp.kv_groups) >= 1 and len(lp.channels) >= 32 and len(lp.channels) % 32 == 0
        if i not in layers:
            assert len(lp.kv_groups) == 4 and len(lp.channels) == 160


def test_layer_cap_bounds_each_layer_and_yields_when_the_ratio_needs_it():
    model = tiny_llama(n_kv=4, layers=6, ffn=320)
    shapes, layers = discover(model), [1, 2, 3, 4]
    costs, total = unit_costs(model, shapes, layers), total_params(model)
    scores = _scores(shapes, layers)
    scores[(2, MLP)] -= 10.0  # layer 2's channels look least important by far
    free = search(scores, shapes, costs, total, 0.15, "global", 32)
    capped = search(scores, shapes, costs, total, 0.15, "global", 32, cap=0.5)
    assert len(free.layers[2].channels) == 32  # uncapped, layer 2 is stripped to one block
    assert all(len(lp.channels) >= 160 and len(lp.kv_groups) >= 2 for lp in capped.layers)
    # a ratio the cap cannot reach still succeeds: the cap rises only as far as needed
    high = search(scores, shapes, costs, total, 0.4, "global", 32, cap=0.5)
    assert min(len(lp.channels) for lp in high.layers) < 160


def test_global_search_removes_the_lowest_scores_first():
    model = tiny_llama(layers=4)
    shapes, layers = discover(model), [1, 2]
    scores = _scores(shapes, layers)
    scores[(2, ATTN)][:] = -1.0  # layer 2's KV groups are the least important
    plan = search(scores, shapes, unit_costs(model, shapes, layers), total_params(model), 0.05, "global", 32)
    assert len(plan.layers[2].kv_groups) < 4 and len(plan.layers[1].kv_groups) == 4


def test_uniform_search_prunes_every_layer_alike():
    model = tiny_llama(n_kv=4, layers=6, ffn=256)
    shapes, layers = discover(model), [1, 2, 3, 4]
    plan = search(_scores(shapes, layers), shapes, unit_costs(model, shapes, layers), total_params(model), 0.3, "uniform", 32)
    assert len({(len(plan.layers[i].kv_groups), len(plan.layers[i].channels)) for i in layers}) == 1


def test_infeasible_ratio_is_refused():
    model = tiny_llama(layers=4)
    shapes, layers = discover(model), [1, 2]
    with pytest.raises(UserError, match="outside"):
        search(_scores(shapes, layers), shapes, unit_costs(model, shapes, layers), total_params(model), 0.9, "global", 32)


@pytest.mark.parametrize("method", ["saap", "llm-pruner", "flap", "wanda-sp", "magnitude", "random"])
def test_plans_are_deterministic(method):
    model = tiny_llama(layers=6, ffn=256)
    samples = torch.randint(0, 512, (4, 16))
    s = PruneSettings(method=method, ratio=0.25, keep_first=1, keep_last=1)
    a, b = prune(model, samples, s, progress=False), prune(model, samples, s, progress=False)
    assert a.plan.layers == b.plan.layers
    assert a.plan.params["removed_share"] >= 0.25


def test_saap_direction_setting_reverses_the_choice():
    model = tiny_llama(layers=6, ffn=256)
    samples = torch.randint(0, 512, (4, 16))
    paper = dict(ratio=0.1, keep_first=1, keep_last=1, indicator="fluctuation", fusion_scope="global")
    high = prune(model, samples, PruneSettings(direction="high", **paper), progress=False)
    low = prune(model, samples, PruneSettings(direction="low", **paper), progress=False)
    assert high.plan.layers != low.plan.layers


def test_random_plan_depends_on_seed():
    model = tiny_llama(layers=6, ffn=256)
    a = prune(model, None, PruneSettings(method="random", ratio=0.3, keep_first=1, keep_last=1, seed=0), progress=False)
    b = prune(model, None, PruneSettings(method="random", ratio=0.3, keep_first=1, keep_last=1, seed=1), progress=False)
    assert a.plan.layers != b.plan.layers


def test_cost_exponent_weighs_units_by_their_parameter_cost():
    from saap_edge.prune import statistics
    from saap_edge.prune.methods import rank_saap

    model = tiny_llama(n_heads=8, n_kv=8, layers=6, ffn=256)
    st = statistics(model, torch.randint(0, 512, (4, 16)), PruneSettings(keep_first=1, keep_last=1), progress=False)
    assert st.costs[(2, ATTN)] > 10 * st.costs[(2, MLP)]  # a head weighs more than ten channels

    def channels_above_weakest_head(exponent):
        keep = rank_saap(st, PruneSettings(cost_exponent=exponent)).keep
        weakest = min(float(keep[(i, ATTN)].min()) for i in st.layers)
        return sum(int((keep[(i, MLP)] > weakest).sum()) for i in st.layers)

    # per parameter, heads look cheaper relative to channels than per unit
    assert channels_above_weakest_head(1.0) > channels_above_weakest_head(0.0)


def _scores_with_heads(shapes, layers, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {(i, k): torch.rand(shapes[i].n_units(k), generator=g, dtype=torch.float64)
            for i in layers for k in (ATTN, MLP, HEAD)}


@pytest.mark.parametrize("modules", [False, True])
@pytest.mark.parametrize("ratio", [0.15, 0.3, 0.4])
def test_head_slots_and_modules_reach_the_ratio_exactly_counted(modules, ratio):
    """The parameters the plan's slim model really lost reach the target and overshoot it by
    at most one candidate: a KV group that leaves after some head slots is counted with the
    heads it still had, a module with its norm. Every kept group keeps as many heads as the others."""
    model = tiny_llama(n_heads=8, n_kv=4, layers=6, ffn=160)
    shapes, layers = discover(model), [1, 2, 3, 4]
    total = total_params(model)
    costs = unit_costs(model, shapes, layers)
    scores = _scores_with_heads(shapes, layers)
    scores[(2, ATTN)] -= 10.0  # layer 2's attention looks least important by far
    plan = search(scores, shapes, costs, total, ratio, "global", align=32, modules=modules)
    removed = total - total_params(apply_plan(model, plan))
    biggest_step = max(costs[(i, MLP)] * 32 for i in layers) + max(costs[(i, ATTN)] + costs[(i, MODULE)] for i in layers)
    assert ratio * total - 1 <= removed <= ratio * total + biggest_step
    assert any(lp.heads is not None for lp in plan.layers)  # head slots were used
    for i, lp in enumerate(plan.layers):
        lp.check(i)
        assert len(lp.channels) >= 32 and len(lp.channels) % 32 == 0
    assert plan.layers[2].attention_free == modules  # groups alone always leave one


def test_heads_and_modules_need_a_global_method():
    with pytest.raises(UserError, match="--units"):
        PruneSettings(method="llm-pruner", units="groups,heads").validate()
    with pytest.raises(UserError, match="--units"):
        PruneSettings(units="heads").validate()
    model = tiny_llama(layers=4)
    shapes, layers = discover(model), [1, 2]
    with pytest.raises(UserError, match="global allocation"):
        search(_scores_with_heads(shapes, layers), shapes, unit_costs(model, shapes, layers), total_params(model), 0.1, "uniform", 32)


@pytest.mark.parametrize("method", ["saap", "flap"])
def test_methods_rank_query_heads_from_calibration(method):
    model = tiny_llama(n_heads=8, n_kv=2, layers=6, ffn=256)
    samples = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    # per-kind standardisation: heads compete with groups and channels on one scale
    s = PruneSettings(method=method, ratio=0.3, keep_first=1, keep_last=1, units="groups,heads,modules",
                      fusion_scope="global").validate()
    result = prune(model, samples, s, progress=False)
    assert any(lp.heads is not None for lp in result.plan.layers)
    assert result.plan.settings["units"] == "groups,heads,modules"
    assert result.model(samples).logits.isfinite().all()


def test_shared_statistics_with_heads_leave_group_rankings_unchanged():
    from saap_edge.prune import statistics

    model = tiny_llama(n_heads=8, n_kv=2, layers=6, ffn=256)
    samples = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    groups = PruneSettings(ratio=0.3, keep_first=1, keep_last=1).validate()
    heads = PruneSettings(ratio=0.3, keep_first=1, keep_last=1, units="groups,heads", fusion_scope="global").validate()
    stats = statistics(model, samples, groups, progress=False)
    before = prune(model, samples, groups, progress=False, stats=stats).plan
    prune(model, samples, heads, progress=False, stats=stats)  # collects the per-head statistics too
    assert stats.heads
    assert prune(model, samples, groups, progress=False, stats=stats).plan.layers == before.layers


def test_auto_units_take_head_slots_only_when_the_refit_runs():
    assert PruneSettings().validate().units == "groups,heads"
    assert PruneSettings().validate(reconstructs=False).units == "groups"
    assert PruneSettings(method="llm-pruner").validate().units == "groups"
