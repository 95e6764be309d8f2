"""Bench results as Markdown (Table III layout), JSON and PNG charts."""

from __future__ import annotations

import json
from pathlib import Path

from saap_edge.report import format_table

HEADERS = ["model", "runtime", "params", "artifact MiB", "weights MiB", "peak memory MiB", "prefill tok/s", "decode tok/s",
           "decode vs dense", "weights read / token MiB", "roofline tok/s", "% of roofline"]


def _mib(x) -> str:
    return f"{x / 2**20:,.1f}" if x else "-"


def _speed(s: dict) -> str:
    return f"{s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}]"


def table_rows(data: dict) -> list[list[str]]:
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


def markdown(data: dict) -> str:
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
        format_table(HEADERS, table_rows(data)),
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


def charts(data: dict, out: Path) -> list[Path]:
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
        path = out / name
        tmp = path.with_name(".tmp-" + path.name)
        fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        tmp.replace(path)
        paths.append(path)
    return paths


def write_outputs(data: dict, out: Path) -> None:
    for name, text in (("bench.json", json.dumps(data, indent=1, default=str) + "\n"), ("bench.md", markdown(data))):
        tmp = out / f".tmp-{name}"
        tmp.write_text(text)
        tmp.replace(out / name)
    charts(data, out)
