"""Tests of saap_edge.data: local datasets, hub fallback errors, calibration sampling."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from saap_edge import data
from saap_edge.data import DATASETS, calibration_samples, load_rows, load_text, resolve_data_dir
from saap_edge.errors import UserError

BOS = 1


class CharTokenizer:
    """Character-level tokenizer: one id per character (code point capped at 255), BOS first."""

    def __init__(self) -> None:
        self.chars_seen = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        self.chars_seen += len(text)
        ids = [min(ord(c), 255) for c in text]
        return {"input_ids": ([BOS] if add_special_tokens else []) + ids}


@pytest.fixture
def story(tmp_path: Path) -> Path:
    """A small local text file (about 6k characters, 100 lines)."""
    path = tmp_path / "story.txt"
    lines = [f"line {i}: the quick brown fox {i * 7 % 13} jumps over the lazy dog" for i in range(100)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_resolve_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SAAP_EDGE_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(str(tmp_path)) == tmp_path
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("SAAP_EDGE_DATA_DIR")
    assert resolve_data_dir(None) is None


def test_local_wikitext2_matches_hub_rows(data_dir: Path) -> None:
    rows = load_rows("wikitext2", "test", data_dir)
    assert len(rows) == 4358
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"  # hub layout: blank -> ""
    assert load_text("wikitext2", "test", data_dir) == "\n\n".join(rows)


def test_local_ptb_and_books(data_dir: Path) -> None:
    assert len(load_rows("ptb", "test", data_dir)) == 3761
    assert load_rows("ptb", "validation", data_dir)
    books = sorted((data_dir / "text" / "books").glob("*.txt"))
    expected = sum(len(p.read_text(encoding="utf-8-sig").splitlines()) for p in books)
    rows = load_rows("books", "train", data_dir)
    assert len(rows) == expected and not rows[0].startswith("\ufeff")


def test_env_var_is_used(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAAP_EDGE_DATA_DIR", str(data_dir))
    assert len(load_rows("wikitext2", "test", None)) == 4358


def test_path_sources(story: Path, tmp_path: Path) -> None:
    rows = load_rows(str(story), "ignored", None)
    assert len(rows) == 100 and rows[0].startswith("line 0")
    (tmp_path / "b.txt").write_text("second\n", encoding="utf-8")
    assert load_rows(str(tmp_path), "train", None) == ["second"] + rows  # sorted b.txt, story.txt


def test_empty_file_raises(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(UserError, match="empty"):
        load_rows(str(empty), "train", None)


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(UserError) as err:
        load_rows("no_such_dataset", "test", None)
    for name in DATASETS:
        assert name in str(err.value)


def test_hub_fallback_failure_is_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError) as err:
        load_rows("ptb", "test", tmp_path)  # empty data dir: no local copy
    message = str(err.value)
    assert "\n" not in message and "'ptb'" in message
    assert str(tmp_path / "text/ptb/ptb.test.txt") in message and "SAAP_EDGE_DATA_DIR" in message


def test_hub_fallback_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return {"text": ["a", "b"]}

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_rows("wikitext2", "validation", tmp_path) == ["a", "b"]
    assert calls == [(("wikitext", "wikitext-2-raw-v1"), {"split": "validation"})]


def _full_ids(source: str, data_dir: Path | None) -> np.ndarray:
    text = "\n".join(load_rows(source, "train", data_dir))
    return np.asarray(CharTokenizer()(text)["input_ids"], dtype=np.int64)


def test_calibration_deterministic_and_seeded(story: Path) -> None:
    a, hash_a = calibration_samples(CharTokenizer(), str(story), 8, 32, seed=0, data_dir=None)
    b, hash_b = calibration_samples(CharTokenizer(), str(story), 8, 32, seed=0, data_dir=None)
    c, hash_c = calibration_samples(CharTokenizer(), str(story), 8, 32, seed=1, data_dir=None)
    assert a.equal(b) and hash_a == hash_b
    assert not a.equal(c) and hash_a != hash_c
    assert hash_a == hashlib.sha256(a.numpy().astype(np.int64).tobytes()).hexdigest()


def test_calibration_windows_are_distinct_text_slices(story: Path) -> None:
    samples, _ = calibration_samples(CharTokenizer(), str(story), 10, 50, seed=3, data_dir=None)
    assert samples.shape == (10, 50) and str(samples.dtype) == "torch.int64"
    ids = _full_ids(str(story), None)
    starts = []
    for row in samples.numpy():
        hits = [s for s in range(0, len(ids) - 49, 50) if np.array_equal(ids[s : s + 50], row)]
        assert hits, "sample is not a window of the tokenized text"
        starts.append(hits[0])
    assert len(set(starts)) == 10  # drawn without replacement


def test_calibration_books_tokenizes_only_a_prefix(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "CHUNK_CHARS", 5_000)  # force several chunks
    tok = CharTokenizer()
    samples, _ = calibration_samples(tok, "books", 16, 256, seed=0, data_dir=data_dir)
    assert samples.shape == (16, 256)
    assert 4 * 16 * 256 <= tok.chars_seen < 4 * 16 * 256 + 5_000 + 1  # stopped early
    ids = _full_ids("books", data_dir)[: tok.chars_seen + 1]  # what was tokenized, with BOS
    windows = ids[: len(ids) // 256 * 256].reshape(-1, 256)
    assert (samples.numpy()[:, None, :] == windows[None]).all(-1).any(-1).all()
    assert (samples.numpy() == BOS).sum() <= 1  # no BOS in the middle of the text


def test_calibration_too_short_reports_token_count(tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("tiny text\n", encoding="utf-8")  # 9 chars + BOS = 10 tokens
    with pytest.raises(UserError) as err:
        calibration_samples(CharTokenizer(), str(short), 4, 8, seed=0, data_dir=None)
    message = str(err.value)
    assert "holds 1 windows of 8 tokens (10 tokens)" in message and "--calib-samples asks for 4" in message
    with pytest.raises(UserError, match="--recon-samples asks for 4"):
        calibration_samples(CharTokenizer(), str(short), 4, 8, seed=0, data_dir=None, flag="--recon-samples")
