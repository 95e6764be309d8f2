"""How much memory each stage needs, counted from the model's config before anything loads.

The counts (bytes; b = bytes per weight of --dtype; T = --seq-len, Tr = --recover-seq-len,
B = --batch-size; H hidden, F MLP width, V vocabulary, per layer q = heads x head_dim and
kv = KV heads x head_dim):

- weights: parameters x b (embedding, output matrix unless tied, q/k/v/o, gate/up/down, norms).
- estimation (one calibration window at a time, forward + backward, gradients only for the
  projection weights, folded into per-unit sums as they arrive, estimate.py):
    activations kept for the backward pass, per layer  T x (4H + 4q + 3kv + 4F) x b
      (norm inputs, q/k/v and their rotated copies, attention output, MLP intermediates)
    attention scores, per layer                         heads x T x T x b  (the math kernel's)
    logits and their gradient                           2 x T x V x 4      (float32 loss)
    one gradient in flight                              largest projection x (b + 3 x 4)
      (the gradient, its float32 copy, g*w and the element-wise term)
    per-sample unit statistics                          samples x units x 3 x 4
- recovery (micro-batches of B windows of Tr; the student at the kept share of the weights,
  the teacher dense when the loss distils):
    student weights (1 - ratio) x weights; teacher weights (kd): weights
    activations B x (the per-layer activation term at Tr + the attention term at Tr) x layers
    logits 3 x B x Tr x V x 4 (student logits, their gradient, the teacher's)
    trained parameters x 4 x 4 (float32 value, gradient, two AdamW moments); the trained
    parameters are LoRA's r x (in + out) per projection, or one offset per int4 group
    (with --train offsets), counted at the dense widths.

These are estimates, not measurements: the kernels' workspaces, the allocator's slack and
Python's own memory come on top. A stage whose count exceeds what the devices hold is refused
before loading, with the flags that change the count.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from saap_edge.errors import UserError

GIB = 2**30


@dataclass
class Shape:
    """The sizes the counts read, from a (slim or dense) LLaMA config."""

    hidden: int
    vocab: int
    layers: list[tuple[int, int, int]]  # (query heads, KV heads, MLP width) per layer
    head_dim: int
    tied: bool

    @classmethod
    def of(cls, config) -> "Shape":
        n = config.num_hidden_layers
        hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        heads = getattr(config, "num_attention_heads_per_layer", None) or [config.num_attention_heads] * n
        kv = getattr(config, "num_key_value_heads_per_layer", None) or [config.num_key_value_heads or config.num_attention_heads] * n
        ffn = getattr(config, "intermediate_size_per_layer", None) or [config.intermediate_size] * n
        return cls(config.hidden_size, config.vocab_size, list(zip(heads, kv, ffn)), hd, bool(config.tie_word_embeddings))

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
        h = self.hidden
        norms = sum((2 if kv else 1) * h for _, kv, _ in self.layers) + h
        return self.vocab * h * (1 if self.tied else 2) + sum(i * o for i, o in self.projections()) + norms

    def activations(self, tokens: int, b: int) -> int:
        """Saved activations of one sequence of `tokens` through every layer, attention scores included."""
        total = 0
        for heads, kv, f in self.layers:
            q, k = heads * self.head_dim, kv * self.head_dim
            total += tokens * (4 * self.hidden + 4 * q + 3 * k + 4 * f) * b + heads * tokens * tokens * b
        return total

    def units(self) -> int:
        return sum(kv + heads + f for heads, kv, f in self.layers)


@dataclass
class StageMemory:
    stage: str
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def estimation_memory(shape: Shape, b: int, seq_len: int, samples: int) -> StageMemory:
    largest = max(i * o for i, o in shape.projections())
    return StageMemory("estimation", {
        "weights": shape.params() * b,
        "activations": shape.activations(seq_len, b),
        "logits": 2 * seq_len * shape.vocab * 4,
        "gradient in flight": largest * (b + 3 * 4),
        "unit statistics": samples * shape.units() * 3 * 4,
    })


def recovery_memory(shape: Shape, b: int, ratio: float, batch: int, seq_len: int, distils: bool, rank: int,
                    lora: bool, group_size: int, teacher: Shape | None = None) -> StageMemory:
    """`shape` is the model before pruning by `ratio` (compress) or the student itself (ratio 0,
    `saap-edge recover`, whose dense `teacher` has a shape of its own)."""
    weights = shape.params() * b
    trained = sum(rank * (i + o) if lora else o * (i // group_size) for i, o in shape.projections())
    parts = {"student weights": int(round((1 - ratio) * weights))}
    if distils:
        parts["teacher weights"] = (teacher or shape).params() * b
    parts.update({
        "activations": batch * shape.activations(seq_len, b),
        "logits": 3 * batch * seq_len * shape.vocab * 4,
        "trained parameters and AdamW": trained * 4 * 4,
    })
    return StageMemory("recovery", parts)


def available_bytes(device: str, max_memory: dict[str, int] | None = None) -> int:
    """What the devices of a run hold: --max-memory's budgets when given, else free CUDA memory
    (every visible GPU under --device-map auto) or the machine's available RAM."""
    if max_memory:
        return sum(max_memory.values())
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return 0
        ids = [int(device.split(":")[1])] if ":" in device else list(range(torch.cuda.device_count()))
        return sum(torch.cuda.mem_get_info(i)[0] for i in ids)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no check
        return 2**62


def parse_max_memory(text: str | None) -> dict[str, int] | None:
    """--max-memory "0=20GiB,1=20GiB,cpu=64GiB" -> {device: bytes} (accelerate's max_memory)."""
    if not text:
        return None
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    out: dict[str, int] = {}
    for part in text.split(","):
        key, _, value = part.strip().partition("=")
        low = value.strip().lower()
        unit = next((u for u in units if low.endswith(u)), None)
        try:
            number = float(low[: -len(unit)] if unit else low)
        except ValueError:
            number = -1
        if not key or number <= 0:
            raise UserError(f"--max-memory {text!r}: each entry is DEVICE=SIZE, e.g. 0=20GiB,cpu=64GiB")
        out[key.strip()] = int(number * (units[unit] if unit else 1))
    return out


def format_bytes(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def describe(stages: list[StageMemory], available: int) -> str:
    lines = [f"memory estimate (devices hold {format_bytes(available)}):"]
    for st in stages:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in st.parts.items())
        lines.append(f"  {st.stage}: {format_bytes(st.total)} ({parts})")
    return "\n".join(lines)


def check_fits(stages: list[StageMemory], available: int, device_map: str | None) -> None:
    """Refuse, before loading, a stage that cannot fit, naming the flags that shrink it."""
    for st in stages:
        if st.total <= available:
            continue
        fixes = {"estimation": "--seq-len (activations grow with it, attention scores with its square)",
                 "recovery": "--batch-size / --recover-seq-len (activations), --recover-loss lm (no teacher copy)"}[st.stage]
        more = ("--max-memory with a cpu= budget to offload layers to RAM" if device_map else
                "--device-map auto to spread the layers over every GPU (and --max-memory cpu=... to offload)")
        weights = sum(v for k, v in st.parts.items() if "weights" in k)
        room = (f" (its weights, {format_bytes(weights)}, fit but leave no room for activations)"
                if weights <= available else "")
        raise UserError(f"{st.stage} needs about {format_bytes(st.total)} and the devices hold {format_bytes(available)}"
                        f"{room}; lower {fixes}, or use {more}, or more devices")
