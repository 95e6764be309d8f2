"""Exported artifacts against the torch model they came from: WikiText-2 perplexity per runtime.

The model: SmolLM2-135M pruned 20% by SAAP with int4 groups (default: made here with
`saap-edge compress --ratio 0.2 --recovery none`, i.e. round-to-nearest int4 at G=32; or
--model DIR, e.g. the demo's saap-out). It is exported with the defaults users get
(`saap-edge export --format gguf` -> Q4_1, f16 embeddings; `--format onnx` -> MatMulNBits
int4, f16 embeddings), each export validated as usual, then every runtime scores the same
token windows:

  torch int4           the checkpoint through transformers (float32 compute)
  llama.cpp Q4_1       llama-cpp-python, logits of every position (KV cache f16, its default)
  onnxruntime int4     runtime/ort.py, CPU provider
  onnxruntime int4     the fused graph (the default), float32 activations
  llama.cpp Q4_1, embedding Q8_0 (`--embed-type q8_0`) and onnxruntime int4, embedding
                       int8 (`--embed-type int8`): the 8-bit embedding / output matrix,
                       candidate defaults if within 0.5% of the f16-embedding artifact
  onnxruntime int4, int8 activations (`--matmul-accuracy int8`, with and without the 8-bit
                       embedding): MatMulNBits quantizes activation blocks as llama.cpp does
  llama.cpp Q4_1, embedding Q4_1 too (`--q4-embedding`): the smallest GGUF, not gated

Protocol: WikiText-2 test text (rows joined by blank lines), tokenized once; every
non-overlapping window of 128 tokens (2382; --windows N for the first N); each window scored on its own (127
predictions, no BOS), NLL summed in float64. The bar (issue: exporters): each runtime within
2% of the torch int4 perplexity.

    python benchmarks/export_quality.py --data-dir ../shared/data
    python benchmarks/export_quality.py --smoke --data-dir ../shared/data   # a tiny model, 4 windows (export_quality_smoke.*)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine, smoke_model, smoke_work, write_results  # noqa: E402

from saap_edge.bench.weights import artifact_bytes  # noqa: E402
from saap_edge.compress import versions  # noqa: E402
from saap_edge.render import format_table  # noqa: E402

CLI = [sys.executable, "-m", "saap_edge.cli"]
BAR = 0.02


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="an int4 saap-edge directory (default: made here)")
    p.add_argument("--windows", type=int, default=0, help="WikiText-2 windows of --window tokens (0: the whole test set)")
    p.add_argument("--q4-embedding", action="store_true", help="also the GGUF with a Q4_1 embedding (measured before: +9.5%%)")
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data-dir", default=os.environ.get("SAAP_EDGE_DATA_DIR"))
    p.add_argument("--work", type=Path, default=Path("benchmarks/work/export"))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--only", nargs="+", default=None, metavar="LABEL",
                   help="score only the rows whose runtime label contains one of these, keeping the other rows of an "
                        "existing results/export_quality.json made on the same model and windows (its torch row included)")
    p.add_argument("--smoke", action="store_true",
                   help="the tiny random-weight model of benchmarks/harness.py compressed the same way (unless --model is "
                        "given), 4 windows: a check of this script; results export_quality_smoke.*, work files under "
                        "<work>/smoke")
    a = p.parse_args(argv)
    a.name = "export_quality"
    if a.smoke:
        a.name += "_smoke"
        a.windows = a.windows or 4
        smoke_work(a, p)
    return a


def _cli(args: list[str], log: Path) -> None:
    with open(log, "w") as f:
        run = subprocess.run(CLI + args, stdout=f, stderr=subprocess.STDOUT)
    if run.returncode:
        raise SystemExit(f"{' '.join(args[:2])} failed; see {log}")


def make_model(a, base: str = "smollm2-135m") -> Path:
    model = a.work / ("smollm2-saap20-int4" if base == "smollm2-135m" else f"{Path(base).name}-saap20-int4")
    if not (model / "config.json").exists():
        data = ["--data-dir", a.data_dir] if a.data_dir else []
        _cli(["compress", "--model", base, "--ratio", "0.2", "--recovery", "none", "--out", str(model),
              "--overwrite", "--no-progress"] + data, a.work / "compress.log")
    return model


def windows(model_dir: Path, a) -> np.ndarray:
    from transformers import AutoTokenizer

    from saap_edge.data import load_text

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(load_text("wikitext2", "test", a.data_dir), add_special_tokens=False)["input_ids"]
    n = min(a.windows or len(ids), len(ids) // a.window)
    return np.asarray(ids[: n * a.window], dtype=np.int64).reshape(n, a.window)


def nll_sum(logits: np.ndarray, ids: np.ndarray) -> float:
    """Summed next-token NLL of one window from its logits [T, vocab] (float64 log-softmax)."""
    z = logits[:-1].astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].sum())


def ppl_torch(model_dir: Path, w: np.ndarray) -> float:
    import torch

    import saap_edge  # noqa: F401  (registers the slim architecture)
    from saap_edge.eval.ppl import window_perplexity
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    return window_perplexity(model, torch.from_numpy(w), progress=False)["ppl"]


def ppl_llama_cpp(path: Path, w: np.ndarray, threads: int | None) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=w.shape[1] + 8, n_batch=w.shape[1], logits_all=True, verbose=False,
                          n_threads=threads)
    total = 0.0
    for row in w:
        llm.reset()
        llm.eval(row.tolist())
        total += nll_sum(np.asarray(llm.scores[: len(row)], dtype=np.float32), row)
    llm.close()
    return float(np.exp(total / (w.shape[0] * (w.shape[1] - 1))))


def ppl_ort(folder: Path, w: np.ndarray, threads: int | None) -> float:
    from runtime.ort import OrtRuntime

    rt = OrtRuntime(folder, n_threads=threads)
    total = 0.0
    for start in range(0, len(w), 8):
        batch = w[start : start + 8]
        logits, _ = rt.forward(batch)
        total += sum(nll_sum(lg, row) for lg, row in zip(logits, batch))
    return float(np.exp(total / (w.shape[0] * (w.shape[1] - 1))))


def previous_rows(a, data: dict) -> list[dict]:
    """The rows of an earlier run on the same model and windows, torch first ([] if none matches)."""
    path = a.out / f"{a.name}.json"
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    same = all(old.get(k) == data[k] for k in ("model", "windows", "window", "group_size"))
    if not same or not old.get("rows") or old["rows"][0]["runtime"] != "torch (float32)":
        return []
    data["command"] = old.get("command", "") + "; then " + data["command"]
    return old["rows"]


def export(model_dir: Path, fmt: str, a, embed: str = "f16", accuracy: str = "fp32") -> tuple[Path, dict]:
    suffix = ("" if embed == "f16" else f"-emb{embed}") + ("" if accuracy == "fp32" else f"-act{accuracy}")
    out = model_dir / (f"model-q4_1{suffix}.gguf" if fmt == "gguf" else f"onnx-int4{suffix}")
    log = a.work / f"export-{fmt}{suffix}.log"
    t0 = time.perf_counter()
    # the variants are measured, not gated: their read-back check is left to this table
    extra = ["--embed-type", embed, "--matmul-accuracy", accuracy] if fmt == "onnx" else ["--embed-type", embed]
    if embed != "f16" or accuracy != "fp32":
        extra.append("--no-validate")
    _cli(["export", str(model_dir), "--format", fmt, "--overwrite", "--out", str(out)] + extra, log)
    return out, {"bytes": artifact_bytes(out), "export_s": round(time.perf_counter() - t0, 1), "export_log": log.read_text()[-1500:]}


EMBED_BAR = 0.005  # an 8-bit embedding becomes the default where it costs at most 0.5% against f16, same runtime


def _costs(rows: list[dict], pairs) -> dict:
    """name -> perplexity of `variant` against `base` (both runtime labels), held to EMBED_BAR."""
    by = {r["runtime"]: r["ppl"] for r in rows}
    return {name: {"cost": by[variant] / by[base] - 1, "within_bar": by[variant] / by[base] - 1 <= EMBED_BAR}
            for name, base, variant in pairs if base in by and variant in by}


def embedding_verdict(rows: list[dict]) -> dict:
    """Per runtime: the 8-bit embedding's perplexity against the f16-embedding artifact's (float32 activations)."""
    return _costs(rows, (("llama.cpp", "llama.cpp", "llama.cpp, embedding Q8_0"),
                         ("onnxruntime", "onnxruntime", "onnxruntime, embedding int8")))


def activations_verdict(rows: list[dict]) -> dict:
    """onnxruntime's int8 activations (--matmul-accuracy int8) against float32 activations with the
    same embedding, and the two 8-bit choices together against the f16 / float32 artifact; the same
    bar as the embedding (at most +0.5%), llama.cpp's own Q4_1 cost against torch for reference."""
    head8 = "onnxruntime, embedding int8, int8 activations in the output matrix only"
    out = _costs(rows, (("int8 activations, f16 embedding", "onnxruntime", "onnxruntime, int8 activations"),
                        ("int8 activations, int8 embedding", "onnxruntime, embedding int8",
                         "onnxruntime, embedding int8, int8 activations"),
                        ("both against f16 / float32", "onnxruntime", "onnxruntime, embedding int8, int8 activations"),
                        ("int8 activations in the output matrix only, int8 embedding", "onnxruntime, embedding int8", head8),
                        ("int8 embedding and output-matrix activations against f16 / float32", "onnxruntime", head8)))
    by = {r["runtime"]: r["ppl"] for r in rows}
    if "llama.cpp" in by and "torch (float32)" in by:
        out["llama.cpp Q4_1 against torch (reference)"] = {"cost": by["llama.cpp"] / by["torch (float32)"] - 1}
    return out


