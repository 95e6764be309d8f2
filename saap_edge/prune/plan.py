"""PrunePlan: which KV groups and MLP channels of each decoder layer are kept (versioned JSON)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from saap_edge.errors import UserError
from saap_edge.prune.groups import LayerShape

PLAN_VERSION = 1


@dataclass
class LayerPlan:
    """Kept units of one layer, as indices into the source model's KV groups and channels."""

    kv_groups: list[int]
    channels: list[int]
    n_kv: int  # source sizes, to check the plan against a model
    n_heads: int
    ffn: int

    @property
    def kept_heads(self) -> int:
        return len(self.kv_groups) * (self.n_heads // self.n_kv)


@dataclass
class PrunePlan:
    layers: list[LayerPlan]
    head_dim: int
    hidden: int
    method: str = "keep-all"
    ratio: float = 0.0
    settings: dict = field(default_factory=dict)
    seed: int | None = None
    calibration: dict = field(default_factory=dict)
    reconstruction: dict = field(default_factory=dict)  # the reconstruct stage's settings and samples ({} = none)
    params: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    version: int = PLAN_VERSION

    @classmethod
    def keep_all(cls, shapes: list[LayerShape]) -> "PrunePlan":
        layers = [
            LayerPlan(list(range(s.n_kv)), list(range(s.ffn)), s.n_kv, s.n_heads, s.ffn) for s in shapes
        ]
        return cls(layers=layers, head_dim=shapes[0].head_dim, hidden=shapes[0].hidden)

    def check_matches(self, shapes: list[LayerShape]) -> None:
        """Raise UserError unless this plan was made for a model of these shapes."""
        if len(shapes) != len(self.layers):
            raise UserError(f"plan has {len(self.layers)} layers, the model has {len(shapes)}")
        for s, lp in zip(shapes, self.layers):
            if (s.n_kv, s.n_heads, s.ffn) != (lp.n_kv, lp.n_heads, lp.ffn):
                raise UserError(f"plan layer {s.layer} was made for different sizes than the model's")
            if not lp.kv_groups or not lp.channels:
                raise UserError(f"plan layer {s.layer} keeps no KV group or no MLP channel")
            if max(lp.kv_groups) >= s.n_kv or max(lp.channels) >= s.ffn:
                raise UserError(f"plan layer {s.layer} names a unit the model does not have")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PrunePlan":
        if data.get("version") != PLAN_VERSION:
            raise UserError(f"prune plan version {data.get('version')} is not {PLAN_VERSION}")
        data = dict(data)
        data["layers"] = [LayerPlan(**lp) for lp in data["layers"]]
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "PrunePlan":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def summary_rows(self) -> list[tuple[int, int, int, int, int]]:
        """(layer, heads before, heads after, MLP before, MLP after) for tables and charts."""
        return [
            (i, lp.n_heads, lp.kept_heads, lp.ffn, len(lp.channels)) for i, lp in enumerate(self.layers)
        ]
