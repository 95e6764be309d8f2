"""Teacher-written recovery text: sampled from the dense model, reproducible from its seed,
cached and reused, mixed with book text, and its bad budgets named."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import DATA_DIR, book_text, save_tiny32, tiny_llama


def _model(seed=0):
    return tiny_llama(n_heads=4, n_kv=2, hidden=64, ffn=128, layers=2, seed=seed)


def test_generated_windows_are_reproducible_from_their_seed_and_cached(tmp_path, monkeypatch):
    import saap_edge.recover.generate as gen

    first, key = gen.generated_windows(_model(), 300, 16, seed=3, cache_dir=tmp_path, progress=False)
    assert first.shape == (19, 16) and first.dtype == torch.int64  # ceil(300 / 16) whole windows
    assert (tmp_path / key / "windows.safetensors").exists()
    # the same model and seed in a new call: the cache answers, nothing is sampled
    monkeypatch.setattr(gen, "sample_windows", lambda *a, **k: pytest.fail("sampled again instead of reading the cache"))
    again, key2 = gen.generated_windows(_model(), 300, 16, seed=3, cache_dir=tmp_path, progress=False)
    assert key2 == key and torch.equal(again, first)
    by_key, _ = gen.generated_windows(None, 300, 16, seed=3, cache_dir=tmp_path, key=key, progress=False)
    assert torch.equal(by_key, first)
    monkeypatch.undo()
    # without a cache, sampling again from the seed gives the same windows; another seed, others
    fresh, _ = gen.generated_windows(_model(), 300, 16, seed=3, cache_dir=None, progress=False)
    other, key3 = gen.generated_windows(_model(), 300, 16, seed=4, cache_dir=tmp_path, progress=False)
    assert torch.equal(fresh, first) and key3 != key and not torch.equal(other, first)


def test_another_model_gets_another_cache_entry(tmp_path):
    from saap_edge.recover.generate import generated_windows

    _, a = generated_windows(_model(0), 64, 16, seed=0, cache_dir=tmp_path, progress=False)
    _, b = generated_windows(_model(1), 64, 16, seed=0, cache_dir=tmp_path, progress=False)
    assert a != b


def test_first_tokens_follow_the_models_own_start_distribution():
    """A model whose output bias makes token 7 almost certain starts (nearly) every window with it."""
    from saap_edge.recover.generate import sample_windows

    model = _model()
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[7] = 0  # logits are 0 everywhere ...
        model.model.norm.weight.fill_(1.0)
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(512))
    with torch.no_grad():
        model.lm_head.bias[7] = 30.0  # ... but token 7's
    windows = sample_windows(model, 8, 4, seed=0, progress=False)
    assert (windows[:, 0] == 7).all()


@pytest.mark.parametrize("source, needle", [
    ("generated:0", "between 1 and 20,000,000"),
    ("books+generated:999999999", "between 1 and 20,000,000"),
    ("generated:lots", "must be a token count"),
    ("generated+generated", "names generated text twice"),
])
def test_bad_generated_budgets_exit_2_in_one_line(tmp_path, capsys, tiny_tokenizer, source, needle):
    from saap_edge.cli import main

    dense = save_tiny32(tmp_path / "dense", tiny_tokenizer)
    out = tmp_path / "out"
    rc = main(["compress", "--model", str(dense), "--out", str(out), "--data-dir", str(DATA_DIR), "--recover-data", source,
               "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_compress_trains_on_books_and_generated_text(tmp_path, tiny_tokenizer, capsys):
    from saap_edge.cli import main

    dense = save_tiny32(tmp_path / "dense", tiny_tokenizer)
    text = tmp_path / "t.txt"
    text.write_text(book_text(20_000))
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    rc = main(["compress", "--model", str(dense), "--out", str(out), "--data-dir", str(DATA_DIR), "--device", "cpu",
               "--ratio", "0.25", "--keep-first", "1", "--calib-samples", "4", "--recon-samples", "8",
               "--recover-data", f"{text}+generated:1024", "--recover-steps", "2", "--batch-size", "2",
               "--recover-seq-len", "32", "--eval-ppl", "none", "--teacher-cache", str(cache), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    data = json.loads((out / "report.json").read_text())["recovery"]["data"]
    assert data["kind"] == "text+generated" and data["generated_key"].startswith("generated-")
    assert (cache / data["generated_key"] / "windows.safetensors").exists()
    from saap_edge.recover.data import recovery_windows

    text_only = recovery_windows(tiny_tokenizer, str(text), 32, 16, 0, DATA_DIR)
    assert data["train_windows"] + data["heldout_windows"] == len(text_only.train) + 16 + 1024 // 32
