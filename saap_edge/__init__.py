"""saap-edge: structurally-aware adaptive pruning of LLaMA-family models for edge devices."""

__version__ = "0.1.0"

import os as _os

# libgomp (torch's OpenMP here) keeps idle workers spinning after every parallel region; beside
# another CPU-bound process that made the refit 5-6x slower and int4 perplexity 2x slower
# (benchmarks/results/thread_contention.md). PASSIVE: idle workers sleep at once. libgomp reads it
# when torch loads it, so it is set before the imports below; an OMP_WAIT_POLICY already set wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from saap_edge.host_memory import fixed_mmap_threshold as _fixed_mmap_threshold

_fixed_mmap_threshold()  # freed tensors give their memory back (see saap_edge/host_memory.py)

from saap_edge.models import slim as _slim  # noqa: F401  registers the slim model with the Auto classes
