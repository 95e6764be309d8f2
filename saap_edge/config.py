"""Settings: dataclasses validated once and saved into every artifact they shape."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from saap_edge.errors import UserError

SETTINGS_VERSION = 1


class Settings:
    """What every settings dataclass shares: a plain dict for the artifacts it shapes, and back."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class MethodSpec:
    """What compress, the settings checks and the CLI need to know of one pruning method; its
    ranking function lives in prune/methods.py (RANKERS) under the same name."""

    calibrates: bool  # compress draws calibration windows for its estimation
    ranks_globally: bool = False  # one ranking across layers, so it may weigh query-head slots and modules
    default_units: str = "groups"  # --units auto (with the refit)
    settings: str | None = None  # the CompressJob field holding settings of its own, given to its ranker
    searched: bool = False  # ranked by a search over whole prune runs (adapruner.py), not one ranker


# Adding a method: one entry here, its ranker in prune/methods.py RANKERS (and its settings
# dataclass, if any, as a CompressJob field named by `settings`).
METHOD_TABLE = {
    # --units auto: what benchmarks/prune_quality.py measured best per method, with the default
    # reconstruction (query-head slots helped SAAP at 50% and cost nothing at 20%; the others keep
    # their papers' units). Without the refit, head slots chosen by score alone cost dearly (50%:
    # WikiText-2 11976 against 1151 with KV groups only), so auto means groups there.
    "saap": MethodSpec(calibrates=True, ranks_globally=True, default_units="groups,heads"),
    "llm-pruner": MethodSpec(calibrates=True),
    "flap": MethodSpec(calibrates=True, ranks_globally=True),
    "wanda-sp": MethodSpec(calibrates=True),
    "magnitude": MethodSpec(calibrates=False),
    "random": MethodSpec(calibrates=False),
    "adapruner": MethodSpec(calibrates=False, settings="search", searched=True),  # draws its own calibration data
    "hywia": MethodSpec(calibrates=True, ranks_globally=True, default_units="groups,heads", settings="hywia"),
}
METHODS = tuple(METHOD_TABLE)
FUSIONS = ("adaptive", "learned", "sum", "vector", "element")
SCOPES = ("all", "global", "layer")
INDICATORS = ("fluctuation", "bound", "none")
UNIT_CHOICES = ("groups", "heads", "modules")  # attention units; see prune/groups.py
GLOBAL_METHODS = tuple(name for name, m in METHOD_TABLE.items() if m.ranks_globally)


def auto_units(method: str, reconstructs: bool = True) -> str:
    return METHOD_TABLE[method].default_units if reconstructs and method in METHOD_TABLE else "groups"


# --recover-data sources: `books+generated:100000` (the text written by recover/generate.py)
GENERATED = "generated"
DEFAULT_TOKENS = 200_000  # `generated` without a budget
MAX_TOKENS = 20_000_000  # the cache holds at most this many generated tokens (80 MB of int32 ids)


def split_sources(source: str) -> list[str]:
    """`books+generated:100000` -> ["books", "generated:100000"] (a path with '+' stays whole
    when it exists)."""
    if Path(source).exists() or "+" not in source:
        return [source]
    return [part.strip() for part in source.split("+") if part.strip()]


def generated_tokens(source: str) -> int | None:
    """The token budget of a `generated[:TOKENS]` part of the source, or None when it has none;
    UserError for a budget of 0, above the cache limit, or not a number."""
    parts = [p for p in split_sources(source) if p.split(":", 1)[0] == GENERATED]
    if not parts:
        return None
    if len(parts) > 1:
        raise UserError(f"--recover-data {source!r} names generated text twice; give one generated[:TOKENS]")
    _, _, budget = parts[0].partition(":")
    try:
        tokens = int(budget.replace("_", "")) if budget else DEFAULT_TOKENS
    except ValueError:
        raise UserError(f"--recover-data {parts[0]!r}: the budget after ':' must be a token count, e.g. "
                        f"generated:{DEFAULT_TOKENS}") from None
    if not 0 < tokens <= MAX_TOKENS:
        raise UserError(f"--recover-data {parts[0]!r}: the generated budget must be between 1 and {MAX_TOKENS:,} "
                        f"tokens (the cache limit), got {tokens:,}")
    return tokens



