"""Shared benchmark plumbing: a peak-RSS sampler, timing, and JSON + Markdown output."""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

from saap_edge.bench.probe import machine, run_child  # noqa: F401  (re-exported for the scripts)


class PeakRSS:
    """Samples this process's RSS every `interval` s in a thread; `.peak_mib` after the block.

    ru_maxrss only ever grows over a process's life, so rows measured one after another in
    one process need a sampler to get each row's own peak."""

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
