"""Settings: dataclasses validated once and saved into every artifact they shape."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from saap_edge.errors import UserError

SETTINGS_VERSION = 1
METHODS = ("saap", "llm-pruner", "flap", "wanda-sp", "magnitude", "random")
FUSIONS = ("adaptive", "learned", "sum", "vector", "element")
SCOPES = ("all", "global", "layer")
INDICATORS = ("fluctuation", "bound", "none")


@dataclass
class PruneSettings:
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
    version: int = SETTINGS_VERSION

    def validate(self) -> "PruneSettings":
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
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PruneSettings":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class RunSettings:
    """Where and how a stage runs (not part of what makes a plan)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    data_dir: str | None = None
    progress: bool = True
