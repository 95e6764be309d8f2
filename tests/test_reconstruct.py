"""Reconstruction: refits that change nothing when nothing is removed, beat plain slicing on
calibration and held-out data, read their statistics from the pruned prefix, and OBS
selection that agrees with a brute-force refit."""

import itertools

import pytest
import torch

from conftest import tiny_llama
from saap_edge.config import ReconstructSettings
from saap_edge.errors import UserError
from saap_edge.prune.groups import decoder_layers, discover
from saap_edge.prune.plan import PrunePlan
from saap_edge.prune.slicing import apply_plan
from saap_edge.reconstruct import obs_select, reconstruct, refit


def _plan(model) -> PrunePlan:
    """Layers 1 and 2 lose units of both kinds; layers 0, 3-5 keep everything."""
    plan = PrunePlan.keep_all(discover(model))
    plan.layers[1].kv_groups, plan.layers[1].channels = [0, 2], list(range(0, 128, 2))
    plan.layers[2].kv_groups, plan.layers[2].channels = [1, 2, 3], list(range(32, 128))
    return plan


def _samples(n=24, t=32, seed=0):
    return torch.randint(3, 512, (n, t), generator=torch.Generator().manual_seed(seed))


def _settings(**kw) -> ReconstructSettings:
    return ReconstructSettings(**{"samples": 24, "seq_len": 32, "batch_size": 5, **kw}).validate()


@pytest.mark.parametrize("target", ["prefix", "dense"])
def test_keep_all_plan_changes_no_weight(target):
    model = tiny_llama()
    plan = PrunePlan.keep_all(discover(model))
    slim = apply_plan(model, plan)
    before = {k: v.clone() for k, v in slim.state_dict().items()}
    reconstruct(model, slim, plan, _samples(), _settings(target=target), progress=False)
    for name, value in slim.state_dict().items():
        assert torch.equal(value, before[name]), name


def _hidden(model, ids, layer):
    return model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]


@pytest.mark.parametrize("target", ["prefix", "dense"])
def test_refit_beats_slicing_on_calibration_and_held_out(target):
    model = tiny_llama()
    plan = _plan(model)
    sliced = apply_plan(model, plan)
    refit_model = apply_plan(model, plan)
    result = reconstruct(model, refit_model, plan, _samples(), _settings(target=target), progress=False)
    for entry in result.info["layers"][1:3]:
        for kind in ("attn", "mlp"):
            assert entry[kind]["rel_err_refit"] < entry[kind]["rel_err_sliced"]
    held_out = _samples(8, 32, seed=1)
    with torch.no_grad():
        for layer in (1, 2, 5):  # the pruned layers, and the model's output after the last layer
            dense = _hidden(model, held_out, layer)
            err_sliced = (_hidden(sliced, held_out, layer) - dense).norm()
            err_refit = (_hidden(refit_model, held_out, layer) - dense).norm()
            assert err_refit < 0.9 * err_sliced, (layer, err_refit, err_sliced)


def _captured(model, ids, path_fn):
    box = []
    handle = path_fn(model).register_forward_pre_hook(lambda m, a: box.append(a[0].detach()))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return torch.cat([b.reshape(-1, b.shape[-1]) for b in box]).double()


def test_layer_statistics_come_from_the_pruned_and_refit_prefix():
    """Layer 2's down_proj refit equals a refit computed from scratch on the real forward of
    the reconstructed model (layer 1 pruned and refit), and differs from one on the dense prefix."""
    model = tiny_llama()
    plan = _plan(model)
    slim = apply_plan(model, plan)
    samples = _samples()
    reconstruct(model, slim, plan, samples, _settings(), progress=False)
    # the down_proj input of dense layer 2's MLP, applied to the pruned stream after layer 2's attention
    dense_layer2 = decoder_layers(model)[2]
    mid = _captured(slim, samples, lambda m: decoder_layers(m)[2].post_attention_layernorm)
    with torch.no_grad():
        box = []
        h = dense_layer2.mlp.down_proj.register_forward_pre_hook(lambda m, a: box.append(a[0]))
        dense_layer2.mlp(dense_layer2.post_attention_layernorm(mid.float()))
        h.remove()
    z = box[0].double()
    gram = z.T @ z
    keep = torch.tensor(plan.layers[2].channels)
    expected = refit(dense_layer2.mlp.down_proj.weight.double(), gram, gram, keep, 0.01)
    got = decoder_layers(slim)[2].mlp.down_proj.weight.double()
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5 * expected.abs().max().item())
    # the same layer refit on the dense prefix's statistics is a different matrix
    dense_mid = _captured(model, samples, lambda m: decoder_layers(m)[2].post_attention_layernorm)
    with torch.no_grad():
        box.clear()
        h = dense_layer2.mlp.down_proj.register_forward_pre_hook(lambda m, a: box.append(a[0]))
        dense_layer2.mlp(dense_layer2.post_attention_layernorm(dense_mid.float()))
        h.remove()
    zd = box[0].double()
    on_dense = refit(dense_layer2.mlp.down_proj.weight.double(), zd.T @ zd, zd.T @ zd, keep, 0.01)
    assert (on_dense - got).abs().max() > 100 * 2e-5 * expected.abs().max()


