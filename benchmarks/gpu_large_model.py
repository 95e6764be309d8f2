"""LLaMA-7B on one 24 GiB card, through the real CLI: the GPU half of benchmarks/large_model.py.

On the GPU machine (benchmarks/gpu_check.sh runs it), this process caps its CUDA allocator at
24 GiB (`torch.cuda.set_per_process_memory_fraction`, what an RTX 3090 holds), builds a
random-weight LLaMA-7B directory (bf16 safetensors, the shape of benchmarks/large_model.py's
`7b-32l`, its tokenizer carried in the data folder), and runs `saap-edge compress` (the
defaults, kd recovery included, with a short recovery budget stated in the results),
`export --format gguf` and `eval --ppl` in this same process (so the cap holds for them),
each stage's wall time and CUDA allocator peak recorded (compress also records each of its
own stages: report.json `memory_measured`). Then Table III rows: torch fp16 decode of the
dense model and of SAAP 20% / 50% at the paper's sizes (benchmarks/gpu_check.py's rows).

    python benchmarks/gpu_large_model.py --data-dir DATA [--out benchmarks/results/gpu] [--small]

`--small` runs the same code on the 4-layer LLaMA-7B widths (on a CPU too, without the cap):
what checks this script where no GPU is lent. Results: gpu_large_model.json / .md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import large_model  # noqa: E402  (the random-weight builder and tokenizer)

CARD_GIB = 24
PAPER = {"dense": (12884.5, 25.84), "20%": (10055.7, 34.15), "50%": (5940.8, 42.72)}  # Table III, RTX 3090
RECOVERY_BUDGET = ["--recover-steps", "20"]  # the defaults otherwise (2 epochs would take about an hour)


def cap(device: torch.device) -> dict:
    total = torch.cuda.get_device_properties(device).total_memory
    share = min(1.0, CARD_GIB * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(share, device)
    return {"card_total_gib": total / 2**30, "cap_gib": CARD_GIB, "fraction": share}


def stage(name: str, argv: list[str], device: torch.device) -> dict:
    """One CLI command in this process: rc, wall time, the allocator's peak during it."""
    from saap_edge.cli import main

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        rc = main(argv)
    except Exception as exc:  # noqa: BLE001 - a stage that crashes is a result (an OOM above all)
        rc, error = 1, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    else:
        error = None
    row = {"stage": name, "argv": argv, "rc": rc, "wall_s": time.perf_counter() - t0, "error": error}
    if device.type == "cuda":
        row["card_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(row), flush=True)
    return row


def build(work: Path, shape: str, data_dir: Path) -> Path:
    tok = work / "tokenizer-32000"
    if not tok.exists():
        carried = data_dir / "tokenizer-32000"
        if carried.exists():
            shutil.copytree(carried, tok)
        else:
            large_model.build_tokenizer(tok, data_dir)
    dense = work / shape / "dense"
    if not dense.exists():
        dense.parent.mkdir(parents=True, exist_ok=True)
        large_model.build_model(shape, dense, tok)
    return dense


def run(a: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = "7b-4l" if a.small else "7b-32l"
    out: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "shape": shape,
                 "torch": torch.__version__, "recovery_budget": RECOVERY_BUDGET}
    if device.type == "cuda":
        out["cap"] = cap(device)
    dense = build(a.work, shape, a.data_dir)
    slim = a.work / shape / "saap-20"
    common = ["--data-dir", str(a.data_dir), "--no-progress"]
    keep = ["--keep-first", "0", "--keep-last", "0"] if a.small else []
    out["stages"] = [
        stage("compress --dry-run", ["compress", "--model", str(dense), "--out", str(slim), "--dry-run", *common,
                                     "--max-memory", f"0={CARD_GIB}GiB"] if device.type == "cuda" else
              ["compress", "--model", str(dense), "--out", str(slim), "--dry-run", *common], device),
        stage("compress", ["compress", "--model", str(dense), "--out", str(slim), "--overwrite", *keep, *RECOVERY_BUDGET,
                           "--teacher-cache", str(a.work / "teacher-cache"), *common], device),
        stage("export gguf", ["export", str(slim), "--format", "gguf", "--overwrite"], device),
        stage("eval", ["eval", str(slim), "--ppl", "wikitext2", "--limit", "32", "--data-dir", str(a.data_dir),
                       "--no-progress"], device),
    ]
    report = slim / "report.json"
    if report.exists():
        r = json.loads(report.read_text())
        out["compress_report"] = {k: r.get(k) for k in ("time_s", "memory_estimate", "memory_measured", "params")}
    out["table3"] = table3(device, a.small)
    return out


def table3(device: torch.device, small: bool) -> list[dict]:
    """Decode rows in torch fp16 at the paper's sizes (benchmarks/gpu_check.py's measurement)."""
    import gpu_check

    cfg = dict(gpu_check.LLAMA_7B, num_hidden_layers=4) if small else gpu_check.LLAMA_7B
    rows = []
    for label, target in (("dense", None), ("20%", 5.26e9), ("50%", 3.12e9)):
        if small and target:
            target = target * 4 / 32
        new = 8 if small else 128
        rows.append(gpu_check.decode_row(label, gpu_check.shaped(cfg, target), device, 128, new, 1 if small else 3, None))
    return rows


def markdown(d: dict) -> str:
    lines = [f"# LLaMA-7B on one {CARD_GIB} GiB card: {d['device']}", "",
             f"Shape {d['shape']} (random bf16 weights), torch {d['torch']}; the CUDA allocator capped at "
             f"{CARD_GIB} GiB in this process; compress with the defaults except {' '.join(d['recovery_budget'])}.", "",
             "| stage | rc | wall s | card peak MiB |", "|---|---|---|---|"]
    for s in d["stages"]:
        peak = f"{s['card_peak_mib']:.0f}" if "card_peak_mib" in s else "-"
        lines.append(f"| {s['stage']} | {s['rc']} | {s['wall_s']:.1f} | {peak} |")
    measured = (d.get("compress_report") or {}).get("memory_measured") or {}
    if measured:
        lines += ["", "compress, per stage (report.json):", "", "| stage | card peak MiB | host peak MiB |", "|---|---|---|"]
        for name, m in measured.items():
            lines.append(f"| {name} | {m.get('card_peak_mib', '-')} | {m.get('host_peak_mib', '-')} |")
    lines += ["", "Table III (torch fp16, batch 1, 128-token prompt, 128 greedy tokens):", "",
              "| model | params | memory MiB | tok/s | paper MiB | paper tok/s |", "|---|---|---|---|---|---|"]
    for r in d["table3"]:
        mib, tok = PAPER[r["model"]]
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in r else "-"
        lines.append(f"| {r['model']} | {r['params'] / 1e9:.2f}B | {peak} | {r['decode_tok_s']:.2f} | {mib} | {tok} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True, help="text/books/*.txt, wikitext2 and (optionally) tokenizer-32000/")
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "gpu_large_model")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu")
    p.add_argument("--small", action="store_true", help="the 4-layer LLaMA-7B widths (a CPU check of this script)")
    a = p.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    data = run(a)
    name = "gpu_large_model_small" if a.small else "gpu_large_model"
    (a.out / f"{name}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (a.out / f"{name}.md").write_text(markdown(data))
    print(markdown(data))
    return 0 if all(s["rc"] == 0 for s in data["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
