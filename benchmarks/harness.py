"""Shared benchmark plumbing: a peak-RSS sampler, timing, and JSON + Markdown output."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

from saap_edge.bench.probe import machine, run_child  # noqa: F401  (re-exported for the scripts)
from saap_edge.report import PeakRSS  # noqa: F401  (re-exported for the scripts)


@contextmanager
def timed(store: dict, key: str):
    t0 = time.perf_counter()
    yield
    store[key] = store.get(key, 0.0) + time.perf_counter() - t0


def write_results(out_dir: Path, name: str, data: dict, markdown: str) -> tuple[Path, Path]:
    """benchmarks/results/<name>.json and .md, each written to a temporary name then renamed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = (out_dir / f"{name}.json", out_dir / f"{name}.md")
    for path, text in zip(paths, (json.dumps(data, indent=1, default=str) + "\n", markdown)):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return paths
