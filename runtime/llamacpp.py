"""llama.cpp runtime through llama-cpp-python: a GGUF file, its own KV cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from runtime.base import Runtime, RuntimeLoadError


def _quiet(llama_cpp) -> None:
    """Route llama.cpp's own log lines (kv-cache notes and such) to nowhere."""
    @llama_cpp.llama_log_callback
    def _drop(level, text, user_data):  # noqa: ARG001
        return None

    _quiet.callback = _drop  # keep a reference: llama.cpp calls it later
    llama_cpp.llama_log_set(_drop, None)


class LlamaCppRuntime(Runtime):
    name = "llama.cpp"

    def __init__(self, path: str | os.PathLike, n_ctx: int = 2048, n_threads: int | None = None, f32_kv: bool = False):
        try:
            import llama_cpp
        except ImportError as exc:
            raise RuntimeLoadError("llama-cpp-python is not installed (pip install 'saap-edge[export]' with "
                                   "CMAKE_ARGS=-DGGML_NATIVE=OFF)") from exc
        path = Path(path)
        if not path.is_file():
            raise RuntimeLoadError(f"{path}: no such file")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise RuntimeLoadError(f"{path} is not a GGUF file (no GGUF magic)")
        _quiet(llama_cpp)
        self._llama_cpp = llama_cpp
        kv = {"type_k": 0, "type_v": 0} if f32_kv else {}
        try:
            self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=n_threads, verbose=False, logits_all=False, **kv)
        except (ValueError, RuntimeError) as exc:
            raise RuntimeLoadError(f"llama.cpp cannot load {path}: {exc}") from exc
        self.bos_token_id = self.llm.token_bos() if self.llm.token_bos() >= 0 else None
        self.eos_token_ids = {self.llm.token_eos()}
        self.vocab_size = self.llm.n_vocab()

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="ignore")

    def detokenize_special(self, token_id: int) -> str:
        return self.llm.detokenize([token_id], special=True).decode("utf-8", errors="ignore")

    def metadata(self) -> dict[str, str]:
        return dict(self.llm.metadata)

    def reset(self) -> None:
        self.llm.reset()

    def logits(self, new_ids: list[int]) -> np.ndarray:
        self.llm.eval(new_ids)
        # read the last position's logits straight from the context (llama-cpp-python keeps
        # its own score table only with logits_all, which costs n_ctx x vocab floats)
        ptr = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.vocab_size,)).astype(np.float32, copy=True)

    def close(self) -> None:
        self.llm.close()


class LlamaCppVocab:
    """A GGUF's vocabulary alone in llama.cpp (no weights, no context): how llama.cpp tokenizes
    with the file, its BOS / EOS and which ids end generation. Through llama-cpp-python's C
    bindings: its `Llama(vocab_only=True)` still makes a context (and warns about it)."""

    def __init__(self, path: str | os.PathLike):
        import llama_cpp

        _quiet(llama_cpp)
        self._c = llama_cpp
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise RuntimeLoadError(f"llama.cpp cannot read the vocabulary of {path}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """`add_special`: BOS / EOS as the file's add_bos / add_eos say; `parse_special`: special
        tokens written in the text are read as those tokens (as a chat prompt needs)."""
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (self._c.llama_token * n_max)()
        n = self._c.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            raise RuntimeLoadError(f"llama.cpp needs {-n} tokens for a {len(data)}-byte text")
        return list(buf[:n])

    @property
    def bos(self) -> int | None:
        i = self._c.llama_vocab_bos(self._vocab)
        return i if i >= 0 else None

    @property
    def eos(self) -> int | None:
        i = self._c.llama_vocab_eos(self._vocab)
        return i if i >= 0 else None

    def is_end(self, token_id: int) -> bool:
        return bool(self._c.llama_vocab_is_eog(self._vocab, token_id))

    def close(self) -> None:
        if self._model:
            self._c.llama_model_free(self._model)
            self._model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
