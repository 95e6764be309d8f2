"""Distillation from the dense model: the KD loss and the teacher's targets (with a disk cache).

Loss. KL(teacher || student) per token, both distributions at logits / T, scaled by T^2
(Hinton et al.), averaged over every position of every window. With `topk` = k > 0 the
teacher keeps its k most likely tokens and one bucket for all the others; the student's
distribution is grouped the same way (its own probabilities of those k tokens, and the rest
summed). That is the exact KL between the two grouped distributions: zero, with zero
gradient, when the student equals the teacher, and equal to the full-vocabulary KL when
k covers the vocabulary. `topk` = 0 uses the whole vocabulary.

Teacher targets. The teacher is the dense model the student was pruned from, run in eval
mode without gradients. Its targets for window position p of the run's endless seeded
shuffle (recover/train.py) depend only on the teacher, the windows, k and T; they are
computed on the fly, or read from a cache of safetensors chunks (`TeacherCache`) keyed by
the hash of all of those, so repeated runs and benchmark rows skip the teacher forward.

Why hand-written: transformers' and trl's distillation trainers take full teacher logits
from a live teacher and cannot resume bit for bit in our checkpoint format; a top-k cache
with a tail bucket is not offered by any of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from saap_edge.config import default_cache_dir  # noqa: F401 (re-exported: where the teacher cache lives)
from saap_edge.errors import UserError
from saap_edge.outputs import write_file, write_safetensors

CHUNK = 256  # window positions per cache file


@dataclass
class Targets:
    """Teacher log-probabilities at temperature T: [B, S, k] with their token ids (topk), or
    [B, S, V] with ids None (the whole vocabulary)."""

    logp: torch.Tensor
    ids: torch.Tensor | None = None

    def to(self, device) -> "Targets":
        return Targets(self.logp.to(device), None if self.ids is None else self.ids.to(device))


def teacher_targets(logits: torch.Tensor, temperature: float, topk: int) -> Targets:
    """Targets from teacher logits [B, S, V] (computed in float32)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    if topk <= 0 or topk >= logp.shape[-1]:
        return Targets(logp)
    values, ids = torch.topk(logp, topk, dim=-1, sorted=True)
    return Targets(values.contiguous(), ids.to(torch.int32).contiguous())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def kd_loss(student_logits: torch.Tensor, targets: Targets, temperature: float) -> torch.Tensor:
    """T^2 * mean over positions of KL(teacher || student); see the module doc."""
    logq = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    if targets.ids is None:
        p_logp = targets.logp
        kl = (p_logp.exp() * (p_logp - logq)).sum(-1)
    else:
        ids = targets.ids.long()
        logp_k, logq_k = targets.logp, logq.gather(-1, ids)
        kl = (logp_k.exp() * (logp_k - logq_k)).sum(-1)
        # the tail bucket: everything outside the teacher's k tokens
        logp_tail = _log1mexp(torch.logsumexp(logp_k, dim=-1))
        logq_tail = _log1mexp(torch.logsumexp(logq_k, dim=-1))
        kl = kl + logp_tail.exp() * (logp_tail - logq_tail)
    return kl.mean() * temperature**2


