"""The tokenizer of a GGUF, written as llama.cpp's own converter writes it for the same files.

- SentencePiece (`tokenizer.ggml.model = llama`): pieces, scores and types from tokenizer.model;
  a directory with only tokenizer.json (a SentencePiece vocabulary converted to `tokenizers`' BPE)
  gets each token's score from the rank of the merge that makes it, which is the order llama.cpp's
  SentencePiece tokenizer merges in (every score -1000 would merge in vocabulary order).
- Byte-level BPE (`gpt2`): tokens, merges and the pre-tokenizer named by
  saap_edge.tokenizer.recognise_pre (llama.cpp's check-text hash, then the structure).
- Both: added tokens typed CONTROL (special) or USER_DEFINED, embedding rows past the tokenizer
  as [PADn] UNUSED; BOS / EOS / UNK / PAD ids, add_bos / add_eos and the chat template by
  gguf-py's SpecialVocab (it reads tokenizer_config.json and the post-processor).

gguf-py's own readers are not used for the tokens: BpeVocab refuses a tokenizer.json whose
decoder is not ByteLevel (transformers' conversions write a Sequence) and LlamaHfVocab gives
every score -1000.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from saap_edge.errors import UserError
from saap_edge.tokenizer import recognise_pre, vocab_kind

T = gguf.TokenType


@dataclass
class VocabFields:
    model: str  # llama (SentencePiece) or gpt2 (byte-level BPE)
    pre: str
    how: str  # how the pre-tokenizer was named
    tokens: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    merges: list[str] | None = None
    add_space_prefix: bool | None = None

    def describe(self, directory: Path) -> str:
        pre = f", pre-tokenizer {self.pre} ({self.how})" if self.model == "gpt2" else ""
        return f"built from {directory} ({self.model}{pre})"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot be read as JSON ({type(exc).__name__}); restore the model's tokenizer files") from exc


def vocab_fields(directory: Path, vocab_size: int, pre_override: str | None = None, tokenizer=None) -> VocabFields:
    """The tokenizer fields for the HF tokenizer files in `directory`, for an embedding of
    `vocab_size` rows; `tokenizer` (the HF tokenizer of the directory) names the pre-tokenizer by
    llama.cpp's hash."""
    tok_json = directory / "tokenizer.json"
    data = _read_json(tok_json) if tok_json.is_file() else {}
    if (directory / "tokenizer.model").is_file():
        fields = _sentencepiece_file(directory / "tokenizer.model")
    elif not data:
        raise UserError(f"{directory} has no tokenizer.json or tokenizer.model: no tokenizer to write into the GGUF; "
                        "copy the model's tokenizer files into it")
    elif vocab_kind(data) == "llama":
        fields = _sentencepiece_json(data)
    else:
        pre, how = recognise_pre(data, tokenizer, pre_override)
        fields = _byte_level(data, pre, how)
    if pre_override and fields.model == "llama":
        raise UserError("--tokenizer-pre applies to byte-level BPE tokenizers; this one is SentencePiece (llama.cpp "
                        "reads no pre-tokenizer for it): drop the flag")
    _added_tokens(fields, data)
    n = len(fields.tokens)
    if n > vocab_size:
        raise UserError(f"{directory}: the tokenizer has {n} tokens but the embedding only {vocab_size} rows; ids past "
                        f"{vocab_size - 1} would read outside it: give the model's own tokenizer files")
    _pad_to(fields, vocab_size)  # embedding rows past the tokenizer's vocabulary
    return fields


def _pad_to(fields: VocabFields, n: int) -> None:
    """Ids up to n - 1 exist: the missing ones as [PADi], UNUSED (as llama.cpp's converter writes them)."""
    while len(fields.tokens) < n:
        fields.tokens.append(f"[PAD{len(fields.tokens)}]")
        fields.scores.append(-1000.0)
        fields.types.append(int(T.UNUSED))


def _sentencepiece_file(path: Path) -> VocabFields:
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as spm

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as exc:
        raise UserError(f"{path}: not a SentencePiece model ({str(exc).splitlines()[0][:120]}); restore it from the "
                        "model's files") from exc
    proto = spm.ModelProto()
    proto.ParseFromString(path.read_bytes())
    fields = VocabFields("llama", "default", "SentencePiece", add_space_prefix=proto.normalizer_spec.add_dummy_prefix)
    for i in range(sp.vocab_size()):
        kind = (T.UNKNOWN if sp.IsUnknown(i) else T.CONTROL if sp.IsControl(i) else T.UNUSED if sp.IsUnused(i)
                else T.BYTE if sp.IsByte(i) else T.NORMAL)
        if proto.pieces[i].type == spm.ModelProto.SentencePiece.USER_DEFINED:
            kind = T.USER_DEFINED
        fields.tokens.append(sp.IdToPiece(i))
        fields.scores.append(float(sp.GetScore(i)))
        fields.types.append(int(kind))
    return fields


