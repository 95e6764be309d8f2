"""How much memory each stage needs on the card and on the host, planned from config.json alone.

Every stage is planned for two places: the *card* (the GPU that computes; on a CPU run the
host plays that role too, and the two counts add up) and the *host* (RAM). Parameter counts
come from the real module tree built on the meta device (accelerate's `init_empty_weights`),
so the plan cannot drift from the model; activation terms are formulas over its sizes.

Notation: b = bytes per weight of --dtype; W = dense weights x b; Ws = the pruned model's
weights ((1 - ratio) x W, ratio being the share of all parameters removed); L = the largest
decoder layer x b; T / Tr = --seq-len / --recover-seq-len; B = --batch-size; V vocabulary;
H hidden; F the widest MLP.

- estimation (card): W + saved activations of one window, T x (4H + 4q + 3kv + 4F) x b per
  layer + heads x T^2 x b (attention scores) + logits and their gradient 2 x T x V x 4 + two
  gradients in flight (2 x largest projection x (b + 12)) + per-sample unit statistics.
  Host: W while the weights load (transformers reads them there first).
- slice + reconstruct (streamed layer by layer, prune/slicing.py, reconstruct.py): the dense
  layer i is sliced into the slim layer i, refit, and then freed, so the dense model shrinks
  as the slim one grows: W + L together, never W + Ws. On a GPU both wait on the host and each
  layer pair visits the card: card 2L + the refit's Gram / OBS work ((8m + 5p) x n^2 for the
  widest refit input n; m = 1 float64 moment for the "prefix" target, 3 for "dense"; p = 4
  bytes, the float32 solves of a GPU, 8 on the CPU) + one batch of streams; host W + L + the
  calibration streams N x T x (3H + F) x b.
- teacher pass (kd, recover/distill.py): the teacher alone computes the top-k targets of every
  window position the run will train and writes them to the teacher cache; the student waits
  on disk. Card: W + logits of one batch B x T x V x 4 x 3 (logits, log-softmax, top-k).
- quantize: the pruned fp model on the card before its projections become int4: Ws.
- recovery (the student alone): int4 projections (0.5 + 4 / G bytes a weight) + embedding and
  output matrix at b + trained float32 masters x 16 (value, gradient, two AdamW moments) +
  activations B x (the per-layer term at Tr) + one projection dequantized at a time
  (models/int4_linear.py recomputes it in the backward pass) + logits 3 x B x Tr x V x 4.
  Without a teacher cache (--teacher-cache off, several processes) the teacher stays on the
  card beside the student: + W.
- export (host): the artifact + one dense layer in float32 + 2 GiB (writers and readers).
- eval (card): the model + one batch of activations and logits (no gradients).

These are plans, not measurements: the kernels' workspaces, the allocator's slack and Python
come on top (tests/test_memory.py holds the dominant term of each stage within 20% of a
measurement). A stage that does not fit is refused before loading, with the flags that shrink it.
"""

from __future__ import annotations

import os
import re
import resource
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import psutil

from saap_edge.errors import UserError

GIB = 2**30
EXPORT_SLACK = 2 * GIB


