"""One generator interface over device runtimes (numpy only: no torch here).

A runtime gives `tokenize`, `detokenize` and `logits(new_ids) -> last-position logits`
(keeping its own KV cache); `Generator.stream` adds sampling (greedy, temperature, top-k,
top-p), stop tokens and prefill / decode timing on top.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np


# The exported ONNX decoder's input and output names (optimum's text-generation-with-past), which
# the exporters write and the runtimes feed: one spelling for both.
ONNX_NAMES = {
    "inputs": ("input_ids", "attention_mask", "position_ids"),
    "past_key": "past_key_values.{i}.key",
    "past_value": "past_key_values.{i}.value",
    "logits": "logits",
    "present_key": "present.{i}.key",
    "present_value": "present.{i}.value",
}


class RuntimeLoadError(ValueError):
    """The artifact cannot be loaded (missing, truncated, not a model the runtime reads)."""


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0

    def validate(self) -> "Sampling":
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature >= 0, top_k >= 0 and top_p in (0, 1] are required")
        return self


def sample(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    """One token id from last-position logits [vocab]."""
    if s.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / s.temperature
    if s.top_k:
        kth = np.partition(z, -s.top_k)[-s.top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if s.top_p < 1:
        order = np.argsort(-p)
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, s.top_p) + 1)]
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask / mask.sum()
    return int(rng.choice(len(p), p=p))


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    token_ids: list[int] = field(default_factory=list)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        # the first generated token comes out of the prefill; the rest are decode steps
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s else 0.0


class Runtime:
    """What a runtime implements; see the module docstring."""

    name = "runtime"
    bos_token_id: int | None = None
    eos_token_ids: set[int] = set()

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        raise NotImplementedError

    def detokenize(self, ids: list[int]) -> str:
        raise NotImplementedError

    def detokenize_special(self, token_id: int) -> str:
        """The text of one token, a special one included (a chat template's bos / eos token)."""
        raise NotImplementedError

    def metadata(self) -> dict[str, str]:
        """Key -> value metadata the artifact carries (a GGUF's); empty where there is none."""
        return {}

    def reset(self) -> None:
        raise NotImplementedError

    def logits(self, new_ids: list[int]) -> np.ndarray:
        """Feed `new_ids` after what was fed since reset(); logits of the last position."""
        raise NotImplementedError


class Generator:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.stats = Stats()

    def stream(self, prompt: str | list[int], max_new_tokens: int = 64, sampling: Sampling | None = None) -> Iterator[str]:
        """Yield text pieces as tokens are generated; `self.stats` holds the timings after.

        A runtime with its own generation loop (`generate_tokens`, e.g. onnxruntime-genai) runs
        it; the others get this loop over `logits` and `sample`."""
        s = (sampling or Sampling()).validate()
        rt = self.runtime
        ids = rt.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        rt.reset()
        self.stats = st = Stats(prompt_tokens=len(ids))
        own = getattr(rt, "generate_tokens", None)
        tokens = own(ids, max_new_tokens, s, st) if own else self._steps(ids, max_new_tokens, s, st)
        text_so_far = ""
        for token in tokens:
            st.token_ids.append(token)
            st.generated_tokens += 1
            text = rt.detokenize(st.token_ids)
            piece, text_so_far = text[len(text_so_far):], text
            if piece:
                yield piece

    def _steps(self, ids: list[int], max_new_tokens: int, s: Sampling, st: Stats) -> Iterator[int]:
        rt = self.runtime
        rng = np.random.default_rng(s.seed)
        t0 = time.perf_counter()
        logits = rt.logits(ids)
        st.prefill_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        for i in range(max_new_tokens):
            token = sample(logits, s, rng)
            yield token
            if token in rt.eos_token_ids or i == max_new_tokens - 1:
                break
            logits = rt.logits([token])
        st.decode_s = time.perf_counter() - t1
