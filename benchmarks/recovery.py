"""Recovery quality: what int4 and training cost and recover on a model pruned 20% by SAAP.

Rows (each a child process, so its peak RSS is its own):
  dense fp32                      saap-edge eval <model>
  pruned fp32                     saap-edge eval <pruned>
  pruned + int4 RTN (G)           saap-edge recover <pruned> --recovery none
  pruned + QA-LoRA int4, K steps  saap-edge recover <pruned> --recovery qalora --recover-steps K
  pruned + fp LoRA, K steps       saap-edge recover <pruned> --recovery lora --recover-steps K
  (--extra-lr adds QA-LoRA rows at other learning rates)

Protocol: WikiText-2 test, the first --limit non-overlapping 128-token windows (text joined by
blank lines). Recovery: `books` text, 128-token windows, batch 8, AdamW, linear warm-up over
10% of the steps then linear decay, LoRA rank 8 / alpha 16 / dropout 0.05 on all seven
projections, seed 0; 16 windows of the recovery text held out. The pruned model is made
once with `saap-edge compress --ratio 0.2 --no-recover` (calibration 50 x 128 books, seed 0).
Results are rewritten after every row, so an interrupted run keeps what it measured.

    python benchmarks/recovery.py --data-dir ../shared/data --steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine, run_child, write_results  # noqa: E402

from saap_edge.compress import versions  # noqa: E402
from saap_edge.report import format_table  # noqa: E402

CLI = [sys.executable, "-m", "saap_edge.cli"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--steps", type=int, default=200, help="K: optimizer steps of each trained row")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--extra-lr", type=float, nargs="*", default=[], help="more QA-LoRA rows at these learning rates")
    p.add_argument("--limit", type=int, default=64, help="WikiText-2 windows of 128 tokens (N)")
    p.add_argument("--data-dir", default=os.environ.get("SAAP_EDGE_DATA_DIR"))
    p.add_argument("--work", type=Path, default=Path("benchmarks/work/recovery"), help="pruned and recovered models go here")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def _common(a) -> list[str]:
    return ["--no-progress", "--device", a.device] + (["--data-dir", a.data_dir] if a.data_dir else [])


def eval_row(a, label: str, model: str) -> dict:
    js = a.work / f"{label}.eval.json"
    run = run_child(CLI + ["eval", model, "--ppl", "wikitext2", "--limit", str(a.limit), "--json", str(js)] + _common(a),
                    log=a.work / f"{label}.log")
    if run["rc"]:
        return {"row": label, "failed": f"exit {run['rc']}, see {a.work / (label + '.log')}", **run}
    ppl = json.loads(js.read_text())["ppl"]["wikitext2"]
    return {"row": label, "wikitext2_ppl": ppl["ppl"], "windows": ppl["windows"], "trainable_params": 0, **run}


def recover_row(a, label: str, pruned: Path, recovery: str, lr: float | None = None) -> dict:
    out = a.work / label.replace(" ", "_")
    cmd = CLI + ["recover", str(pruned), "--out", str(out), "--overwrite", "--recovery", recovery,
                 "--eval-ppl", "wikitext2", "--eval-limit", str(a.limit)] + _common(a)
    if recovery != "none":
        cmd += ["--recover-steps", str(a.steps), "--lr", str(lr or a.lr)]
    run = run_child(cmd, log=a.work / f"{label.replace(' ', '_')}.log")
    if run["rc"]:
        return {"row": label, "failed": f"exit {run['rc']}, see the log in {a.work}", **run}
    report = json.loads((out / "report.json").read_text())
    rec = report["recovery"]
    ppl = report["ppl"]["wikitext2"]["recovered"]
    row = {"row": label, "wikitext2_ppl": ppl["ppl"], "windows": ppl["windows"], "trainable_params": rec.get("trainable_params", 0),
           "group_size": rec.get("group_size"), **run}
    if recovery != "none":
        row.update(steps=rec["steps"], lr=rec["settings"]["lr"], train_s=rec["train_s"], tokens_trained=rec["tokens_trained"],
                   train_tokens_per_s=rec["tokens_per_s"], heldout_ppl=rec["heldout_ppl"], loss_first=rec["loss_first"],
                   loss_last=rec["loss_last"])
    return row


def markdown(data: dict) -> str:
    rows = []
    for r in data["rows"]:
        if "failed" in r:
            rows.append([r["row"], "failed: " + r["failed"], None, None, None, None])
            continue
        held = r.get("heldout_ppl")
        rows.append([r["row"], r["wikitext2_ppl"], f"{held['before']:.1f} -> {held['after']:.1f}" if held else None,
                     r["trainable_params"], round(r["peak_rss_mib"]), round(r["wall_s"])])
    p = data["protocol"]
    head = (f"# Recovery: {data['model']} pruned {p['ratio']:.0%} by SAAP (default settings)\n\n"
            f"WikiText-2 test perplexity, first {p['limit']} windows of 128 tokens. Trained rows: {p['steps']} steps x "
            f"batch 8 x 128 tokens of `books`, AdamW lr {p['lr']:g}, warm-up 10% then linear decay, rank 8, alpha 16, "
            f"dropout 0.05, seed 0. Held-out: 16 windows of the recovery text (before -> after training). "
            f"Peak RSS of the row's own process; wall time includes loading and both perplexity passes. "
            f"Device: {data['device']}.\n\n")
    table = format_table(["row", "WikiText-2 PPL", "held-out PPL", "trainable params", "peak RSS MiB", "wall s"], rows)
    return head + table + "\n\nCommand: `" + data["command"] + "`\n"


def main(argv=None) -> int:
    a = parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    pruned = a.work / "pruned"
    data = {"model": a.model, "protocol": {"ratio": a.ratio, "steps": a.steps, "lr": a.lr, "limit": a.limit,
                                           "recovery_data": "books", "batch": 8, "seq_len": 128},
            "device": a.device if a.device != "auto" else machine(), "versions": versions(),
            "command": "python benchmarks/recovery.py " + " ".join(sys.argv[1:]), "rows": []}

    def save():
        write_results(a.out, "recovery", data, markdown(data))

    if not (pruned / "config.json").exists():
        run = run_child(CLI + ["compress", "--model", a.model, "--ratio", str(a.ratio), "--no-recover", "--eval-ppl",
                               "--out", str(pruned), "--overwrite"] + _common(a), log=a.work / "prune.log")
        if run["rc"]:
            raise SystemExit(f"pruning failed: see {a.work / 'prune.log'}")
        data["prune"] = run
    steps = [
        lambda: eval_row(a, "dense fp32", a.model),
        lambda: eval_row(a, f"pruned {a.ratio:.0%} fp32", str(pruned)),
        lambda: recover_row(a, "pruned + int4 RTN", pruned, "none"),
        lambda: recover_row(a, f"pruned + QA-LoRA int4, {a.steps} steps", pruned, "qalora"),
        lambda: recover_row(a, f"pruned + fp LoRA, {a.steps} steps", pruned, "lora"),
    ] + [lambda lr=lr: recover_row(a, f"pruned + QA-LoRA int4, {a.steps} steps, lr {lr:g}", pruned, "qalora", lr) for lr in a.extra_lr]
    for step in steps:
        row = step()
        data["rows"].append(row)
        print(json.dumps(row), flush=True)
        save()
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
