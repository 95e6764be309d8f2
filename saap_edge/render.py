"""Everything a person reads: Markdown tables and PNG charts of compress, AdaPruner, HyWIA and bench.

Each chart is written whole (a temporary name renamed when complete), like every other output.
"""

from __future__ import annotations

from pathlib import Path

from saap_edge.outputs import write_file, write_json, written_whole
from saap_edge.prune.groups import ATTN, HEAD, MLP
from saap_edge.prune.plan import PrunePlan
from saap_edge.run_report import RunReport


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """`fig` as a PNG at `path` (its folder made if missing, as write_file does), written whole, and closed."""
    import matplotlib.pyplot as plt

    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with written_whole(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)


# ------------------------------------------------------------------ compress


def format_table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (also readable in a terminal)."""
    cells = [[str(c) for c in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def before_after_table(report: RunReport) -> str:
    params = report.params
    rows = [["parameters", params["before"], params["after"]]]
    rows.append(["removed share", None, f"{params['removed_share']:.2%} (asked {report.settings['ratio']:.0%})"])
    recovery = report.recovery
    for name, result in report.ppl.items():
        dense = result["before"]["ppl"] if result.get("before") else None
        row = [f"PPL {name} ({result['after']['windows']} x {result['after']['window']} tok)", dense, result["after"]["ppl"]]
        if recovery:
            row.append(result["recovered"]["ppl"] if "recovered" in result else None)
        rows.append(row)
    recon = report.reconstruction or {}
    refit = recon.get("method", "none") != "none"
    headers = ["", "dense", report.settings["method"] + (" + refit" if refit else "")]
    if recovery:
        rows[0].append(rows[0][2])
        rows[1].append(_recovery_label(recovery))
        trained = "+".join(recovery.get("trained") or [])
        how = f"{trained} ({recovery['settings']['loss']})" if trained and recovery.get("settings", {}).get("loss") else recovery["recovery"]
        headers.append(f"+ {how}" + (" int4" if "group_size" in recovery else ""))
    if refit:
        detail = (f"{recon['method']}, target {recon['target']}, {recon['samples']} x {recon['seq_len']} tok, "
                  f"select {recon['select']}, {recon['time_s']:.0f} s")
        rows.insert(2, ["reconstruction", None, detail] + [None] * (len(headers) - 3))
    return format_table(headers, rows)


def _recovery_label(recovery: dict) -> str:
    parts = []
    if "group_size" in recovery:
        parts.append(f"int4 G={recovery['group_size']}")
    if recovery.get("steps"):
        parts.append(f"{recovery['steps']} steps")
    return ", ".join(parts) or "-"


def plot_layers(plan: PrunePlan, path: Path, title: str) -> None:
    """Bars of query heads and MLP width per layer, dense vs kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = plan.summary_rows()
    layers = [r[0] for r in rows]
    fig, axes = plt.subplots(2, 1, figsize=(max(6, len(layers) * 0.3), 5), sharex=True)
    for ax, (before, after, label) in zip(axes, ((1, 2, "query heads"), (3, 4, "MLP width"))):
        ax.bar(layers, [r[before] for r in rows], color="#d0d0d0", label="dense")
        ax.bar(layers, [r[after] for r in rows], color="#2f6db5", label="kept")
        ax.set_ylabel(label)
    axes[0].legend(loc="lower right", fontsize=8)
    axes[0].set_title(title, fontsize=10)
    axes[1].set_xlabel("decoder layer")
    fig.tight_layout()
    save_figure(fig, path)


# ------------------------------------------------------------------ HyWIA
BLEND_CHART = "hywia_blend.png"


