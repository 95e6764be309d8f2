"""`python -m runtime ARTIFACT --prompt "..."`: generate on a device without torch installed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.base import Generator, Sampling
from runtime.base import RuntimeLoadError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="a .gguf file or an exported ONNX folder (model.onnx inside)")
    p.add_argument("--prompt", default="Once upon a time", help="text to continue (default: %(default)s)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=64, help="tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens, 0 for all (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, 1 for off (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the runtime's choice)")
    p.add_argument("--engine", default="auto", choices=ENGINES, help="ONNX: onnxruntime-genai's generation loop (genai; "
                   "folders with genai_config.json), our numpy loop over onnxruntime (onnxruntime), or auto: genai where it "
                   "is installed and the folder has its config (default: %(default)s)")
    p.add_argument("--provider", default="auto", help="ONNX: onnxruntime execution provider, auto (CUDA where "
                   "onnxruntime-gpu has it, else CPU), cpu or cuda (default: %(default)s)")


ENGINES = ("auto", "genai", "onnxruntime")


def open_runtime(path: str, threads: int | None = None, provider: str = "auto", engine: str = "auto"):
    """The runtime for an artifact: a .gguf file (llama.cpp) or an ONNX folder / .onnx file
    (onnxruntime-genai or onnxruntime, see --engine)."""
    p = Path(path)
    if engine not in ENGINES:
        raise RuntimeLoadError(f"--engine {engine!r} is not one of {', '.join(ENGINES)}")
    if p.suffix == ".gguf":
        if engine == "genai":
            raise RuntimeLoadError("--engine genai runs exported ONNX folders; a .gguf runs on llama.cpp")
        if provider not in ("auto", "cpu"):
            raise RuntimeLoadError(f"--provider {provider} chooses onnxruntime's provider; a .gguf runs on llama.cpp's CPU build")
        from runtime.llamacpp import LlamaCppRuntime

        return LlamaCppRuntime(path, n_threads=threads)
    if p.suffix == ".onnx" or p.is_dir():
        from runtime.genai import GENAI_CONFIG, GenaiRuntime, genai_available
        from runtime.ort import OrtRuntime

        folder = p.parent if p.suffix == ".onnx" else p
        if engine == "genai" or engine == "auto" and genai_available() and (folder / GENAI_CONFIG).is_file():
            return GenaiRuntime(path, n_threads=threads, provider=provider)

        return OrtRuntime(path, n_threads=threads, provider=provider)
    raise RuntimeLoadError(f"{path}: unknown artifact type; give a .gguf file or an exported ONNX folder")


def run(a: argparse.Namespace, out=None, err=None) -> int:
    # Resolved at call time: sys.stdout may be replaced after import (pytest, notebooks).
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        sampling = Sampling(a.temperature, a.top_k, a.top_p, a.seed).validate()
    except ValueError as exc:
        raise RuntimeLoadError(str(exc)) from exc
    rt = open_runtime(a.artifact, a.threads, a.provider, a.engine)
    gen = Generator(rt)
    out.write(a.prompt)
    for piece in gen.stream(a.prompt, a.max_new_tokens, sampling):
        out.write(piece)
        out.flush()
    out.write("\n")
    st = gen.stats
    err.write(f"[{rt.name}] prompt {st.prompt_tokens} tokens at {st.prefill_tok_s:.1f} tok/s, "
              f"generated {st.generated_tokens} tokens at {st.decode_tok_s:.1f} tok/s\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime", description=__doc__)
    add_arguments(p)
    a = p.parse_args(argv)
    try:
        return run(a)
    except RuntimeLoadError as exc:
        print(f"runtime: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
