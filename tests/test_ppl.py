"""Tests of saap_edge.eval.ppl: exact perplexity on a uniform model and on a tiny LLaMA."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from saap_edge.errors import UserError
from saap_edge.eval.ppl import evaluate_ppl, perplexity

TEXT = "It is a truth universally acknowledged, that a single man in possession of a fortune. " * 20


class CharTokenizer:
    """Character-level tokenizer: one id per character (code point capped at 255), BOS = 1 first."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": ([1] if add_special_tokens else []) + [min(ord(c), 255) for c in text]}


class UniformLM(torch.nn.Module):
    """Predicts the uniform distribution over ``vocab`` tokens at every position."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


@pytest.fixture(scope="module")
def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def test_uniform_model_ppl_is_vocab_size() -> None:
    n_tokens = len(TEXT) + 1
    result = perplexity(UniformLM(256), CharTokenizer(), TEXT, window=64, batch_size=5, progress=False)
    assert result["ppl"] == pytest.approx(256, rel=1e-6)
    assert result["nll"] == pytest.approx(math.log(256), rel=1e-7)
    assert result["windows"] == n_tokens // 64  # incomplete tail dropped
    assert result["tokens_scored"] == result["windows"] * 63 and result["window"] == 64


def test_limit_keeps_first_windows() -> None:
    result = perplexity(UniformLM(256), CharTokenizer(), TEXT, window=32, limit=3, progress=False)
    assert result["windows"] == 3 and result["tokens_scored"] == 3 * 31


def test_tiny_llama_matches_manual_cross_entropy(tiny_llama: torch.nn.Module) -> None:
    window, limit = 48, 7
    ids = torch.tensor(CharTokenizer()(TEXT)["input_ids"])[: window * limit].view(limit, window)
    with torch.no_grad():
        losses = [F.cross_entropy(tiny_llama(w[None]).logits[0, :-1], w[1:]) for w in ids]
    expected = math.exp(torch.stack(losses).mean().item())
    result = perplexity(tiny_llama, CharTokenizer(), TEXT, window=window, limit=limit,
                        batch_size=3, progress=False)
    assert result["windows"] == limit
    assert result["ppl"] == pytest.approx(expected, rel=1e-5)


def test_too_short_text_raises() -> None:
    with pytest.raises(UserError, match="no full window"):
        perplexity(UniformLM(8), CharTokenizer(), "short", window=128, progress=False)


def test_evaluate_ppl_on_sources(tmp_path: Path, data_dir: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    results = evaluate_ppl(UniformLM(300), CharTokenizer(), [str(path), "wikitext2"],
                           window=64, limit=4, data_dir=data_dir)
    assert set(results) == {str(path), "wikitext2"}
    for result in results.values():
        assert result["windows"] == 4 and result["ppl"] == pytest.approx(300, rel=1e-6)


def test_onednn_linears_score_like_plain_float32_and_restore_the_model():
    """The fast CPU path (oneDNN matmuls) gives the plain float32 perplexity within 1e-5
    relative and logits within 1e-4 of the logit scale; afterwards every module is back."""
    from conftest import hetero_model
    from saap_edge.eval.ppl import window_perplexity
    from saap_edge.models.onednn import onednn_linears, usable

    if not usable(hetero_model()):
        pytest.skip("torch without oneDNN")
    model = hetero_model(seed=3)
    windows = torch.randint(0, 512, (6, 24), generator=torch.Generator().manual_seed(0))
    before = [type(m) for m in model.modules()]
    plain = window_perplexity(model, windows, batch_size=4, progress=False, fast=False)
    fast = window_perplexity(model, windows, batch_size=4, progress=False, fast=True)
    assert fast["ppl"] == pytest.approx(plain["ppl"], rel=1e-5)
    with torch.inference_mode():
        ref = model(input_ids=windows).logits
        with onednn_linears(model):
            assert any(type(m).__name__ == "OneDNNLinear" for m in model.modules())
            out = model(input_ids=windows).logits
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert [type(m) for m in model.modules()] == before
