"""The run report: what `compress` and `recover` did and measured, written once as report.json.

A RunReport is made by the prune stage (or, for `recover` of a model that was never pruned, from
its keep-everything plan), grows a `recovery` section when recovery runs, is closed with the
run's peaks and written at the end. Every reader (the CLI's table, the model card, the
exporters' provenance, benchmarks) reads these fields, never keys of a dict passed around.

report.json written by another version may carry keys this one does not know: they are kept
(`extra`) and written back as read.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class RunReport:
    model: dict = field(default_factory=dict)  # the source: kind, path, model id (models.load's `source`)
    settings: dict = field(default_factory=dict)  # PruneSettings.to_dict(), or method / ratio of a plan
    reconstruction: dict | None = None  # the refit's record ({"method": "none"} when off)
    params: dict = field(default_factory=dict)  # before, after, removed_share
    per_layer: list | None = None  # layer, heads_before, heads_after, mlp_before, mlp_after
    ppl: dict = field(default_factory=dict)  # dataset -> {before, after[, recovered]}, each {ppl, windows, window}
    time_s: dict = field(default_factory=dict)  # stage -> seconds
    peak_memory_mib: float | None = None
    device: str | None = None
    memory_measured: dict = field(default_factory=dict)  # stage -> {host_peak_mib[, card_peak_mib]}
    details: dict | None = None  # the ranking's record (method-specific)
    versions: dict | None = None
    search: dict | None = None  # AdaPruner's trials
    recovery: dict | None = None  # recover_model's record
    processes: int | None = None
    memory_estimate: dict | None = None  # stage -> the plan (memory.StageMemory.as_dict)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """report.json's content: the fields in order, unset optional ones left out."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**{k: v for k, v in out.items() if v is not None}, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunReport":
        names = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in names}, extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    def read(cls, path: Path) -> "RunReport":
        from saap_edge.files import read_json

        return cls.from_dict(read_json(path, "report"))

    @classmethod
    def read_if_any(cls, path: Path) -> "RunReport | None":
        """The report at `path`, or None where the directory has none (a model not made here)."""
        return cls.read(path) if Path(path).is_file() else None

    def source_name(self) -> str | None:
        """The model this run was made from, as it loads again (its path, else its name); None if unrecorded."""
        return self.model.get("path") or self.model.get("model") or None

    def write(self, path: Path) -> None:
        from saap_edge.outputs import write_json

        write_json(path, self.to_dict())

    def add_recovered_ppl(self, recovered: dict, before: dict | None = None) -> None:
        """The recovered model's perplexities beside the pruned ones. `before`: the input's own
        scores where recovery ran on a model loaded afresh (`recover`); the dense "before" of the
        pruning report is kept only if it was scored on the same windows."""
        for name, result in recovered.items():
            if before is None:
                self.ppl[name]["recovered"] = result
                continue
            old = self.ppl.get(name, {})
            same = (old.get("after", {}).get("windows") == before[name]["windows"]
                    and old["after"].get("window") == before[name]["window"])
            self.ppl[name] = {"before": old["before"] if same else None, "after": before[name], "recovered": result}

    def close(self, peak_memory_mib: float, processes: int, memory: list) -> None:
        """The run's last numbers: its peak memory, process count and the memory plan it ran under."""
        self.peak_memory_mib = peak_memory_mib
        self.processes = processes
        self.memory_estimate = {st.stage: st.as_dict() for st in memory}