def plot_blend(record: dict, path) -> None:
    """Chart: the learned share of the coarse granularity per layer, one line per unit kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    kinds = sorted({b["kind"] for b in record["blend"]})
    for kind in kinds:
        rows = [b for b in record["blend"] if b["kind"] == kind]
        ax.plot([b["layer"] for b in rows], [b["coarse"] for b in rows], marker="o", label={ATTN: "KV groups", MLP: "MLP channels", HEAD: "query heads"}.get(kind, kind))
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_ylim(0, 1)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("weight of the coarse score")
    ax.set_title(f"HyWIA blend ({record['blend_mode']}; fine = {record['fine']} order)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


# ------------------------------------------------------------------ AdaPruner


def write_search(directory: Path, info: dict) -> None:
    """search.json (every trial), search.md (a table) and search.png (best objective so far)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_json(directory / "search.json", info)
    trials = info["trials"]
    rows = [[t["number"], t["metric"], len(t["windows"]), t["value"]] for t in trials]
    per_trial = sum(info["trial_s"]) / len(info["trial_s"]) if info["trial_s"] else None
    lines = [f"# AdaPruner search: {len(trials)} trials", "",
             f"Objective: perplexity on {info['identity']['objective']} windows (validation split). Best: "
             f"{info['best']['metric']} on windows {info['best']['windows']}, {info['best']['value']:.3f}.",
             f"Pool statistics {info['pool_s']:.0f} s ({'cached' if info['pool_cache']['cached'] else 'computed'}); "
             + (f"{per_trial:.1f} s per trial run in this process." if per_trial else "no trial ran in this process."),
             "", format_table(["trial", "metric", "windows", "objective"], rows), ""]
    write_file(directory / "search.md", "\n".join(lines))
    best, so_far = float("inf"), []
    for t in trials:
        best = min(best, t["value"])
        so_far.append(best)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([t["number"] for t in trials], [t["value"] for t in trials], "o", alpha=0.4, label="trial")
    ax.plot([t["number"] for t in trials], so_far, "-", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, directory / "search.png", dpi=100)


# ------------------------------------------------------------------ bench
BENCH_HEADERS = ["model", "runtime", "params", "artifact MiB", "weights MiB", "peak memory MiB", "prefill tok/s", "decode tok/s",
           "decode vs dense", "weights read / token MiB", "roofline tok/s", "% of roofline"]


def _mib(x) -> str:
    return f"{x / 2**20:,.1f}" if x else "-"


def _speed(s: dict) -> str:
    return f"{s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}]"


def bench_table_rows(data: dict) -> list[list[str]]:
    rows = []
    for r in data["rows"]:
        if r["status"] != "ok":
            continue
        vs = (r.get("vs_dense") or {}).get("decode_tok_s")
        rows.append([
            r["model"], r["runtime"] + (f" ({r['provider'].replace('ExecutionProvider', '')})" if r.get("provider") else ""),
            f"{r['params'] / 1e6:.2f}M" if r.get("params") else "-",
            _mib(r.get("artifact_bytes")), _mib(r.get("weight_bytes")), f"{r['peak_memory_mib']:,.1f}",
            _speed(r["prefill_tok_s"]), _speed(r["decode_tok_s"]), f"{vs:.2f}x" if vs else "-",
            _mib(r.get("bytes_per_token")), f"{r['roofline_tok_s']:.1f}" if r.get("roofline_tok_s") else "-",
            f"{r['roofline_share']:.0%}" if r.get("roofline_share") else "-",
        ])
    return rows