def _brute_force_error(w, gram, keep, damp):
    new = refit(w, gram, gram, keep, damp)
    diff_full = torch.zeros_like(w)
    diff_full[:, keep] = new
    diff_full -= w
    return float(torch.einsum("oi,ij,oj->", diff_full, gram, diff_full))


@pytest.mark.parametrize("width", [1, 4])
def test_obs_first_pick_is_the_brute_force_best(width):
    gen = torch.Generator().manual_seed(0)
    n_units, out = 6, 10
    x = torch.randn(400, n_units * width, generator=gen, dtype=torch.float64)
    x[:, :width] += 0.9 * x[:, width : 2 * width]  # correlated units: the refit matters
    w = torch.randn(out, n_units * width, generator=gen, dtype=torch.float64)
    gram = x.T @ x
    errors = []
    for unit in range(n_units):
        kept = [u for u in range(n_units) if u != unit]
        keep = (torch.tensor(kept)[:, None] * width + torch.arange(width)).reshape(-1)
        errors.append(_brute_force_error(w, gram, keep, 1e-9))
    assert obs_select(w, gram, width, 1, 1e-9) == [min(range(n_units), key=errors.__getitem__)]
    # two removals: the greedy pick is never worse than removing the two smallest single errors blindly
    picked = obs_select(w, gram, width, 2, 1e-9)
    def err_of(pair):
        kept = [u for u in range(n_units) if u not in pair]
        return _brute_force_error(w, gram, (torch.tensor(kept)[:, None] * width + torch.arange(width)).reshape(-1), 1e-9)
    best = min(itertools.combinations(range(n_units), 2), key=err_of)
    assert err_of(tuple(picked)) <= 1.05 * err_of(best) or err_of(tuple(picked)) <= err_of(tuple(sorted(range(n_units), key=errors.__getitem__)[:2]))


