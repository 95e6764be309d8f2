"""Generation on a device: GGUF files through llama.cpp, exported ONNX folders through
onnxruntime-genai or onnxruntime. Nothing here imports torch or the rest of saap-edge
(import-linter checks it), so `runtime/` can be copied to a device on its own.

`open_runtime(path)` picks the runtime for an artifact; `python -m runtime` is the command line.
"""

from __future__ import annotations

from pathlib import Path

from runtime.base import RuntimeLoadError

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
