"""Time one artifact on this device: prefill and decode tokens/s at batch 1 (no torch).

    python -m runtime.bench ARTIFACT --prompt-tokens 128 --new-tokens 64 --reps 3

The prompt is fixed random token ids (seed 0) and generation is greedy with end-of-text
ignored, so every run takes exactly the same steps. `--warmup` runs are discarded. Prints
one JSON line. `saap-edge bench` runs this in a child process per row (torch rows use the
same loop through saap_edge.bench.worker), so each row's peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from runtime.base import Generator


def time_generation(rt, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one greedy run; decode counts the steps after the first token."""
    rt.eos_token_ids = set()
    gen = Generator(rt)
    for _ in gen.stream(prompt, new_tokens):
        pass
    return gen.stats.prefill_tok_s, gen.stats.decode_tok_s


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def measure(rt, prompt_tokens: int, new_tokens: int, reps: int, warmup: int) -> dict:
    vocab = getattr(rt, "vocab_size", None) or 32000
    prompt = np.random.default_rng(0).integers(3, min(vocab, 32000), size=prompt_tokens).tolist()
    for _ in range(warmup):
        time_generation(rt, prompt, min(new_tokens, 8))
    runs = [time_generation(rt, prompt, new_tokens) for _ in range(reps)]
    return {"engine": rt.name, "prefill_tok_s": summary([r[0] for r in runs]), "decode_tok_s": summary([r[1] for r in runs]),
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "reps": reps, "warmup": warmup}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="a .gguf file or an exported ONNX folder")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--provider", default="auto", help="ONNX: auto, cpu or cuda (onnxruntime execution provider)")
    p.add_argument("--engine", default="auto", help="ONNX: auto, genai (onnxruntime-genai) or onnxruntime (our loop)")


def main(argv=None) -> int:
    from runtime import open_runtime

    p = argparse.ArgumentParser(prog="python -m runtime.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    rt = open_runtime(a.artifact, a.threads, a.provider, a.engine)
    load_s = time.perf_counter() - t0
    result = measure(rt, a.prompt_tokens, a.new_tokens, a.reps, a.warmup)
    print(json.dumps({"artifact": a.artifact, "load_s": load_s, "provider": getattr(rt, "provider", None), **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
