"""Host memory that is given back: freed tensors leave the process's resident memory.

glibc serves an allocation above its mmap threshold with its own mapping, returned to the
system on free, but raises that threshold (up to 32 MiB) every time such a block is freed;
after that, tensors of a few MiB come from the heap, where freeing one leaves its pages
resident. Stages that free a model layer by layer while building another (prune/slicing.py)
would then hold both. Fixing the threshold at 1 MiB (which also switches the dynamic rule
off) keeps every tensor of that size in its own mapping. No library exposes mallopt.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
THRESHOLD = 1 << 20


def fixed_mmap_threshold(threshold: int = THRESHOLD) -> bool:
    """Set glibc's mmap threshold; False where there is no glibc (macOS, musl, Windows)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
