"""Measuring probes: a child process's peak RSS, the memory bandwidth of this machine."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import psutil


def machine(device: str = "cpu") -> dict:
    """What the numbers were measured on: CPU, cores, Python, and the GPU when `device` is CUDA."""
    import os
    import platform

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()}
    if device.startswith("cuda"):
        import torch

        info["gpu"] = torch.cuda.get_device_name()
    return info


def run_child(cmd: list[str], log: Path | None = None, interval: float = 0.02, env: dict | None = None) -> dict:
    """Run `cmd` as a child process; its exit code, wall time and peak RSS (sampled every
    `interval` s over the child and its own children), so rows do not share one process's peak."""
    t0 = time.perf_counter()
    out = open(log, "w") if log else None
    try:
        proc = psutil.Popen(cmd, stdout=out or None, stderr=out or None, env=env)
        peak = 0
        while proc.poll() is None:
            try:
                rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(interval)
    finally:
        if out:
            out.close()
    return {"rc": proc.returncode, "wall_s": time.perf_counter() - t0, "peak_rss_mib": peak / 2**20}


def memory_bandwidth_gbs(mib: int = 512, reps: int = 5, threads: int | None = None) -> dict:
    """Read bandwidth of main memory in GB/s: the best of `reps` passes over a `mib` MiB array,
    summed in `threads` slices at once (numpy releases the GIL), default one per core.

    A decode step of a memory-bound model reads every weight once, so a streaming read is the
    yardstick (a copy would count writes the decoder does not do)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    threads = threads or os.cpu_count() or 1
    a = np.ones(mib * 2**20 // 8, dtype=np.float64)
    parts = np.array_split(a, threads)
    a.sum()  # fault the pages in
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(reps):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return {"gbs": a.nbytes / best / 1e9, "mib": mib, "reps": reps, "threads": threads, "method": "numpy sum (read)"}


def cuda_bandwidth_gbs(mib: int = 1024, reps: int = 10) -> dict:
    """Device memory bandwidth in GB/s (read + write of a device-to-device copy)."""
    import torch

    a = torch.empty(mib * 2**20, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return {"gbs": 2 * a.numel() / best / 1e9, "mib": mib, "reps": reps, "method": "torch device copy (read + write)"}
