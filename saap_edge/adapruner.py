"""AdaPruner (Kong et al., AAAI 2025, arXiv 2503.06184) as we read it: Bayesian search (optuna's
TPE) over which calibration windows and which importance metric a structured pruner uses.

The authors' repository holds only a README, so this is our reading (README, "AdaPruner"):

- **Calibration subspace.** A seeded pool of P windows; a point picks S of them, one
  categorical index per slot. A repeated index is replaced by the next unused window in pool
  order, so a point always names S distinct windows and TPE still learns per slot.
- **Metric subspace.** LLM-Pruner's Taylor metrics (vectorize, param_first, param_second,
  param_mix) x its group aggregations (sum, mean, max, prod, last), uniform allocation as in
  LLM-Pruner; plus SAAP's fused metric with its indicator (bound or none), global allocation.
- **Cost.** One backward pass per pool window fills per-sample, per-member, per-unit Taylor
  sums (PoolStats, cached on disk by model and pool hash); a trial is then a ranking from
  those sums, a plan, a slice and the objective, with no backward pass.

Per-sample sums make every metric a function of the chosen windows: vectorize |mean_d sum g w|
and param_second mean_d sum (g w)^2 / 2 (the Fisher form) are exactly LLM-Pruner's for those
windows; param_first and param_mix average the per-sample element sums |g w| and
|g w - (g w)^2 / 2| instead of applying |.| after averaging the gradient (which would need
per-weight gradients of every window: P x all parameters).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from saap_edge.errors import UserError
from saap_edge.outputs import write_safetensors
from saap_edge.prune.estimate import TaylorStats, backward_each
from saap_edge.prune.groups import MEMBERS, LayerShape, decoder_layers, submodule, unit_reduce
from saap_edge.prune.importance import Scores

TAYLOR_METRICS = ("vectorize", "param_first", "param_second", "param_mix")
AGGREGATIONS = ("sum", "mean", "max", "prod", "last")
SAAP_METRICS = ("saap-bound", "saap-none")
STATS = ("signed", "first", "second", "mix")  # sum g w, sum |g w|, sum (g w)^2 / 2, sum |g w - (g w)^2 / 2|


def metric_choices() -> list[str]:
    """Every point of the metric subspace, as "metric/aggregation" or a SAAP metric."""
    return [f"{m}/{a}" for m in TAYLOR_METRICS for a in AGGREGATIONS] + list(SAAP_METRICS)


@dataclass
class PoolStats:
    """stats[(layer, kind)][name]: [P, members, units] float32 sums for each pool window."""

    stats: dict[tuple[int, str], dict[str, torch.Tensor]]
    losses: list[float]

    @property
    def n_windows(self) -> int:
        return len(self.losses)

    def save(self, path: Path) -> None:
        flat = {f"{i}.{kind}.{name}": t.contiguous() for (i, kind), d in self.stats.items() for name, t in d.items()}
        flat["losses"] = torch.tensor(self.losses, dtype=torch.float64)
        write_safetensors(path, flat)

    @classmethod
    def load(cls, path: Path) -> "PoolStats":
        flat = load_file(path)
        losses = flat.pop("losses").tolist()
        stats: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for key, t in flat.items():
            i, kind, name = key.split(".")
            stats.setdefault((int(i), kind), {})[name] = t
        return cls(stats, losses)

    def taylor(self, idx: torch.Tensor) -> TaylorStats:
        """What collect_taylor returns for the windows `idx` (members summed in the hooks' order)."""
        vector, element = {}, {}
        for key, d in self.stats.items():
            v, e = d["signed"][idx], d["mix"][idx]
            vector[key], element[key] = _member_sum(v), _member_sum(e)
        return TaylorStats(vector, element, losses=[self.losses[i] for i in idx.tolist()])


def _member_sum(t: torch.Tensor) -> torch.Tensor:
    """[S, M, U] -> [S, U], adding members one after another as the estimation hooks do."""
    out = torch.zeros(t.shape[0], t.shape[2], dtype=t.dtype)
    for m in range(t.shape[1]):
        out += t[:, m]
    return out


def collect_pool(model: nn.Module, pool: torch.Tensor, shapes: list[LayerShape], layers: list[int],
                 progress: bool = True) -> PoolStats:
    """One forward + backward per pool window [P, T]; per member of every unit kind, the four
    Taylor sums per unit (STATS), folded in gradient hooks that free each gradient at once."""
    blocks = decoder_layers(model)
    n = pool.shape[0]
    stats: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    members = []
    for i in layers:
        for kind, kind_members in MEMBERS.items():
            units = shapes[i].n_units(kind)
            stats[(i, kind)] = {name: torch.zeros(n, len(kind_members), units) for name in STATS}
            for m, (path, axis, _) in enumerate(kind_members):
                members.append(((i, kind), m, axis, units, submodule(blocks[i], path).weight, f"layer {i} {path}"))
    state = {"sample": 0, "bad": None}

    def make(key, m, axis, units, name):
        def hook(param):
            g = param.grad.float()
            param.grad = None
            if state["bad"] is None and not torch.isfinite(g).all():
                state["bad"] = name
            gw = g * param.detach().float()
            d, s = state["sample"], stats[key]
            s["signed"][d, m] = unit_reduce(gw, axis, units).cpu()
            s["first"][d, m] = unit_reduce(gw.abs(), axis, units).cpu()
            s["second"][d, m] = unit_reduce(0.5 * gw * gw, axis, units).cpu()
            s["mix"][d, m] = unit_reduce((gw - 0.5 * gw * gw).abs(), axis, units).cpu()
        return hook

    hooked = [(weight, make(key, m, axis, units, name)) for key, m, axis, units, weight, name in members]
    losses = backward_each(model, pool, hooked, lambda d: state.__setitem__("sample", d), lambda: state["bad"],
                           "pool window", "pool statistics", progress)
    return PoolStats(stats, losses)


def model_digest(model: nn.Module) -> str:
    """sha256 of every tensor of the model, in name order (the cache key of its statistics)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cached_pool(model: nn.Module, pool: torch.Tensor, shapes: list[LayerShape], layers: list[int],
                cache_dir: Path | None, progress: bool = True, cache_mib: int = 4096) -> tuple[PoolStats, dict]:
    """PoolStats of `pool`, read from `cache_dir` when this model and pool were seen before; the
    folder is held within `cache_mib` MiB (least recently used entries leave first)."""
    key = hashlib.sha256(json.dumps([model_digest(model), hashlib.sha256(pool.numpy().tobytes()).hexdigest(),
                                     layers]).encode()).hexdigest()[:24]
    info = {"key": key, "cached": False}
    path = cache_dir / f"pool-{key}.safetensors" if cache_dir else None
    if path is not None and path.exists():
        try:
            stats = PoolStats.load(path)
            os.utime(path)  # most recently used: evicted last
            return stats, {**info, "cached": True, "path": str(path)}
        except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed
            path.unlink(missing_ok=True)
    stats = collect_pool(model, pool, shapes, layers, progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        stats.save(path)
        info["path"] = str(path)
        info["evicted"] = evict_pools(cache_dir, cache_mib * 2**20, keep=path)
        if not path.exists():
            info.pop("path")
    return stats, info


def evict_pools(cache_dir: Path, limit: int, keep: Path) -> list[str]:
    """Keep the pool cache within `limit` bytes: drop the least recently used entries, `keep`
    (the one just written) last; it goes too when it alone passes the bound."""
    entries = sorted(cache_dir.glob("pool-*.safetensors"), key=lambda f: (f == keep, f.stat().st_mtime))
    total = sum(f.stat().st_size for f in entries)
    dropped = []
    for f in entries:
        if total <= limit:
            break
        total -= f.stat().st_size
        f.unlink(missing_ok=True)
        dropped.append(f.name)
    return dropped


def taylor_scores(pool: PoolStats, idx: torch.Tensor, metric: str, aggregation: str) -> Scores:
    """LLM-Pruner's importance of every unit from the windows `idx`: per member, the metric over
    those windows; across the group's members, the aggregation."""
    if metric not in TAYLOR_METRICS or aggregation not in AGGREGATIONS:
        raise UserError(f"unknown metric {metric!r} / aggregation {aggregation!r}; metrics: {', '.join(TAYLOR_METRICS)}; "
                        f"aggregations: {', '.join(AGGREGATIONS)}")
    out: Scores = {}
    for key, d in pool.stats.items():
        if metric == "vectorize":
            per_member = d["signed"][idx].double().mean(0).abs()
        else:
            name = {"param_first": "first", "param_second": "second", "param_mix": "mix"}[metric]
            per_member = d[name][idx].double().mean(0)
        out[key] = {"sum": lambda t: t.sum(0), "mean": lambda t: t.mean(0), "max": lambda t: t.max(0).values,
                    "prod": lambda t: t.prod(0), "last": lambda t: t[-1]}[aggregation](per_member)
    return out


def distinct_windows(picks: list[int], pool_size: int) -> list[int]:
    """S distinct pool windows from per-slot picks: a repeated pick becomes the next unused
    window after it (wrapping), so the result is a deterministic function of the picks."""
    used: set[int] = set()
    out = []
    for p in picks:
        while p in used:
            p = (p + 1) % pool_size
        used.add(p)
        out.append(p)
    return out


# ------------------------------------------------------------------------------------------
# The search: one optuna study in SQLite, resumable, its sampler reseeded per trial.

@dataclass
class Point:
    windows: list[int]  # pool indices, distinct
    metric: str  # "metric/aggregation" or a SAAP metric

    def to_dict(self) -> dict:
        return {"windows": self.windows, "metric": self.metric}


def point_of(params: dict, n_slots: int, pool_size: int, metrics: list[str], fixed: Point | None = None) -> Point:
    windows = fixed.windows if fixed and "slot_0" not in params else distinct_windows(
        [int(params[f"slot_{k}"]) for k in range(n_slots)], pool_size)
    metric = params.get("metric", fixed.metric if fixed else metrics[0])
    return Point(windows, metric)


def open_study(storage: Path, identity: dict, new: bool):
    """The study stored at `storage` for this identity (model, pool, objective, space); a
    database made for another identity is refused in one line unless `new` replaces it."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{storage}"
    if new and storage.exists():
        storage.unlink()
    try:
        names = [s.study_name for s in optuna.get_all_study_summaries(url)] if storage.exists() else []
        study = optuna.load_study(study_name="adapruner", storage=url) if "adapruner" in names else None
    except (SQLAlchemyError, ValueError, RuntimeError) as exc:
        raise UserError(f"{storage}: the search database cannot be read ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:160]}); it is damaged or locked: remove it, or pass --new-search") from exc
    if study is not None:
        stored = study.user_attrs.get("identity", {})
        diffs = [k for k in identity if stored.get(k) != identity[k]]
        if diffs:
            raise UserError(f"{storage} holds a search for another {', '.join(diffs)}; pass --new-search to replace it "
                            "or choose another --out")
        return study
    study = optuna.create_study(study_name="adapruner", storage=url, direction="minimize")
    study.set_user_attr("identity", identity)
    return study


def run_search(study, evaluate, n_trials: int, n_slots: int, pool_size: int, metrics: list[str], seed: int,
               startup: int, sampler: str = "tpe", fixed: Point | None = None, search_data: bool = True,
               search_metric: bool = True, progress: bool = True) -> list[dict]:
    """Run trials until `n_trials` have completed (counting those already in the study).
    `evaluate(point) -> objective`. Each trial's sampler is seeded by (seed, completed trials),
    so a search killed and resumed proposes what an uninterrupted one would have."""
    import optuna
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # a killed run's last trial
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    bar = tqdm(total=n_trials, initial=done, desc="adapruner search", disable=not progress)
    while done < n_trials:
        trial_seed = seed * 100_003 + done
        study.sampler = (optuna.samplers.TPESampler(seed=trial_seed, n_startup_trials=startup) if sampler == "tpe"
                         else optuna.samplers.RandomSampler(seed=trial_seed))
        trial = study.ask()
        params = {}
        if search_data:
            for k in range(n_slots):
                params[f"slot_{k}"] = trial.suggest_int(f"slot_{k}", 0, pool_size - 1)
        if search_metric:
            params["metric"] = trial.suggest_categorical("metric", metrics)
        point = point_of(params, n_slots, pool_size, metrics, fixed)
        value = float(evaluate(point))
        trial.set_user_attr("point", point.to_dict())
        study.tell(trial, value)
        done += 1
        bar.update(1)
        bar.set_postfix(best=f"{study.best_value:.2f}")
    bar.close()
    return [{"number": t.number, "value": t.value, **t.user_attrs.get("point", {})}
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]


# ------------------------------------------------------------------------------------------
# A point -> a plan and a slim model, from the cached statistics alone.

def rank_point(model: nn.Module, pool: PoolStats, point: Point, s, shapes: list[LayerShape], layers: list[int]):
    """The Ranking a point gives: LLM-Pruner's metric and aggregation with its uniform
    allocation, or SAAP's ranking (with its indicator) computed on the point's windows."""
    from dataclasses import replace

    from saap_edge.prune.methods import rank_saap
    from saap_edge.prune.ranking import Ranking, Statistics

    idx = torch.tensor(sorted(point.windows), dtype=torch.long)
    if point.metric in SAAP_METRICS:
        st = Statistics(model, None, shapes, layers, progress=False)
        st.use_taylor(pool.taylor(idx))
        return rank_saap(st, replace(s, method="saap", indicator=point.metric.split("-", 1)[1], units="groups"))
    metric, aggregation = point.metric.split("/")
    return Ranking(taylor_scores(pool, idx, metric, aggregation), "uniform", {})


def prune_point(model: nn.Module, pool: PoolStats, point: Point, s, shapes: list[LayerShape], layers: list[int]):
    """Search and slice for a point, as prune() does for a method."""
    from saap_edge.prune import PruneResult
    from saap_edge.prune.groups import total_params, unit_costs
    from saap_edge.prune.search import search
    from saap_edge.prune.slicing import apply_plan

    ranking = rank_point(model, pool, point, s, shapes, layers)
    before = total_params(model)
    plan = search(ranking.keep, shapes, unit_costs(model, shapes, layers), before, s.ratio, ranking.allocation, s.align,
                  ranking.cap)
    slim = apply_plan(model, plan)
    after = total_params(slim)
    plan.method, plan.ratio, plan.settings, plan.seed = "adapruner", s.ratio, s.to_dict(), s.seed
    plan.params = {"before": before, "after": after, "removed_share": (before - after) / before}
    return PruneResult(slim, plan, {"point": point.to_dict()})


# ------------------------------------------------------------------------------------------
# The stage compress runs for --method adapruner.

def objective_windows(tokenizer, source: str, n: int, data_dir) -> torch.Tensor:
    """The first `n` 128-token windows of `source`'s *validation* split (a path: the file)."""
    from saap_edge.data import load_text
    from saap_edge.eval.ppl import token_windows

    return token_windows(tokenizer, load_text(source, "validation", data_dir), 128, n)


def search_and_prune(model: nn.Module, tokenizer, s, search, recon, recon_samples, storage: Path, data_dir,
                     progress: bool = True):
    """Pool, cached statistics, the study (resumed or reused), and the model pruned with the
    best point. Returns (PruneResult, info for report.json and search.json)."""
    import time

    from saap_edge.config import default_cache_dir
    from saap_edge.data import calibration_samples
    from saap_edge.eval.ppl import window_perplexity
    from saap_edge.prune import prunable_layers
    from saap_edge.prune.groups import discover
    from saap_edge.reconstruct import reconstruct

    t0 = time.perf_counter()
    search = search.validate(s.calib_samples)
    pool, pool_hash = calibration_samples(tokenizer, search.pool, search.pool_size, s.seq_len, s.seed, data_dir,
                                          flag="--pool-size")
    held_out = objective_windows(tokenizer, search.objective, search.objective_windows, data_dir)
    shapes = discover(model)
    layers = prunable_layers(len(shapes), s)
    stats, cache = cached_pool(model, pool, shapes, layers, default_cache_dir().parent / "adapruner", progress,
                               search.cache_mib)
    pool_s = time.perf_counter() - t0
    metrics = metric_choices()
    identity = {"model": cache["key"], "pool": pool_hash, "objective": f"{search.objective}/validation/{search.objective_windows}",
                "space": f"{search.space}/{s.calib_samples}/{search.pool_size}" + ("" if search.sampler == "tpe" else
                                                                                      f"/{search.sampler}"), "ratio": s.ratio,
                "reconstruct": f"{recon.method}/{recon.select}" if recon is not None else "none"}
    study = open_study(storage, identity, search.new)
    fixed = Point(list(range(s.calib_samples)), metrics[0])
    trial_times: list[float] = []

    def evaluate(point: Point) -> float:
        t = time.perf_counter()
        result = prune_point(model, stats, point, s, shapes, layers)
        if recon is not None and recon.active:
            reconstruct(model, result.model, result.plan, recon_samples, recon, progress=False)
        ppl = window_perplexity(result.model, held_out, progress=False)["ppl"]
        trial_times.append(time.perf_counter() - t)
        return ppl

    trials = run_search(study, evaluate, search.trials, s.calib_samples, search.pool_size, metrics, s.seed, search.startup,
                        search.sampler, fixed, search.space in ("both", "data"), search.space in ("both", "metric"), progress)
    best = min(trials, key=lambda t: (t["value"], t["number"]))
    point = Point(best["windows"], best["metric"])
    result = prune_point(model, stats, point, s, shapes, layers)
    result.plan.settings = {**s.to_dict(), "search": search.to_dict()}
    result.plan.calibration = {"source": search.pool, "pool_size": search.pool_size, "pool_sha256": pool_hash,
                               "windows": point.windows, "seq_len": s.seq_len}
    info = {"settings": search.to_dict(), "identity": identity, "storage": str(storage), "pool_cache": cache,
            "pool_s": pool_s, "trial_s": trial_times, "best": {**point.to_dict(), "value": best["value"]},
            "trials": trials, "time_s": time.perf_counter() - t0}
    result.details.update(search=info["best"])
    return result, info
