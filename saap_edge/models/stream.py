"""A checkpoint streamed module by module: the model's skeleton on the meta device, each
module's tensors read from the safetensors files when it runs (or when an exporter asks for
them with accelerate's `align_module_device`) and dropped after.

What export and its validation hold then is the artifact, one module's tensors and their
temporaries, never the model (issue: export's host peak <= the artifact + one dense layer +
2 GiB). accelerate's offload hooks (`attach_align_device_hook`) move the tensors in and out;
what they read is `CheckpointTensors`, a lazy mapping over the safetensors files that reads each
tensor with plain file reads. Why not safetensors' own `safe_open`: it maps the files, and the
pages of a mapped file count in the process's memory once touched and stay until the file is
closed, so streaming through a map would end holding the whole checkpoint (see load.own_weights).

A float checkpoint exported to int4 is quantized as it is read (`quantize=` group size): the
skeleton holds Int4Linear projections, and their codes, scales and offsets are computed from
the float weight by the same round-to-nearest group quantizer `quantize_model` uses.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from saap_edge.errors import UserError
from saap_edge.files import reading

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
INT4_PARTS = ("qweight", "scales", "offsets")


def safetensors_index(directory: Path) -> dict[str, tuple[Path, int, int, torch.dtype | None, list[int]]]:
    """name -> (file, byte offset of the data, byte length, dtype, shape) over every
    *.safetensors file of `directory`, from the files' JSON headers alone."""
    index = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with reading(path, "weights"), open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for key, info in header.items():
            if key == "__metadata__" or not isinstance(info, dict):
                continue
            dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))  # None: a type torch reads otherwise (read_tensor refuses it)
            start, end = info["data_offsets"]
            index[key] = (path, 8 + n + start, end - start, dtype, list(info["shape"]))
    return index


READ_CHUNK = 64 * 2**20  # bytes read (and widened) at a time when a tensor changes dtype as it is read