@dataclass
class PruneSettings(Settings):
    """How `compress` prunes. Defaults are the variant benchmarks/prune_quality.py chose."""

    method: str = "saap"
    ratio: float = 0.2  # share of TOTAL parameters removed
    calib: str = "books"  # named dataset or path of a text file / folder of .txt files
    calib_samples: int = 50
    seq_len: int = 128
    seed: int = 0
    keep_first: int = 3  # first decoder layers never pruned
    keep_last: int = 1  # last decoder layers never pruned
    align: int = 32  # kept MLP widths are multiples of this
    fusion: str = "adaptive"  # adaptive | learned | sum | vector | element (SAAP eq. 9 and ablations)
    fusion_scope: str = "all"  # all units | global: per module kind | layer: per layer and kind
    indicator: str = "bound"  # fluctuation (eq. 10) | bound (mean + std) | none (mean)
    weight_norm: str = "group"  # ||W||^2 in eq. 10 over the whole group, or "out" projection only
    direction: str = "high"  # fluctuation only. high: prune the most volatile first (paper); low
    cost_exponent: float = 0.0  # rank by score / (unit parameter cost) ** this
    layer_cap: float = 0.8  # saap: no layer loses more than this share of its KV groups / channels
    taylor: str = "param_mix"  # llm-pruner: vectorize | param_mix
    units: str = "auto"  # attention units, comma list: groups (KV groups), heads (query-head slots), modules (whole attention); auto: METHOD_TABLE default_units
    version: int = SETTINGS_VERSION

    @property
    def unit_set(self) -> set[str]:
        units = auto_units(self.method) if self.units == "auto" else self.units
        return {u.strip() for u in units.split(",") if u.strip()}

    def validate(self, reconstructs: bool = True) -> "PruneSettings":
        """Check every setting; `reconstructs` (the reconstruct stage will run) resolves --units auto."""
        choices = {
            "method": METHODS,
            "fusion": FUSIONS,
            "fusion_scope": SCOPES,
            "indicator": INDICATORS,
            "weight_norm": ("group", "out"),
            "direction": ("high", "low"),
            "taylor": ("vectorize", "param_mix"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not 0 < self.ratio < 1:
            raise UserError(f"--ratio {self.ratio} must be a share of all parameters in (0, 1), e.g. 0.2")
        if self.calib_samples < 2 or self.seq_len < 2:
            raise UserError("--calib-samples and --seq-len must be at least 2 (the fluctuation needs a variance)")
        if self.keep_first < 0 or self.keep_last < 0:
            raise UserError("--keep-first and --keep-last must be >= 0")
        if not 0 <= self.cost_exponent <= 1:
            raise UserError(f"--cost-exponent {self.cost_exponent} must be in [0, 1]")
        if not 0 < self.layer_cap <= 1:
            raise UserError(f"--layer-cap {self.layer_cap} must be in (0, 1]")
        if self.align < 1:
            raise UserError("--align must be >= 1 (32 keeps int4 groups and GGUF blocks whole)")
        if self.units == "auto":
            self.units = auto_units(self.method, reconstructs)
        units = self.unit_set
        if "groups" not in units or units - set(UNIT_CHOICES):
            raise UserError(f"--units {self.units!r} must be a comma list of {', '.join(UNIT_CHOICES)} that includes groups, "
                            "e.g. groups,heads")
        if units != {"groups"} and self.method not in GLOBAL_METHODS:
            raise UserError(f"--units {self.units} needs a method with one global ranking ({', '.join(GLOBAL_METHODS)}); "
                            f"--method {self.method} allocates uniformly, use --units groups")
        return self


SEARCH_SAMPLERS = ("tpe", "random")
SEARCH_SPACES = ("both", "data", "metric")


@dataclass
class SearchSettings(Settings):
    """AdaPruner's search (--method adapruner): which --calib-samples windows of a seeded pool
    and which importance metric; see saap_edge/adapruner.py."""

    pool: str = "books"  # --calib-pool: named dataset or path the pool windows come from
    pool_size: int = 256  # P windows of --seq-len tokens
    trials: int = 16  # completed trials the study needs (those of an earlier, killed run count)
    startup: int = 6  # random trials before TPE models the results
    objective: str = "wikitext2"  # perplexity on this text's *validation* split
    objective_windows: int = 32  # 128-token windows of it
    sampler: str = "tpe"  # tpe | random (the ablation)
    space: str = "both"  # both | data (metric fixed to the first choice) | metric (windows fixed to the first S)
    new: bool = False  # replace a stored study made for another model, pool or objective
    cache_mib: int = 4096  # bound of the pool-statistics cache folder (least recently used entries leave first)
    version: int = SETTINGS_VERSION

    def validate(self, calib_samples: int = 1) -> "SearchSettings":
        if self.sampler not in SEARCH_SAMPLERS or self.space not in SEARCH_SPACES:
            raise UserError(f"--search-sampler must be one of {', '.join(SEARCH_SAMPLERS)} and --search-space one of "
                            f"{', '.join(SEARCH_SPACES)}")
        if self.pool_size < calib_samples:
            raise UserError(f"--pool-size {self.pool_size} is smaller than --calib-samples {calib_samples}: a point picks "
                            "that many distinct windows of the pool")
        if self.trials < 1 or self.startup < 0 or self.objective_windows < 1 or self.cache_mib < 0:
            raise UserError("--search-trials and --search-windows must be >= 1, --search-startup and --pool-cache-mib >= 0")
        return self


HYWIA_BLENDS = ("learned", "fixed", "coarse", "fine")
HYWIA_FINE = ("first", "second")
HYWIA_LOSSES = ("kd", "lm")


@dataclass
class HywiaSettings(Settings):
    """HyWIA's attention fusion of coarse and fine importance (--method hywia), learned end to
    end under a soft keep-mask; see saap_edge/prune/hywia.py."""

    blend: str = "learned"  # learned | fixed (50/50) | coarse (only) | fine (only): the ablations
    fine: str = "first"  # fine granularity: first (sum |g*w|) | second (sum |g*w - (g*w)^2/2|)
    loss: str = "kd"  # kd: KL(dense || masked model); lm: next-token cross-entropy of the masked model
    steps: int = 40  # optimizer steps of the fusion learning
    batch: int = 4  # calibration windows per step
    lr: float = 0.05  # Adam on the fusion parameters
    hidden: int = 8  # width of the key projection and of the queries
    t_start: float = 0.5  # soft-mask temperature (in standard deviations of the keep-scores), annealed
    t_end: float = 0.01  # geometrically to this one
    version: int = SETTINGS_VERSION

    MIN_BATCHES = 2  # the learning needs at least this many distinct batches of calibration windows

    def validate(self, calib_samples: int) -> "HywiaSettings":
        for name, allowed in (("blend", HYWIA_BLENDS), ("fine", HYWIA_FINE), ("loss", HYWIA_LOSSES)):
            if getattr(self, name) not in allowed:
                raise UserError(f"--hywia-{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.steps < 1 or self.batch < 1 or self.hidden < 1 or not self.lr > 0:
            raise UserError("--hywia-steps, --hywia-batch and --hywia-hidden must be >= 1 and --hywia-lr > 0")
        if not 0 < self.t_end <= self.t_start:
            raise UserError(f"the soft-mask temperatures must satisfy 0 < end ({self.t_end}) <= start ({self.t_start})")
        need = self.MIN_BATCHES * self.batch
        if self.blend == "learned" and calib_samples < need:
            raise UserError(f"--calib-samples {calib_samples} is too few for HyWIA's fusion learning: it needs at least "
                            f"{need} ({self.MIN_BATCHES} batches of --hywia-batch {self.batch}); raise --calib-samples or "
                            "lower --hywia-batch")
        return self


RECONSTRUCTIONS = ("lsq", "none")
RECON_TARGETS = ("prefix", "dense")
SELECTIONS = ("global", "local")


@dataclass
class ReconstructSettings(Settings):
    """The reconstruct stage between slicing and recovery: refit the kept columns of every
    layer's o_proj and down_proj by least squares, layer after layer on activations of the
    already pruned-and-refit prefix. Defaults are what benchmarks/prune_quality.py measured best."""

    method: str = "lsq"  # lsq: ridge least-squares refit; none: slicing only
    target: str = "prefix"  # prefix: the dense layer applied to the pruned prefix's inputs; dense: the dense model's own activations
    samples: int = 128  # calibration windows (forward only, so more than the gradient pass; 256 measured no better)
    seq_len: int = 128
    damp: float = 0.01  # ridge lambda as a share of the mean diagonal of X X^T
    select: str = "local"  # local: the method's ranking sets how many units each layer loses, the refit error which; global: the ranking picks them
    batch_size: int = 8  # windows per forward pass
    version: int = SETTINGS_VERSION

    def validate(self) -> "ReconstructSettings":
        choices = {"method": RECONSTRUCTIONS, "target": RECON_TARGETS, "select": SELECTIONS}
        flags = {"method": "--reconstruct", "target": "--recon-target", "select": "--select"}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"{flags[name]} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.samples < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise UserError("--recon-samples and --recon-batch-size must be >= 1 and --recon-seq-len >= 2")
        if not 0 < self.damp < 10:
            raise UserError(f"--recon-damp {self.damp} must be in (0, 10), e.g. 0.01 (1% of the mean diagonal of X X^T)")
        if self.select == "local" and self.method == "none":
            raise UserError("--select local chooses units by the refit error; it needs --reconstruct lsq")
        return self

    @property
    def active(self) -> bool:
        return self.method != "none"


@dataclass
class RunSettings:
    """Where and how a stage runs (not part of what makes a plan)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    data_dir: str | None = None
    progress: bool = True
    device_map: str | None = None  # "auto": the decoder layers spread over the visible GPUs (accelerate)
    max_memory: str | None = None  # per-device budgets for the map, "0=20GiB,cpu=64GiB"
    solve_dtype: str = "auto"  # the refit's solves and OBS selection: auto (float32 on CUDA, float64 on CPU), float32, float64


RECOVERIES = ("qalora", "lora", "none")
RECOVER_LOSSES = ("lm", "kd", "kd+lm")
TRAINABLES = ("lora", "offsets", "scales", "norms", "full")  # what recovery may train (see recover/params.py)
RECOVER_ORDERS = ("quantize-distil", "distil-quantize")  # int4 first and train the groups, or train the fp model first
QUANTIZERS = ("rtn", "gptq")  # round to nearest; GPTQ from the layers' input statistics (quant/gptq.py)
CPU_RECOVER_STEPS = 60  # CPU default: keeps `make demo` near ten minutes on 2 cores


def default_cache_dir() -> Path:
    """Where the teacher's top-k targets are cached: $SAAP_EDGE_CACHE/teacher, else
    $XDG_CACHE_HOME/saap-edge/teacher, else ~/.cache/saap-edge/teacher."""
    base = os.environ.get("SAAP_EDGE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "saap-edge")
    return Path(base).expanduser() / "teacher"


@dataclass
class RecoverSettings(Settings):
    """How recovery trains. `steps` / `epochs` None: device defaults (see `resolved`)."""

    recovery: str = "qalora"  # qalora: int4 groups + group-pooled LoRA merged into offsets; lora: fp LoRA; none: int4 RTN
    data: str = "books"  # named dataset, .txt file / folder, Alpaca .json / .jsonl, or hub dataset name
    steps: int | None = None  # optimizer steps (wins over epochs)
    epochs: float | None = None  # passes over the training windows
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    group_size: int | None = None  # int4 group size G; None: largest of 128 / 64 / 32 dividing every input dim
    lr: float = 1e-4
    warmup: float = 0.1  # share of the steps with a linear warm-up (then linear decay to 0)
    weight_decay: float = 0.0
    batch_size: int = 8  # windows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 128
    heldout: int = 16  # windows of the recovery text held out for perplexity
    max_tokens: int | None = 2_000_000  # tokens of the recovery text used at most (None: all)
    seed: int = 0
    loss: str = "kd"  # kd: KL(teacher || student); lm: next-token cross-entropy; kd+lm: kd_weight * kd + (1 - kd_weight) * lm
    kd_temperature: float = 1.0  # both distributions at logits / T; the loss is scaled by T^2
    kd_topk: int = 64  # teacher's k most likely tokens + one bucket for the rest (0: the whole vocabulary, no cache)
    kd_weight: float = 0.5  # kd+lm only
    group_lr: float = 1e-3  # AdamW rate of trained offsets and norms (scales: a tenth of it); lr is the LoRA adapters'
    train: str | None = None  # comma list of lora, offsets, scales, norms, full (codes never change); None: see `trained`
    order: str = "quantize-distil"  # qalora: quantize then train the groups, or distil the fp model then quantize
    quantizer: str = "rtn"  # how fp weights become int4 groups: rtn | gptq
    quant_samples: int = 128  # gptq: calibration windows of the recovery text (its first training windows)
    offset_steps: int = 0  # distil-quantize: offsets kd steps after quantizing (0: none)
    version: int = SETTINGS_VERSION

    # Settings that decide the training result: a resumed run must match them all.
    RESULT_FIELDS = ("recovery", "steps", "epochs", "rank", "alpha", "dropout", "group_size", "lr", "warmup",
                     "weight_decay", "batch_size", "grad_accum", "seq_len", "heldout", "max_tokens", "seed",
                     "loss", "kd_temperature", "kd_topk", "kd_weight", "train", "group_lr", "order", "quantizer",
                     "quant_samples", "offset_steps")

    @property
    def trained(self) -> tuple[str, ...]:
        """The parts `train` names, in a fixed order."""
        default = "lora" if self.recovery == "lora" else "full" if self.order == "distil-quantize" else "offsets"
        train = self.train if self.train is not None else default
        parts = {p.strip() for p in train.split(",") if p.strip()}
        return tuple(t for t in TRAINABLES if t in parts)

    @property
    def distills(self) -> bool:
        return self.recovery != "none" and self.loss != "lm"

    def validate(self) -> "RecoverSettings":
        if self.recovery not in RECOVERIES:
            raise UserError(f"--recovery {self.recovery!r} is not one of {', '.join(RECOVERIES)}")
        for name in ("rank", "batch_size", "grad_accum", "seq_len"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 0:
            raise UserError(f"--recover-steps must be >= 0, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise UserError(f"--epochs must be > 0, got {self.epochs}")
        if not 0 <= self.dropout < 1 or not 0 <= self.warmup < 1:
            raise UserError("--lora-dropout and --warmup must be in [0, 1)")
        if self.lr <= 0 or self.group_lr <= 0:
            raise UserError(f"--lr and --group-lr must be > 0, got {self.lr} and {self.group_lr}")
        if self.group_size is not None and (self.group_size <= 0 or self.group_size % 32):
            raise UserError(f"--group-size {self.group_size} must be a positive multiple of 32 (32, 64 or 128)")
        if self.loss not in RECOVER_LOSSES:
            raise UserError(f"--recover-loss {self.loss!r} is not one of {', '.join(RECOVER_LOSSES)}")
        if not 0 < self.kd_temperature <= 100:
            raise UserError(f"--kd-temperature {self.kd_temperature} must be in (0, 100], e.g. 1 or 2")
        if self.kd_topk < 0:
            raise UserError(f"--kd-topk {self.kd_topk} must be >= 0 (0: the whole vocabulary)")
        if not 0 < self.kd_weight <= 1:
            raise UserError(f"--kd-weight {self.kd_weight} must be in (0, 1]")
        unknown = [p.strip() for p in (self.train or "").split(",") if p.strip() and p.strip() not in TRAINABLES]
        if unknown or not self.trained:
            raise UserError(f"--train {self.train!r}: give a comma list of {', '.join(TRAINABLES)} (e.g. offsets,scales)")
        if self.recovery == "lora" and set(self.trained) & {"offsets", "scales", "full"}:
            raise UserError("--train offsets / scales / full needs --recovery qalora (offsets and scales are the int4 "
                            "groups' own; full trains the fp model before int4 with --recover-order distil-quantize); "
                            "--recovery lora trains lora,norms")
        return self._validate_order()

    def _validate_order(self) -> "RecoverSettings":
        generated_tokens(self.data)  # a budget of 0, above the cache limit or not a number: named now
        if self.order not in RECOVER_ORDERS:
            raise UserError(f"--recover-order {self.order!r} is not one of {', '.join(RECOVER_ORDERS)}")
        if self.quantizer not in QUANTIZERS:
            raise UserError(f"--quantizer {self.quantizer!r} is not one of {', '.join(QUANTIZERS)}")
        if self.quantizer == "gptq" and self.quant_samples < 1:
            raise UserError(f"--quantizer gptq rounds from calibration statistics and --quant-samples is "
                            f"{self.quant_samples}; give --quant-samples N >= 1 (default 128) or --quantizer rtn")
        if self.offset_steps < 0:
            raise UserError(f"--offset-steps must be >= 0, got {self.offset_steps}")
        if self.order == "distil-quantize" and self.recovery != "qalora":
            raise UserError(f"--recover-order distil-quantize ends in int4 groups; it needs --recovery qalora, not "
                            f"{self.recovery!r}")
        if self.order == "distil-quantize" and set(self.trained) & {"offsets", "scales"}:
            raise UserError("--recover-order distil-quantize trains the fp model before int4 groups exist: --train takes "
                            "full, lora or norms there (--offset-steps trains the offsets after quantizing)")
        if self.order == "quantize-distil" and "full" in self.trained:
            raise UserError("--train full trains every fp weight; it needs --recover-order distil-quantize (the int4 "
                            "codes of quantize-distil never change)")
        if self.offset_steps and self.order != "distil-quantize":
            raise UserError("--offset-steps is the offsets pass after distil-quantize; with quantize-distil the offsets "
                            "train in the main run (--train offsets)")
        return self

    @property
    def reads_text(self) -> bool:
        """Does the run read its recovery text (to train on, or for GPTQ's statistics)?"""
        return self.recovery != "none" or self.quantizer == "gptq"

    @property
    def quantized_first(self) -> bool:
        """Are the projections int4 while the main run trains (quantize-distil qalora)?"""
        return self.recovery == "qalora" and self.order == "quantize-distil"

    def offsets_pass(self) -> "RecoverSettings":
        """The settings of the offsets pass after distil-quantize: `offset_steps` steps of the
        same loss and data on the int4 groups' offsets."""
        return replace(self, order="quantize-distil", train="offsets", steps=self.offset_steps, epochs=None,
                       offset_steps=0)

    def resolved(self, device_type: str) -> "RecoverSettings":
        """Fill what trains (see `trained`) and the step budget: the paper's 2 epochs on a GPU;
        CPU_RECOVER_STEPS steps on a CPU."""
        if self.train is None:
            return replace(self, train=",".join(self.trained)).resolved(device_type)
        if self.steps is not None or self.epochs is not None:
            return self
        if device_type == "cuda":
            return replace(self, epochs=2.0)
        return replace(self, steps=CPU_RECOVER_STEPS)


# the int4 rows are the export defaults: 8-bit embedding / output matrix (GGUF Q8_0; ONNX int8 with
# int8 activations in the output matrix only)
@dataclass(frozen=True)
class BenchRuntime:
    """One kind of bench row: where it runs (torch, llama.cpp, onnxruntime) and, for a device
    runtime, the export it needs (format, projections, embedding / output matrix, ONNX graph,
    generation loop and matmul activations). Adding a row is one entry in BENCH_TABLE."""

    runs_in: str
    format: str | None = None
    quant: str | None = None
    embed: str | None = None
    graph: str | None = None  # ONNX: fused | dynamo
    engine: str | None = None  # ONNX: onnxruntime (our loop) | genai (onnxruntime-genai's)
    accuracy: str | None = None  # ONNX fused: --matmul-accuracy
    default: bool = False  # in `bench`'s default --runtimes


def _onnx(quant: str, embed: str, graph: str = "fused", engine: str = "onnxruntime", accuracy: str = "fp32",
          default: bool = False) -> BenchRuntime:
    return BenchRuntime("onnxruntime", "onnx", quant, embed, graph, engine, accuracy, default)


BENCH_TABLE = {
    # the default rows, in the order they print
    "torch": BenchRuntime("torch", default=True),
    "gguf-f16": BenchRuntime("llama.cpp", "gguf", "f16", "f16", default=True),
    "gguf-q4_1-embq8": BenchRuntime("llama.cpp", "gguf", "q4_1", "q8_0", default=True),  # embedding / output matrix Q8_0
    "onnx-f32": _onnx("f32", "f32", default=True),
    # the export defaults: 8-bit embedding / output matrix, int8 activations in the output matrix only
    "onnx-int4-emb8-head8": _onnx("int4", "int8", accuracy="int8-head", default=True),
    # on request: f16 embedding / output matrix, Q4_1 embedding; other ONNX engines / graphs
    "gguf-q4_1": BenchRuntime("llama.cpp", "gguf", "q4_1", "f16"),
    "gguf-q4_1-embq4": BenchRuntime("llama.cpp", "gguf", "q4_1", "q4_1"),
    "onnx-int4": _onnx("int4", "f16"),  # our loop, shared KV buffer
    "onnx-int4-emb8": _onnx("int4", "int8"),
    "onnx-int4-genai": _onnx("int4", "f16", engine="genai"),  # onnxruntime-genai's loop
    "onnx-int4-emb8-head8-genai": _onnx("int4", "int8", engine="genai", accuracy="int8-head"),
    "onnx-int4-dynamo": _onnx("int4", "f16", graph="dynamo"),  # the traced graph
    # int8 activations in the matmuls (--matmul-accuracy int8), as llama.cpp's Q4_1 path computes
    "onnx-int4-act8": _onnx("int4", "f16", accuracy="int8"),
    "onnx-int4-emb8-act8": _onnx("int4", "int8", accuracy="int8"),
}
BENCH_RUNTIMES = tuple(name for name, r in BENCH_TABLE.items() if r.default)
EXTRA_BENCH_RUNTIMES = tuple(name for name, r in BENCH_TABLE.items() if not r.default)


@dataclass
class BenchSettings(Settings):
    """`saap-edge bench`: which runtimes, and the speed protocol (batch 1, greedy)."""

    runtimes: tuple[str, ...] = BENCH_RUNTIMES
    prompt_tokens: int = 128  # prefill length
    new_tokens: int = 64  # decode steps timed (the first token comes out of the prefill)
    reps: int = 3  # timed runs per row: median, min and max reported
    warmup: int = 1  # untimed runs before them
    threads: int | None = None  # CPU threads of every runtime; None: the runtime's default
    device: str = "cpu"  # torch rows: cpu, or cuda (fp16, allocator peak)
    validate_exports: bool = True  # read each exported artifact back before timing it
    provider: str = "auto"  # ONNX rows: onnxruntime's execution provider (auto: CUDA where onnxruntime-gpu has it)

    def validate(self) -> "BenchSettings":
        from runtime.ort import PROVIDER_CHOICES  # torch-free; onnxruntime itself is imported only when a session opens

        if self.provider not in PROVIDER_CHOICES:
            raise UserError(f"--provider {self.provider!r} is not one of {', '.join(PROVIDER_CHOICES)}")
        known = BENCH_RUNTIMES + EXTRA_BENCH_RUNTIMES
        unknown = [r for r in self.runtimes if r not in known]
        if unknown or not self.runtimes:
            raise UserError(f"--runtimes {' '.join(unknown) or '(none)'}: choose from {', '.join(known)}")
        for name in ("prompt_tokens", "new_tokens", "reps"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or (self.threads is not None and self.threads < 1):
            raise UserError("--warmup must be >= 0 and --threads >= 1")
        return self

