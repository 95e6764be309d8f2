"""Pruning quality without recovery training: every method at 20% and 50% of all parameters,
each without and with the reconstruct stage, on the full WikiText-2 and PTB test sets.

Rows
  main       every method (SAAP default, LLM-Pruner param_mix, FLAP, Wanda-sp, magnitude,
             random) x ratio x reconstruction (none | the default), the same reconstruction
             applied to every method so the comparison stays fair
  ablations  SAAP with the reconstruction variants: target prefix vs dense, selection global
             vs local, refit samples, damping
  units      SAAP with finer and coarser attention units (query-head slots, whole attention
             modules; --units), with the default reconstruction: first on the ablation
             windows, then the full test sets

Protocol: one model load (float32, CPU); one calibration draw for importance (--calib-samples
x 128 tokens of books, seed 0) whose statistics are collected once and shared by the methods
that read them; the reconstruction windows are a second seeded draw from the same text
(--recon-samples of ReconstructSettings). Perplexity: non-overlapping 128-token windows of
each test set (rows joined by blank lines), all of them unless --limit (N stated in the
table). Wall time per row: ranking + search + slicing plus the collection of the statistic
the method reads (shared, charged to each reader), and the reconstruct stage on its own.
Peak memory: RSS sampled every 10 ms while the row pruned / reconstructed (one process, the
dense model loaded). Finished rows are cached under --work, so an interrupted run resumes.

    python benchmarks/prune_quality.py --data-dir ../shared/data
    python benchmarks/prune_quality.py --smoke --data-dir ../shared/data   # every row on a tiny model (prune_quality_smoke.*)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (PeakRSS, cached_row, machine, quality_arguments, quality_smoke,  # noqa: E402
                     reconstruct_settings, timed, write_results)

from saap_edge.compress import versions  # noqa: E402
from saap_edge.config import PruneSettings, ReconstructSettings  # noqa: E402
from saap_edge.data import calibration_samples  # noqa: E402
from saap_edge.eval.ppl import evaluate_ppl  # noqa: E402
from saap_edge.models.load import load_model  # noqa: E402
from saap_edge.prune import prune, statistics  # noqa: E402
from saap_edge.prune.groups import total_params  # noqa: E402
from saap_edge.reconstruct import reconstruct  # noqa: E402
from saap_edge.render import format_table  # noqa: E402

# (label, settings overrides, statistic it reads)
METHODS = [
    ("saap (default)", {"method": "saap"}, "taylor"),
    ("saap --units groups", {"method": "saap", "units": "groups"}, "taylor"),  # the default before query-head units
    ("llm-pruner (param_mix)", {"method": "llm-pruner", "taylor": "param_mix"}, "taylor"),
    ("flap", {"method": "flap"}, "inputs"),
    ("wanda-sp", {"method": "wanda-sp"}, "inputs"),
    ("magnitude", {"method": "magnitude"}, None),
    ("random", {"method": "random"}, None),
]
# SAAP with reconstruction variants: (label, ReconstructSettings overrides)
ABLATIONS = [
    ("select global", {"select": "global"}),
    ("target dense", {"target": "dense"}),
    ("samples 64", {"samples": 64}),
    ("samples 256", {"samples": 256}),
    ("damp 0.001", {"damp": 0.001}),
]
# SAAP with other attention units: (label, PruneSettings overrides). Per-kind standardisation
# ("fusion_scope": "global") is tried with them because under the default one scale for all
# units a query head, a small unit, competes with KV groups and channels by raw Taylor sums.
UNIT_VARIANTS = [  # (the reference, --units groups, is the ablations' default row)
    ("units groups,heads", {"units": "groups,heads"}),
    ("units groups,modules", {"units": "groups,modules"}),
    ("units groups,heads,modules", {"units": "groups,heads,modules"}),
    ("units groups,heads,modules, scope per kind", {"units": "groups,heads,modules", "fusion_scope": "global"}),
    ("scope per kind", {"fusion_scope": "global", "units": "groups"}),
]
TARGETS = {0.2: 110.0, 0.5: 600.0}  # WikiText-2, full test set, no recovery training


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    quality_arguments(p, "prune_quality")
    p.add_argument("--calib", default="books")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--units-main", nargs="*", default=[], help="UNIT_VARIANTS labels to measure on the full test sets too")
    p.add_argument("--cached-only", action="store_true", help="write the results from the rows cached under --work; run nothing")
    p.add_argument("--name", default="prune_quality")
    a = p.parse_args(argv)
    if a.smoke:
        a.name += "_smoke"
        quality_smoke(a, p)
    return a


class Bench:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        (a.work / "rows").mkdir(parents=True, exist_ok=True)
        self.loaded = load_model(a.model, "cpu", "float32")
        self.model, self.tok = self.loaded.model, self.loaded.tokenizer
        self.samples, self.calib_hash = calibration_samples(self.tok, a.calib, a.calib_samples, 128, a.seed, a.data_dir)
        self.stats = statistics(self.model, self.samples, PruneSettings(), progress=False)  # collected lazily
        self.stat_time: dict = {}
        self.stat_peak: dict = {}
        self.recon_samples: dict = {}
        self.rows: list[dict] = []
        self.missing: list[str] = []  # rows not measured (--cached-only)

    def ppl(self, model, limit: int) -> dict:
        res, seconds = {}, {}
        for ds in self.a.datasets:
            t0 = time.perf_counter()
            res.update(evaluate_ppl(model, self.tok, [ds], window=128, limit=limit or None,
                                    data_dir=self.a.data_dir, progress=False))
            seconds[ds] = time.perf_counter() - t0
        return {"ppl": {k: v["ppl"] for k, v in res.items()}, "windows": {k: v["windows"] for k, v in res.items()},
                "eval_s": seconds}

    def statistic(self, reads: str | None) -> None:
        """Collect a shared statistic once, timing it alone (charged to every row that reads it)."""
        if reads and reads not in self.stat_time:
            with PeakRSS() as mem, timed(self.stat_time, reads):
                self.stats.taylor(with_param_mix=True) if reads == "taylor" else self.stats.inputs()
            self.stat_peak[reads] = mem.peak_mib

    def windows(self, r: ReconstructSettings):
        if r.samples not in self.recon_samples:
            self.recon_samples[r.samples] = calibration_samples(self.tok, self.a.calib, r.samples, r.seq_len, self.a.seed,
                                                                self.a.data_dir)[0]
        return self.recon_samples[r.samples]

    def cached(self, key: str, make, what: str = "", label: str | None = None) -> dict | None:
        if self.a.only and not key.startswith(tuple(self.a.only)):
            return None
        path = self.a.work / "rows" / f"{key}.json"
        if self.a.cached_only and not path.exists():
            self.missing.append(what or key)
            return None
        row = cached_row(path, lambda: {"key": key, **make()})
        row["label"] = label or row["label"]  # the same settings may have been measured under an older name
        print(f"[{time.strftime('%H:%M:%S')}] {key}: {row['ppl']}", flush=True)
        self.rows.append(row)
        return row

    def dense_row(self) -> dict | None:
        return self.cached(f"dense-{self.a.limit}", lambda: {"table": "dense", "label": "dense", "ratio": 0.0,
                                                             "params": total_params(self.model), "removed_share": 0.0,
                                                             "reconstruct": "none", **self.ppl(self.model, self.a.limit)})

    def pruned_row(self, table: str, label: str, s: PruneSettings, reads: str | None, r: ReconstructSettings) -> dict | None:
        limit = self.a.ablation_limit if table in ("ablation", "units") else self.a.limit
        # a setting added later keeps the rows measured before it cached while it has its default
        keyed = {k: v for k, v in s.to_dict().items() if not (k == "units" and v == "groups")}
        digest = hashlib.sha256(json.dumps([keyed, r.to_dict(), self.calib_hash, limit], sort_keys=True).encode())
        key = f"{table}-{s.ratio:.2f}-{label.split(' ')[0]}-{r.method}-{digest.hexdigest()[:10]}"

        def make() -> dict:
            self.statistic(reads)
            times: dict = {}
            with PeakRSS() as mem, timed(times, "prune_s"):
                torch.manual_seed(self.a.seed)
                result = prune(self.model, self.samples, s, progress=False, stats=self.stats)
            row = {"table": table, "label": label, "ratio": s.ratio, "settings": s.to_dict(), "reconstruct": r.method,
                   "recon_settings": r.to_dict() if r.active else None,
                   "params": result.plan.params["after"], "removed_share": result.plan.params["removed_share"],
                   "importance_s": self.stat_time.get(reads, 0.0),
                   "prune_s": times["prune_s"] + self.stat_time.get(reads, 0.0),
                   "prune_peak_rss_mib": max(mem.peak_mib, self.stat_peak.get(reads, 0.0))}
            if r.active:
                info = reconstruct(self.model, result.model, result.plan, self.windows(r), r, progress=False).info
                row.update(reconstruct_s=info["time_s"], reconstruct_peak_rss_mib=info["peak_rss_mib"],
                           rel_err=_mean_errors(info["layers"]))
            row.update(kept_heads=[lp.kept_heads for lp in result.plan.layers],
                       kept_kv=[len(lp.kv_groups) for lp in result.plan.layers],
                       kept_mlp=[len(lp.channels) for lp in result.plan.layers], **self.ppl(result.model, limit))
            return row

        return self.cached(key, make, f"{s.ratio:.0%} {label}, reconstruct {r.method}", label)


def _mean_errors(layers: list[dict]) -> dict:
    """Mean relative output error of the refit projections, sliced vs refit, per kind."""
    out = {}
    for kind in ("attn", "mlp"):
        entries = [e[kind] for e in layers if kind in e and e[kind]["removed_units"] > 0]
        if entries:
            out[kind] = {k: sum(e[k] for e in entries) / len(entries) for k in ("rel_err_sliced", "rel_err_refit")}
    return out


def run(a: argparse.Namespace) -> dict:
    b = Bench(a)
    b.dense_row()
    default = reconstruct_settings(a)
    none = replace(default, method="none")
    # most telling rows first, so an interrupted run (rows are cached) has the headline numbers
    def main_rows(methods, recons):
        for label, overrides, reads in methods:
            for ratio in a.ratios:
                for r in recons:
                    s = PruneSettings(ratio=ratio, seed=a.seed, calib=a.calib, calib_samples=a.calib_samples,
                                      **overrides).validate(reconstructs=r.active)
                    b.pruned_row("main", label, s, reads, r)

    main_rows(METHODS[:2], (default, none))
    if not a.no_ablations:  # reconstruction variants on the first --ablation-limit windows, measured with --units groups
        for ratio in a.ratios:
            s = PruneSettings(ratio=ratio, seed=a.seed, calib=a.calib, calib_samples=a.calib_samples, units="groups").validate()
            for label, overrides in [("default", {})] + ABLATIONS:
                b.pruned_row("ablation", f"saap + lsq, {label}", s, "taylor", replace(default, **overrides).validate())
    if not a.no_ablations:  # attention units, on the ablation windows (the default row above is their reference)
        for ratio in a.ratios:
            for label, overrides in UNIT_VARIANTS:
                s = PruneSettings(ratio=ratio, seed=a.seed, calib=a.calib, calib_samples=a.calib_samples, **overrides).validate()
                b.pruned_row("units", f"saap + lsq, {label}", s, "taylor", default)
    chosen = [(f"saap, {label}", overrides, "taylor") for label, overrides in UNIT_VARIANTS if label in a.units_main]
    main_rows(chosen, (default,))
    # the baselines with the same reconstruction first (the fair comparison), then without it
    main_rows(METHODS[2:], (default,))
    main_rows(METHODS[2:], (none,))
    return {
        "benchmark": "prune_quality",
        "model": b.loaded.source,
        "protocol": {
            "calibration": {"source": a.calib, "samples": a.calib_samples, "seq_len": 128, "seed": a.seed, "sha256": b.calib_hash},
            "reconstruction_default": default.to_dict(),
            "ppl": {"window": 128, "windows_per_dataset": a.limit or "all", "split": "test", "join": "blank lines"},
            "recovery": "none",
            "memory": "peak RSS sampled every 10 ms while the row pruned (including the collection of the statistic it reads) "
                      "and while it reconstructed; one process, dense model loaded",
            "wall_time": "prune_s: ranking + search + slicing plus the collection of the statistic the method reads; "
                         "reconstruct_s: the reconstruct stage alone",
        },
        "statistic_collection_s": b.stat_time,
        "targets_wikitext2": {str(k): v for k, v in TARGETS.items()},
        "command": "python benchmarks/prune_quality.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "versions": versions(),
        "rows": b.rows,
        "not_run": b.missing,
    }


def _cell(row: dict | None, ds: str):
    return row["ppl"][ds] if row else None


def markdown(data: dict) -> str:
    rows, p = data["rows"], data["protocol"]
    datasets = list(rows[0]["ppl"])
    dense = next((r for r in rows if r["table"] == "dense"), None)
    windows = ", ".join(f"{d} {n}" for d, n in (dense or rows[0])["windows"].items())
    cal, rd = p["calibration"], p["reconstruction_default"]
    out = [f"# Pruning quality without recovery training: {data['model']['model']}", "",
           f"Perplexity on non-overlapping 128-token windows of each test set (text joined by blank lines): {windows} windows "
           f"({'the whole test set' if p['ppl']['windows_per_dataset'] == 'all' else 'the first ones only'}). Importance "
           f"calibration {cal['samples']} x {cal['seq_len']} tokens of `{cal['source']}`, seed {cal['seed']}. Reconstruction "
           f"`lsq`: target {rd['target']}, {rd['samples']} x {rd['seq_len']} tokens of the same text (a second seeded draw), "
           f"damping {rd['damp']} of the mean diagonal, selection {rd['select']}, float64 solves. No recovery training. "
           f"Machine: {data['machine']['cores']} CPU cores, float32. Made by `{data['command']}`.", ""]
    main = [r for r in rows if r["table"] == "main"]
    head = ["ratio", "method", "params", "removed"]
    for d in datasets:
        head += [f"{d} none", f"{d} lsq"]
    head += ["prune s", "reconstruct s", "recon / importance", "peak RSS MiB"]
    body = [["0%", "dense", dense["params"], "0.00%"] + [x for d in datasets for x in (dense["ppl"][d], None)] + [None] * 4] if dense else []
    keys = []
    for r in main:
        if (r["ratio"], r["label"]) not in keys:
            keys.append((r["ratio"], r["label"]))
    for ratio, label in keys:
        pair = {r["reconstruct"]: r for r in main if (r["ratio"], r["label"]) == (ratio, label)}
        ref = pair.get("lsq") or pair.get("none")
        cells = [f"{ratio:.0%}", label, ref["params"], f"{ref['removed_share']:.2%}"]
        for d in datasets:
            cells += [_cell(pair.get("none"), d), _cell(pair.get("lsq"), d)]
        lsq = pair.get("lsq")
        importance = lsq.get("importance_s") if lsq else None
        cells += [ref["prune_s"], lsq["reconstruct_s"] if lsq else None,
                  f"{lsq['reconstruct_s'] / importance:.2f}x" if lsq and importance else "-",
                  max(ref["prune_peak_rss_mib"], lsq.get("reconstruct_peak_rss_mib", 0) if lsq else 0)]
        body.append(cells)
    out += ["## Every method, without and with reconstruction", "", format_table(head, body), ""]
    if data.get("not_run"):
        out += [f"Not measured yet ('-' above; `{data['command'].replace(' --cached-only', '')}` measures them and keeps "
                f"the cached rows): {'; '.join(data['not_run'])}.", ""]
    out += _targets(main, datasets[0])
    abl = [r for r in rows if r["table"] == "ablation"]
    if abl:
        head = ["ratio", "variant"] + datasets + ["reconstruct s", "attn err sliced -> refit", "mlp err sliced -> refit"]
        body = []
        for r in sorted(abl, key=lambda r: r["ratio"]):
            name = r["label"]
            errs = [f"{e['rel_err_sliced']:.3f} -> {e['rel_err_refit']:.3f}" if e else "-" for e in
                    (r.get("rel_err", {}).get("attn"), r.get("rel_err", {}).get("mlp"))]
            body.append([f"{r['ratio']:.0%}", name] + [r["ppl"][d] for d in datasets] + [r.get("reconstruct_s")] + errs)
        n_abl = ", ".join(f"{d} {n}" for d, n in abl[0]["windows"].items())
        out += ["## Reconstruction variants (SAAP, --units groups)", "", f"Perplexity on the first windows only ({n_abl}), so these rows compare "
                "with each other, not with the table above. Relative output error of the refit projections on the calibration "
                "tokens, mean over the layers that lost units: ||W_K' x_K - W z||^2 / ||W z||^2.", "",
                format_table(head, body), ""]
    units = [r for r in rows if r["table"] == "units"] + [r for r in abl if r["label"].endswith(", default")]
    if any(r["table"] == "units" for r in units):
        out += _units_table(units, datasets)
    return "\n".join(out)


def _units_table(rows: list[dict], datasets: list[str]) -> list[str]:
    """SAAP with other attention units: what each keeps of attention and MLP, and its perplexity."""
    head = ["ratio", "variant"] + datasets + ["query heads kept", "KV groups kept", "attention-free layers", "MLP channels kept",
                                              "reconstruct s"]
    body = []
    for r in sorted(rows, key=lambda r: (r["ratio"], r["table"] != "ablation")):
        free = sum(1 for h in r["kept_heads"] if h == 0)
        kv = sum(r["kept_kv"]) if "kept_kv" in r else "-"
        name = "units groups (the ablations' default row)" if r["table"] == "ablation" else r["label"].replace("saap + lsq, ", "")
        body.append([f"{r['ratio']:.0%}", name] + [r["ppl"][d] for d in datasets]
                    + [sum(r["kept_heads"]), kv, free, sum(r["kept_mlp"]), r.get("reconstruct_s")])
    n = ", ".join(f"{d} {k}" for d, k in rows[0]["windows"].items())
    return ["## Attention units (SAAP + the default reconstruction)", "",
            f"Perplexity on the first windows only ({n}), comparable with the variants table above. `heads`: query-head "
            "slots (one head of every KV group of a layer at once) may leave; `modules`: a layer's whole attention may "
            "leave (its MLP stays); `scope per kind`: importance fused and standardised per unit kind instead of over all "
            "units. Totals over the 30 layers.", "", format_table(head, body), ""]


def _targets(main: list[dict], ds: str) -> list[str]:
    lines = []
    for ratio, bar in TARGETS.items():
        saap = next((r for r in main if r["ratio"] == ratio and r["label"] == "saap (default)" and r["reconstruct"] == "lsq"), None)
        if saap is None:
            continue
        got = saap["ppl"][ds]
        verdict = "met" if got <= bar else f"missed by {got - bar:.1f} ({got / bar - 1:.0%})"
        others = [r for r in main if r["ratio"] == ratio and r["reconstruct"] == "lsq" and not r["label"].startswith("saap")]
        best = min(others, key=lambda r: r["ppl"][ds], default=None)
        beat = "" if best is None else (f"; best baseline with the same reconstruction: {best['label']} {best['ppl'][ds]:.1f} "
                                        f"({'SAAP ahead' if got < best['ppl'][ds] else 'SAAP behind'})")
        lines.append(f"- {ratio:.0%}: SAAP + reconstruction {got:.1f} on {ds} against the target <= {bar:.0f}: {verdict}{beat}.")
    return (["Targets (full WikiText-2 test set, no recovery training):", ""] + lines + [""]) if lines else []


def main(argv=None) -> None:
    args = parse_args(argv)
    data = run(args)
    paths = write_results(args.out, args.name, data, markdown(data))
    print(markdown(data))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
