"""Shared pytest fixtures: the offline data folder and tiny LLaMA models built in the test."""

import os
from pathlib import Path

import pytest
import torch

DATA_DIR = Path(os.environ.get("SAAP_EDGE_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")


@pytest.fixture(autouse=True)
def _teacher_cache(tmp_path_factory, monkeypatch):
    """Distillation caches go to a temporary folder, never the user's ~/.cache."""
    monkeypatch.setenv("SAAP_EDGE_CACHE", str(tmp_path_factory.getbasetemp() / "saap-edge-cache"))


@pytest.fixture
def data_dir() -> Path:
    """The offline data folder: $SAAP_EDGE_DATA_DIR, else ../shared/data beside the repo."""
    return DATA_DIR


def tiny_llama(n_heads=8, n_kv=4, layers=6, hidden=64, ffn=128, vocab=512, seed=0):
    """A random LLaMA causal LM small enough for CPU unit tests (GQA when n_kv < n_heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def hetero_model(seed: int = 0, uniform: bool = False, vocab: int = 512, heads_and_modules: bool = False):
    """A random slim model (saap_edge.models.slim) whose layers differ (or not), head_dim 32, scaled so logits spread.
    `heads_and_modules`: layers as query-head and module units leave them: 2 KV groups x 2 heads,
    an attention-free layer, 3 KV groups x 2 heads."""
    from saap_edge.models.slim import SlimLlamaConfig, SlimLlamaForCausalLM

    heads, kv, ffn = ([4, 4, 4], [2, 2, 2], [256, 256, 256]) if uniform else ([4, 2, 4], [2, 1, 1], [256, 96, 160])
    if heads_and_modules:
        heads, kv = [4, 0, 6], [2, 0, 3]
    config = SlimLlamaConfig(
        vocab_size=vocab, hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=256, head_dim=32, num_attention_heads_per_layer=heads, num_key_value_heads_per_layer=kv,
        intermediate_size_per_layer=ffn, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = SlimLlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            else:
                p.uniform_(0.8, 1.2)
    return model.eval()


def greedy_torch(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after `ids` from transformers' generate (end-of-text ignored)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                             eos_token_id=None, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def greedy_runtime(rt, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after `ids` from a device runtime's generator (end-of-text ignored)."""
    from runtime.base import Generator

    rt.eos_token_ids = set()
    gen = Generator(rt)
    list(gen.stream(ids, n))
    return gen.stats.token_ids


def save_tiny32(path: Path, tokenizer) -> Path:
    """An HF directory of a tiny LLaMA whose widths are multiples of 32 (int4 groups and GGUF
    blocks fit), with the test tokenizer: what the CLI tests compress."""
    tiny_llama(n_heads=4, n_kv=2, hidden=128, ffn=256, layers=4).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def book_text(chars: int = 60_000) -> str:
    return (DATA_DIR / "text" / "books" / "botchan.txt").read_text(encoding="utf-8-sig")[:chars]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab 512) trained here on book text: no hub download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([book_text()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """An HF directory (safetensors + tokenizer) of a tiny GQA LLaMA, for CLI tests."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(path)
    return path


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a test skipped because a dependency could not be imported fails instead:
    CI installs every extra, so such a skip means a package went missing, not a choice.
    GPU-marked tests still skip where there is no GPU."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") != "true" or not report.skipped or "gpu" in item.keywords:
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if "could not import" in reason:
        report.outcome = "failed"
        report.longrepr = f"CI=true: a dependency is missing ({reason}); install the test extras"