def test_local_selection_keeps_counts_and_equals_refitting_its_plan():
    model = tiny_llama()
    plan = _plan(model)
    slim = apply_plan(model, plan)
    result = reconstruct(model, slim, plan, _samples(), _settings(select="local"), progress=False)
    counts = [(len(lp.kv_groups), len(lp.channels)) for lp in result.plan.layers]
    assert counts == [(len(lp.kv_groups), len(lp.channels)) for lp in _plan(model).layers]
    assert result.plan.layers[1].channels != _plan(model).layers[1].channels  # OBS chose differently
    # slicing the locally chosen plan and refitting it with the global rule gives the same model
    again = apply_plan(model, result.plan)
    reconstruct(model, again, result.plan, _samples(), _settings(), progress=False)
    for (name, a), b in zip(slim.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_dead_channels_are_damped_not_nan():
    model = tiny_llama()
    with torch.no_grad():
        decoder_layers(model)[1].mlp.up_proj.weight[:40] = 0  # 40 channels that never fire
    plan = _plan(model)
    slim = apply_plan(model, plan)
    reconstruct(model, slim, plan, _samples(), _settings(), progress=False)
    assert all(torch.isfinite(p).all() for p in slim.parameters())


def test_non_finite_refit_names_the_layer():
    model = tiny_llama()
    plan = _plan(model)
    slim = apply_plan(model, plan)
    with torch.no_grad():
        decoder_layers(model)[2].mlp.gate_proj.weight[5, 3] = float("inf")
    with pytest.raises(UserError, match="layer 2 mlp.down_proj"):
        reconstruct(model, slim, plan, _samples(), _settings(), progress=False)


def test_settings_are_validated():
    with pytest.raises(UserError, match="--reconstruct"):
        ReconstructSettings(method="obs").validate()
    with pytest.raises(UserError, match="--select local"):
        ReconstructSettings(method="none", select="local").validate()
    with pytest.raises(UserError, match="--recon-damp"):
        ReconstructSettings(damp=0).validate()


@pytest.mark.gpu
def test_reconstruct_on_cuda_in_bfloat16_moves_one_layer_at_a_time():
    """Models wait on the CPU; each layer visits the GPU (bf16 activations, float64 solves),
    the refit still beats slicing, and the device peak is reported."""
    model = tiny_llama().to(torch.bfloat16)
    plan = _plan(model)
    slim = apply_plan(model, plan)
    result = reconstruct(model, slim, plan, _samples(), _settings(), device="cuda", progress=False)
    assert next(slim.parameters()).device.type == "cpu" and result.info["peak_device_mib"] > 0
    for entry in result.info["layers"][1:3]:
        for kind in ("attn", "mlp"):
            assert entry[kind]["rel_err_refit"] < entry[kind]["rel_err_sliced"]


def _head_plan(model) -> PrunePlan:
    """Layer 1 keeps 3 KV groups x 1 query head, layer 2 loses its attention module and half
    its MLP, layer 3 keeps every group with one head each."""
    plan = PrunePlan.keep_all(discover(model))
    plan.layers[1].kv_groups, plan.layers[1].heads = [0, 2, 3], [1, 4, 7]
    plan.layers[2].kv_groups, plan.layers[2].channels = [], list(range(0, 128, 2))
    plan.layers[3].heads = [0, 3, 4, 6]
    return plan


@pytest.mark.parametrize("target", ["prefix", "dense"])
@pytest.mark.parametrize("select", ["global", "local"])
def test_head_slots_and_attention_free_layers_refit_and_select(target, select):
    model = tiny_llama()
    plan = _head_plan(model)
    sliced = apply_plan(model, plan)
    slim = apply_plan(model, plan)
    result = reconstruct(model, slim, plan, _samples(), _settings(target=target, select=select), progress=False)
    log = result.info["layers"]
    assert log[2]["attn"] == {"removed_units": 4, "module": True, "rel_err_sliced": 1.0, "rel_err_refit": 1.0}
    for i in (1, 3):
        assert log[i]["attn"]["rel_err_refit"] < log[i]["attn"]["rel_err_sliced"]
        assert log[i]["attn"]["removed_heads"] == (5 if i == 1 else 4)
    # local selection may choose other groups and heads, never other counts
    for i, lp in enumerate(result.plan.layers):
        lp.check(i)
        assert (len(lp.kv_groups), lp.kept_heads) == (len(_head_plan(model).layers[i].kv_groups), _head_plan(model).layers[i].kept_heads)
    held_out = _samples(8, 32, seed=1)
    with torch.no_grad():
        dense = _hidden(model, held_out, 5)
        if select == "global":  # the same units: the refit alone must help
            assert (_hidden(slim, held_out, 5) - dense).norm() < (_hidden(sliced, held_out, 5) - dense).norm()
        # the plan the stage returns slices to the model it refit
        again = apply_plan(model, result.plan)
        assert [p.shape for p in again.parameters()] == [p.shape for p in slim.parameters()]


def test_obs_quota_keeps_families_equal():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    w[:, :4] *= 0.01  # family 0's units are nearly free to remove: unconstrained OBS takes them all
    families = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    assert set(obs_select(w, x.T @ x, 1, 3, 1e-6)) <= {0, 1, 2, 3}
    picked = obs_select(w, x.T @ x, 1, 6, 1e-6, families=families, quota=2)
    assert torch.bincount(families[picked], minlength=3).tolist() == [2, 2, 2]


@pytest.mark.parametrize("select", ["global", "local"])
def test_the_streamed_stage_and_the_kept_dense_stage_build_the_same_slim_model(select):
    """compress slices the dense model into the refit layer by layer and uses it up; benchmarks
    that compare many plans keep it (compress.prune_keeping_dense). Both give the same weights."""
    import copy

    from saap_edge.compress import _slice_stage, prune_keeping_dense
    from saap_edge.config import PruneSettings, RunSettings

    model = tiny_llama(seed=3).eval()
    calib, windows = _samples(8, 32, seed=1), _samples()
    s = PruneSettings(ratio=0.3, calib_samples=8, seq_len=32, keep_first=1, align=8).validate()
    r = _settings(select=select)
    kept = prune_keeping_dense(model, calib, s, r, windows)
    dense = copy.deepcopy(model)
    plan = PrunePlan.from_dict(kept.plan.to_dict()) if select == "global" else None
    if plan is None:  # local selection rewrites the plan: stream from the ranking's own plan
        from saap_edge.prune import prune

        plan = prune(dense, calib, s, progress=False, slice_now=False).plan
    streamed, info = _slice_stage(dense, plan, windows, r, torch.device("cpu"), RunSettings(device="cpu", progress=False))
    assert kept.details["reconstruction"]["method"] == info["method"] == r.method
    assert kept.plan.to_dict()["layers"] == plan.to_dict()["layers"]
    a, b = kept.model.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