def markdown(d: dict) -> str:
    rows = [[r["runtime"], r["artifact"], f"{r['bytes']:,}" if r.get("bytes") else "-", f"{r['ppl']:.3f}",
             f"{r['vs_torch']:+.2%}", ("yes" if abs(r["vs_torch"]) <= BAR else "NO") if r.get("gated", True) else "(not gated)",
             f"{r['time_s']:.0f}"] for r in d["rows"]]
    return "\n".join([
        "# Exported artifacts: perplexity through each runtime",
        "",
        f"Model: `{d['model']}` (SmolLM2-135M pruned 20% by SAAP, int4 groups G={d['group_size']}). WikiText-2 test, "
        + (f"all {d['windows']} windows" if d.get("whole_set") else f"first {d['windows']} windows")
        + f" of {d['window']} tokens, each scored alone (no BOS). Bar: within "
        f"{BAR:.0%} of the torch int4 perplexity. Machine: {d['machine']}.",
        "",
        format_table(["runtime", "artifact", "model bytes", "PPL", "vs torch int4", f"within {BAR:.0%}", "scoring s"], rows),
        "",
        *([f"8-bit embedding / output matrix against f16 in the same runtime (bar: at most +{EMBED_BAR:.1%}): "
           + "; ".join(f"{k} {v['cost']:+.2%} ({'within' if v['within_bar'] else 'over'})" for k, v in d["embedding_default"].items()),
           ""] if d.get("embedding_default") else []),
        *([f"int8 activations in onnxruntime (bar: at most +{EMBED_BAR:.1%}): "
           + "; ".join(f"{k} {v['cost']:+.2%}" + (f" ({'within' if v['within_bar'] else 'over'})" if "within_bar" in v else "")
                       for k, v in d["activations_default"].items()),
           ""] if d.get("activations_default") else []),
        f"Command: `{d['command']}`",
        "",
    ])


