"""Where float64 matters in the reconstruction stage (saap_edge/reconstruct.py): float32 against
float64 for the Gram accumulation, the ridge refit solve and the greedy structured OBS selection.

Protocol: SmolLM2-135M (float32, CPU), --samples reconstruction windows of 128 tokens drawn as
compress draws them (calibration_samples(tokenizer, "books", N, 128, seed 0)). One dense forward
pass in batches of 8 windows (the stage's batch size) captures the inputs of o_proj and down_proj
of --layers. For each projection:

(a) Gram G = sum over batches of X^T X, three ways: all in float64 (the reference, used by
    everything below), float32 batch products summed in float64 (what _Moments does today), all
    in float32. Reported: the relative Frobenius error of G, and the refit error (b's fp64 solve)
    obtained from the float32 G.
(b) For each --shares of removed units (MLP channels; attention query heads, blocks of head_dim
    columns), the removed set is chosen by obs_select in float64 on the reference G; then
    refit(w, G, G, keep, damp) with float32 tensors against float64 tensors. Each solution is
    scored in float64 on the reference G: rel_err = output_error(...) (relative squared output
    error, "prefix" target). Also the relative difference of the refit weights.
(c) obs_select in float32 against float64 (same damp, default 16 steps): Jaccard overlap of the
    removed sets and the float64 refit error of each selection. "all fp32" runs (a)-(c) in
    float32 end to end. Times are medians of --repeats calls on this CPU.

    python benchmarks/reconstruct_precision.py --data-dir ../shared/data
    python benchmarks/reconstruct_precision.py --smoke --data-dir ../shared/data   # 4 windows, layer 3, 20% (reconstruct_precision_smoke.*)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine, write_results  # noqa: E402

from saap_edge.data import calibration_samples  # noqa: E402
from saap_edge.models.load import load_model  # noqa: E402
from saap_edge.reconstruct import obs_select, output_error, refit, ridge_lambda  # noqa: E402
from saap_edge.render import format_table  # noqa: E402

PROJECTIONS = {"o_proj": "self_attn.o_proj", "down_proj": "mlp.down_proj"}
SEQ_LEN, BATCH = 128, 8
F32, F64 = torch.float32, torch.float64


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--samples", type=int, default=32, help="reconstruction windows of 128 tokens")
    p.add_argument("--layers", type=int, nargs="+", default=[3, 10, 20, 28])
    p.add_argument("--shares", type=float, nargs="+", default=[0.2, 0.5], help="share of units removed")
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per variant (median)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--smoke", action="store_true", help="4 windows, layer 3, 20%% removed, one timed call: a check of this "
                                                        "script; results reconstruct_precision_smoke.*")
    a = p.parse_args(argv)
    if a.smoke:
        a.samples, a.layers, a.shares, a.repeats = 4, [3], [0.2], 1
    return a


def timed(fn, repeats: int):
    """(fn()'s result, median wall seconds over `repeats` calls)."""
    times, result = [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return result, statistics.median(times)


@torch.no_grad()
def capture_inputs(model, samples: torch.Tensor, layers: list[int]) -> dict:
    """{(layer, projection name): [float32 input batches, tokens x in]} from one dense pass."""
    store: dict = {(i, name): [] for i in layers for name in PROJECTIONS}
    handles = []
    for i in layers:
        layer = model.model.layers[i]
        for name, path in PROJECTIONS.items():
            module = layer.get_submodule(path)
            hook = lambda m, args, key=(i, name): store[key].append(flat(args[0]))  # noqa: E731
            handles.append(module.register_forward_pre_hook(hook))
    try:
        for s in range(0, len(samples), BATCH):
            model.model(input_ids=samples[s:s + BATCH])
    finally:
        for h in handles:
            h.remove()
    return store


def flat(x: torch.Tensor) -> torch.Tensor:
    """A captured input as a float32 [tokens, in] copy."""
    return x.reshape(-1, x.shape[-1]).float().clone()


def gram_fp64(batches):
    return sum(x.double().T @ x.double() for x in batches)


def gram_pipeline(batches):
    """As _Moments.add: float32 batch products, summed in float64."""
    return sum((x.T @ x).double() for x in batches)


def gram_fp32(batches):
    return sum(x.T @ x for x in batches)


def rel_fro(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm(a.double() - ref) / torch.linalg.norm(ref))


def chol_ok(gram: torch.Tensor, keep: torch.Tensor, damp: float) -> bool:
    """Whether the refit's Cholesky of G_KK + lambda I succeeds first time in gram's dtype
    (refit would otherwise add damping silently)."""
    g_kk = gram[keep][:, keep]
    lam = ridge_lambda(g_kk, damp)
    return int(torch.linalg.cholesky_ex(g_kk + lam * torch.eye(len(keep), dtype=gram.dtype))[1]) == 0


def condition(gram: torch.Tensor, keep: torch.Tensor, damp: float) -> float:
    """Condition number of G_KK + lambda I (float64)."""
    g_kk = gram[keep][:, keep]
    eig = torch.linalg.eigvalsh(g_kk + ridge_lambda(g_kk, damp) * torch.eye(len(keep), dtype=F64))
    return float(eig[-1] / eig[0])


def keep_of(removed: list[int], n_units: int, width: int) -> torch.Tensor:
    gone = set(removed)
    return torch.tensor([u * width + j for u in range(n_units) if u not in gone for j in range(width)], dtype=torch.long)


def jaccard(a: list[int], b: list[int]) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def scorer(w64: torch.Tensor, g64: torch.Tensor):
    """rel_err(w_k, keep): a refit's relative output error, in float64 on the reference Gram."""
    return lambda w_k, keep: output_error(w_k.double(), w64, g64, g64, g64, keep)


def measure_gram(batches: list[torch.Tensor], repeats: int) -> tuple[dict, dict]:
    """The three Grams and their errors / times."""
    g64, t64 = timed(lambda: gram_fp64(batches), repeats)
    gpipe, tpipe = timed(lambda: gram_pipeline(batches), repeats)
    g32, t32 = timed(lambda: gram_fp32(batches), repeats)
    stats = {"tokens": sum(len(x) for x in batches), "in": batches[0].shape[1],
             "gram_err_pipeline": rel_fro(gpipe, g64), "gram_err_fp32": rel_fro(g32, g64),
             "diag_err_fp32": float(((g32.diagonal().double() - g64.diagonal()).abs() / g64.diagonal()).max()),
             "nonfinite_fp32": not bool(torch.isfinite(g32).all()),
             "time_fp64_s": t64, "time_pipeline_s": tpipe, "time_fp32_s": t32}
    return {"fp64": g64, "pipeline": gpipe, "fp32": g32}, stats


def measure_selection(w64, g64, g32, width, n_remove, damp, repeats) -> dict:
    """(c): obs_select in float64 and float32, the Jaccard overlap and each selection's fp64 refit error."""
    n_units = g64.shape[0] // width
    sel64, t64 = timed(lambda: obs_select(w64, g64, width, n_remove, damp), repeats)
    sel32, t32 = timed(lambda: obs_select(w64.float(), g64.float(), width, n_remove, damp), repeats)
    sel_all32 = obs_select(w64.float(), g32, width, n_remove, damp)
    score = scorer(w64, g64)
    keep32 = keep_of(sel32, n_units, width)
    hchol = torch.linalg.cholesky_ex(g64.float() + ridge_lambda(g64.float(), damp) * torch.eye(len(g64)))[1]
    return {"removed64": sel64, "removed32": sel32, "removed_all32": sel_all32, "jaccard": jaccard(sel64, sel32),
            "jaccard_all32": jaccard(sel64, sel_all32),
            "rel_err_select32": score(refit(w64, g64, g64, keep32, damp), keep32),
            "select_chol_ok_fp32": int(hchol) == 0, "time_select_fp64_s": t64, "time_select_fp32_s": t32}


def measure_refit(w64, grams, keep, damp, repeats) -> dict:
    """(b): refit with float64 tensors, float32 tensors, and float64 on the float32-accumulated Gram."""
    g64, g32 = grams["fp64"], grams["fp32"]
    score = scorer(w64, g64)
    r64, t64 = timed(lambda: refit(w64, g64, g64, keep, damp), repeats)
    r32, t32 = timed(lambda: refit(w64.float(), g64.float(), g64.float(), keep, damp), repeats)
    e64, e32 = score(r64, keep), score(r32, keep)
    return {"cond": condition(g64, keep, damp), "rel_err_sliced": score(w64[:, keep], keep),
            "rel_err_fp64": e64, "rel_err_fp32": e32, "abs_diff": abs(e32 - e64), "rel_diff": abs(e32 - e64) / e64,
            "weight_rel_diff": rel_fro(r32, r64), "nonfinite_fp32": not bool(torch.isfinite(r32).all()),
            "chol_ok_fp32": chol_ok(g64.float(), keep, damp),
            "rel_err_gram_pipeline": score(refit(w64, grams["pipeline"], grams["pipeline"], keep, damp), keep),
            "rel_err_gram_fp32": score(refit(w64, g32.double(), g32.double(), keep, damp), keep),
            "time_refit_fp64_s": t64, "time_refit_fp32_s": t32}


def measure_projection(w64: torch.Tensor, grams: dict, width: int, a) -> list[dict]:
    """Rows of one projection, one per removed share."""
    n_units = w64.shape[1] // width
    rows = []
    for share in a.shares:
        n_remove = max(1, int(share * n_units + 0.5))
        sel = measure_selection(w64, grams["fp64"], grams["fp32"], width, n_remove, a.damp, a.repeats)
        row = {"share": share, "units": n_units, "removed": n_remove, **sel}
        row.update(measure_refit(w64, grams, keep_of(sel["removed64"], n_units, width), a.damp, a.repeats))
        keep_all32 = keep_of(sel["removed_all32"], n_units, width)
        w_all32 = refit(w64.float(), grams["fp32"], grams["fp32"], keep_all32, a.damp)
        row["rel_err_all32"] = scorer(w64, grams["fp64"])(w_all32, keep_all32)
        row["differ_fp32_sel"] = len(set(row.pop("removed64")) ^ set(row.pop("removed32")))  # units in one set only
        row["differ_all32_sel"] = len(set(sel["removed64"]) ^ set(row.pop("removed_all32")))
        rows.append(row)
    return rows


def run(a) -> dict:
    torch.manual_seed(0)
    loaded = load_model(a.model, device="cpu", dtype="float32")
    samples, digest = calibration_samples(loaded.tokenizer, "books", a.samples, SEQ_LEN, 0, a.data_dir,
                                          flag="--samples")
    captured = capture_inputs(loaded.model, samples, a.layers)
    head_dim = loaded.model.config.hidden_size // loaded.model.config.num_attention_heads
    grams_out, rows = [], []
    for (i, name), batches in captured.items():
        grams, stats = measure_gram(batches, a.repeats)
        grams_out.append({"layer": i, "proj": name, **stats})
        w64 = loaded.model.model.layers[i].get_submodule(PROJECTIONS[name]).weight.detach().double()
        width = head_dim if name == "o_proj" else 1
        for row in measure_projection(w64, grams, width, a):
            rows.append({"layer": i, "proj": name, "unit": "head" if width > 1 else "channel", **row})
        print(f"layer {i} {name}: done", flush=True)
    return {"protocol": {"model": a.model, "samples": a.samples, "seq_len": SEQ_LEN, "batch": BATCH, "source": "books",
                         "samples_sha256": digest, "layers": a.layers, "shares": a.shares, "damp": a.damp,
                         "obs_steps": 16, "repeats": a.repeats, "torch": torch.__version__,
                         "threads": torch.get_num_threads()},
            "machine": machine(), "grams": grams_out, "rows": rows,
            "command": "python benchmarks/reconstruct_precision.py " + " ".join(sys.argv[1:])}


THRESHOLD = 1e-3  # "no measurable loss": rel_err changes by less than this, relative


def verdicts(data: dict) -> dict:
    """Worst relative change of rel_err per point, and whether it is under THRESHOLD."""
    rows = data["rows"]
    worst = {"(a) Gram, fp32 products + fp64 sum": max(abs(r["rel_err_gram_pipeline"] / r["rel_err_fp64"] - 1) for r in rows),
             "(a) Gram, all fp32": max(abs(r["rel_err_gram_fp32"] / r["rel_err_fp64"] - 1) for r in rows),
             "(b) refit solve fp32": max(r["rel_diff"] for r in rows),
             "(c) obs_select fp32": max(abs(r["rel_err_select32"] / r["rel_err_fp64"] - 1) for r in rows),
             "all fp32 (a)+(b)+(c)": max(abs(r["rel_err_all32"] / r["rel_err_fp64"] - 1) for r in rows)}
    return {k: {"worst_rel_change": v, "ok": v < THRESHOLD} for k, v in worst.items()}


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def main_table(rows: list[dict]) -> str:
    head = ["layer", "proj", "removed", "rel_err fp64", "rel_err fp32 refit", "abs diff", "rel diff", "overlap fp32 sel",
            "rel_err fp32 sel", "refit ms fp64/fp32", "select ms fp64/fp32"]
    body = [[r["layer"], r["proj"], f"{r['share']:.0%} ({r['removed']}/{r['units']} {r['unit']}s)", r["rel_err_fp64"],
             r["rel_err_fp32"], f"{r['abs_diff']:.1e}", f"{r['rel_diff']:.1e}",
             f"{r['jaccard']:.3f} ({r['differ_fp32_sel']} differ)", r["rel_err_select32"],
             f"{ms(r['time_refit_fp64_s'])}/{ms(r['time_refit_fp32_s'])}",
             f"{ms(r['time_select_fp64_s'])}/{ms(r['time_select_fp32_s'])}"] for r in rows]
    return format_table(head, body)


def gram_table(data: dict) -> str:
    by_proj = {(r["layer"], r["proj"]): [] for r in data["rows"]}
    for r in data["rows"]:
        by_proj[(r["layer"], r["proj"])].append(r)
    head = ["layer", "proj", "tokens", "G err fp32 prod/fp64 sum", "G err fp32", "max diag err fp32",
            "rel_err change (prod/sum, fp32), worst share", "ms fp64 / prod+sum / fp32"]
    body = []
    for g in data["grams"]:
        rs = by_proj[(g["layer"], g["proj"])]
        pipe = max(abs(r["rel_err_gram_pipeline"] / r["rel_err_fp64"] - 1) for r in rs)
        full = max(abs(r["rel_err_gram_fp32"] / r["rel_err_fp64"] - 1) for r in rs)
        body.append([g["layer"], g["proj"], g["tokens"], f"{g['gram_err_pipeline']:.1e}", f"{g['gram_err_fp32']:.1e}",
                     f"{g['diag_err_fp32']:.1e}", f"{pipe:.1e}, {full:.1e}",
                     f"{ms(g['time_fp64_s'])} / {ms(g['time_pipeline_s'])} / {ms(g['time_fp32_s'])}"])
    return format_table(head, body)


def numerics_table(rows: list[dict]) -> str:
    head = ["layer", "proj", "removed", "cond(G_KK + lambda I)", "rel_err sliced", "W rel diff fp32",
            "fp32 Cholesky ok (refit, select)", "fp32 non-finite", "overlap all fp32", "rel_err all fp32"]
    body = [[r["layer"], r["proj"], f"{r['share']:.0%}", f"{r['cond']:.2e}", r["rel_err_sliced"],
             f"{r['weight_rel_diff']:.1e}",
             f"{r['chol_ok_fp32']}, {r['select_chol_ok_fp32']}", str(r["nonfinite_fp32"]), f"{r['jaccard_all32']:.3f}",
             r["rel_err_all32"]] for r in rows]
    return format_table(head, body)


def markdown(data: dict) -> str:
    p = data["protocol"]
    verdict = "\n".join(f"- {k}: worst relative change of rel_err {v['worst_rel_change']:.1e} -> "
                        f"{'no measurable loss' if v['ok'] else 'MEASURABLE'}" for k, v in data["verdicts"].items())
    return "\n\n".join([
        "# Reconstruction precision: float32 against float64",
        f"Protocol: {p['model']} (float32, CPU, {p['threads']} threads, torch {p['torch']}), {p['samples']} windows of "
        f"{p['seq_len']} tokens from `{p['source']}` (seed 0, as compress draws them), dense-stream inputs of o_proj and "
        f"down_proj in layers {', '.join(map(str, p['layers']))}, captured in batches of {p['batch']} windows. Removed "
        f"sets of {', '.join(f'{s:.0%}' for s in p['shares'])} of the query heads (o_proj, blocks of head_dim columns) and "
        f"MLP channels (down_proj) chosen by obs_select in float64 ({p['obs_steps']} steps); ridge damp {p['damp']}. "
        "rel_err is output_error (relative squared output error, \"prefix\" target) of the refit, always evaluated in "
        "float64 on the float64 Gram; fp32 variants run the pure functions of saap_edge.reconstruct on float32 tensors. "
        f"Times: median of {p['repeats']} CPU calls (a CPU runs float64 at about half the float32 rate, a consumer GPU at "
        "1/64, so they show cost, not the GPU gain). Threshold for \"no measurable loss\": rel_err changes by less than "
        f"{THRESHOLD:g} relative.",
        "## Verdicts\n\n" + verdict,
        "## (b) refit solve and (c) selection\n\n" + main_table(data["rows"]),
        "## (a) Gram accumulation\n\nG err: relative Frobenius error against the all-float64 Gram. \"fp32 prod/fp64 sum\" "
        "is what `_Moments.add` does today. rel_err change: the fp64 refit solved on that Gram, scored on the fp64 one.\n\n"
        + gram_table(data),
        "## Numerics\n\n" + numerics_table(data["rows"]),
        f"Command: `{data['command']}`\n"])


def main(argv=None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    data = run(a)
    data["verdicts"] = verdicts(data)
    text = markdown(data)
    paths = write_results(a.out, "reconstruct_precision" + ("_smoke" if a.smoke else ""), data, text)
    print(text)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