def _merges(model: dict) -> list[tuple[str, str]]:
    """tokenizer.json merges: "a b" strings (older files) or [a, b] pairs."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]


def _ordered(vocab: dict[str, int]) -> tuple[list[str], set[int]]:
    """The tokens by id, holes in the ids as [PADi], and the holes' ids."""
    n = max(vocab.values()) + 1 if vocab else 0
    tokens = [f"[PAD{i}]" for i in range(n)]
    for text, i in vocab.items():
        tokens[i] = text
    return tokens, set(range(n)) - set(vocab.values())


def _sentencepiece_json(data: dict) -> VocabFields:
    model = data["model"]
    vocab = model.get("vocab") or {}
    fields = VocabFields("llama", "default", "SentencePiece (tokenizer.json)")
    fields.tokens, _ = _ordered(vocab)
    rank = {}
    for r, (a, b) in enumerate(_merges(model)):
        rank.setdefault(a + b, r)
    unk = model.get("unk_token")
    for text in fields.tokens:
        if text in rank:
            score = -float(rank[text] + 1)
        else:  # single characters (never made by a merge) and pieces no merge makes
            score = 0.0 if len(text) == 1 else -1e9
        fields.scores.append(score)
        is_byte = len(text) == 6 and text.startswith("<0x") and text.endswith(">")
        fields.types.append(int(T.UNKNOWN if text == unk else T.BYTE if is_byte else T.NORMAL))
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") == "Metaspace":
        fields.add_space_prefix = pre.get("prepend_scheme", "first") != "never"
    else:  # the newer layout: a Prepend("▁") normaliser
        fields.add_space_prefix = "Prepend" in json.dumps(data.get("normalizer") or {})
    return fields


def _byte_level(data: dict, pre: str, how: str) -> VocabFields:
    model = data["model"]
    fields = VocabFields("gpt2", pre, how)
    fields.tokens, holes = _ordered(model.get("vocab") or {})
    fields.scores = [0.0] * len(fields.tokens)
    fields.types = [int(T.UNUSED if i in holes else T.NORMAL) for i in range(len(fields.tokens))]
    fields.merges = [f"{a} {b}" for a, b in _merges(model)]
    return fields


def _looks_special(text: str) -> bool:
    """Added tokens llama.cpp's converter types CONTROL though the file says not special."""
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>")


def _added_tokens(fields: VocabFields, data: dict) -> None:
    """tokenizer.json's added tokens: CONTROL when special, USER_DEFINED otherwise, at their ids."""
    for added in data.get("added_tokens") or []:
        i, text = int(added["id"]), added["content"]
        _pad_to(fields, i + 1)
        special = added.get("special") or _looks_special(text)
        if fields.types[i] == int(T.UNKNOWN) and fields.model == "llama":
            continue  # SentencePiece's <unk> stays UNKNOWN, as llama.cpp expects
        if fields.types[i] == int(T.UNUSED):  # a token past the base vocabulary
            fields.scores[i] = -1000.0 if fields.model == "llama" else 0.0
        fields.tokens[i] = text
        fields.types[i] = int(T.CONTROL if special else T.USER_DEFINED)


def add_vocab(writer: gguf.GGUFWriter, fields: VocabFields, directory: Path) -> None:
    """`fields` and the directory's special tokens, add flags and chat template into `writer`."""
    writer.add_tokenizer_model(fields.model)
    writer.add_tokenizer_pre(fields.pre)
    writer.add_token_list(fields.tokens)
    writer.add_token_scores(fields.scores)
    writer.add_token_types(fields.types)
    if fields.merges is not None:
        writer.add_token_merges(fields.merges)
    if fields.add_space_prefix is not None:
        writer.add_add_space_prefix(fields.add_space_prefix)
    # gguf-py warns on the pair template <bos> $A <bos> $B that LLaMA-3's own tokenizer.json has
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)
    gguf.SpecialVocab(directory, load_merges=False, n_vocab=len(fields.tokens)).add_to_gguf(writer)
