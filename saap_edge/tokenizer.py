"""Tokenizers as llama.cpp runs them.

One table, `PRE_TOKENIZERS`, says for each pre-tokenizer that llama.cpp implements and saap-edge
can reproduce (its name in `tokenizer.ggml.pre`) how llama.cpp splits text and what the same
split is in Hugging Face's `tokenizers`. It is read both ways:
- HF -> GGUF (export): `recognise_pre` names the pre-tokenizer of a tokenizer.json, first by
  llama.cpp's own check-text hash (how its converter knows real vocabularies), then by the
  structure of the pre-tokenizer and normaliser (a tokenizer trained for a test has its own
  hash); `vocab_kind` says whether the vocabulary is byte-level BPE (`gpt2`) or SentencePiece
  (`llama`).
- GGUF -> HF (loading): `tokenizer_from_gguf` builds the fast tokenizer the file describes:
  the BOS / EOS ids and add_bos / add_eos of the file, its pre-tokenizer, merges and token types
  (transformers' own conversion of a GGUF gets several of these wrong for byte-level files:
  byte fallback on, GPT-2's regex for every pre-tokenizer, the EOS text taken from BOS).

Written here rather than taken from a library: gguf-py reads HF tokenizer files into GGUF
fields but does not name the pre-tokenizer (llama.cpp's converter does it by a hash table
inside a script that needs the model's hub name), and transformers' GGUF reader ignores
`tokenizer.ggml.pre`. The regexes are llama.cpp's (src/llama-vocab.cpp) and Hugging Face's
(the models' public tokenizer.json files); the export checks every choice by tokenizing text
with both (exporters.token_check).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from saap_edge.errors import UserError

# GPT-2's split, as llama.cpp writes it (tokenizers' ByteLevel regex adds a final `|\s+`, which
# only names the gaps the split keeps anyway)
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# LLaMA-3's split as its tokenizer.json spells it (llama.cpp runs an equivalent without `(?i:`)
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTokenizer:
    """How one llama.cpp pre-tokenizer splits text, as a `tokenizers` pre-tokenizer.

    `splits`: regexes applied one after the other, each splitting the pieces of the one before
    (llama.cpp's unicode_regex_split; `tokenizers`' Split with behaviour "isolated" does the same).
    `digits`: single digits split off first (`tokenizers`' Digits(individual_digits=True)).
    `byte_level_regex`: the split is the one built into ByteLevel (use_regex=True), GPT-2's.
    `ignore_merges`: a word that is itself a token is not merged from pieces (llama.cpp sets it
    for this pre-tokenizer; the HF model must say the same)."""

    splits: tuple[str, ...] = ()
    digits: bool = False
    byte_level_regex: bool = False
    ignore_merges: bool = False
    add_bos: bool = False  # llama.cpp's add_bos_token for a file that does not say

    def hf(self):
        """The `tokenizers` pre-tokenizer that splits as llama.cpp does."""
        from tokenizers import Regex, pre_tokenizers as pt

        parts = [pt.Digits(individual_digits=True)] if self.digits else []
        parts += [pt.Split(Regex(r), behavior="isolated", invert=False) for r in self.splits]
        parts.append(pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=self.byte_level_regex))
        return parts[0] if len(parts) == 1 else pt.Sequence(parts)

    def shape(self) -> tuple:
        return pre_shape(json.loads(self.hf().__getstate__()))


PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    # llama.cpp's fallback for BPE; not GPT-2's: punctuation runs are split off first (`I'm` -> I ' m)
    "default": PreTokenizer(splits=(r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]")),
    "gpt-2": PreTokenizer(byte_level_regex=True),
    "smollm": PreTokenizer(digits=True, byte_level_regex=True),  # SmolLM / SmolLM2
    "llama-bpe": PreTokenizer(splits=(LLAMA3_REGEX,), ignore_merges=True, add_bos=True),  # LLaMA-3, 3.1, 3.2
}
PRE_ALIASES = {"llama3": "llama-bpe", "llama-v3": "llama-bpe"}  # names llama.cpp reads as llama-bpe

# Every `tokenizer.ggml.pre` that llama.cpp (as llama-cpp-python 0.3.36 vendors it) accepts: what
# --tokenizer-pre may name. Names outside PRE_TOKENIZERS are written as asked and proven (or
# refused) by the export's tokenization check alone.
LLAMA_CPP_PRE_NAMES = frozenset("""
default minicpm5 llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano deepseek-llm
deepseek-coder deepseek-v3 spark2_5 youtu falcon mpt starcoder gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es
jina-v2-de a.x-4.0 mellum modern-bert jais-2 gemma4 granite-embed-multi-311m sarvam-moe jina-v1-en jina-v2-code
roberta-bpe whitespace refact command-r qwen2 deepseek-r1-qwen kormo f2llmv2 qwen35 stablelm2 olmo dbrx smaug-bpe
poro-chat chatglm-bpe glm4 glm5 viking jais tekken smollm codeshell bloom gpt3-finnish exaone exaone4 exaone-moe
chameleon minerva-7b megrez gpt-4o llama4 kanana2 talkie granite-embed-multi-97m tiny_aya cohere2moe superbpe
trillion granite-docling bailingmoe bailingmoe2 llada-moe seed-coder hunyuan hunyuan-dense hy_v4 joyai-llm
kimi-k2 ufakzeka grok-2 afmoe laguna minimax-m2 solar-open mellum2""".split())

# llama.cpp's converter hashes the ids a HF tokenizer gives this text (encode with its special
# tokens) to name the pre-tokenizer of a real vocabulary; the same text and hash rule here give
# the same names. Hashes of the LLaMA-block families' tokenizers (convert_hf_to_gguf's table).
LLAMA_CPP_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM-135M (SmolLM2 too)
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",  # deepseek-llm-7b-base
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",  # deepseek-coder-6.7b
}

# The text every export tokenizes with the source tokenizer and with the artifact's runtime:
# whitespace runs, digits, contractions, code, several scripts, emoji (special tokens are added
# per tokenizer by `check_texts`).
CHECK_TEXT = (
    "Hello world! I'm sure you'll see: we've   three  spaces,\ttabs\t\tand\n\nnew lines.\n"
    "Numbers 7 42 1234 3.14159 1,000,000 2026-12-07 0x1F; ratio=0.5\n"
    "def f(x):\n    return x**2  # squared\n\tif a != b: print(f'{a}')\n"
    "Ünïcödé café naïve — Straße; Привет, мир; 你好，世界; こんにちは; 안녕하세요; مرحبا; नमस्ते\n"
    "emoji 🚀🦙 😶\u200d🌫️ ✅ 👍🏽 and 'quoted' \"text\"... !!! ???  trailing   "
)


def check_hash(tokenizer) -> str:
    """llama.cpp's converter's hash of a HF tokenizer (chkhsh)."""
    ids = tokenizer.encode(LLAMA_CPP_CHECK_TEXT)
    return hashlib.sha256(str(ids).encode()).hexdigest()


# ---------------------------------------------------------------------- HF -> GGUF: recognising


def _flatten(node) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        out = []
        for key in ("pretokenizers", "normalizers", "decoders"):
            for child in node.get(key) or []:
                out += _flatten(child)
        return out
    return [node]


def pre_shape(pre: dict | None) -> tuple:
    """What matters of a tokenizer.json pre-tokenizer for the split it makes (types, patterns and
    flags; offsets handling left out)."""
    shape = []
    for p in _flatten(pre):
        kind = p.get("type")
        if kind == "ByteLevel":
            shape.append((kind, bool(p.get("add_prefix_space")), bool(p.get("use_regex", True))))
        elif kind == "Split":
            pattern = p.get("pattern") or {}
            shape.append((kind, pattern.get("Regex", pattern.get("String")), p.get("behavior"), bool(p.get("invert"))))
        elif kind == "Digits":
            shape.append((kind, bool(p.get("individual_digits"))))
        else:
            shape.append((kind, json.dumps(p, sort_keys=True)))
    return tuple(shape)


def describe_pre(pre: dict | None) -> str:
    parts = [p.get("type", "?") for p in _flatten(pre)]
    return " + ".join(parts) if parts else "none"


def vocab_kind(data: dict) -> str:
    """`gpt2` (byte-level BPE: ByteLevel in the pre-tokenizer or the decoder) or `llama`
    (SentencePiece-style: pieces with ▁ and <0xXX> byte fallback); UserError for anything else."""
    model = data.get("model") or {}
    pieces = [p.get("type") for p in _flatten(data.get("pre_tokenizer"))] + \
             [d.get("type") for d in _flatten(data.get("decoder"))]
    if model.get("type") == "BPE" and "ByteLevel" in pieces:
        return "gpt2"
    normalizers = [n.get("type") for n in _flatten(data.get("normalizer"))]
    if model.get("type") == "BPE" and ("Metaspace" in pieces or "Prepend" in normalizers or "Replace" in normalizers):
        return "llama"
    raise UserError(f"tokenizer.json holds a {model.get('type', 'unknown')} model with pre-tokenizer "
                    f"{describe_pre(data.get('pre_tokenizer'))} and decoder {describe_pre(data.get('decoder'))}: "
                    "neither byte-level BPE nor a SentencePiece vocabulary, which are the two LLaMA-family kinds "
                    "llama.cpp runs; export from a directory with the model's original tokenizer files")


def recognise_pre(data: dict, tokenizer=None, override: str | None = None) -> tuple[str, str]:
    """(name, how it was known) of the llama.cpp pre-tokenizer of a byte-level tokenizer.json
    (`data`); `tokenizer` the HF tokenizer for the hash, `override` a --tokenizer-pre NAME."""
    if override:
        if override not in LLAMA_CPP_PRE_NAMES:
            raise UserError(f"--tokenizer-pre {override!r} is not a pre-tokenizer llama.cpp knows; "
                            f"saap-edge reproduces {', '.join(PRE_TOKENIZERS)}")
        return override, "--tokenizer-pre"
    if tokenizer is not None:
        name = KNOWN_HASHES.get(check_hash(tokenizer))
        if name:
            return name, "llama.cpp's check-text hash"
    if not _flatten(data.get("normalizer")):
        shape = pre_shape(data.get("pre_tokenizer"))
        for name, pre in PRE_TOKENIZERS.items():
            if pre.shape() == shape:
                return name, "tokenizer.json's pre-tokenizer"
    raise UserError(f"tokenizer.json's pre-tokenizer ({describe_pre(data.get('pre_tokenizer'))}, normaliser "
                    f"{describe_pre(data.get('normalizer'))}) is not one llama.cpp implements as saap-edge knows "
                    f"({', '.join(PRE_TOKENIZERS)}); pass --tokenizer-pre NAME with one of llama.cpp's names "
                    "(the export then proves it on the check text)")


# ---------------------------------------------------------------------- GGUF -> HF: rebuilding


@dataclass
class GGUFVocab:
    """The tokenizer.ggml.* fields of a GGUF file."""

    model: str
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    special: dict[str, int]  # bos / eos / unk / pad / eot -> id
    add_bos: bool | None
    add_eos: bool | None
    add_space_prefix: bool | None
    chat_template: str | None

    @classmethod
    def read(cls, path: Path) -> GGUFVocab:
        from saap_edge.models.gguf_index import GGUFIndex

        try:
            index = GGUFIndex(path)
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"cannot read {path} as GGUF ({type(exc).__name__}: {exc}); is the file complete?") from exc

        def get(key):
            value = index.get(f"tokenizer.ggml.{key}", index.get(f"tokenizer.{key}"))
            return value.tolist() if hasattr(value, "tolist") else value

        tokens, model = get("tokens"), get("model")
        if tokens is None or model is None:
            raise UserError(f"{path} has no tokenizer metadata (tokenizer.ggml.tokens / .model); convert it with "
                            "llama.cpp's convert_hf_to_gguf.py from the model's HF directory, or load that directory")
        ids = {k: get(f"{k}_token_id") for k in ("bos", "eos", "unknown", "padding", "eot")}
        special = {k: int(i) for k, i in ids.items() if i is not None and 0 <= int(i) < len(tokens)}  # 2^32-1: none
        scores = get("scores")
        return cls(model=model, pre=get("pre"), tokens=list(tokens), types=[int(t) for t in get("token_type")],
                   scores=None if scores is None else [float(s) for s in scores], merges=get("merges"),
                   special=special, add_bos=get("add_bos_token"), add_eos=get("add_eos_token"),
                   add_space_prefix=get("add_space_prefix"), chat_template=get("chat_template"))


TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def tokenizer_from_gguf(path: Path):
    """The HF fast tokenizer that tokenizes as llama.cpp does with the GGUF at `path`. UserError for
    a file without tokenizer metadata or a kind / pre-tokenizer not rebuilt here."""
    vocab = GGUFVocab.read(path)
    if vocab.model == "gpt2":
        tok = _byte_level_tokenizer(vocab, path)
    elif vocab.model == "llama":
        tok = _sentencepiece_tokenizer(vocab)
    else:
        raise UserError(f"{path}: tokenizer.ggml.model {vocab.model!r} is not a LLaMA-family vocabulary (gpt2 or llama)")
    if vocab.chat_template:
        tok.chat_template = vocab.chat_template
    return tok


def _special_text(vocab: GGUFVocab, key: str) -> str | None:
    i = vocab.special.get(key)
    return vocab.tokens[i] if i is not None and 0 <= i < len(vocab.tokens) else None


def _byte_level_tokenizer(vocab: GGUFVocab, path: Path):
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    pre_name = PRE_ALIASES.get(vocab.pre or "default", vocab.pre or "default")
    pre = PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        raise UserError(f"{path}: tokenizer.ggml.pre {vocab.pre!r} is not a pre-tokenizer saap-edge rebuilds "
                        f"({', '.join(PRE_TOKENIZERS)}); load the model's HF directory instead")
    merges = [tuple(m.split(" ", 1)) for m in vocab.merges or []]
    # every token in the model's vocabulary (ids without holes); CONTROL / USER_DEFINED ones are
    # also added tokens, matched in the text before the model sees it
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    tok = Tokenizer(models.BPE(vocab=ids, merges=merges, ignore_merges=pre.ignore_merges, byte_fallback=False))
    tok.pre_tokenizer = pre.hf()
    tok.decoder = decoders.ByteLevel()
    add_bos = pre.add_bos if vocab.add_bos is None else vocab.add_bos  # llama.cpp's default where the file is silent
    added = [AddedToken(t, special=vocab.types[i] == TOKEN_CONTROL, normalized=False)
             for i, t in enumerate(vocab.tokens) if vocab.types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
    _add_keeping_ids(tok, added, ids, path)
    bos, eos = _special_text(vocab, "bos"), _special_text(vocab, "eos")
    _post_processor(tok, vocab, add_bos, bos, eos)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   unk_token=_special_text(vocab, "unknown"), pad_token=_special_text(vocab, "padding"),
                                   add_bos_token=bool(add_bos), add_eos_token=bool(vocab.add_eos),
                                   clean_up_tokenization_spaces=False)


def _add_keeping_ids(tok, added, ids: dict[str, int], path: Path) -> None:
    """CONTROL / USER_DEFINED tokens as added tokens (matched in the text before the model sees it).
    Every token is already in the BPE model's vocabulary, so each keeps its GGUF id; UserError if
    one would not."""
    tok.add_special_tokens([a for a in added if a.special])
    tok.add_tokens([a for a in added if not a.special])
    for a in added:
        if tok.token_to_id(a.content) != ids[a.content]:
            raise UserError(f"{path}: added token {a.content!r} (id {ids[a.content]}) does not keep its id when rebuilt "
                            "as a Hugging Face tokenizer; load the model's HF directory instead")


def _post_processor(tok, vocab: GGUFVocab, add_bos: bool, bos: str | None, eos: str | None) -> None:
    """BOS / EOS added as the file says (llama.cpp's add_bos_token / add_eos_token)."""
    from tokenizers import processors

    single, pair, specials = "$A", "$A $B", []
    if add_bos and bos is not None:
        single, pair = f"{bos} {single}", f"{bos} $A {bos} $B"
        specials.append((bos, vocab.special["bos"]))
    if vocab.add_eos and eos is not None:
        single, pair = f"{single} {eos}", f"{pair} {eos}"
        specials.append((eos, vocab.special["eos"]))
    if specials:
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _sentencepiece_tokenizer(vocab: GGUFVocab):
    """A SentencePiece model (one piece per GGUF token, with its score and type) and transformers'
    LLaMA tokenizer over it; the tokenizer keeps the file (`vocab_file`), so saving it writes
    tokenizer.model beside tokenizer.json."""
    from sentencepiece import sentencepiece_model_pb2 as spm
    from transformers import LlamaTokenizerFast

    proto = spm.ModelProto()
    proto.trainer_spec.model_type = spm.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = any(t == TOKEN_BYTE for t in vocab.types)
    proto.trainer_spec.split_digits = True
    proto.trainer_spec.unk_id = vocab.special.get("unknown", 0)
    proto.trainer_spec.bos_id = vocab.special.get("bos", -1)
    proto.trainer_spec.eos_id = vocab.special.get("eos", -1)
    proto.trainer_spec.pad_id = vocab.special.get("padding", -1)
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = vocab.add_space_prefix is not False
    proto.normalizer_spec.remove_extra_whitespaces = False
    kinds = {TOKEN_NORMAL: spm.ModelProto.SentencePiece.NORMAL, TOKEN_UNKNOWN: spm.ModelProto.SentencePiece.UNKNOWN,
             TOKEN_CONTROL: spm.ModelProto.SentencePiece.CONTROL, TOKEN_USER_DEFINED: spm.ModelProto.SentencePiece.USER_DEFINED,
             TOKEN_UNUSED: spm.ModelProto.SentencePiece.UNUSED, TOKEN_BYTE: spm.ModelProto.SentencePiece.BYTE}
    for i, text in enumerate(vocab.tokens):
        piece = proto.pieces.add()
        piece.piece, piece.score = text, (vocab.scores[i] if vocab.scores else 0.0)
        piece.type = kinds.get(vocab.types[i], spm.ModelProto.SentencePiece.NORMAL)
    # the model file must outlive this call: the tokenizer reads it again when it is saved
    folder = Path(tempfile.mkdtemp(prefix="saap-spm-"))
    model_file = folder / "tokenizer.model"
    model_file.write_bytes(proto.SerializeToString())
    # add_prefix_space named: left None, transformers' converter drops the leading ▁ (Prepend)
    tok = LlamaTokenizerFast(vocab_file=str(model_file), from_slow=True, legacy=True,
                              add_prefix_space=proto.normalizer_spec.add_dummy_prefix,
                              bos_token=_special_text(vocab, "bos"), eos_token=_special_text(vocab, "eos"),
                              unk_token=_special_text(vocab, "unknown"), pad_token=_special_text(vocab, "padding"),
                              add_bos_token=vocab.add_bos is not False, add_eos_token=bool(vocab.add_eos),
                              clean_up_tokenization_spaces=False)
    # ...but not saved: tokenizer.json holds the prefix, and a saved add_prefix_space makes
    # transformers rebuild from tokenizer.model, which a directory need not have
    tok.init_kwargs.pop("add_prefix_space", None)
    return tok
