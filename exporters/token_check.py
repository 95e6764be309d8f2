"""Export proves the tokenizer as it proves the weights.

A fixed check text (saap_edge.tokenizer.CHECK_TEXT with the tokenizer's special tokens in it)
and one rendered chat turn are tokenized by the source tokenizer (transformers, as the model was
pruned and trained) and by the artifact's runtime: llama.cpp with the GGUF's vocabulary only, or
for an ONNX folder `tokenizers` on its tokenizer.json (what runtime/ort.py and runtime/genai.py
read) and onnxruntime-genai's own tokenizer. The ids must be equal, and so must BOS, EOS and the
chat template's end-of-turn token (which the runtime must treat as an end of generation). Any
difference is a UserError naming the text and the first differing token: the export then keeps
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from saap_edge.errors import UserError
from saap_edge.tokenizer import CHECK_TEXT

FIX = ("the file was not kept; export from a directory with the model's original tokenizer files, or name the "
       "pre-tokenizer with --tokenizer-pre NAME")


@dataclass
class TokenCheck:
    runtime: str
    texts: int = 0
    tokens: int = 0
    specials: dict[str, int | None] = field(default_factory=dict)  # bos / eos / end_of_turn as both agree

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def describe(self) -> str:
        """The export table's cell, e.g. `3 texts, 508 tokens; bos 1, eos 2, end of turn 2 equal`."""
        named = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in self.specials.items() if v is not None)
        return f"{self.texts} texts, {self.tokens} tokens" + (f"; {named} equal" if named else "")

    def compare(self, tokenizer, texts: list[tuple[str, str, bool]], tokenize) -> None:
        """Each (label, text, with BOS / EOS) in the source tokenizer and in `tokenize(text, with)`."""
        for label, text, with_specials in texts:
            want = source_ids(tokenizer, text, with_specials)
            _first_difference(label, want, tokenize(text, with_specials), tokenizer, self.runtime)
            self.texts += 1
            self.tokens += len(want)


def _chat_turn(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return None
    for user, answer in (("What is 12 + 30? Answer in one word.", "Forty-two."), ("Hello there", "Hi")):
        turn = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        try:
            text = tokenizer.apply_chat_template(turn, tokenize=False)
        except Exception:  # noqa: BLE001 - a template that cannot render a plain turn has no turn to check
            return None
        if all(representable(tokenizer, t) == t for t in (user, answer)):
            return text
    return None


def representable(tokenizer, text: str) -> str:
    """The lines of `text` the source tokenizer encodes without loss (all of them for a real
    vocabulary; a small test vocabulary has no pieces for the scripts it never saw, and drops
    those characters, so a runtime has nothing to agree with there)."""
    lines = text.split("\n")
    kept = [line for line in lines
            if tokenizer.decode(tokenizer.encode(line, add_special_tokens=False)) in (line, " " + line)]
    return "\n".join(kept)


def check_texts(tokenizer, extra: tuple[str, ...] = ()) -> list[tuple[str, str, bool]]:
    """(label, text, with the tokenizer's own BOS / EOS rule) to tokenize on both sides."""
    specials = [t for t in (tokenizer.bos_token, tokenizer.eos_token) if t]
    specials += [t for t in getattr(tokenizer, "additional_special_tokens", []) or []][:4]
    base = representable(tokenizer, CHECK_TEXT)
    text = base + ("\n" + " x ".join(specials) + " end" if specials else "")
    texts = [("check text", text, True), ("check text without BOS/EOS", base, False)]
    turn = _chat_turn(tokenizer)
    if turn is not None:
        texts.append(("chat turn", turn, False))
    texts += [(f"text {i}", t, False) for i, t in enumerate(extra)]
    return texts


def source_ids(tokenizer, text: str, with_specials: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=with_specials)["input_ids"])


def _first_difference(label: str, want: list[int], got: list[int], tokenizer, runtime: str) -> None:
    if want == got:
        return
    i = next((k for k, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))

    def name(ids, k):
        if k >= len(ids):
            return "the end"
        text = tokenizer.convert_ids_to_tokens(ids[k]) if 0 <= ids[k] < len(tokenizer) else "outside the vocabulary"
        return f"{text!r} (id {ids[k]})"

    raise UserError(f"tokenizer check: {runtime} tokenizes the {label} into {len(got)} tokens, the source tokenizer "
                    f"into {len(want)}; first difference at token {i}: {name(got, i)} where the source has "
                    f"{name(want, i)}; {FIX}")


