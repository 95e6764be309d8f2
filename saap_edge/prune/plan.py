"""PrunePlan: which KV groups, query heads and MLP channels of each decoder layer are kept
(versioned JSON). Version 2 added `heads`; a version-1 plan (whole KV groups only) loads as
the plan that keeps every query head of its kept groups."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from saap_edge.errors import UserError
from saap_edge.prune.groups import LayerShape

PLAN_VERSION = 2


@dataclass
class LayerPlan:
    """Kept units of one layer, as indices into the source model's KV groups, query heads and
    MLP channels. Every kept group keeps the same number of its query heads (head h belongs
    to group h // (n_heads / n_kv)); no kept group and no head is an attention-free layer."""

    kv_groups: list[int]
    channels: list[int]
    n_kv: int  # source sizes, to check the plan against a model
    n_heads: int
    ffn: int
    heads: list[int] | None = None  # kept query heads; None: every head of the kept groups

    def group_heads(self, groups: list[int]) -> list[int]:
        """Every query head of the given KV groups, in order."""
        n_rep = self.n_heads // self.n_kv if self.n_kv else 0
        return [g * n_rep + r for g in sorted(groups) for r in range(n_rep)]

    @property
    def query_heads(self) -> list[int]:
        """The kept query heads (every head of the kept groups unless `heads` says otherwise)."""
        return self.group_heads(self.kv_groups) if self.heads is None else sorted(self.heads)

    @property
    def kept_heads(self) -> int:
        return len(self.query_heads)

    @property
    def attention_free(self) -> bool:
        return not self.kv_groups

    def check(self, layer: int) -> None:
        """Raise UserError unless the kept heads sit in kept groups, as many in each."""
        n_rep = self.n_heads // self.n_kv if self.n_kv else 0
        if not self.channels:
            raise UserError(f"plan layer {layer} keeps no MLP channel")
        heads = self.query_heads
        if max(self.kv_groups, default=-1) >= self.n_kv or max(self.channels) >= self.ffn or max(heads, default=-1) >= self.n_heads:
            raise UserError(f"plan layer {layer} names a unit the model does not have")
        per_group = {g: 0 for g in self.kv_groups}
        for h in heads:
            if h // n_rep not in per_group:
                raise UserError(f"plan layer {layer} keeps query head {h} of a KV group it removes")
            per_group[h // n_rep] += 1
        if len(set(per_group.values())) > 1 or 0 in per_group.values():
            raise UserError(f"plan layer {layer} keeps {sorted(per_group.values())} query heads in its KV groups; "
                            "every kept group must keep the same number (at least one)")


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
    importance: dict = field(default_factory=dict)  # what the ranking learned (HyWIA: the blend per layer and kind)
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
            lp.check(s.layer)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PrunePlan":
        if data.get("version") not in (1, PLAN_VERSION):
            raise UserError(f"prune plan version {data.get('version')} is not {PLAN_VERSION} (or 1)")
        data = dict(data)
        data["layers"] = [LayerPlan(**lp) for lp in data["layers"]]
        data["version"] = PLAN_VERSION  # version 1 differs only by the heads it derives
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "PrunePlan":
        from saap_edge.files import read_json, reading

        data = read_json(path, "prune plan")
        with reading(path, "prune plan", "make it again with compress"):
            return cls.from_dict(data)

    def summary_rows(self) -> list[tuple[int, int, int, int, int]]:
        """(layer, heads before, heads after, MLP before, MLP after) for tables and charts."""
        return [
            (i, lp.n_heads, lp.kept_heads, lp.ffn, len(lp.channels)) for i, lp in enumerate(self.layers)
        ]
