"""Importance: Taylor sums from gradient hooks, fusion, fluctuation and standardisation."""

import math

import pytest
import torch

from conftest import tiny_llama
from saap_edge.prune import importance as imp
from saap_edge.prune.estimate import collect_inputs, collect_taylor
from saap_edge.prune.groups import MEMBERS, decoder_layers, discover, submodule, unit_reduce


def _reference_taylor(model, samples, layers):
    """Per-sample I_V / I_E from full autograd gradients, the obvious slow way."""
    shapes = discover(model)
    vec, elem = {}, {}
    for d in range(samples.shape[0]):
        ids = samples[d : d + 1]
        loss = model(input_ids=ids, labels=ids).loss
        weights = [(i, k, submodule(decoder_layers(model)[i], p).weight, a) for i in layers for k, ms in MEMBERS.items() for p, a, _ in ms]
        grads = torch.autograd.grad(loss, [w for _, _, w, _ in weights])
        for (i, k, w, axis), g in zip(weights, grads):
            gw = g * w.detach()
            n = shapes[i].n_units(k)
            vec.setdefault((i, k), torch.zeros(samples.shape[0], n))[d] += unit_reduce(gw, axis, n)
            elem.setdefault((i, k), torch.zeros(samples.shape[0], n))[d] += unit_reduce((gw - 0.5 * gw**2).abs(), axis, n)
    return vec, elem


def test_hooked_taylor_sums_equal_full_gradient_reference():
    model = tiny_llama(layers=3)
    samples = torch.randint(0, 512, (3, 16))
    stats = collect_taylor(model, samples, discover(model), [1, 2], progress=False)
    vec, elem = _reference_taylor(model, samples, [1, 2])
    for key in vec:
        torch.testing.assert_close(stats.vector[key], vec[key], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(stats.element[key], elem[key], rtol=1e-4, atol=1e-7)
    # gradients were freed as consumed and the requires_grad flags restored
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert len(stats.losses) == 3


def test_param_mix_matches_its_definition():
    model = tiny_llama(layers=2)
    samples = torch.randint(0, 512, (2, 16))
    stats = collect_taylor(model, samples, discover(model), [1], with_param_mix=True, progress=False)
    w = model.model.layers[1].mlp.down_proj.weight
    grads = []
    for d in range(2):
        ids = samples[d : d + 1]
        grads.append(torch.autograd.grad(model(input_ids=ids, labels=ids).loss, [w])[0])
    g_mean, g2_mean = sum(grads) / 2, sum(g * g for g in grads) / 2
    down = unit_reduce((w * g_mean - 0.5 * w * w * g2_mean).abs().detach(), "in", 128).double()
    up_gate = stats.param_mix[(1, "mlp")] - down
    assert (up_gate > 0).all()  # gate and up rows add positive amounts on top of down's columns


def test_learned_uncertainty_converges_to_the_closed_form():
    torch.manual_seed(0)
    iv, ie = torch.rand(50, 40) * 3e-3, torch.rand(50, 40) * 20
    closed = imp.uncertainty_closed_form(iv, ie)
    learned = imp.uncertainty_learned(iv, ie)
    assert closed == pytest.approx((float(iv.double().mean()), float(ie.double().mean())))
    assert learned == pytest.approx(closed, rel=1e-3)


def test_adaptive_fusion_formula_and_scope():
    iv = {(0, "attn"): torch.tensor([[1.0, 3.0]]), (1, "attn"): torch.tensor([[2.0, 2.0]]), (0, "mlp"): torch.tensor([[4.0]])}
    ie = {k: 2 * v for k, v in iv.items()}
    fused = imp.fuse(iv, ie, "adaptive", "global")
    l1, l2 = 2.0, 4.0  # means over the attention scope (both layers)
    expect = iv[(0, "attn")] / (2 * l1) + ie[(0, "attn")] / (2 * l2) + 0.5 * math.log(l1 * l2)
    torch.testing.assert_close(fused[(0, "attn")], expect.double())
    per_layer = imp.fuse(iv, ie, "adaptive", "layer")
    assert per_layer[(1, "attn")].tolist() == [[1.0 + 0.5 * math.log(2.0 * 4.0)] * 2]


def test_fluctuation_is_bessel_variance_times_weight_norm():
    scores = torch.tensor([[1.0, 5.0], [3.0, 5.0], [5.0, 8.0]])
    norms = torch.tensor([2.0, 10.0])
    m = imp.fluctuation(scores, norms)
    assert m.tolist() == pytest.approx([4.0 * 2.0, 3.0 * 10.0])
    with pytest.raises(ValueError):
        imp.fluctuation(scores[:1], norms)


def test_standardize_per_scope():
    scores = {(0, "attn"): torch.tensor([1.0, 2.0]), (1, "attn"): torch.tensor([3.0]), (0, "mlp"): torch.tensor([10.0, 30.0])}
    z = imp.standardize(scores, "global")
    attn = torch.cat([z[(0, "attn")], z[(1, "attn")]])
    assert float(attn.mean()) == pytest.approx(0.0, abs=1e-12) and float(attn.std()) == pytest.approx(1.0)
    assert z[(0, "mlp")].tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)])