@dataclass
class Shape:
    """The sizes the plans read, counted on the meta-device module tree of a LLaMA config."""

    hidden: int
    vocab: int
    layers: list[tuple[int, int, int]]  # (query heads, KV heads, MLP width) per layer
    head_dim: int
    tied: bool
    layer_params: list[int] = field(default_factory=list)  # every parameter of each decoder layer
    embed_params: int = 0
    head_params: int = 0  # 0 when tied to the embedding
    other_params: int = 0  # final norm and anything else outside the layers
    group_size: int | None = None  # int4 group size of an int4 checkpoint's config, else None

    @classmethod
    def of(cls, config) -> "Shape":
        n = config.num_hidden_layers
        hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        heads = getattr(config, "num_attention_heads_per_layer", None) or [config.num_attention_heads] * n
        kv = getattr(config, "num_key_value_heads_per_layer", None) or [config.num_key_value_heads or config.num_attention_heads] * n
        ffn = getattr(config, "intermediate_size_per_layer", None) or [config.intermediate_size] * n
        shape = cls(config.hidden_size, config.vocab_size, list(zip(heads, kv, ffn)), hd, bool(config.tie_word_embeddings))
        shape.group_size = (getattr(config, "quantization", None) or {}).get("group_size")
        try:
            shape._count(config)
        except Exception:  # noqa: BLE001 - a config transformers will not build empty (e.g. a pad id past the
            shape._count_by_formula()  # vocabulary): the LLaMA block's own sizes
        return shape

    def _count_by_formula(self) -> None:
        h = self.hidden
        self.layer_params = []
        for layer in self.layers:
            alone = Shape(h, self.vocab, [layer], self.head_dim, self.tied)
            norms = 2 * h if layer[1] else h  # an attention-free layer has no attention norm
            self.layer_params.append(sum(i * o for i, o in alone.projections()) + norms)
        self.embed_params = self.vocab * h
        self.head_params = 0 if self.tied else self.vocab * h
        self.other_params = h

    def _count(self, config) -> None:
        """Parameter counts from the model transformers builds for `config`, on the meta device."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        import saap_edge.models.slim  # noqa: F401  registers the slim architecture

        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        inner = model.model
        self.layer_params = [_weights(layer) for layer in inner.layers]
        self.embed_params = inner.embed_tokens.weight.numel()
        head = model.get_output_embeddings()
        self.head_params = 0 if self.tied or head is None else head.weight.numel()
        total = _weights(model)  # tied weights appear once
        self.other_params = total - sum(self.layer_params) - self.embed_params - self.head_params

    def projections(self) -> list[tuple[int, int]]:
        """(in, out) of every projection."""
        h, out = self.hidden, []
        for heads, kv, f in self.layers:
            q, k = heads * self.head_dim, kv * self.head_dim
            if kv:
                out += [(h, q), (h, k), (h, k), (q, h)]
            out += [(h, f), (h, f), (f, h)]
        return out

    def params(self) -> int:
        return sum(self.layer_params) + self.embed_params + self.head_params + self.other_params

    def activations(self, tokens: int, b: int) -> int:
        """Saved activations of one sequence of `tokens` through every layer, attention scores included."""
        total = 0
        for heads, kv, f in self.layers:
            q, k = heads * self.head_dim, kv * self.head_dim
            total += tokens * (4 * self.hidden + 4 * q + 3 * k + 4 * f) * b + heads * tokens * tokens * b
        return total

    def units(self) -> int:
        return sum(kv + heads + f for heads, kv, f in self.layers)

    def widest_refit_input(self) -> int:
        """The largest input of an output projection (o_proj: heads x head_dim, down_proj: F)."""
        return max(max(heads * self.head_dim, f) for heads, _, f in self.layers)

    def int4_bytes(self, group_size: int, b: int, keep: float = 1.0) -> int:
        """The model with int4 projections (codes + fp16 scale and offset per group) and the
        rest at b bytes; `keep` scales the projections (a pruned model of the kept share)."""
        proj = sum(i * o for i, o in self.projections())
        rest = self.params() - proj
        return int(keep * proj * (0.5 + 4 / group_size)) + rest * b


def _weights(module) -> int:
    """Weights of a module tree: its parameters, and in*out for each int4 projection (whose
    codes, scales and offsets are buffers), so an int4 checkpoint counts like its float twin."""
    from saap_edge.models.int4_linear import Int4Linear

    n, seen = 0, set()
    for m in module.modules():
        if isinstance(m, Int4Linear):
            n += m.in_features * m.out_features
            continue
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
    return n


def model_shape(name: str) -> Shape:
    """The sizes of --model `name` read from its config alone (no weights, no tokenizer); a
    UserError in one line when that config cannot be read or is not a LLaMA-block model."""
    from saap_edge.models.load import SUPPORTED_MODEL_TYPES, SUPPORTED_TEXT, model_config

    config = model_config(name)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        what = "cannot be read" if config is None else f"is {getattr(config, 'model_type', None)!r}"
        raise UserError(f"{name}: its config {what}; memory plans cover {SUPPORTED_TEXT} from their config.json")
    try:
        return Shape.of(config)
    except (AttributeError, TypeError, ValueError) as exc:
        raise UserError(f"{name}: its config is not a LLaMA-block model ({exc})") from exc


@dataclass
class StageMemory:
    """The planned peak of one stage: its parts on the card and on the host (bytes)."""

    stage: str
    card: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    fixes: str = ""  # the flags that shrink it

    @property
    def card_total(self) -> int:
        return sum(self.card.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    @property
    def total(self) -> int:
        return self.card_total + self.host_total

    def as_dict(self) -> dict:
        return {"card": {**self.card, "total": self.card_total}, "host": {**self.host, "total": self.host_total}}


@dataclass
class Devices:
    """What a run may use: the card's budget (None on a CPU run: the host is the card) and the host's."""

    card: int | None
    host: int
    card_name: str = "cpu"

    def fits(self, st: StageMemory) -> tuple[bool, str]:
        """(fits, where it does not)."""
        if self.card is None:
            return st.total <= self.host, "host"
        if st.card_total > self.card:
            return False, "card"
        return st.host_total <= self.host, "host"


# --------------------------------------------------------------------------------------------
# The stages.

def estimation_memory(shape: Shape, b: int, seq_len: int, samples: int, on_cpu: bool = False) -> StageMemory:
    largest = max(i * o for i, o in shape.projections())
    weights = shape.params() * b
    return StageMemory("estimation", {
        "weights": weights,
        "activations": shape.activations(seq_len, b),
        "logits": 2 * seq_len * shape.vocab * 4,
        # measured: two at once (gate and up finish their backward together)
        "gradients in flight": 2 * largest * (b + 3 * 4),
        "unit statistics": samples * shape.units() * 3 * 4,
    }, {} if on_cpu else {"weights while loading": weights},
        "lower --seq-len (activations grow with it, attention scores with its square)")


def reconstruct_memory(shape: Shape, b: int, ratio: float, samples: int, seq_len: int, batch: int,
                       on_cpu: bool, refits: bool = True, precision_bytes: int = 8, moments: int = 1) -> StageMemory:
    """Slicing streamed into the layer-by-layer refit (see the module doc). `moments`: 1 for the
    "prefix" target (one Gram matrix), 3 for "dense" (cross and target moments too)."""
    weights, layer = shape.params() * b, max(shape.layer_params) * b
    n = shape.widest_refit_input()
    widest = max(f for _, _, f in shape.layers)
    streams = samples * seq_len * (3 * shape.hidden + widest) * b
    batch_acts = batch * seq_len * (3 * shape.hidden + widest) * 4
    # the moments, then OBS's damped copy, identity, Cholesky factor, inverse and one rank-|B| update
    work = (moments * 8 + 5 * precision_bytes) * n * n if refits else 0
    fixes = "lower --recon-samples (calibration streams) or use --reconstruct none (no refit work)"
    dense_and_slim = {"dense and slim weights, streamed": weights + layer}
    if on_cpu:
        return StageMemory("slice + reconstruct", {**dense_and_slim, "refit work": work, "streams": streams + batch_acts},
                           {}, fixes)
    # on a GPU the dense model waits on the host too; each layer pair visits the card for its refit
    return StageMemory("slice + reconstruct",
                       {"two layers in flight": 2 * layer, "refit work": work, "one batch of streams": batch_acts},
                       {**dense_and_slim, "streams": streams}, fixes)


def teacher_memory(teacher: Shape, b: int, batch: int, seq_len: int) -> StageMemory:
    """The teacher alone on the card, computing the cached top-k targets."""
    return StageMemory("teacher pass", {
        "teacher weights": teacher.params() * b,
        "one layer's activations": batch * seq_len * (2 * teacher.hidden + 2 * max(f for _, _, f in teacher.layers)) * b,
        "logits": 3 * batch * seq_len * teacher.vocab * 4,
    }, {}, "lower --batch-size (the teacher's batch)")


def quantize_memory(shape: Shape, b: int, ratio: float, gptq_windows: int = 0, seq_len: int = 0,
                    batch: int = 1) -> StageMemory:
    """Rounding to int4: the pruned fp weights; GPTQ adds one site's float64 input second
    moment and its solve (3 x n^2 x 8 B for the widest input n), the layer it quantizes as
    float32 (its int4 forward over the calibration windows), the calibration stream on the
    host and one batch of a layer's activations."""
    parts = {"pruned fp weights": int(round((1 - ratio) * shape.params() * b))}
    host = {}
    fixes = "use --dtype bfloat16 (the pruned weights before int4)"
    if gptq_windows:
        widest = max(max(f for _, _, f in shape.layers), shape.hidden)
        parts["input second moment and its inverse (float64)"] = 3 * widest * widest * 8
        parts["one layer dequantized (float32)"] = max(shape.layer_params) * 4
        parts["one batch through a layer"] = int(round(batch * shape.activations(seq_len, b) / len(shape.layers)))
        host["calibration stream (two copies)"] = 2 * gptq_windows * seq_len * shape.hidden * b
        fixes += ", lower --quant-samples"
    return StageMemory("quantize", parts, host, fixes)


