"""Human-facing output of compress: the before/after table and the per-layer chart."""

from __future__ import annotations

import os
import resource
from contextlib import contextmanager
import threading
import time
from pathlib import Path

import psutil
import torch

from saap_edge.prune.plan import PrunePlan


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: the CUDA allocator's peak, else the peak RSS."""
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
def stage_peak(record: dict, stage: str, device: torch.device):
    """Measure one stage into `record[stage]`: the process's peak RSS during it (MiB) and, on a
    GPU, the CUDA allocator's peak (the stage's counter starts at zero)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with PeakRSS(interval=0.05) as rss:
        yield
    record[stage] = {"host_peak_mib": round(rss.peak_mib, 1)}
    if cuda:
        record[stage]["card_peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def format_table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (also readable in a terminal)."""
    cells = [[str(c) for c in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def before_after_table(report: dict) -> str:
    params = report["params"]
    rows = [["parameters", params["before"], params["after"]]]
    rows.append(["removed share", None, f"{params['removed_share']:.2%} (asked {report['settings']['ratio']:.0%})"])
    recovery = report.get("recovery")
    for name, result in report.get("ppl", {}).items():
        dense = result["before"]["ppl"] if result.get("before") else None
        row = [f"PPL {name} ({result['after']['windows']} x {result['after']['window']} tok)", dense, result["after"]["ppl"]]
        if recovery:
            row.append(result["recovered"]["ppl"] if "recovered" in result else None)
        rows.append(row)
    recon = report.get("reconstruction") or {}
    refit = recon.get("method", "none") != "none"
    headers = ["", "dense", report["settings"]["method"] + (" + refit" if refit else "")]
    if recovery:
        rows[0].append(rows[0][2])
        rows[1].append(_recovery_label(recovery))
        trained = "+".join(recovery.get("trained") or [])
        how = f"{trained} ({recovery['settings']['loss']})" if trained and recovery.get("settings", {}).get("loss") else recovery["recovery"]
        headers.append(f"+ {how}" + (" int4" if "group_size" in recovery else ""))
    if refit:
        detail = (f"{recon['method']}, target {recon['target']}, {recon['samples']} x {recon['seq_len']} tok, "
                  f"select {recon['select']}, {recon['time_s']:.0f} s")
        rows.insert(2, ["reconstruction", None, detail] + [None] * (len(headers) - 3))
    return format_table(headers, rows)


def _recovery_label(recovery: dict) -> str:
    parts = []
    if "group_size" in recovery:
        parts.append(f"int4 G={recovery['group_size']}")
    if recovery.get("steps"):
        parts.append(f"{recovery['steps']} steps")
    return ", ".join(parts) or "-"


def plot_layers(plan: PrunePlan, path: Path, title: str) -> None:
    """Bars of query heads and MLP width per layer, dense vs kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = plan.summary_rows()
    layers = [r[0] for r in rows]
    fig, axes = plt.subplots(2, 1, figsize=(max(6, len(layers) * 0.3), 5), sharex=True)
    for ax, (before, after, label) in zip(axes, ((1, 2, "query heads"), (3, 4, "MLP width"))):
        ax.bar(layers, [r[before] for r in rows], color="#d0d0d0", label="dense")
        ax.bar(layers, [r[after] for r in rows], color="#2f6db5", label="kept")
        ax.set_ylabel(label)
    axes[0].legend(loc="lower right", fontsize=8)
    axes[0].set_title(title, fontsize=10)
    axes[1].set_xlabel("decoder layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
