"""Search: turn per-unit keep-scores into a PrunePlan that removes a share of TOTAL parameters.

Keep-scores: higher means keep. Two allocations:
- global: one ranking across every prunable layer; candidates are removed lowest score first,
  each charged its real parameter cost, until the requested parameters are gone (SAAP, FLAP);
- uniform: every prunable layer loses the same fraction of KV groups and of MLP channels,
  the smallest fraction that reaches the target (LLM-Pruner, Wanda-sp, magnitude, random).
Constraints the exporters need: each layer keeps >= 1 KV group (or, with module units, no
attention at all) and >= one alignment block of MLP channels, MLP channels leave in alignment
blocks so kept widths stay multiples of it, and query heads (head units) leave as slots, one
from every KV group at once, so each kept group keeps as many heads as the others.
Query heads and modules are offered to the global allocation only; the uniform baselines keep
the units of their papers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saap_edge.errors import UserError
from saap_edge.prune.groups import ATTN, HEAD, MLP, MODULE, LayerShape
from saap_edge.prune.importance import Scores
from saap_edge.prune.plan import PrunePlan


@dataclass(frozen=True)
class Candidate:
    """Units that leave together: one KV group, one query-head slot (a head of every KV group),
    or one alignment block of MLP channels. `whole`: the layer's last KV group, whose removal
    takes the attention module with it."""

    layer: int
    kind: str
    units: tuple[int, ...]
    cost: int  # parameters it removes on its own from the dense layer (Ledger: in combination)
    score: float
    rank: int  # position in its layer's removal order (blocks must leave in this order)
    whole: bool = False


class Ledger:
    """Parameters a set of candidates removes, counted exactly: a KV group that leaves after
    some query-head slots takes fewer heads with it, and the attention module's norm leaves
    with its last group."""

    def __init__(self, shapes: list[LayerShape], costs: dict[tuple[int, str], int]):
        self.shapes, self.costs = shapes, costs
        self.counts: dict[tuple[int, str], int] = {}  # units removed per (layer, kind)
        self.removed = 0

    def _layer(self, layer: int) -> int:
        s, c = self.shapes[layer], self.costs
        groups = min(self.counts.get((layer, ATTN), 0), s.n_kv)
        slots = self.counts.get((layer, HEAD), 0) // max(s.n_kv, 1)
        kept_groups = s.n_kv - groups
        kept_heads = kept_groups * (s.n_rep - slots) if s.n_kv else 0
        kv_cost = c[(layer, ATTN)] - s.n_rep * c.get((layer, HEAD), 0)
        gone = groups * kv_cost + (s.n_heads - kept_heads) * c.get((layer, HEAD), 0)
        gone += self.counts.get((layer, MLP), 0) * c[(layer, MLP)]
        return gone + (c.get((layer, MODULE), 0) if s.n_kv and groups == s.n_kv else 0)

    def add(self, cand: Candidate) -> int:
        """Take `cand`; returns the parameters it removes on top of those taken before."""
        before = self._layer(cand.layer)
        key = (cand.layer, cand.kind)
        self.counts[key] = self.counts.get(key, 0) + len(cand.units)
        delta = self._layer(cand.layer) - before
        self.removed += delta
        return delta


def _blocks(keep: torch.Tensor, align: int) -> list[tuple[tuple[int, ...], float]]:
    """MLP channels, least important first, cut into removal blocks. A first block of
    ffn % align channels makes the remaining width a multiple of align; the most important
    block is never offered, so a layer keeps at least one."""
    order = torch.argsort(keep.double(), stable=True).tolist()
    sizes = ([len(order) % align] if len(order) % align else []) + [align] * (len(order) // align)
    blocks, start = [], 0
    for size in sizes[:-1]:
        chunk = order[start : start + size]
        blocks.append((tuple(chunk), float(keep[chunk].double().mean())))
        start += size
    return blocks


def _slots(scores: torch.Tensor, shape: LayerShape) -> list[tuple[tuple[int, ...], float]]:
    """Query-head slots, weakest first: slot r holds the r-th weakest head of every KV group
    (scored by their mean). A group's strongest head is never offered, so each keeps one."""
    per_group = scores.double().reshape(shape.n_kv, shape.n_rep)
    order = torch.argsort(per_group, dim=1, stable=True)
    slots = []
    for r in range(shape.n_rep - 1):
        heads = tuple(g * shape.n_rep + int(order[g, r]) for g in range(shape.n_kv))
        slots.append((heads, float(scores[list(heads)].double().mean())))
    return slots


