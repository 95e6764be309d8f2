"""Discovery: coupled units under MHA and GQA, their index maps and parameter costs."""

import pytest
import torch

from conftest import tiny_llama
from saap_edge.prune.groups import ATTN, MLP, MEMBERS, discover, member_index, submodule, unit_cost, unit_reduce
from saap_edge.prune.plan import PrunePlan
from saap_edge.prune.slicing import apply_plan


@pytest.mark.parametrize("n_heads,n_kv", [(8, 8), (8, 4), (8, 2), (8, 1)])
def test_shapes_discovered_from_weights(n_heads, n_kv):
    shapes = discover(tiny_llama(n_heads=n_heads, n_kv=n_kv, layers=2))
    assert [(s.n_heads, s.n_kv, s.n_rep, s.head_dim, s.ffn) for s in shapes] == [(n_heads, n_kv, n_heads // n_kv, 8, 128)] * 2


@pytest.mark.parametrize("n_heads,n_kv", [(8, 8), (8, 4), (8, 2)])
def test_kv_group_owns_the_query_heads_that_read_it(n_heads, n_kv):
    """Zeroing KV group j's k/v rows changes exactly the outputs of query heads h // n_rep == j."""
    model = tiny_llama(n_heads=n_heads, n_kv=n_kv, layers=1)
    shape = discover(model)[0]
    attn = model.model.layers[0].self_attn
    seen = []
    attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    x = torch.randint(0, 512, (1, 12))
    model(x)
    j = n_kv - 1
    rows = member_index(torch.tensor([j]), shape, "kv")
    with torch.no_grad():
        attn.k_proj.weight[rows] = 0
        attn.v_proj.weight[rows] = 0
    model(x)
    before, after = (t.reshape(12, n_heads, shape.head_dim) for t in seen)
    changed = [h for h in range(n_heads) if not torch.allclose(before[:, h], after[:, h])]
    assert changed == [h for h in range(n_heads) if h // shape.n_rep == j]
    q_cols = member_index(torch.tensor([j]), shape, "q")
    assert q_cols.tolist() == [c for h in changed for c in range(h * shape.head_dim, (h + 1) * shape.head_dim)]


def test_unit_reduce_matches_explicit_sums():
    t = torch.randn(12, 6)
    assert torch.allclose(unit_reduce(t, "out", 3), torch.stack([t[4 * i : 4 * i + 4].sum() for i in range(3)]))
    assert torch.allclose(unit_reduce(t, "in", 2), torch.stack([t[:, 3 * i : 3 * i + 3].sum() for i in range(2)]))


@pytest.mark.parametrize("kind", [ATTN, MLP])
def test_unit_cost_is_what_removing_one_unit_removes(kind):
    model = tiny_llama(n_heads=8, n_kv=2, layers=2)
    shapes = discover(model)
    plan = PrunePlan.keep_all(shapes)
    if kind == ATTN:
        plan.layers[1].kv_groups = plan.layers[1].kv_groups[1:]
    else:
        plan.layers[1].channels = plan.layers[1].channels[1:]
    removed = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in apply_plan(model, plan).parameters())
    assert removed == unit_cost(model.model.layers[1], shapes[1], kind)


def test_members_table_names_real_projections():
    layer = tiny_llama(layers=1).model.layers[0]
    for members in MEMBERS.values():
        for path, axis, part in members:
            assert isinstance(submodule(layer, path), torch.nn.Linear) and axis in ("out", "in") and part in ("q", "kv", "ch")