def _specials(tokenizer, runtime: str, bos: int | None, eos: int | None, is_end) -> dict[str, int | None]:
    """BOS / EOS of the runtime == the source's; the end-of-turn token ends generation there."""
    from exporters.onnx_fused import end_of_turn_id

    out = {}
    for key, want, got in (("bos", tokenizer.bos_token_id, bos), ("eos", tokenizer.eos_token_id, eos)):
        if want is not None and want != got:
            raise UserError(f"tokenizer check: {runtime} has {key.upper()} id {got}, the source tokenizer {want} "
                            f"({getattr(tokenizer, key + '_token')!r}); {FIX}")
        out[key] = want
    turn = end_of_turn_id(tokenizer)
    if turn is not None and not is_end(turn):
        raise UserError(f"tokenizer check: the chat template ends a turn with {tokenizer.convert_ids_to_tokens(turn)!r} "
                        f"(id {turn}), which {runtime} does not treat as an end of generation; {FIX}")
    out["end_of_turn"] = turn
    return out


def check_gguf_tokenizer(path: Path, tokenizer, extra: tuple[str, ...] = ()) -> TokenCheck:
    """The GGUF's vocabulary in llama.cpp (vocabulary only: no weights are read) against `tokenizer`."""
    from runtime.llamacpp import LlamaCppVocab

    with LlamaCppVocab(path) as vocab:
        check = TokenCheck("llama.cpp")
        check.compare(tokenizer, check_texts(tokenizer, extra), lambda text, specials: vocab.tokenize(text, specials))
        check.specials = _specials(tokenizer, "llama.cpp", vocab.bos, vocab.eos, vocab.is_end)
        return check


def check_onnx_tokenizer(folder: Path, tokenizer, extra: tuple[str, ...] = ()) -> list[TokenCheck]:
    """The folder's tokenizer.json in `tokenizers` (runtime/ort.py, runtime/genai.py) and, where the
    folder runs in onnxruntime-genai, that library's own tokenizer, against `tokenizer`."""
    import json

    from tokenizers import Tokenizer

    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"tokenizer check: {folder} has no tokenizer.json; {FIX}")
    runtimes = [("tokenizers", Tokenizer.from_file(str(folder / "tokenizer.json")))]
    genai = _genai_tokenizer(folder)
    if genai is not None:
        runtimes.append(("onnxruntime-genai", genai))
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    eos_ids = _eos_ids(folder, config)
    texts = check_texts(tokenizer, extra)
    checks = []
    for name, tok in runtimes:
        check = TokenCheck(name)
        if name == "tokenizers":
            check.compare(tokenizer, texts, lambda text, specials: list(tok.encode(text, add_special_tokens=specials).ids))
        else:  # onnxruntime-genai 0.18's encode adds no BOS / EOS (runtime/genai.py tokenizes with `tokenizers`)
            check.compare(tokenizer, [t for t in texts if not t[2]], lambda text, _: [int(i) for i in tok.encode(text)])
        eos = (_as_ids(config.get("eos_token_id")) or [None])[0]
        check.specials = _specials(tokenizer, name, config.get("bos_token_id"), eos, lambda i: i in eos_ids)
        checks.append(check)
    return checks


def _as_ids(value) -> list[int]:
    """An eos_token_id field (one id, a list of them, or None) as a list."""
    return list(value) if isinstance(value, list) else [] if value is None else [value]


def _eos_ids(folder: Path, config: dict) -> set[int]:
    """What ends generation in the folder's runtimes: `config`'s (config.json) and the
    generation_config / genai_config eos ids."""
    import json

    ids = set(_as_ids(config.get("eos_token_id")))
    for name in ("generation_config.json", "genai_config.json"):
        if (folder / name).is_file():
            data = json.loads((folder / name).read_text())
            ids.update(_as_ids((data.get("model") or {}).get("eos_token_id") if name == "genai_config.json"
                               else data.get("eos_token_id")))
    return ids


def _genai_tokenizer(folder: Path):
    """onnxruntime-genai's tokenizer of a folder it runs (genai_config.json), else None."""
    if not (folder / "genai_config.json").is_file():
        return None
    try:
        import onnxruntime_genai as og
    except ImportError:
        return None
    return og.Tokenizer(og.Model(str(folder)))