def candidates(
    keep: Scores, shapes: list[LayerShape], costs: dict[tuple[int, str], int], align: int, modules: bool = False
) -> list[Candidate]:
    """Every removable candidate of the prunable layers (the keys of `keep`: ATTN and MLP, and
    HEAD when query heads are units). `modules`: a layer's last KV group may leave too."""
    out: list[Candidate] = []
    for (layer, kind), scores in sorted(keep.items()):
        unit_cost = costs[(layer, kind)]
        if kind == ATTN:
            order = torch.argsort(scores.double(), stable=True).tolist()
            groups = [((u,), float(scores[u])) for u in (order if modules else order[:-1])]
        elif kind == HEAD:
            groups = _slots(scores, shapes[layer])
        else:
            groups = _blocks(scores, align)
        last = shapes[layer].n_kv - 1
        out += [Candidate(layer, kind, units, unit_cost * len(units), score, rank, kind == ATTN and rank == last)
                for rank, (units, score) in enumerate(groups)]
    return out


def max_removable(cands: list[Candidate], shapes: list[LayerShape], costs: dict[tuple[int, str], int]) -> int:
    """Parameters the candidates remove together (counted by a Ledger)."""
    ledger = Ledger(shapes, costs)
    for c in cands:
        ledger.add(c)
    return ledger.removed


def check_feasible(ratio: float, cands: list[Candidate], total_params: int, shapes, costs) -> None:
    limit = max_removable(cands, shapes, costs) / total_params
    if not 0 < ratio < limit:
        raise UserError(
            f"--ratio {ratio} is outside (0, {limit:.4f}): the prunable layers can give up at most "
            f"{limit:.2%} of all parameters; lower --ratio or --keep-first/--keep-last"
        )


def _by_layer(cands: list[Candidate]) -> dict[tuple[int, str], list[Candidate]]:
    """Candidates per (layer, kind), each list in removal order."""
    groups: dict[tuple[int, str], list[Candidate]] = {}
    for c in sorted(cands, key=lambda c: c.rank):
        groups.setdefault((c.layer, c.kind), []).append(c)
    return groups


def _under_cap(cands: list[Candidate], cap: float, shapes: list[LayerShape]) -> list[Candidate]:
    """Each layer's candidates, in removal order, while the units removed from that layer and
    kind stay within `cap` of its units. A whole attention module is a unit of its own that
    the cap does not limit (it is offered once the cap has let every other group go)."""
    allowed = []
    for (layer, kind), group in _by_layer(cands).items():
        limit, taken = cap * shapes[layer].n_units(kind), 0
        for c in group:
            if taken + len(c.units) > limit + 1e-9 and not c.whole:
                break
            allowed.append(c)
            taken += len(c.units)
    return allowed


def global_pool(cands: list[Candidate], target: int, shapes: list[LayerShape], costs, cap: float = 1.0) -> list[Candidate]:
    """The candidates the global search may take: those within `cap` of their layer's units,
    the cap raised in steps of 0.01 only as far as `target` needs."""
    pool = _under_cap(cands, cap, shapes)
    while cap < 1.0 and max_removable(pool, shapes, costs) < target:
        cap = min(1.0, cap + 0.01)
        pool = _under_cap(cands, cap, shapes)
    return pool


def search_global(cands: list[Candidate], target: int, shapes: list[LayerShape], costs, cap: float = 1.0) -> list[Candidate]:
    """Lowest keep-score first across all layers until `target` parameters are removed.

    No layer loses more than `cap` of its KV groups or of its MLP channels: first-order scores
    ignore how removals in one layer compound, and without a cap a high ratio can strip whole
    layers to the minimum. When the target cannot be reached under `cap`, the cap is raised
    (in steps of 0.01) only as far as needed."""
    return take_lowest(global_pool(cands, target, shapes, costs, cap), target, shapes, costs)