def weights_sha256(model: nn.Module) -> str:
    """Hash of every tensor of `model` (names, dtypes, shapes, bytes): the teacher's identity."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class Teacher:
    """The teacher's targets for positions of the run's window shuffle (optionally cached).

    `windows_at(start, count)` gives the window indices of those positions (the trainer's
    shuffle); `train` is the training windows [n, S]. With `model` None the targets come from
    the cache folder `key` alone, filled beforehand by `precompute` (the teacher pass): the
    student then trains with no teacher in memory.
    """

    def __init__(self, model: nn.Module | None, train: torch.Tensor, windows_at, temperature: float, topk: int,
                 key_parts: dict, cache_dir: Path | None = None, cache_mib: int = 4096, batch_size: int = 8,
                 key: str | None = None, chunk: int = CHUNK):
        self.chunk = chunk  # window positions per cache file (a short run computes only the positions it reads)
        self.model = model.eval().requires_grad_(False) if model is not None else None
        self.device = next(model.parameters()).device if model is not None else torch.device("cpu")
        self.train, self.windows_at = train, windows_at
        self.temperature, self.topk, self.batch_size = temperature, topk, batch_size
        self.cache_mib = cache_mib
        self.cache: Path | None = None
        self.hits = self.computed = 0
        self._recent: dict[int, Targets] = {}  # chunks in memory (a micro-batch reads 1-2 of them)
        if model is None:
            if cache_dir is None or key is None or not (Path(cache_dir) / key / "meta.json").exists():
                raise UserError(f"the teacher cache {cache_dir}/{key} is gone; rerun the teacher pass (run again, or "
                                "--teacher-cache off)")
            self.cache, self.key = Path(cache_dir) / key, key
            self.chunk = json.loads((self.cache / "meta.json").read_text()).get("chunk", CHUNK)
            os.utime(self.cache / "meta.json")  # recently used
        elif cache_dir is not None and topk > 0:
            meta = {**key_parts, "teacher_sha256": weights_sha256(model), "topk": topk, "temperature": temperature,
                    "format": 1, **({"chunk": chunk} if chunk != CHUNK else {})}
            key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
            self.cache = Path(cache_dir) / key
            self.cache.mkdir(parents=True, exist_ok=True)
            write_file(self.cache / "meta.json", json.dumps(meta, indent=1) + "\n")  # also marks it recently used
            self.key = key

    def chunk_bytes(self) -> int:
        """Bytes of one cached chunk: CHUNK windows x positions x k x (float32 + int32)."""
        return self.chunk * self.train.shape[1] * self.topk * 8

    def _path(self, index: int) -> Path:
        return self.cache / f"positions-{index * self.chunk:09d}-{(index + 1) * self.chunk:09d}.safetensors"

    @torch.no_grad()
    def precompute(self, positions: int, progress: bool = True) -> None:
        """The teacher pass: compute and store the targets of window positions 0 .. positions
        (every micro-batch of the run), chunks already cached skipped. Refuses, before any
        forward, a run whose targets would pass the cache's size limit."""
        chunks = -(-positions // self.chunk)
        need = chunks * self.chunk_bytes()
        if need > self.cache_mib * 2**20:
            raise UserError(f"the teacher's targets for this run take {need / 2**20:.0f} MiB and --teacher-cache-mib is "
                            f"{self.cache_mib}; raise it to {-(-need // 2**20)} (or --teacher-cache off: the teacher then "
                            "stays on the device beside the student)")
        from tqdm.auto import tqdm

        self._evict(self.cache_mib * 2**20 - need)
        todo = [i for i in range(chunks) if not self._path(i).exists()]
        for index in tqdm(todo, desc="teacher pass", disable=not progress):
            self._recent = {}
            self._load_or_compute(index)
        self._recent = {}

    @torch.no_grad()
    def _compute(self, windows: torch.Tensor) -> Targets:
        parts = []
        for i in range(0, len(windows), self.batch_size):
            batch = windows[i: i + self.batch_size].to(self.device)
            parts.append(teacher_targets(self.model(input_ids=batch).logits, self.temperature, self.topk).to("cpu"))
        ids = None if parts[0].ids is None else torch.cat([p.ids for p in parts])
        return Targets(torch.cat([p.logp for p in parts]), ids)

    def _chunk(self, index: int) -> Targets:
        if index not in self._recent:
            self._recent = {i: t for i, t in self._recent.items() if i >= index - 1}  # the one before may still be read
            self._recent[index] = self._load_or_compute(index)
        return self._recent[index]

    def _load_or_compute(self, index: int) -> Targets:
        path = self._path(index)
        if path.exists():
            try:
                data = load_file(path)
                self.hits += 1
                return Targets(data["logp"], data["ids"])
            except (SafetensorError, KeyError, OSError):
                path.unlink(missing_ok=True)  # a damaged chunk is recomputed, never trusted
        if self.model is None:
            raise UserError(f"{path} is missing or damaged and the teacher has left; rerun the command to repeat the "
                            "teacher pass")
        windows = self.train[self.windows_at(index * self.chunk, self.chunk)]
        t = self._compute(windows)
        self.computed += 1
        if self._room_for(t):
            write_safetensors(path, {"logp": t.logp, "ids": t.ids})
        return t

    def _room_for(self, t: Targets) -> bool:
        """Make room for one more chunk within cache_mib by dropping the least recently used
        other keys; False when this key alone would pass the bound (then the chunk is used
        without being stored: a long GPU run never fills the disk)."""
        need = t.logp.numel() * t.logp.element_size() + t.ids.numel() * t.ids.element_size()
        limit = self.cache_mib * 2**20
        mine = sum(f.stat().st_size for f in self.cache.iterdir() if f.is_file())
        if mine + need > limit:
            return False
        self._evict(limit - need)
        return True

    def targets(self, start: int, count: int) -> Targets:
        """Targets of window positions start .. start + count (the windows of one micro-batch)."""
        if self.cache is None:
            return self._compute(self.train[self.windows_at(start, count)])
        first, last = start // self.chunk, (start + count - 1) // self.chunk
        chunks = [self._chunk(i) for i in range(first, last + 1)]
        logp = torch.cat([c.logp for c in chunks])
        ids = torch.cat([c.ids for c in chunks])
        lo = start - first * self.chunk
        return Targets(logp[lo: lo + count], ids[lo: lo + count])

    def _evict(self, limit: int) -> None:
        """Drop the least recently used keys other than this one until the folder holds <= limit bytes."""
        root = self.cache.parent
        sizes = {}
        for key in root.iterdir():
            if key.is_dir():
                sizes[key] = sum(f.stat().st_size for f in key.iterdir() if f.is_file())
        total = sum(sizes.values())
        for key in sorted(sizes, key=lambda k: (k / "meta.json").stat().st_mtime if (k / "meta.json").exists() else 0):
            if total <= limit:
                break
            if key == self.cache:
                continue
            shutil.rmtree(key, ignore_errors=True)
            total -= sizes[key]

    def describe(self) -> dict:
        return {"topk": self.topk, "temperature": self.temperature, "cache": str(self.cache) if self.cache else None,
                "cache_chunks_read": self.hits, "cache_chunks_written": self.computed}


def check_teacher(teacher: nn.Module, student: nn.Module, teacher_tok, student_tok, where: str) -> None:
    """UserError unless the teacher speaks the student's vocabulary with the same tokenizer."""
    tv, sv = teacher.config.vocab_size, student.config.vocab_size
    if tv != sv:
        raise UserError(f"teacher {where} has a vocabulary of {tv} tokens, the student {sv}; "
                        "point --teacher at the dense model this one was pruned from")
    probe = "The quick brown fox, 1234 — jumps over naïve dogs."
    if teacher_tok is not None and student_tok is not None and teacher_tok(probe)["input_ids"] != student_tok(probe)["input_ids"]:
        raise UserError(f"teacher {where} tokenizes text differently from the student; "
                        "point --teacher at the dense model this one was pruned from")