def read_tensor(entry: tuple[Path, int, int, torch.dtype | None, list[int]], dtype: torch.dtype | None = None) -> torch.Tensor:
    """One tensor of a safetensors file, read into memory of its own, in `dtype` when given (the
    conversion done READ_CHUNK bytes at a time: a bf16 embedding matrix widened to float32 never
    sits in memory in both types)."""
    path, offset, length, stored, shape = entry
    if stored is None:
        raise UserError(f"{path}: a tensor of a dtype saap-edge does not read (not one of {', '.join(SAFETENSORS_DTYPES)})")
    out = torch.empty(shape, dtype=dtype or stored)
    if not length:
        return out
    with reading(path, "weights"), open(path, "rb") as f:
        f.seek(offset)
        if out.dtype == stored:
            got = f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy()))
        else:
            flat, size, got = out.view(-1), stored.itemsize, 0
            step = max(1, READ_CHUNK // size)
            buffer = torch.empty(min(step, flat.numel()), dtype=stored)
            for lo in range(0, flat.numel(), step):
                part = buffer[: min(step, flat.numel() - lo)]
                got += f.readinto(memoryview(part.view(torch.uint8).numpy()))
                flat[lo:lo + part.numel()] = part
        if got != length:
            raise UserError(f"{path} ends inside tensor data (read {got} of {length} bytes); is the file complete?")
    return out


class CheckpointTensors(Mapping):
    """The checkpoint's tensors by the model's state-dict names, each read when asked for.

    `aliases`: names the model has and the files do not (a tied output matrix) -> the stored
    name. `dtypes`: the dtype each name is read into (the model's; floating tensors only).
    `quantize`: projections (names in `projections`) whose Int4Linear parts are computed from
    the stored float weight at that group size. `transform`: applied to each tensor as it
    is read (name, tensor) -> tensor; validation sets it to round weights as an artifact stores
    them."""

    def __init__(self, directory: Path, aliases: dict[str, str] | None = None, quantize: int | None = None,
                 projections: set[str] | None = None, dtypes: dict[str, torch.dtype] | None = None):
        self.index = safetensors_index(directory)
        self.dtypes = dict(dtypes or {})
        self.aliases = dict(aliases or {})
        self.quantize, self.projections = quantize, set(projections or ())
        self.transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None
        self._last: tuple[str, dict[str, torch.Tensor]] | None = None  # one projection's parts, read once

    def _quantized(self, key: str) -> tuple[str, str] | None:
        module, _, part = key.rpartition(".")
        if self.quantize and part in INT4_PARTS and module in self.projections:
            return module, part
        return None

    def __contains__(self, key) -> bool:
        q = self._quantized(key) if isinstance(key, str) else None
        if q is not None:
            return f"{q[0]}.weight" in self.index
        return key in self.index or self.aliases.get(key) in self.index

    def __getitem__(self, key: str) -> torch.Tensor:
        q = self._quantized(key)
        if q is not None:
            value = self._parts(q[0])[q[1]]
        else:
            stored = key if key in self.index else self.aliases.get(key)
            if stored not in self.index:
                raise KeyError(key)
            entry = self.index[stored]
            want = self.dtypes.get(key)
            value = read_tensor(entry, want if want is not None and want.is_floating_point and entry[3] is not None
                                and entry[3].is_floating_point else None)
        return self.transform(key, value) if self.transform is not None else value

    def rows(self, key: str, lo: int, hi: int) -> torch.Tensor:
        """Rows lo..hi of a stored matrix in float32, read alone (an embedding matrix checked or
        encoded a block at a time; no transform)."""
        stored = key if key in self.index else self.aliases.get(key)
        path, offset, length, dtype, shape = self.index[stored]
        hi = min(hi, shape[0])
        row = length // shape[0]
        return read_tensor((path, offset + lo * row, (hi - lo) * row, dtype, [hi - lo, *shape[1:]]), torch.float32)

    def _parts(self, module: str) -> dict[str, torch.Tensor]:
        from saap_edge.models.int4_linear import pack_nibbles
        from saap_edge.quant.int4 import quantize_groups

        if self._last is None or self._last[0] != module:
            self._last = None
            g = quantize_groups(read_tensor(self.index[f"{module}.weight"], torch.float32), self.quantize)
            self._last = (module, {"qweight": pack_nibbles(g.codes), "scales": g.scales.half(), "offsets": g.offsets.half()})
        return self._last[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


def stream_model(directory: Path, int4: bool = False, group_size: int | None = None):
    """A LoadedModel whose model is `directory`'s checkpoint streamed (see the module doc), on
    the CPU in float32 (int4 groups as stored), with a slim config (per-layer sizes) whatever
    the checkpoint's. `int4`: a float checkpoint's projections become Int4Linear at
    `group_size` (None: the largest of 128/64/32 that fits, as quantize_model picks); an int4
    checkpoint is read as it is."""
    from accelerate import init_empty_weights
    from accelerate.hooks import attach_align_device_hook
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import saap_edge.models.slim  # noqa: F401  registers the slim architecture
    from saap_edge.models.int4_linear import Int4Linear, replace_linears
    from saap_edge.models.load import LoadedModel, check_architecture
    from saap_edge.models.slim import SlimLlamaConfig
    from saap_edge.quant.int4 import QUANT_MODULES, prepare_quantization

    directory = Path(directory)
    config = check_architecture("hf", directory)
    if not isinstance(config, SlimLlamaConfig):
        config = SlimLlamaConfig(**config.to_dict())  # a plain LLaMA: every layer the same size
    with reading(directory, "model directory (its tokenizer)"):
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    # parameters on the meta device; buffers made for real (RoPE's inv_freq is computed, not
    # stored), except Int4Linear's, which its constructor puts beside the meta weights
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        quantize = None
        if int4 and not getattr(config, "quantization", None):
            quantize = prepare_quantization(model, group_size)
            replace_linears(model.model, quantize, QUANT_MODULES)
    projections = {name for name, m in model.named_modules() if isinstance(m, Int4Linear)} if quantize else set()
    stored = dict(model.named_parameters(remove_duplicate=False))  # what the checkpoint must hold
    stored.update((n, t) for n, t in model.named_buffers(remove_duplicate=False) if _persistent(model, n))
    aliases = {}
    if getattr(config, "tie_word_embeddings", False):
        aliases["lm_head.weight"] = "model.embed_tokens.weight"
    weights = CheckpointTensors(directory, aliases, quantize, projections, {n: t.dtype for n, t in stored.items()})
    missing = [n for n in stored if n not in weights]
    if missing:
        raise UserError(f"{directory}: the weights lack {len(missing)} tensors of the model (first: {missing[0]}); "
                        "the checkpoint is incomplete or of another model")
    _check_shapes(directory, weights.index, weights.aliases, stored, projections)
    attach_align_device_hook(model, execution_device=torch.device("cpu"), offload=True, weights_map=weights,
                             offload_buffers=True)
    for name, module in model.named_modules():
        module.streamed_name = name  # where weight_rows finds its tensors
    model.streamed_from = weights
    if (directory / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(directory))
    return LoadedModel(model.eval(), tokenizer, {"model": str(directory), "kind": "hf", "path": str(directory),
                                                 "streamed": True})


def check_checkpoint_shapes(directory: Path, config) -> None:
    """The loaded (not streamed) path's check: every tensor of `directory`'s safetensors files has
    the shape its `config` gives it (a model built on the meta device to know them)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    import saap_edge.models.slim  # noqa: F401  registers the slim architecture

    index = safetensors_index(directory)
    if not index:
        return
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    _check_shapes(directory, index, {}, dict(model.named_parameters(remove_duplicate=False)), set())


def _check_shapes(directory: Path, index: dict, aliases: dict, stored: dict, projections: set[str]) -> None:
    """Every tensor of the checkpoint has the shape the config gives it (UserError naming the
    first that does not): accelerate or transformers would otherwise fail deep inside with a
    traceback or a message that names no tensor."""
    for name, t in stored.items():
        key = name if name in index else aliases.get(name)
        module = name.rpartition(".")[0]
        if key not in index or module in projections or t.dim() == 0:
            continue  # quantized while read, or an int4 part whose shape its own reader checks
        shape = index[key][4]
        if list(t.shape) != shape:
            raise UserError(f"{directory}: tensor {key} is {' x '.join(map(str, shape))} in the checkpoint but the config "
                            f"makes it {' x '.join(map(str, t.shape))}; the weights and config.json are of different "
                            "models: export the directory compress wrote, or restore its config.json")


def _persistent(model: torch.nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf not in model.get_submodule(owner)._non_persistent_buffers_set


def streamed_weights(model) -> CheckpointTensors | None:
    """The lazy weights behind a streamed model (None for a model in memory)."""
    return getattr(model, "streamed_from", None)


def tied_head(model) -> bool:
    """Whether the output matrix is the token embedding: one tensor in a model in memory; for a
    streamed model (whose tensors are read per module, never shared) the config's tie."""
    if streamed_weights(model) is not None:
        return bool(getattr(model.config, "tie_word_embeddings", False))
    return model.lm_head.weight is model.model.embed_tokens.weight


def float_weight(module: torch.nn.Module) -> torch.Tensor:
    """A module's weight in float32 on the CPU (an int4 layer's a*q + b), read through
    accelerate's `align_module_device`: a streamed module holds its tensors only inside it."""
    from accelerate.utils import align_module_device

    from saap_edge.models.int4_linear import Int4Linear

    with align_module_device(module):
        if isinstance(module, Int4Linear):
            return module.dequantized(torch.float32).cpu()
        return module.weight.detach().float().cpu()


def weight_rows(module: torch.nn.Module, lo: int, hi: int, weights: CheckpointTensors | None = None) -> torch.Tensor:
    """Rows lo..hi of a module's 2-D weight in float32: read alone from the checkpoint for a
    streamed module (`weights`), sliced from the weight in memory otherwise."""
    if weights is not None and module.weight.device.type == "meta":
        return weights.rows(f"{module.streamed_name}.weight", lo, hi)
    return module.weight[lo:hi].detach().float().cpu()


def execution_device(model) -> torch.device:
    """Where `model` computes: the streaming hooks' device, else its first parameter's."""
    if streamed_weights(model) is not None:
        return torch.device("cpu")
    return next(model.parameters()).device
