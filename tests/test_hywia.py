"""HyWIA: granular scores, the attention fusion, the soft keep-mask and its end-to-end learning."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from conftest import tiny_llama
from saap_edge.config import HywiaSettings, PruneSettings
from saap_edge.errors import UserError
from saap_edge.prune import prune
from saap_edge.prune.groups import ATTN, MLP, discover, total_params
from saap_edge.prune.hywia import (
    AttentionFusion,
    FEATURES,
    SoftMask,
    granular_scores,
    keep_scores,
    keys_of,
    rank_hywia,
    soft_masks,
)
from saap_edge.prune.methods import rank_saap
from saap_edge.prune.ranking import Statistics
from saap_edge.prune.search import search

LAYERS = [1, 2, 3, 4]


def _setup(units="groups", seed=0):
    model = tiny_llama(n_heads=4, n_kv=2, hidden=64, ffn=128, layers=6, seed=seed)
    samples = torch.randint(3, 512, (8, 16), generator=torch.Generator().manual_seed(1))
    s = PruneSettings(method="hywia", ratio=0.3, keep_first=1, keep_last=1, align=8, calib_samples=8, units=units).validate()
    st = Statistics(model, samples, discover(model), LAYERS, progress=False, heads="heads" in s.unit_set)
    return model, samples, s, st


H = HywiaSettings(steps=6, batch=4, lr=0.1)


@pytest.mark.parametrize("blend, fusion, fine", [("coarse", "vector", "first"), ("fine", "element", "second")])
def test_a_forced_blend_reproduces_the_single_granularity_ranking(blend, fusion, fine):
    """Blend (1, 0) ranks as SAAP's vector-only fusion, (0, 1) with the second-order fine score
    as its element-only fusion: the same z-scores, so the same plan."""
    model, samples, s, st = _setup()
    mine = rank_hywia(st, s, replace(H, blend=blend, fine=fine)).keep
    theirs = rank_saap(st, replace(s, method="saap", fusion=fusion)).keep
    assert mine.keys() == theirs.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-9, atol=1e-9)
        assert torch.equal(torch.argsort(mine[key], stable=True), torch.argsort(theirs[key], stable=True))


def test_fine_first_order_is_the_sum_of_absolute_taylor_terms():
    model, samples, s, st = _setup()
    stats = st.taylor()
    for key in stats.first:
        assert (stats.first[key] >= stats.vector[key].abs() - 1e-6).all()  # |sum| <= sum |.|
        assert stats.first[key].shape == stats.element[key].shape


def test_gradients_reach_the_fusion_parameters_and_no_model_weight():
    model, samples, s, st = _setup()
    per_sample, unit = granular_scores(st, s, H)
    keys = keys_of(per_sample, unit)
    fusion = AttentionFusion(st.kinds, len(FEATURES), H.hidden, 0)
    keep = keep_scores(unit, fusion(keys), st.costs, s)
    masks, _ = soft_masks(keep, st.shapes, st.costs, total_params(model), s, temperature=0.5)
    hook = SoftMask(model, st.shapes, LAYERS)
    hook.masks = masks
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        loss = model(input_ids=samples[:2], labels=samples[:2]).loss
        loss.backward()
    finally:
        hook.remove()
        for p in model.parameters():
            p.requires_grad_(True)
    assert all(p.grad is None for p in model.parameters())
    assert fusion.queries.grad is not None and fusion.queries.grad.abs().sum() > 0
    # the projection learns through the queries, which start at zero: its first gradient is zero
    assert fusion.project.grad is not None


def test_the_soft_mask_at_a_low_temperature_selects_the_hard_plans_units():
    for units in ("groups", "groups,heads"):
        model, samples, s, st = _setup(units)
        ranking = rank_hywia(st, s, replace(H, blend="fixed"))
        plan = search(ranking.keep, st.shapes, st.costs, total_params(model), s.ratio, "global", s.align, s.layer_cap)
        masks, _ = soft_masks(ranking.keep, st.shapes, st.costs, total_params(model), s, temperature=1e-6)
        removed_any = False
        for i in LAYERS:
            lp = plan.layers[i]
            heads = torch.zeros(st.shapes[i].n_heads)
            heads[lp.query_heads] = 1
            channels = torch.zeros(st.shapes[i].ffn)
            channels[lp.channels] = 1
            got = masks.get(i, {ATTN: torch.ones_like(heads), MLP: torch.ones_like(channels)})
            assert torch.equal(got[ATTN].round(), heads.double()), (units, i)
            assert torch.equal(got[MLP].round(), channels.double()), (units, i)
            removed_any |= bool((channels == 0).any() or (heads == 0).any())
        assert removed_any


def test_a_zero_mask_equals_slicing():
    """The soft mask's hooks at mask 0 compute what the sliced model computes."""
    model, samples, s, st = _setup()
    ranking = rank_hywia(st, s, replace(H, blend="fixed"))
    result = prune(model, samples, s, progress=False, stats=st, ranker=lambda st_, s_: ranking)
    masks, _ = soft_masks(ranking.keep, st.shapes, st.costs, total_params(model), s, temperature=1e-9)
    hook = SoftMask(model, st.shapes, LAYERS)
    hook.masks = {i: {k: v.round() for k, v in m.items()} for i, m in masks.items()}
    try:
        with torch.no_grad():
            masked = model(input_ids=samples).logits
    finally:
        hook.remove()
    with torch.no_grad():
        sliced = result.model(input_ids=samples).logits
    torch.testing.assert_close(masked, sliced, rtol=1e-4, atol=1e-4)


