"""onnxruntime-genai runtime: an exported ONNX folder with genai_config.json (the fused graph).

onnxruntime-genai (PyPI `onnxruntime-genai`) owns the generation loop: it binds one KV buffer
per layer shared by past and present (sized from each layer's `past_key_values.N.key` input
shape), runs the search (greedy, or sampling with temperature / top-k / top-p) and stops at
end-of-text. This runtime hands it the prompt's token ids and reads the tokens back, so
timings and text come out as for every other runtime. Tokenization is the folder's
tokenizer.json through `tokenizers` (the same ids as runtime/ort.py).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from runtime.base import RuntimeLoadError, Sampling, Stats
from runtime.ort import PROVIDERS, OnnxFolder, choose_providers

GENAI_CONFIG = "genai_config.json"


def genai_available() -> bool:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


def check_genai_config(folder: Path) -> None:
    """genai_config.json against the graph it names (onnxruntime-genai reads the config without
    checking it, then fails mid-generation): the file, the cache input names, the number of
    layers and the head size. Needs the `onnx` package to read the graph; skipped without it."""
    path = folder / GENAI_CONFIG
    fix = "export the folder again (saap-edge export --format onnx)"
    try:
        dec = json.loads(path.read_text())["model"]["decoder"]
        names, layers, head = dec["filename"], int(dec["num_hidden_layers"]), int(dec["head_size"])
        pattern = dec["inputs"]["past_key_names"]
    except (ValueError, KeyError, TypeError) as exc:
        raise RuntimeLoadError(f"{path}: not an onnxruntime-genai config ({type(exc).__name__}: {exc}); {fix}") from exc
    graph = folder / names
    if not graph.is_file():
        raise RuntimeLoadError(f"{path} names {names}, which is not in {folder}; {fix}")
    try:
        import onnx
    except ImportError:
        return
    try:
        proto = onnx.load(str(graph), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: the file is damaged
        raise RuntimeLoadError(f"{graph}: cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); the "
                               f"file is damaged: {fix}") from exc
    inputs = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    found = sum(1 for i in range(len(inputs)) if pattern % i in inputs)
    if found != layers:
        raise RuntimeLoadError(f"{path} says {layers} layers but {names} has {found} inputs named {pattern!r}; {fix}")
    dims = {inputs[pattern % i][-1] for i in range(found)}
    if dims != {head}:
        raise RuntimeLoadError(f"{path} says head_size {head} but the cache inputs of {names} have {sorted(map(str, dims))}; {fix}")


class GenaiRuntime(OnnxFolder):
    name = "onnxruntime-genai"

    def __init__(self, path: str | os.PathLike, n_threads: int | None = None, provider: str = "auto"):
        try:
            import onnxruntime_genai as og
        except ImportError as exc:
            raise RuntimeLoadError("onnxruntime-genai is not installed (pip install onnxruntime-genai), or use "
                                   "--engine onnxruntime") from exc
        folder = Path(path)
        folder = folder.parent if folder.suffix == ".onnx" else folder
        if not (folder / GENAI_CONFIG).is_file():
            raise RuntimeLoadError(f"{folder}: no {GENAI_CONFIG}, so onnxruntime-genai cannot run it; export it again with "
                                   "the fused graph (saap-edge export --format onnx --onnx-graph fused), or use --engine onnxruntime")
        self.folder, self.og = folder, og
        check_genai_config(folder)
        try:
            providers = choose_providers(provider, ["CUDAExecutionProvider", "CPUExecutionProvider"]
                                         if og.is_cuda_available() else ["CPUExecutionProvider"])
            config = og.Config(str(folder))
            config.clear_providers()
            if providers[0] == PROVIDERS["cuda"]:
                config.append_provider("cuda")
            if n_threads:
                config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": n_threads}}}}))
            self.model = og.Model(config)
        except RuntimeLoadError:
            raise
        except Exception as exc:  # onnxruntime-genai raises RuntimeError / OrtException with the reason
            raise RuntimeLoadError(f"onnxruntime-genai cannot load {folder}: {str(exc).splitlines()[0][:300]}") from exc
        self.provider = providers[0]
        self.name = f"onnxruntime-genai ({self.provider.replace('ExecutionProvider', '')})"
        self._read_tokenizer()
        self.reset()

    def reset(self) -> None:
        self.generator = None
        self.n_past = 0

    def _search(self, max_length: int, s: Sampling | None = None, min_length: int = 0):
        params = self.og.GeneratorParams(self.model)
        s = s or Sampling()
        opts = {"max_length": max_length, "min_length": min_length, "do_sample": s.temperature > 0,
                "random_seed": s.seed}
        if s.temperature > 0:
            opts.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or int(self.vocab_size or 0) or 50)
        params.set_search_options(**opts)
        return self.og.Generator(self.model, params)

    def logits(self, new_ids: list[int]) -> np.ndarray:
        """Feed tokens after what was fed since reset(); last-position logits (the search is unused)."""
        if self.generator is None:
            self.generator = self._search(self.max_positions or 4096)
        self.generator.append_tokens(np.asarray(new_ids, np.int32))
        self.n_past += len(new_ids)
        logits = np.asarray(self.generator.get_logits())
        return logits.reshape(-1, logits.shape[-1])[-1].astype(np.float32)

    def generate_tokens(self, ids: list[int], max_new_tokens: int, s: Sampling, st: Stats):
        """Token ids from onnxruntime-genai's own loop and search; fills st's prefill / decode time.
        With no end-of-text ids (timing runs) the search may not stop early (min_length)."""
        total = len(ids) + max_new_tokens
        self.check_length(total)
        gen = self._search(total, s, min_length=0 if self.eos_token_ids else total)
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray(ids, np.int32))
        st.prefill_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(max_new_tokens):
            gen.generate_next_token()  # runs the model on the previous token, then searches
            token = int(gen.get_next_tokens()[0])
            yield token
            if token in self.eos_token_ids or gen.is_done():
                break
        st.decode_s = time.perf_counter() - t1

    def close(self) -> None:
        self.generator = self.model = None
