"""Importance: pure functions from per-sample unit scores to one ranking score per unit.

Scores are dicts keyed by (layer, kind) with kind "attn" or "mlp"; per-sample tensors have
shape [D, U] (D calibration samples, U units of that layer and kind), per-unit ones [U].
SAAP (arXiv 2412.15127) as DESIGN.md section 2 reads it:
  eq. 1  I_V = |sum over the unit's weights of g*w|            (vector-wise, coarse)
  eq. 2  I_E = sum over the unit's weights |g*w - (g*w)^2 / 2|  (element-wise, fine)
  eq. 9  I_ada = I_V / (2 l1^2) + I_E / (2 l2^2) + log(l1 l2), l_k^2 = mean(I_k) over a scope
  eq. 10 M = var_d(I_ada^d) (Bessel) * ||W_unit||^2
  eq. 11 M_hat = (M - mean M) / std M over a scope
"""

from __future__ import annotations

import math

import torch

from saap_edge.config import FUSIONS

Key = tuple[int, str]
Scores = dict[Key, torch.Tensor]



def scope_of(key: Key, scope: str) -> object:
    """Keys that share a scope are fused / standardised together: every unit ("all"), per
    module kind over all layers ("global"), or per layer and kind ("layer")."""
    return {"all": None, "global": key[1]}.get(scope, key)


def group_keys(keys, scope: str) -> dict[object, list[Key]]:
    groups: dict[object, list[Key]] = {}
    for key in keys:
        groups.setdefault(scope_of(key, scope), []).append(key)
    return groups


def uncertainty_closed_form(iv: torch.Tensor, ie: torch.Tensor) -> tuple[float, float]:
    """The l1^2, l2^2 minimising mean(I_V/(2 l1^2) + I_E/(2 l2^2) + log(l1 l2)): the means."""
    return float(iv.double().mean()), float(ie.double().mean())


def uncertainty_learned(
    iv: torch.Tensor, ie: torch.Tensor, steps: int = 3000, lr: float = 0.05
) -> tuple[float, float]:
    """The same l1^2, l2^2 found the way multi-task weighting learns them: Adam on log l^2."""
    means = torch.stack([iv.double().mean(), ie.double().mean()])
    log_var = torch.zeros(2, dtype=torch.float64, requires_grad=True)  # start at l^2 = 1
    optimizer = torch.optim.Adam([log_var], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = (means / (2 * log_var.exp()) + 0.5 * log_var).sum()
        loss.backward()
        optimizer.step()
    l1, l2 = log_var.detach().exp().tolist()
    return l1, l2


def _flat(scores: Scores, keys: list[Key]) -> torch.Tensor:
    return torch.cat([scores[k].reshape(-1) for k in keys])


def fuse(iv: Scores, ie: Scores, fusion: str = "adaptive", scope: str = "global", log_term: bool = True) -> Scores:
    """Per-sample fused importance [D, U] for every key (eq. 9 and the ablation variants).

    eq. 9's log(l1 l2) is one constant per scope: it moves no unit against another in its
    scope and is gone after standardisation (eq. 11). `log_term=False` leaves it out, which
    matters only when scores are divided by unit costs (it would otherwise dominate)."""
    if fusion not in FUSIONS:
        raise ValueError(f"fusion {fusion!r} is not one of {FUSIONS}")
    if fusion == "vector":
        return {k: v.double() for k, v in iv.items()}
    if fusion == "element":
        return {k: v.double() for k, v in ie.items()}
    if fusion == "sum":
        return {k: iv[k].double() + ie[k].double() for k in iv}
    fused: Scores = {}
    for keys in group_keys(iv, scope).values():
        estimate = uncertainty_learned if fusion == "learned" else uncertainty_closed_form
        l1, l2 = estimate(_flat(iv, keys), _flat(ie, keys))
        l1, l2 = max(l1, 1e-30), max(l2, 1e-30)
        for k in keys:
            constant = 0.5 * math.log(l1 * l2) if log_term else 0.0
            fused[k] = iv[k].double() / (2 * l1) + ie[k].double() / (2 * l2) + constant
    return fused


def fluctuation(fused: torch.Tensor, weight_norm2: torch.Tensor) -> torch.Tensor:
    """Eq. 10: Bessel-corrected variance over samples of [D, U] scores, times ||W_unit||^2."""
    if fused.shape[0] < 2:
        raise ValueError("the fluctuation indicator needs at least 2 calibration samples")
    return fused.var(dim=0, unbiased=True) * weight_norm2.double()


def indicator(fused: torch.Tensor, weight_norm2: torch.Tensor | None, name: str) -> torch.Tensor:
    """One score per unit from its per-sample fused importance [D, U]:
    fluctuation: eq. 10, M = var_d(I_ada) * ||W||^2;
    bound: mean_d(I_ada) + std_d(I_ada), importance raised by its fluctuation, so a unit that
           matters much on some samples is kept even when its mean is modest;
    none: mean_d(I_ada), the ablation without the stability indicator.
    Only the fluctuation reads `weight_norm2`."""
    if name == "fluctuation":
        return fluctuation(fused, weight_norm2)
    if name == "bound":
        return fused.mean(0) + fused.std(0, unbiased=True)
    return fused.mean(0)


def standardize(scores: Scores, scope: str = "global") -> Scores:
    """Eq. 11: (M - mean M) / std M within each scope."""
    out: Scores = {}
    for keys in group_keys(scores, scope).values():
        flat = _flat(scores, keys).double()
        mean, std = flat.mean(), flat.std() if flat.numel() > 1 else torch.tensor(1.0)
        std = std if std > 0 else torch.tensor(1.0)
        for k in keys:
            out[k] = (scores[k].double() - mean) / std
    return out
