"""AdaPruner's search: cached pool statistics, rankings from them, a seeded and resumable study."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from saap_edge.config import PruneSettings
from saap_edge.errors import UserError
from saap_edge.adapruner import (
    Point,
    cached_pool,
    collect_pool,
    distinct_windows,
    metric_choices,
    open_study,
    prune_point,
    rank_point,
    run_search,
    taylor_scores,
)
from saap_edge.prune.estimate import collect_taylor
from saap_edge.prune.groups import discover
from saap_edge.prune.methods import rank_saap
from saap_edge.prune.ranking import Statistics

pytest.importorskip("optuna")
LAYERS = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(n_heads=4, n_kv=2, hidden=64, ffn=128, layers=6)
    pool = torch.randint(3, 512, (8, 16), generator=torch.Generator().manual_seed(0))
    shapes = discover(model)
    return model, pool, shapes, collect_pool(model, pool, shapes, LAYERS, progress=False)


def test_cached_pool_statistics_equal_recomputed_and_the_methods_own(setup, tmp_path):
    model, pool, shapes, stats = setup
    first, info = cached_pool(model, pool, shapes, LAYERS, tmp_path, progress=False)
    again, info2 = cached_pool(model, pool, shapes, LAYERS, tmp_path, progress=False)
    assert not info["cached"] and info2["cached"] and info["key"] == info2["key"]
    for key in stats.stats:
        for name, t in stats.stats[key].items():
            assert torch.equal(first.stats[key][name], t) and torch.equal(again.stats[key][name], t)
    idx = torch.tensor([1, 4, 6])
    direct = collect_taylor(model, pool[idx], shapes, LAYERS, progress=False)
    mine = stats.taylor(idx)  # members added in another order than the hooks fire: float32 rounding only
    for key in direct.vector:
        torch.testing.assert_close(mine.vector[key], direct.vector[key], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(mine.element[key], direct.element[key], rtol=1e-5, atol=1e-9)


def test_a_points_saap_ranking_equals_the_methods_on_the_same_windows(setup):
    model, pool, shapes, stats = setup
    s = PruneSettings(ratio=0.3, keep_first=1, keep_last=1, units="groups").validate()
    idx = [6, 1, 4]
    st = Statistics(model, pool[sorted(idx)], shapes, LAYERS, progress=False)
    direct = rank_saap(st, s).keep
    ranked = rank_point(model, stats, Point(idx, "saap-bound"), s, shapes, LAYERS).keep
    for key in direct:
        torch.testing.assert_close(ranked[key], direct[key], rtol=1e-4, atol=1e-7)


def test_taylor_metrics_and_aggregations(setup):
    model, pool, shapes, stats = setup
    idx = torch.tensor([0, 2])
    per_member = stats.stats[(1, "mlp")]["second"][idx].double().mean(0)  # [members, units]
    assert torch.equal(taylor_scores(stats, idx, "param_second", "max")[(1, "mlp")], per_member.max(0).values)
    assert torch.equal(taylor_scores(stats, idx, "param_second", "last")[(1, "mlp")], per_member[-1])
    vec = taylor_scores(stats, idx, "vectorize", "sum")[(2, "attn")]
    assert torch.equal(vec, stats.stats[(2, "attn")]["signed"][idx].double().mean(0).abs().sum(0))
    with pytest.raises(UserError, match="unknown metric"):
        taylor_scores(stats, idx, "param_third", "sum")
    assert len(metric_choices()) == 22 and distinct_windows([3, 3, 7, 0], 8) == [3, 4, 7, 0]


def _evaluate(model, stats, shapes):
    s = PruneSettings(ratio=0.25, keep_first=1, keep_last=1, units="groups").validate()
    held_out = torch.randint(3, 512, (4, 16), generator=torch.Generator().manual_seed(9))

    def evaluate(point: Point) -> float:
        slim = prune_point(model, stats, point, s, shapes, LAYERS).model
        with torch.no_grad():
            return float(slim(input_ids=held_out, labels=held_out).loss.exp())

    return evaluate


def test_same_seed_same_trials_and_a_killed_search_resumes_to_the_straight_one(setup, tmp_path):
    model, pool, shapes, stats = setup
    evaluate, metrics = _evaluate(model, stats, shapes), metric_choices()
    identity = {"model": "tiny", "pool": "p", "objective": "o"}
    kw = dict(n_slots=3, pool_size=8, metrics=metrics, seed=0, startup=2, progress=False)
    straight = run_search(open_study(tmp_path / "a.db", identity, False), evaluate, 6, **kw)
    again = run_search(open_study(tmp_path / "b.db", identity, False), evaluate, 6, **kw)
    assert straight == again
    run_search(open_study(tmp_path / "c.db", identity, False), evaluate, 3, **kw)  # "killed" after 3 trials
    resumed = run_search(open_study(tmp_path / "c.db", identity, False), evaluate, 6, **kw)
    assert resumed == straight
    # a finished search is reused: asking for the same number of trials runs none
    calls = []
    reused = run_search(open_study(tmp_path / "a.db", identity, False), lambda p: calls.append(p) or 0.0, 6, **kw)
    assert reused == straight and not calls


def test_a_study_of_another_model_or_a_damaged_database_is_refused(tmp_path):
    open_study(tmp_path / "s.db", {"model": "a", "pool": "p"}, False)
    with pytest.raises(UserError, match="another model"):
        open_study(tmp_path / "s.db", {"model": "b", "pool": "p"}, False)
    assert open_study(tmp_path / "s.db", {"model": "b", "pool": "p"}, True).user_attrs["identity"]["model"] == "b"
    (tmp_path / "bad.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(UserError, match="bad.db"):
        open_study(tmp_path / "bad.db", {"model": "a"}, False)


def _compress(model_dir, out, data_dir, *extra):
    from saap_edge.cli import main

    return main(["compress", "--model", str(model_dir), "--method", "adapruner", "--data-dir", str(data_dir),
                 "--calib-pool", str(model_dir.parent / "book.txt"), "--pool-size", "8", "--calib-samples", "3",
                 "--seq-len", "32", "--search-trials", "3", "--search-startup", "2", "--search-windows", "2",
                 "--recon-samples", "4", "--recon-seq-len", "32", "--keep-first", "1", "--ratio", "0.2", "--no-recover",
                 "--eval-ppl", "none", "--no-progress", "--out", str(out), *extra])


def test_compress_with_adapruner_never_reads_a_test_split_and_reuses_its_study(tmp_path, tiny_tokenizer, data_dir,
                                                                               monkeypatch, capsys):
    import json

    import saap_edge.data as data
    from conftest import book_text, save_tiny32

    model_dir = save_tiny32(tmp_path / "dense", tiny_tokenizer)
    (tmp_path / "book.txt").write_text(book_text(30_000))
    splits = []
    real = data.load_rows
    monkeypatch.setattr(data, "load_rows", lambda source, split, d: splits.append((source, split)) or real(source, split, d))
    out = tmp_path / "out"
    assert _compress(model_dir, out, data_dir) == 0, capsys.readouterr().err
    assert ("wikitext2", "validation") in splits and not [s for s in splits if s[1] == "test"]
    plan = json.loads((out / "prune_plan.json").read_text())
    search = json.loads((out / "search.json").read_text())
    assert plan["method"] == "adapruner" and len(plan["calibration"]["windows"]) == 3
    assert len(search["trials"]) == 3 and search["best"]["windows"] == plan["calibration"]["windows"]
    # the point's own units are refit (under local selection OBS would make every point one model)
    assert plan["reconstruction"]["select"] == "global" and len({t["value"] for t in search["trials"]}) > 1
    assert (out / "search.md").is_file() and (out / "search.png").is_file() and (tmp_path / "out.search.db").is_file()
    # the same command again: the finished study is reused, no trial runs
    assert _compress(model_dir, out, data_dir, "--overwrite") == 0
    again = json.loads((out / "search.json").read_text())
    assert again["trial_s"] == [] and again["trials"] == search["trials"]
    # another ratio is another search: refused in one line unless --new-search
    assert _compress(model_dir, tmp_path / "out2", data_dir, "--ratio", "0.3") == 0  # its own database
    (tmp_path / "out2.search.db").replace(tmp_path / "out.search.db")
    capsys.readouterr()
    assert _compress(model_dir, out, data_dir, "--overwrite") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another ratio" in err[0] and "--new-search" in err[0]


def test_the_pool_cache_stays_within_its_bound(setup, tmp_path):
    """Least recently used entries leave first; one entry larger than the bound is not kept."""
    import os

    from saap_edge.adapruner import cached_pool

    model, pool, shapes, _ = setup
    _, first = cached_pool(model, pool, shapes, LAYERS, tmp_path, progress=False)
    size = (tmp_path / f"pool-{first['key']}.safetensors").stat().st_size
    os.utime(tmp_path / f"pool-{first['key']}.safetensors", (1, 1))  # long unused
    _, second = cached_pool(model, pool[:6], shapes, LAYERS, tmp_path, progress=False, cache_mib=4096)
    assert len(list(tmp_path.glob("pool-*"))) == 2 and not second["evicted"]
    bound = (size + (tmp_path / f"pool-{second['key']}.safetensors").stat().st_size - 1) / 2**20
    _, third = cached_pool(model, pool[:4], shapes, LAYERS, tmp_path, progress=False, cache_mib=bound)
    assert third["evicted"] == [f"pool-{first['key']}.safetensors"]  # the oldest left, the newest stayed
    assert (tmp_path / f"pool-{third['key']}.safetensors").exists()
    _, fourth = cached_pool(model, pool[:2], shapes, LAYERS, tmp_path, progress=False, cache_mib=0)
    assert not list(tmp_path.glob("pool-*")) and "path" not in fourth