def main(argv=None) -> int:
    a = parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    model_dir = a.model or (make_model(a, str(smoke_model(a.work, a.data_dir))) if a.smoke else make_model(a))
    cfg = json.loads((model_dir / "config.json").read_text())
    if not cfg.get("quantization"):
        raise SystemExit(f"{model_dir} has no int4 groups; give a recovered (int4) directory")
    w = windows(model_dir, a)
    data = {"model": str(model_dir), "group_size": cfg["quantization"]["group_size"], "windows": int(w.shape[0]),
            "window": int(w.shape[1]), "whole_set": not a.windows, "machine": machine(), "versions": versions(),
            "command": "python benchmarks/export_quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "rows": []}
    kept = previous_rows(a, data) if a.only else []
    if kept:
        data["rows"] = kept
        ref = kept[0]["ppl"]
    else:
        t0 = time.perf_counter()
        ref = ppl_torch(model_dir, w)
        data["rows"].append({"runtime": "torch (float32)", "artifact": "checkpoint", "bytes": None, "ppl": ref,
                             "vs_torch": 0.0, "time_s": time.perf_counter() - t0})
    runs = [("gguf", "f16", "fp32", "llama.cpp", ppl_llama_cpp), ("onnx", "f16", "fp32", "onnxruntime", ppl_ort),
            ("gguf", "q8_0", "fp32", "llama.cpp, embedding Q8_0", ppl_llama_cpp),
            ("onnx", "int8", "fp32", "onnxruntime, embedding int8", ppl_ort),
            ("onnx", "f16", "int8", "onnxruntime, int8 activations", ppl_ort),
            ("onnx", "int8", "int8", "onnxruntime, embedding int8, int8 activations", ppl_ort),
            ("onnx", "int8", "int8-head", "onnxruntime, embedding int8, int8 activations in the output matrix only", ppl_ort)]
    if a.q4_embedding:
        runs.insert(2, ("gguf", "q4_1", "fp32", "llama.cpp, embedding Q4_1", ppl_llama_cpp))
    if a.only:
        runs = [r for r in runs if any(k in r[3] for k in a.only)]
        data["rows"] = [r for r in data["rows"] if r["runtime"] not in {run[3] for run in runs}]
    for fmt, embed, accuracy, label, score in runs:
        path, info = export(model_dir, fmt, a, embed, accuracy)
        t0 = time.perf_counter()
        ppl = score(path, w, a.threads)
        data["rows"].append({"runtime": label, "artifact": path.name, "ppl": ppl, "vs_torch": ppl / ref - 1,
                             "time_s": time.perf_counter() - t0, "gated": embed == "f16" and accuracy == "fp32", **info})
        write_results(a.out, a.name, data, markdown(data))
    data["embedding_default"] = embedding_verdict(data["rows"])
    data["activations_default"] = activations_verdict(data["rows"])
    write_results(a.out, a.name, data, markdown(data))
    print(markdown(data))
    return 0 if all(abs(r["vs_torch"]) <= BAR for r in data["rows"] if r.get("gated", True)) else 1


if __name__ == "__main__":
    sys.exit(main())