def test_learning_moves_the_blend_and_the_same_seed_gives_the_same_plan():
    plans, blends = [], []
    for _ in range(2):
        model, samples, s, st = _setup()
        ranking = rank_hywia(st, s, replace(H, steps=12))
        curve = ranking.details["hywia"]["curve"]
        assert len(curve) == 12 and all(c["loss"] >= 0 for c in curve)
        assert curve[0]["temperature"] == H.t_start and curve[-1]["temperature"] == pytest.approx(H.t_end)
        blend = ranking.record["blend"]
        assert len(blend) == len(LAYERS) * 2 and all(abs(b["coarse"] + b["fine"] - 1) < 1e-6 for b in blend)
        assert any(abs(b["coarse"] - 0.5) > 1e-4 for b in blend)  # learned, not the 50/50 start
        result = prune(model, samples, s, progress=False, stats=st, ranker=lambda st_, s_: ranking)
        plans.append(json.dumps(result.plan.layers, default=vars))
        blends.append(blend)
    assert plans[0] == plans[1] and blends[0] == blends[1]


def test_too_few_samples_and_bad_settings_are_named():
    with pytest.raises(UserError, match="needs at least 8"):
        HywiaSettings(batch=4).validate(7)
    HywiaSettings(blend="coarse", batch=4).validate(2)  # nothing learned: no minimum
    with pytest.raises(UserError, match="hywia-blend"):
        HywiaSettings(blend="half").validate(50)


def _compress(model_dir, out, data_dir, *extra):
    from saap_edge.cli import main

    return main(["compress", "--model", str(model_dir), "--method", "hywia", "--data-dir", str(data_dir),
                 "--calib", str(model_dir.parent / "book.txt"), "--calib-samples", "8", "--seq-len", "32",
                 "--hywia-steps", "3", "--hywia-batch", "4", "--recon-samples", "4", "--recon-seq-len", "32",
                 "--keep-first", "1", "--ratio", "0.2", "--no-recover", "--eval-ppl", "none", "--no-progress",
                 "--out", str(out), *extra])


def test_compress_with_hywia_records_the_blend_and_a_nan_loss_leaves_nothing(tmp_path, tiny_tokenizer, data_dir,
                                                                             monkeypatch, capsys):
    import saap_edge.prune.hywia as hywia
    from conftest import book_text, save_tiny32

    model_dir = save_tiny32(tmp_path / "dense", tiny_tokenizer)
    (tmp_path / "book.txt").write_text(book_text(30_000))
    out = tmp_path / "out"
    assert _compress(model_dir, out, data_dir) == 0, capsys.readouterr().err
    plan = json.loads((out / "prune_plan.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert plan["method"] == "hywia" and plan["importance"]["blend_mode"] == "learned"
    assert {b["kind"] for b in plan["importance"]["blend"]} == {"attn", "mlp", "head"}  # auto units: groups,heads
    assert len(report["details"]["hywia"]["curve"]) == 3 and (out / "hywia_blend.png").stat().st_size > 0

    real = hywia.keys_of
    monkeypatch.setattr(hywia, "keys_of", lambda *a: {k: v * float("nan") for k, v in real(*a).items()})
    bad = tmp_path / "bad"
    assert _compress(model_dir, bad, data_dir) == 2
    err = capsys.readouterr().err
    assert "fusion loss is nan at step 1 of 3" in err and len(err.strip().splitlines()) == 1, err
    assert not bad.exists() and not list(tmp_path.glob("bad*"))


@pytest.mark.gpu
def test_the_fusion_learns_on_cuda():
    """The masks live on the CPU with the scores; the hooks bring them to the activations' device."""
    model, samples, s, st = _setup()
    st.model = model.to("cuda")
    ranking = rank_hywia(st, s, replace(H, steps=2))
    assert len(ranking.details["hywia"]["curve"]) == 2 and all(torch.isfinite(v).all() for v in ranking.keep.values())