def bench_markdown(data: dict) -> str:
    s, bw = data["settings"], data["bandwidth"]
    lines = [
        "# saap-edge bench: memory, parameters and tokens/s (Table III layout)",
        "",
        f"Batch 1, greedy; prompt {s['prompt_tokens']} tokens (fixed random ids, seed 0), {s['new_tokens']} generated "
        f"tokens, end-of-text ignored; {s['warmup']} warm-up run(s) excluded, then {s['reps']} timed runs: median "
        f"[min-max]. Decode tok/s counts the steps after the first generated token. Threads: "
        f"{s['threads'] or 'runtime default'}. Peak memory: {_memory_kind(data)}. Ratios are to the dense row of "
        f"the same runtime in this run.",
        "",
        f"Roofline: memory read bandwidth {bw['gbs']:.1f} GB/s ({bw['method']}, {bw.get('threads', '-')} thread(s), "
        f"best of {bw['reps']}); a batch-1 decode step reads every weight once (one embedding row; norms included, "
        "KV cache not), so roofline tok/s = bandwidth / weights read per token.",
        "",
        "Artifact MiB: the GGUF file, or an ONNX folder's graph and weight files (tokenizer files aside). Weights "
        "MiB: the stored tensors alone (a GGUF's tokenizer metadata aside), which the size targets compare with the "
        "dense model's parameters at two bytes each.",
        "",
        format_table(BENCH_HEADERS, bench_table_rows(data)),
        "",
    ]
    failed = [r for r in data["rows"] if r["status"] != "ok"]
    if failed:
        lines += ["Rows that failed or were skipped:", ""] + [f"- {r['model']} / {r['runtime']}: {r['reason']}" for r in failed] + [""]
    ideal = [r for r in data["rows"] if r["status"] == "ok" and r["model"] != "dense"
             and (r.get("vs_dense") or {}).get("ideal_decode")]
    if ideal:
        lines += ["Decode speed-up over the dense model in the same runtime, against the ratio of weight bytes read "
                  "per token (the ideal for a memory-bound decode):", ""]
        lines += [f"- {r['model']} / {r['runtime']}: {r['vs_dense']['decode_tok_s']:.2f}x measured, "
                  f"{r['vs_dense']['ideal_decode']:.2f}x ideal ({r['vs_dense']['decode_tok_s'] / r['vs_dense']['ideal_decode']:.0%})"
                  for r in ideal] + [""]
    if data.get("targets"):
        lines += ["Targets:", ""]
        for t in data["targets"]:
            lines.append(f"- {t['target']}: measured {t['measured']:.0%} (bar {t['bar']:.0%}) -> "
                         f"{'met' if t['met'] else 'MISSED by ' + format(abs(t['measured'] - t['bar']), '.0%')}")
        lines.append("")
    lines += [f"Machine: {data['machine']}.", ""]
    return "\n".join(lines)


def _memory_kind(data: dict) -> str:
    kinds = {r.get("memory_kind") for r in data["rows"] if r["status"] == "ok"}
    return ", ".join(sorted(k for k in kinds if k)) or "-"


def bench_charts(data: dict, out: Path) -> list[Path]:
    """bench_memory.png and bench_speed.png: grouped bars, one group per runtime."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in data["rows"] if r["status"] == "ok"]
    if not ok:
        return []
    runtimes = list(dict.fromkeys(r["runtime"] for r in ok))
    models = list(dict.fromkeys(r["model"] for r in ok))
    paths = []
    for name, key, label in (("bench_memory.png", "peak_memory_mib", "peak memory (MiB)"),
                             ("bench_speed.png", "decode_tok_s", "decode tokens/s (median)")):
        fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(runtimes), 3.6))
        width = 0.8 / len(models)
        for j, m in enumerate(models):
            xs, ys = [], []
            for i, rt in enumerate(runtimes):
                r = next((r for r in ok if r["model"] == m and r["runtime"] == rt), None)
                if r is not None:
                    xs.append(i + j * width)
                    ys.append(r[key]["median"] if isinstance(r[key], dict) else r[key])
            ax.bar(xs, ys, width, label=m)
            if key == "decode_tok_s":
                roof = [(i + j * width, r["roofline_tok_s"]) for i, rt in enumerate(runtimes)
                        for r in ok if r["model"] == m and r["runtime"] == rt and r.get("roofline_tok_s")]
                if roof:
                    ax.scatter(*zip(*roof), marker="_", s=300, color="black", zorder=3,
                               label="bandwidth roofline" if j == 0 else None)
        ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(runtimes))], runtimes)
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
        fig.tight_layout()
        save_figure(fig, out / name)
        paths.append(out / name)
    return paths


def write_bench_outputs(data: dict, out: Path) -> None:
    write_json(out / "bench.json", data)
    write_file(out / "bench.md", bench_markdown(data))
    bench_charts(data, out)