def take_lowest(pool: list[Candidate], target: int, shapes: list[LayerShape], costs) -> list[Candidate]:
    """The candidates of `pool`, lowest keep-score first, until `target` parameters are removed."""
    chosen, ledger = [], Ledger(shapes, costs)
    for cand in sorted(pool, key=lambda c: (c.score, c.layer, c.kind, c.rank)):
        if ledger.removed >= target:
            break
        chosen.append(cand)
        ledger.add(cand)
    return chosen


def _uniform_pick(cands: list[Candidate], fractions: dict[str, float], shapes: list[LayerShape]) -> list[Candidate]:
    """Per layer and kind, the first candidates in removal order whose unit count comes
    closest to fractions[kind] of the layer's units."""
    chosen = []
    for (layer, kind), group in _by_layer(cands).items():
        want, taken = fractions[kind] * shapes[layer].n_units(kind), 0
        for c in group:
            if abs(taken + len(c.units) - want) >= abs(taken - want):
                break
            chosen.append(c)
            taken += len(c.units)
    return chosen


def _cost(cands: list[Candidate]) -> int:
    return sum(c.cost for c in cands)


def search_uniform(cands: list[Candidate], target: int, shapes: list[LayerShape], slack: int) -> list[Candidate]:
    """Every prunable layer loses the same fraction of its KV groups and of its MLP channels.

    KV groups come in few units per layer, so their fraction takes a few values k / n_kv; for
    each, bisection finds the smallest MLP fraction that reaches `target`. Among the pairs
    that overshoot the target by at most `slack` parameters, the one with the two fractions
    closest together wins; when none does, the smallest overshoot."""
    kv_counts = {shapes[c.layer].n_kv for c in cands if c.kind == ATTN} or {1}
    levels = sorted({k / n for n in kv_counts for k in range(n)})
    best = None
    for f_attn in levels:
        if _cost(_uniform_pick(cands, {ATTN: f_attn, MLP: 1.0}, shapes)) < target:
            continue
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            hit = _cost(_uniform_pick(cands, {ATTN: f_attn, MLP: mid}, shapes)) >= target
            lo, hi = (lo, mid) if hit else (mid, hi)
        picked = _uniform_pick(cands, {ATTN: f_attn, MLP: hi}, shapes)
        overshoot = _cost(picked) - target
        key = (overshoot > slack, abs(f_attn - hi) if overshoot <= slack else overshoot)
        if best is None or key < best[0]:
            best = (key, picked)
    return best[1]


def build_plan(shapes: list[LayerShape], removed: list[Candidate]) -> PrunePlan:
    plan = PrunePlan.keep_all(shapes)
    gone: dict[tuple[int, str], set[int]] = {}
    for c in removed:
        gone.setdefault((c.layer, c.kind), set()).update(c.units)
    for i, lp in enumerate(plan.layers):
        lp.kv_groups = [u for u in lp.kv_groups if u not in gone.get((i, ATTN), set())]
        lp.channels = [u for u in lp.channels if u not in gone.get((i, MLP), set())]
        if gone.get((i, HEAD)):
            lp.heads = [h for h in lp.group_heads(lp.kv_groups) if h not in gone[(i, HEAD)]]
    return plan


def search(
    keep: Scores,
    shapes: list[LayerShape],
    costs: dict[tuple[int, str], int],
    total_params: int,
    ratio: float,
    allocation: str,
    align: int,
    cap: float = 1.0,
    modules: bool = False,
) -> PrunePlan:
    """A plan removing at least `ratio` of `total_params` under the layer constraints
    (query-head slots where `keep` scores HEAD units, whole attention modules if `modules`)."""
    if allocation != "global" and (modules or any(kind == HEAD for _, kind in keep)):
        raise UserError("query-head and attention-module units need a global allocation (--method saap or flap); "
                        "use --units groups with this method")
    cands = candidates(keep, shapes, costs, align, modules)
    check_feasible(ratio, cands, total_params, shapes, costs)
    target = int(round(ratio * total_params))
    if allocation == "global":
        removed = search_global(cands, target, shapes, costs, cap)
    else:
        removed = search_uniform(cands, target, shapes, slack=total_params // 100)
    return build_plan(shapes, removed)
