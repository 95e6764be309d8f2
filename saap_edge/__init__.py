"""saap-edge: structurally-aware adaptive pruning of LLaMA-family models for edge devices."""

__version__ = "0.1.0"

from saap_edge.host_memory import fixed_mmap_threshold as _fixed_mmap_threshold

_fixed_mmap_threshold()  # freed tensors give their memory back (see saap_edge/host_memory.py)

from saap_edge.models import slim as _slim  # noqa: F401  registers the slim model with the Auto classes