def test_collect_inputs_counts_every_token():
    model = tiny_llama(layers=2)
    samples = torch.randint(0, 512, (3, 10))
    seen = []
    model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 128)))
    stats = collect_inputs(model, samples, [1], progress=False)
    x = torch.cat(seen).double()
    total, sq, n = stats[(1, "mlp")]
    assert n == 30
    torch.testing.assert_close(total, x.sum(0))
    torch.testing.assert_close(sq, (x * x).sum(0))


@pytest.mark.gpu
def test_cuda_bfloat16_estimation_agrees_with_cpu_float32():
    """The hooks accumulate in fp32 on any device: bf16 on CUDA ranks like fp32 on CPU."""
    model = tiny_llama(layers=3)
    samples = torch.randint(0, 512, (4, 32))
    cpu = collect_taylor(model, samples, discover(model), [1, 2], progress=False)
    gpu_model = tiny_llama(layers=3).to("cuda", torch.bfloat16)
    gpu = collect_taylor(gpu_model, samples, discover(gpu_model), [1, 2], progress=False)
    for key in cpu.element:
        a, b = cpu.element[key].sum(0), gpu.element[key].sum(0)
        assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.95


def test_indicator_variants():
    fused = torch.tensor([[1.0, 4.0], [3.0, 4.0]], dtype=torch.float64)
    norms = torch.tensor([3.0, 5.0], dtype=torch.float64)
    assert imp.indicator(fused, norms, "fluctuation").tolist() == pytest.approx([2.0 * 3.0, 0.0])
    assert imp.indicator(fused, norms, "none").tolist() == pytest.approx([2.0, 4.0])
    assert imp.indicator(fused, norms, "bound").tolist() == pytest.approx([2.0 + math.sqrt(2.0), 4.0])


def test_scope_all_fuses_every_kind_with_one_pair_of_scales():
    iv = {(0, "attn"): torch.tensor([[2.0]]), (0, "mlp"): torch.tensor([[6.0]])}
    ie = {(0, "attn"): torch.tensor([[1.0]]), (0, "mlp"): torch.tensor([[3.0]])}
    fused = imp.fuse(iv, ie, "adaptive", "all")
    l1, l2 = 4.0, 2.0
    assert fused[(0, "attn")].item() == pytest.approx(2 / (2 * l1) + 1 / (2 * l2) + 0.5 * math.log(l1 * l2))
    assert fused[(0, "mlp")].item() == pytest.approx(6 / (2 * l1) + 3 / (2 * l2) + 0.5 * math.log(l1 * l2))
    z = imp.standardize({k: v[0] for k, v in fused.items()}, "all")
    assert z[(0, "attn")].item() < z[(0, "mlp")].item()  # one scale: the order across kinds survives
