"""onnxruntime runtime: an exported ONNX folder (model.onnx + data, config, tokenizer.json).

The decoder takes optimum's inputs (input_ids, attention_mask, position_ids,
past_key_values.{i}.key/value) and returns logits and present.{i}.key/value. Each layer's
cache has that layer's own KV-head count, read from the graph's input shapes, so slim models
whose layers differ run here (optimum's ORTModelForCausalLM sizes every layer alike).
Tokenization uses `tokenizers` on tokenizer.json: no torch, no transformers.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from runtime.base import ONNX_NAMES, Runtime, RuntimeLoadError

PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
PROVIDER_CHOICES = ("auto", *PROVIDERS)


def choose_providers(requested: str = "auto", available: list[str] | None = None) -> list[str]:
    """onnxruntime execution providers for --provider: auto takes CUDA where this onnxruntime
    has it (the onnxruntime-gpu wheel), else the CPU; cuda insists on CUDA."""
    if requested not in PROVIDER_CHOICES:
        raise RuntimeLoadError(f"--provider {requested!r} is not one of {', '.join(PROVIDER_CHOICES)}")
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    cuda, cpu = PROVIDERS["cuda"], PROVIDERS["cpu"]
    if requested == "cuda" and cuda not in available:
        raise RuntimeLoadError(f"--provider cuda: this onnxruntime has no {cuda} (it has {', '.join(available)}); "
                               "install onnxruntime-gpu in place of onnxruntime (pip install 'saap-edge[gpu]'), or use "
                               "--provider cpu")
    if requested == "cpu" or cuda not in available:
        return [cpu]
    return [cuda, cpu]
DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _model_path(path: Path) -> Path:
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise RuntimeLoadError(f"{path}: no such file (give an exported ONNX folder or its model.onnx)")
    return path


class OnnxFolder(Runtime):
    """What every runtime of an exported ONNX folder reads besides the graph: config.json and
    generation_config.json (special tokens, sizes, which graph) and tokenizer.json."""

    folder: Path

    def _read_tokenizer(self) -> None:
        cfg = {}
        for name in ("config.json", "generation_config.json"):
            if (self.folder / name).exists():
                try:
                    data = json.loads((self.folder / name).read_bytes().decode("utf-8-sig"))
                    cfg.update({k: v for k, v in data.items() if v is not None})
                except (ValueError, AttributeError) as exc:  # not UTF-8, not JSON, not an object
                    raise RuntimeLoadError(f"{self.folder / name}: cannot be read ({type(exc).__name__}: "
                                           f"{str(exc).splitlines()[0][:160]}); the file is damaged: export again") from exc
        self.graph = (cfg.get("saap_onnx") or {}).get("graph", "dynamo")
        self.vocab_size = cfg.get("vocab_size")
        self.max_positions = cfg.get("max_position_embeddings")
        self.bos_token_id = cfg.get("bos_token_id")
        eos = cfg.get("eos_token_id")
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.tokenizer = None
        if (self.folder / "tokenizer.json").exists():
            from tokenizers import Tokenizer

            try:
                self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
            except Exception as exc:  # the tokenizers library raises plain Exception
                raise RuntimeLoadError(f"{self.folder / 'tokenizer.json'}: cannot be read ({str(exc).splitlines()[0][:160]}); "
                                       "the file is damaged: export again") from exc

    def check_length(self, total: int) -> None:
        """Refuse a context longer than the model's positions (the rotary caches end there)."""
        if self.max_positions and total > self.max_positions:
            raise RuntimeLoadError(f"{total} tokens exceed the model's {self.max_positions} positions "
                                   "(max_position_embeddings); use a shorter prompt or fewer new tokens")

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise RuntimeLoadError(f"{self.folder} has no tokenizer.json; pass token ids instead of text")
        # the tokenizer's own post-processor decides on BOS, as transformers does (LLaMA's adds
        # <s>, SmolLM2's adds nothing); llama.cpp follows the same rule from the GGUF metadata
        return self.tokenizer.encode(text, add_special_tokens=add_bos).ids

    def detokenize(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return self.tokenizer.decode(ids, skip_special_tokens=True)


    def detokenize_special(self, token_id: int) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.id_to_token(token_id) or ""


class OrtRuntime(OnnxFolder):
    name = "onnxruntime"
    cache_block = 256  # shared cache: first buffer length in positions, doubled as needed

    def __init__(self, path: str | os.PathLike, n_threads: int | None = None, provider: str = "auto"):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeLoadError("onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu)") from exc
        providers = choose_providers(provider)
        model = _model_path(Path(path))
        self.folder = model.parent
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if n_threads:
            opts.intra_op_num_threads = n_threads
        try:
            self.session = ort.InferenceSession(str(model), opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidProtobuf / RuntimeException
            raise RuntimeLoadError(f"onnxruntime cannot load {model}: {str(exc).splitlines()[0][:300]}") from exc
        self.provider = self.session.get_providers()[0]  # what runs the nodes it can (CUDA falls back to CPU silently)
        if provider == "cuda" and self.provider != PROVIDERS["cuda"]:
            raise RuntimeLoadError(f"--provider cuda: onnxruntime has {PROVIDERS['cuda']} but could not start it (no GPU "
                                   "or no CUDA libraries); use --provider cpu")
        self.name = f"onnxruntime ({self.provider.replace('ExecutionProvider', '')})"
        self._read_cache_layout()
        self._read_tokenizer()
        # The fused graph (GroupQueryAttention) writes new keys in place when past and present are
        # one buffer: generation then binds one growing buffer per cache tensor instead of
        # concatenating the whole cache every step. The traced graph concatenates.
        self.shared_cache = self.graph == "fused" and self.provider == PROVIDERS["cpu"]
        self.reset()

    def _read_cache_layout(self) -> None:
        names = {i.name: i for i in self.session.get_inputs()}
        if "input_ids" not in names:
            raise RuntimeLoadError(f"{self.folder}: the model has no input_ids input; not a decoder export")
        layers: dict[int, tuple[int, int]] = {}
        for name, inp in names.items():
            m = PAST.match(name)
            if m:
                _, heads, _, head_dim = inp.shape
                if not isinstance(heads, int) or not isinstance(head_dim, int):
                    raise RuntimeLoadError(f"{name} has no fixed KV-head / head-dim size: {inp.shape}")
                layers[int(m.group(1))] = (heads, head_dim)
                self.kv_dtype = DTYPES.get(inp.type, np.float32)
        self.kv = [layers[i] for i in range(len(layers))]
        self.inputs = set(names)
        self.outputs = [o.name for o in self.session.get_outputs()]

    def reset(self) -> None:
        self.past = [(np.zeros((1, h, 0, d), self.kv_dtype), np.zeros((1, h, 0, d), self.kv_dtype)) for h, d in self.kv]
        self.n_past = 0
        self.buffers: list = []  # shared cache: one OrtValue per past / present pair
        self.capacity = 0

    def forward(self, ids: np.ndarray, past=None, n_past: int = 0):
        """Logits [batch, seq, vocab] and the new cache for ids [batch, seq] after `past`."""
        batch, seq = ids.shape
        if past is None:
            past = [(np.zeros((batch, h, 0, d), self.kv_dtype),) * 2 for h, d in self.kv]
        feed = {"input_ids": ids.astype(np.int64),
                "attention_mask": np.ones((batch, n_past + seq), np.int64),
                "position_ids": np.broadcast_to(np.arange(n_past, n_past + seq, dtype=np.int64), (batch, seq)).copy()}
        for i, (k, v) in enumerate(past):
            feed[ONNX_NAMES["past_key"].format(i=i)], feed[ONNX_NAMES["past_value"].format(i=i)] = k, v
        out = dict(zip(self.outputs, self.session.run(None, {k: v for k, v in feed.items() if k in self.inputs})))
        present = [(out[ONNX_NAMES["present_key"].format(i=i)], out[ONNX_NAMES["present_value"].format(i=i)])
                   for i in range(len(self.kv))]
        return out["logits"], present

    def logits(self, new_ids: list[int]) -> np.ndarray:
        if self.shared_cache:
            return self._shared_step(new_ids)
        logits, self.past = self.forward(np.asarray([new_ids], np.int64), self.past, self.n_past)
        self.n_past += len(new_ids)
        return logits[0, -1].astype(np.float32)

    def _grow(self, needed: int) -> None:
        """Buffers of at least `needed` positions (doubling), the cache so far copied over."""
        import onnxruntime as ort

        capacity = max(self.cache_block, self.capacity)
        while capacity < needed:
            capacity *= 2
        capacity = min(capacity, self.max_positions or capacity)
        old, self.buffers = self.buffers, []
        for i, (h, d) in enumerate(self.kv):
            pair = []
            for j in range(2):
                arr = np.zeros((1, h, capacity, d), self.kv_dtype)
                if old:
                    arr[:, :, : self.capacity] = old[i][j].numpy()
                pair.append(ort.OrtValue.ortvalue_from_numpy(arr))
            self.buffers.append(pair)
        self.capacity = capacity
        # one binding for the whole generation: the cache buffers stay bound, each step rebinds
        # the token ids, the mask and the logits (bound first: get_outputs() follows that order)
        self._io = self.session.io_binding()
        self._io.bind_output("logits")
        for i, (k, v) in enumerate(self.buffers):
            for kind, value in (("key", k), ("value", v)):
                self._io.bind_ortvalue_input(ONNX_NAMES[f"past_{kind}"].format(i=i), value)
                self._io.bind_ortvalue_output(ONNX_NAMES[f"present_{kind}"].format(i=i), value)

    def _shared_step(self, new_ids: list[int]) -> np.ndarray:
        """One step with each layer's past and present bound to the same buffer (the mask's width,
        not the buffer's, tells GroupQueryAttention how many positions are filled)."""
        total = self.n_past + len(new_ids)
        self.check_length(total)
        if total > self.capacity:
            self._grow(total)
        io = self._io
        io.bind_cpu_input("input_ids", np.asarray([new_ids], np.int64))
        io.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
        io.bind_output("logits")
        self.session.run_with_iobinding(io)
        self.n_past = total
        return io.get_outputs()[0].numpy()[0, -1].astype(np.float32)

    def close(self) -> None:
        self.session = None
