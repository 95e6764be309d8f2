"""Data parallelism over the processes `accelerate launch` (or torchrun) starts.

    accelerate launch --num_processes 2 -m saap_edge.cli compress ...        # GPUs: NCCL
    accelerate launch --multi_gpu --num_processes 2 -m saap_edge.cli compress ...  # CPUs too: gloo

The process group is accelerate's (`PartialState`, torch.distributed underneath: NCCL where
CUDA is present, gloo otherwise); nothing here is a transport of our own. A stage splits its
samples over the processes and combines exactly what it must:

- estimation: sample d is scored by process d mod N into row d of the per-sample tensors;
  the other rows stay 0, so one all-reduce (sum) gives every process the tensors a single
  process computes, bit for bit (x + 0 = x), and the plan is the same;
- reconstruction: each process streams its share of the samples through the layers and the
  second moments X Xᵀ / X Yᵀ are all-reduced before each refit (float64 sums; the order of
  the additions differs from one process's, ~1e-16 relative);
- an error on any process (a NaN loss, a damaged weight) stops every process with its
  message, instead of leaving the others waiting in a collective.

Only process 0 writes (checkpoints, outputs, caches). A single process (no launcher) takes
none of these paths. SAAP_EDGE_DIST_TIMEOUT (seconds) bounds how long the process group waits
for its peers (torch's default otherwise).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from saap_edge.errors import UserError


def launched() -> bool:
    """True when a launcher started several processes (WORLD_SIZE > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None  # nccl | gloo | None (one process)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def share(self, n: int) -> list[int]:
        """This process's sample indices out of n: d with d mod world == rank."""
        return list(range(self.rank, n, self.world))

    def device(self, requested: str) -> str:
        """--device for this process: each process its own GPU (cuda -> cuda:local_rank)."""
        if self.parallel and requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return requested

    def sum_(self, *tensors: torch.Tensor) -> None:
        """All-reduce (sum) each tensor in place across the processes."""
        if not self.parallel:
            return
        import torch.distributed as dist

        for t in tensors:
            if self.backend == "nccl" and t.device.type != "cuda":  # NCCL reduces GPU tensors only
                moved = t.to(f"cuda:{self.local_rank}")
                dist.all_reduce(moved)
                t.copy_(moved.to(t.device))
            else:
                dist.all_reduce(t)

    def agree(self, error: BaseException | None) -> None:
        """Raise on every process if any process failed: its own error where it failed, else
        one naming the process that did. Call it where every process arrives."""
        if not self.parallel:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        messages: list = [None] * self.world
        dist.all_gather_object(messages, None if error is None else str(error))
        if error is not None:
            raise error
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if failed:
            rank, message = failed[0]
            raise UserError(f"process {rank} of {self.world} failed: {message}")

    def barrier(self) -> None:
        if self.parallel:
            import torch.distributed as dist

            dist.barrier()


@lru_cache(maxsize=1)
def processes() -> Processes:
    """The processes of this run (one, unless a launcher started several)."""
    if not launched():
        return Processes()
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    timeout = os.environ.get("SAAP_EDGE_DIST_TIMEOUT")  # seconds; unset: torch's default
    try:
        from datetime import timedelta

        from accelerate import PartialState

        extra = {"timeout": timedelta(seconds=float(timeout))} if timeout else {}
        state = PartialState(cpu=not cuda, **extra)
    except Exception as exc:  # torch.distributed raises RuntimeError / DistNetworkError / ValueError
        raise UserError(f"the {backend} process group cannot start ({str(exc).splitlines()[0][:200]}); check the "
                        "launcher's MASTER_ADDR / MASTER_PORT and that every process sees the same settings, or run "
                        "in one process without accelerate launch") from exc
    return Processes(state.process_index, state.num_processes, state.local_process_index, backend)
