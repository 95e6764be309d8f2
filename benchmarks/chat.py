"""Chat answers of SmolLM2-135M dense, pruned 20% and 50% by the default pipeline.

Each compressed model is made by `saap-edge compress --ratio R` with every default (SAAP,
refit, int4 + distillation; the CPU's recovery budget) and exported by `saap-edge export
--format gguf` with its defaults (Q4_1 projections, Q8_0 embedding). The ten fixed prompts below
go through each GGUF on llama.cpp as chat turns (the model's own template, greedy, at most
128 new tokens; `saap_edge.compare`). Written: results/chat.md (answers side by side, the share
of answers that repeat a 4-word sequence more than 3 times, mean answer length) and chat.json.
Models are cached under --work, so a rerun only answers again; --rebuild makes them anew.

    python benchmarks/chat.py --data-dir ../shared/data
    python benchmarks/chat.py --smoke --data-dir ../shared/data   # a tiny model, 20%, 2 prompts (chat_smoke.*)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import machine, smoke_model, smoke_work, write_file  # noqa: E402

PROMPTS = [
    "What are three things that make a healthy diet?",
    "Explain in two sentences why the sky is blue.",
    "Write a four-line poem about the sea.",
    "What is the capital of France, and what is it known for?",
    "Give me three tips for a job interview.",
    "How do I boil an egg?",
    "What is photosynthesis?",
    "Translate 'good morning' into Spanish and French.",
    "Write a short thank-you note to a friend who helped me move.",
    "What is the difference between weather and climate?",
]


def cli() -> list[str]:
    return [sys.executable, "-m", "saap_edge.cli"]


def build(ratio: float, work: Path, data_dir: str | None, rebuild: bool, extra: tuple[str, ...] = ()) -> tuple[Path, dict]:
    """The default pipeline at `ratio`: compress (with `extra` flags), then the default GGUF export (cached)."""
    out = work / f"saap-{ratio:.2f}"
    gguf = out / "model-q4_1.gguf"
    info = {"ratio": ratio, "dir": str(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out)}
    if gguf.is_file() and not rebuild:
        return out, {**info, "cached": True}
    env = {**os.environ, **({"SAAP_EDGE_DATA_DIR": data_dir} if data_dir else {})}
    t0 = time.perf_counter()
    for cmd in (cli() + ["compress", "--ratio", str(ratio), "--out", str(out), "--overwrite", "--no-progress", *extra],
                cli() + ["export", str(out), "--format", "gguf", "--overwrite"]):
        print("$", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return out, {**info, "cached": False, "build_s": time.perf_counter() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--data-dir", default=os.environ.get("SAAP_EDGE_DATA_DIR"))
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "chat")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true",
                   help="the tiny random-weight model of benchmarks/harness.py (its own default GGUF export as the dense "
                        "row) at 20%% with 4 calibration / 16 reconstruction windows and 2 recovery steps, the first 2 "
                        "prompts, 16 new tokens: a check of this script; results chat_smoke.*, work files under <work>/smoke")
    a = p.parse_args(argv)
    from saap_edge.compare import compare, repeats

    dense, extra, prompts, name = "smollm2-135m", (), PROMPTS, "chat"
    if a.smoke:
        smoke_work(a, p)
        a.ratios, a.max_new_tokens, prompts, name = [0.2], 16, PROMPTS[:2], "chat_smoke"
        model = smoke_model(a.work, a.data_dir)
        dense = str(model / "model-q4_1.gguf")
        if not Path(dense).is_file():
            subprocess.run(cli() + ["export", str(model), "--format", "gguf", "--overwrite", "--no-progress"], check=True,
                           cwd=ROOT)
        extra = ("--model", str(model), "--calib-samples", "4", "--recon-samples", "16", "--recover-steps", "2",
                 "--eval-limit", "4")
    a.work.mkdir(parents=True, exist_ok=True)
    builds = [build(r, a.work, a.data_dir, a.rebuild, extra) for r in a.ratios]
    names = [dense] + [str(out) for out, _ in builds]
    models, text = compare(names, prompts, chat=True, max_new_tokens=a.max_new_tokens, threads=a.threads)
    rows = []
    for m in models:
        loops = sum(repeats(x.text) for x in m.answers)
        rows.append({"model": m.label, "artifact": os.path.relpath(m.artifact, ROOT), "runtime": m.runtime,
                     "mib": m.size_mib, "template": m.template, "looping_share": loops / len(m.answers),
                     "mean_answer_tokens": sum(x.generated_tokens for x in m.answers) / len(m.answers),
                     "answers": [x.__dict__ for x in m.answers]})
    summary = ["| model | answers looping (a 4-word sequence > 3 times) | mean answer tokens |", "|---|---|---|"]
    summary += [f"| {r['model']} | {r['looping_share']:.0%} | {r['mean_answer_tokens']:.0f} |" for r in rows]
    command = "python benchmarks/chat.py" + (" --smoke" if a.smoke else "") + (f" --data-dir {a.data_dir}" if a.data_dir else "")
    header = ("# Chat: SmolLM2-135M dense against the default pipeline at 20% and 50%\n\n"
              "Dense: the SmolLM2-135M-Instruct Q4_1 GGUF (`smollm2-135m`). Compressed: `saap-edge compress --ratio R` "
              "with every default (SAAP, refit, int4 groups + kd distillation at the CPU's budget), exported by "
              "`saap-edge export --format gguf` (Q4_1, Q8_0 embedding). Ten fixed chat prompts, each its own one-turn "
              f"conversation through the model's chat template on llama.cpp, greedy, at most {a.max_new_tokens} new "
              f"tokens. Machine: {machine()}.\n\n" + "\n".join(summary) + f"\n\nCommand: `{command}`\n\n")
    if a.smoke:
        header = header.replace("\n\n", f"\n\nA check of this script (--smoke): dense is `{dense}`, a random-weight model, "
                                f"compressed with `{' '.join(extra)}`; the first {len(prompts)} prompts.\n\n", 1)
    a.out.mkdir(parents=True, exist_ok=True)
    write_file(a.out / f"{name}.md", header + text.split("\n", 2)[2])
    write_file(a.out / f"{name}.json", json.dumps({"prompts": prompts, "builds": [b for _, b in builds], "models": rows,
                                                    "machine": machine(), "command": command}, indent=1) + "\n")
    print(header + "\n".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