def recovery_memory(shape: Shape, b: int, ratio: float, batch: int, seq_len: int, distils: bool, rank: int,
                    lora: bool, group_size: int, teacher: Shape | None = None, live_teacher: bool = False,
                    quantized: bool = True, full: bool = False, stage: str = "recovery") -> StageMemory:
    """The student training alone (`live_teacher`: the teacher beside it, no cache). `shape` is
    the model before pruning by `ratio` (compress) or the student itself (ratio 0, `recover`).
    `full`: every weight trains as float32 (weights, gradients, two AdamW moments: 16 B each)."""
    keep = 1 - ratio
    trained = sum(rank * (i + o) if lora else o * (i // group_size) for i, o in shape.projections())
    largest = max(i * o for i, o in shape.projections())
    student = shape.int4_bytes(group_size, b, keep) if quantized else int(round(keep * shape.params() * b))
    if full:
        student = int(round(keep * shape.params() * 4))
    parts = {"student weights" + (" (float32 masters)" if full else ""): student}
    if distils and live_teacher:
        parts["teacher weights"] = (teacher or shape).params() * b
    parts.update({
        "activations": int(round(batch * shape.activations(seq_len, b) * (keep if ratio else 1))),
        "one projection dequantized": largest * 4 * 2,
        "logits": 3 * batch * seq_len * shape.vocab * 4,
        "trained parameters and AdamW": int(round(keep * trained)) * 4 * 4,
    })
    if full:  # the weights are the trained parameters: their gradients and two moments
        del parts["trained parameters and AdamW"], parts["one projection dequantized"]
        parts["gradients and AdamW (float32)"] = 3 * student
    fixes = "lower --batch-size / --recover-seq-len (activations)"
    if full:
        fixes = "use --train lora (full training holds 16 B per weight), or " + fixes
    if live_teacher:
        fixes += ", or give a --teacher-cache folder (the teacher then leaves the card before training)"
    return StageMemory(stage, parts, {}, fixes)


def export_memory(shape: Shape, artifact: int, group_size: int | None, streamed: bool = False) -> StageMemory:
    """The export on the host. Streamed (a safetensors directory: exporters.streams): the
    artifact (written, then mapped by the checks and the runtime) and the largest tensor being
    encoded or checked: an embedding matrix read into float32 and encoded in row blocks (~5 B a
    weight), a projection grouped, rounded and decoded whole (~24 B a weight, measured); plus
    the writers' and readers' slack. The model is never held. Loaded whole (a GGUF or hub
    source, the traced ONNX graph): the checkpoint as it loads (float32; an int4 checkpoint
    keeps its groups), the artifact, one dense layer in float32, and the slack."""
    fix = ("free memory or use a machine with more RAM" if group_size or streamed else
           "export an int4 checkpoint (saap-edge compress writes one), or use a machine with more RAM")
    if streamed:
        largest = max(5 * max(shape.embed_params, shape.head_params), 24 * max(i * o for i, o in shape.projections()))
        return StageMemory("export", {}, {"artifact": artifact, "the largest tensor being encoded or checked": largest,
                                          "writers and readers": EXPORT_SLACK}, fix)
    loaded = shape.int4_bytes(group_size, 4) if group_size else shape.params() * 4
    return StageMemory("export", {}, {"checkpoint (float32 outside int4 groups)": loaded, "artifact": artifact,
                                      "one dense layer (float32)": max(shape.layer_params) * 4,
                                      "writers and readers": EXPORT_SLACK}, fix)


def eval_memory(shape: Shape, weights: int, batch: int, seq_len: int, b: int) -> StageMemory:
    widest = max(f for _, _, f in shape.layers)
    return StageMemory("eval", {"weights": weights,
                                "one batch": batch * seq_len * (3 * shape.hidden + 2 * widest) * b,
                                "logits": 2 * batch * seq_len * shape.vocab * 4}, {}, "lower --batch-size")


def artifact_bytes(shape: Shape, quant: str, embed: str | None, group_size: int = 32) -> int:
    """Bytes of an exported file: projections at `quant`, embedding / output matrix at `embed`."""
    per = {"f32": 4.0, "f16": 2.0, "q4_1": 0.625, "int4": 0.625, "q8_0": 34 / 32, "int8": 34 / 32,
           "fp32": 4.0}
    proj = sum(i * o for i, o in shape.projections())
    outer = shape.embed_params + shape.head_params
    q = per.get(quant, 4.0) if quant not in ("q4_1", "int4") else 0.5 + 4 / group_size
    e = per.get(embed or ("f16" if quant in ("q4_1", "int4") else quant), 2.0)
    return int(proj * q + outer * e + shape.other_params * 4 + sum(shape.layer_params) - proj)


# --------------------------------------------------------------------------------------------
# Budgets: --max-memory as accelerate spells it, and what the machine has free.

UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "b": 1}
_GPU_KEY = re.compile(r"^(?:cuda:)?(\d+)$")


def _size(text: str, flag_text: str) -> int:
    low = text.strip().lower().replace(" ", "")
    unit = next((u for u in UNITS if low.endswith(u)), None)
    try:
        number = float(low[: -len(unit)] if unit else low)
    except ValueError:
        number = -1
    if number <= 0:
        raise UserError(f"--max-memory {flag_text!r}: each entry is DEVICE=SIZE, e.g. 0=20GiB,cpu=64GiB")
    return int(number * (UNITS[unit] if unit else 1))


def parse_max_memory(text: str | None) -> dict[int | str, int] | None:
    """--max-memory "0=20GiB,cuda:1=20GiB,cpu=64GiB" -> {0: bytes, 1: bytes, "cpu": bytes}:
    accelerate's max_memory, whose GPU keys are integers."""
    if not text:
        return None
    out: dict[int | str, int] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        key = key.strip().lower()
        if not sep or not key:
            raise UserError(f"--max-memory {text!r}: each entry is DEVICE=SIZE, e.g. 0=20GiB,cpu=64GiB")
        gpu = _GPU_KEY.match(key)
        if gpu:
            name: int | str = int(gpu.group(1))
        elif key in ("cpu", "disk"):
            name = key
        else:
            raise UserError(f"--max-memory: unknown device {key!r}; use a GPU index (0, cuda:0) or cpu, "
                            "e.g. 0=20GiB,cpu=64GiB")
        if name in out:
            raise UserError(f"--max-memory: device {key!r} is given twice")
        out[name] = _size(value, text)
    return out


def host_available() -> int:
    """Available RAM of this machine."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is a dependency
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def devices_for(device: str, max_memory: dict | None, device_map: str | None = None, probe: bool = True) -> Devices:
    """The budgets of a run on `device` ("cpu", "cuda", "cuda:N"): --max-memory's entries where
    given (the cpu= entry is the host's, never the card's), else what is free. `probe` False
    (a dry run) never asks CUDA: a card without a budget is an error naming the flag."""
    mm = max_memory or {}
    host = mm.get("cpu") or host_available()
    if not device.startswith("cuda"):
        return Devices(None, host)
    index = int(device.split(":")[1]) if ":" in device else 0
    gpus = sorted(k for k in mm if isinstance(k, int))
    if device_map:
        if gpus:
            return Devices(sum(mm[k] for k in gpus), host, f"{len(gpus)} GPUs")
    elif index in mm:
        return Devices(mm[index], host, f"cuda:{index}")
    elif gpus:
        raise UserError(f"--max-memory gives budgets for GPU {', '.join(map(str, gpus))} but the run uses cuda:{index}; "
                        f"add {index}=SIZE or run on --device cuda:{gpus[0]}")
    if not probe:
        raise UserError("--dry-run on a GPU needs the card's size: give it with --max-memory, e.g. 0=24GiB,cpu=64GiB")
    import torch

    if not torch.cuda.is_available():
        return Devices(0, host, "cuda (none visible)")
    ids = list(range(torch.cuda.device_count())) if device_map else [index]
    return Devices(sum(torch.cuda.mem_get_info(i)[0] for i in ids), host, f"cuda:{index}" if not device_map else "GPUs")


# --------------------------------------------------------------------------------------------
# Reporting and refusing.

def format_bytes(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def _parts(parts: dict[str, int]) -> str:
    return ", ".join(f"{k} {format_bytes(v)}" for k, v in parts.items() if v)


def describe(stages: list[StageMemory], devices: Devices) -> str:
    if devices.card is None:
        lines = [f"memory plan (CPU run: the host holds {format_bytes(devices.host)}):"]
        for st in stages:
            lines.append(f"  {st.stage}: {format_bytes(st.total)} ({_parts({**st.card, **st.host})})")
        return "\n".join(lines)
    lines = [f"memory plan (card {devices.card_name} holds {format_bytes(devices.card)}, host {format_bytes(devices.host)}):"]
    for st in stages:
        lines.append(f"  {st.stage}: card {format_bytes(st.card_total)} ({_parts(st.card) or 'nothing'}); "
                     f"host {format_bytes(st.host_total)} ({_parts(st.host) or 'nothing'})")
    return "\n".join(lines)


def check_fits(stages: list[StageMemory], devices: Devices, device_map: str | None) -> None:
    """Refuse, before loading, a stage that cannot fit, naming the stage, the place and the flags."""
    for st in stages:
        ok, where = devices.fits(st)
        if ok:
            continue
        need = st.total if devices.card is None else (st.card_total if where == "card" else st.host_total)
        budget = devices.host if where == "host" else devices.card
        holder = "the host holds" if devices.card is None else f"the {where} holds"
        more = ""
        if st.card:
            more = (", or use --max-memory with a cpu= budget to offload layers to RAM" if device_map else
                    ", or use --device-map auto to spread the layers over every GPU (and --max-memory cpu=... to "
                    "offload), or more devices")
        parts = st.card if where == "card" or devices.card is None else st.host
        weights = sum(v for k, v in {**parts, **(st.host if devices.card is None else {})}.items() if "weights" in k)
        room = (f" (its weights, {format_bytes(weights)}, fit but leave no room for activations)"
                if 0 < weights <= budget else "")
        raise UserError(f"{st.stage} needs about {format_bytes(need)} and {holder} {format_bytes(budget)}{room}; "
                        f"{st.fixes}{more}")


# --------------------------------------------------------------------------------------------
# Whole commands: the stages each one runs, in order.

TEACHER_CHUNK = 256  # window positions per teacher-cache file (recover/distill.py CHUNK)


def planned_steps(r, device_type: str, n_windows: int) -> int:
    """Optimizer steps of a recovery (RecoverSettings `r`) on `device_type` over `n_windows`."""
    if r.steps is not None:
        return r.steps
    epochs = r.epochs if r.epochs is not None else (2.0 if device_type == "cuda" else None)
    if epochs is None:
        from saap_edge.config import CPU_RECOVER_STEPS

        return CPU_RECOVER_STEPS
    return max(1, -(-int(epochs * n_windows) // (r.batch_size * r.grad_accum)))


def teacher_cache_bytes(r, device_type: str, n_windows: int | None = None) -> int:
    """Bytes of the teacher's cached top-k targets for a run (at most, when the text's length
    is not known: --max-tokens / --recover-seq-len windows)."""
    n = n_windows if n_windows is not None else (r.max_tokens or 2_000_000) // r.seq_len
    positions = planned_steps(r, device_type, n) * r.batch_size * r.grad_accum
    return -(-positions // TEACHER_CHUNK) * TEACHER_CHUNK * r.seq_len * r.kd_topk * 8


def recovery_stages(student: Shape, teacher: Shape | None, b: int, ratio: float, r, device_type: str,
                    cache_mib: int | None) -> list[StageMemory]:
    """teacher pass, quantize and recovery of a RecoverSettings `r` (compress: `student` is the
    dense shape and `ratio` the share pruned; recover: the student itself and 0)."""
    from saap_edge.config import generated_tokens

    gptq = (r.quant_samples, r.seq_len, r.batch_size) if r.quantizer == "gptq" else (0, 0, 1)
    group = r.group_size or 32
    stages = []
    cached = r.distills and cache_mib is not None and r.kd_topk > 0
    generates = r.reads_text and cache_mib is not None and generated_tokens(r.data) is not None
    if cached or generates:  # the teacher alone: its targets, and the text it writes
        need = teacher_cache_bytes(r, device_type)
        if need > cache_mib * 2**20:
            raise UserError(f"the teacher's targets for this run take up to {need / 2**20:.0f} MiB and "
                            f"--teacher-cache-mib is {cache_mib}; raise it to {-(-need // 2**20)}, or lower "
                            "--max-tokens / --epochs")
        stages.append(teacher_memory(teacher or student, b, r.batch_size, r.seq_len))
    if r.recovery == "none":
        return stages + [quantize_memory(student, b, ratio, *gptq)]
    live = r.distills and not cached
    if r.quantized_first:
        stages.append(quantize_memory(student, b, ratio, *gptq))
    stages.append(recovery_memory(student, b, ratio, r.batch_size, r.seq_len, r.distills, r.rank, "lora" in r.trained,
                                  group, teacher, live_teacher=live, quantized=r.quantized_first,
                                  full="full" in r.trained))
    if r.recovery == "qalora" and not r.quantized_first:  # distil-quantize: int4 after training
        stages.append(quantize_memory(student, b, ratio, *gptq))
        if r.offset_steps:
            stages.append(recovery_memory(student, b, ratio, r.batch_size, r.seq_len, r.distills, r.rank, False, group,
                                          teacher, live_teacher=live, stage="offsets pass"))
    return stages


def compress_stages(shape: Shape, b: int, s, rc, r, device_type: str, cache_mib: int | None,
                    teacher: Shape | None = None, solve_bytes: int | None = None) -> list[StageMemory]:
    """Every stage of `saap-edge compress` with PruneSettings `s`, ReconstructSettings `rc` and
    RecoverSettings `r` (None: --no-recover)."""
    on_cpu = device_type != "cuda"
    stages = [estimation_memory(shape, b, s.seq_len, s.calib_samples, on_cpu),
              reconstruct_memory(shape, b, s.ratio, rc.samples if rc.active else 0, rc.seq_len, rc.batch_size, on_cpu,
                                 refits=rc.active, precision_bytes=solve_bytes or (8 if on_cpu else 4),
                                 moments=3 if rc.target == "dense" else 1)]
    if r is not None:
        stages += recovery_stages(shape, teacher, b, s.ratio, r, device_type, cache_mib)
    return stages


# ------------------------------------------------------------------ measured
# What a stage really took, beside what it was planned to take: report.json keeps both.


def peak_memory_mib(device) -> float:
    """Peak memory of this process: the CUDA allocator's peak, else the peak RSS."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class PeakRSS:
    """Samples this process's RSS every `interval` s in a thread; `.peak_mib` after the block.

    ru_maxrss only ever grows over a process's life, so stages (or benchmark rows) measured
    one after another in one process need a sampler to get each one's own peak."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._proc = psutil.Process(os.getpid())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.start_mib = self._proc.memory_info().rss / 2**20
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20


@contextmanager
def stage_peak(record: dict, stage: str, device):
    """Measure one stage into `record[stage]`: the process's peak RSS during it (MiB) and, on a
    GPU, the CUDA allocator's peak (the stage's counter starts at zero)."""
    import torch

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with PeakRSS(interval=0.05) as rss:
        yield
    record[stage] = {"host_peak_mib": round(rss.peak_mib, 1)}
    if cuda:
        record[stage]["card_peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
