"""The prepared GPU run (benchmarks/gpu_check.sh calls it): what needs a CUDA device, measured in
one go on whatever GPU is present, results in benchmarks/results/gpu/ with the device named.

1. Bandwidth roofline of this GPU, measured here: a reduction over a 4 GiB fp16 tensor (bytes
   read / time, best of 5), so roofline decode tok/s = bandwidth / weight bytes.
2. Estimation memory: a randomly initialised LLaMA-shaped model (hidden 2048, 16 layers, 16
   heads / 4 KV heads, MLP 5632, vocabulary 32000: ~1.2B parameters) in bf16 on CUDA, pruned
   20% by SAAP (estimation, search, slicing) on random calibration windows; the peak allocated
   memory of that call against the fp16 weight bytes (goal: <= 1.2x).
3. Table III rows in torch fp16: LLaMA-7B-shaped random weights, dense (6.74B) and at the
   paper's SAAP sizes (5.26B and 3.12B parameters: layers 4..29 narrowed alike, the first 4
   and last 2 kept, heads and MLP width scaled by one factor found by bisection), batch 1,
   prefill of 128 tokens, 128 greedy decode steps; decode tok/s (median of 3), peak
   allocated memory, and decode as a share of the roofline.

`--small` runs the same code on tiny shapes (also on a CPU): what the test suite checks.

    python benchmarks/gpu_check.py [--small] [--out benchmarks/results/gpu]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saap_edge.models.slim import SlimLlamaConfig, SlimLlamaForCausalLM  # noqa: E402

LLAMA_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                intermediate_size=11008, vocab_size=32000, head_dim=128)
ESTIMATION_MODEL = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                        intermediate_size=5632, vocab_size=32000, head_dim=128)
SMALL = dict(hidden_size=128, num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=4,
             intermediate_size=352, vocab_size=512, head_dim=32)
TABLE3_PARAMS = (5.26e9, 3.12e9)  # the paper's SAAP rows (LLaMA-7B at its two ratios)
KEEP_FIRST, KEEP_LAST = 4, 2


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def params_of(cfg: dict, heads: list[int], ffn: list[int]) -> int:
    h, hd, v = cfg["hidden_size"], cfg["head_dim"], cfg["vocab_size"]
    per = sum(h * n * hd * 4 + 3 * h * f + 2 * h for n, f in zip(heads, ffn))  # q k v o (no GQA), gate up down, norms
    return per + 2 * v * h + h


def shaped(cfg: dict, target: float | None) -> SlimLlamaConfig:
    """A slim config whose middle layers keep one share of heads and MLP width so that the model
    has about `target` parameters (None: dense)."""
    n = cfg["num_hidden_layers"]
    heads, ffn = [cfg["num_attention_heads"]] * n, [cfg["intermediate_size"]] * n
    if target is not None:
        lo, hi = 0.01, 1.0
        for _ in range(60):
            f = (lo + hi) / 2
            hs = [heads[0] if i < KEEP_FIRST or i >= n - KEEP_LAST else max(1, round(heads[0] * f)) for i in range(n)]
            fs = [ffn[0] if i < KEEP_FIRST or i >= n - KEEP_LAST else max(32, round(ffn[0] * f / 32) * 32) for i in range(n)]
            lo, hi = (f, hi) if params_of(cfg, hs, fs) < target else (lo, f)
        heads, ffn = hs, fs
    kv = heads if cfg["num_key_value_heads"] == cfg["num_attention_heads"] else [cfg["num_key_value_heads"]] * n
    return SlimLlamaConfig(**cfg, num_attention_heads_per_layer=heads, num_key_value_heads_per_layer=kv,
                           intermediate_size_per_layer=ffn, max_position_embeddings=2048, tie_word_embeddings=False,
                           bos_token_id=1, eos_token_id=2)


def random_model(config, dtype, device) -> SlimLlamaForCausalLM:
    """Random weights made on the device in `dtype` (no float32 copy on the host)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = SlimLlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def bandwidth(device, gib: float) -> dict:
    x = torch.ones(int(gib * 2**30 / 2), dtype=torch.float16, device=device)
    best = math.inf
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        x.sum(dtype=torch.float32)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    nbytes = x.numel() * 2
    del x
    return {"method": f"sum over a {gib:g} GiB fp16 tensor, best of 5", "bytes": nbytes, "gbs": nbytes / best / 1e9}


def estimation_peak(cfg: dict, device, samples: int, seq: int) -> dict:
    from saap_edge.config import PruneSettings
    from saap_edge.prune import prune

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(shaped(cfg, None), dtype, device)
    weight_bytes = sum(p.numel() for p in model.parameters()) * 2  # fp16 bytes
    ids = torch.randint(3, cfg["vocab_size"], (samples, seq), generator=torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    result = prune(model, ids, PruneSettings(ratio=0.2, calib_samples=samples, seq_len=seq), progress=False)
    sync(device)
    out = {"params": sum(p.numel() for p in model.parameters()), "fp16_weight_bytes": weight_bytes,
           "samples": samples, "seq_len": seq, "dtype": str(dtype).replace("torch.", ""), "prune_s": time.perf_counter() - t0,
           "removed_share": result.plan.params["removed_share"]}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        out.update(peak_bytes=peak, peak_vs_weights=peak / weight_bytes, goal=1.2)
    del model, result
    return out


def decode_row(label: str, config, device, prompt: int, new: int, reps: int, bw: float | None) -> dict:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = random_model(config, dtype, device)
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = params * (2 if dtype == torch.float16 else 4)
    ids = torch.randint(3, config.vocab_size, (1, prompt), device=device, generator=None)
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0,
                  attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        prefill, decode = [], []
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            model(ids)
            sync(device)
            t1 = time.perf_counter()
            model.generate(ids, **kwargs)
            sync(device)
            t2 = time.perf_counter()
            prefill.append(prompt / (t1 - t0))
            decode.append((new - 1) / max(t2 - t1 - (t1 - t0), 1e-9))  # the generate call's prefill taken out
    row = {"model": label, "params": params, "weight_bytes": weight_bytes, "dtype": str(dtype).replace("torch.", ""),
           "prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode),
           "decode_runs": decode, "heads_per_layer": config.num_attention_heads_per_layer,
           "mlp_per_layer": config.intermediate_size_per_layer}
    if device.type == "cuda":
        row["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    if bw:
        row["roofline_tok_s"] = bw * 1e9 / weight_bytes
        row["roofline_share"] = row["decode_tok_s"] / row["roofline_tok_s"]
    del model
    return row


def markdown(d: dict) -> str:
    gib = 2**30
    out = [f"# GPU check: {d['device']}", "", f"torch {d['torch']}, {d['when']}; command: `{d['command']}`", ""]
    if d.get("bandwidth"):
        out += [f"Bandwidth roofline: {d['bandwidth']['gbs']:.0f} GB/s ({d['bandwidth']['method']}).", ""]
    e = d["estimation"]
    line = (f"Estimation (SAAP 20%, {e['samples']} windows of {e['seq_len']}, {e['dtype']}): {e['params'] / 1e9:.2f}B "
            f"parameters, {e['prune_s']:.1f} s")
    if "peak_bytes" in e:
        line += (f", peak {e['peak_bytes'] / gib:.2f} GiB = {e['peak_vs_weights']:.2f}x the fp16 weights "
                 f"(goal <= {e['goal']}x: {'met' if e['peak_vs_weights'] <= e['goal'] else 'MISSED'})")
    out += [line + ".", "", "| model | params | weights | peak memory | prefill tok/s | decode tok/s | roofline share | vs dense |",
            "|---|---|---|---|---|---|---|---|"]
    dense = d["rows"][0]["decode_tok_s"]
    for r in d["rows"]:
        peak = f"{r['peak_bytes'] / gib:.2f} GiB" if "peak_bytes" in r else "-"
        share = f"{r['roofline_share']:.0%}" if "roofline_share" in r else "-"
        out.append(f"| {r['model']} | {r['params'] / 1e9:.2f}B | {r['weight_bytes'] / gib:.2f} GiB | {peak} | "
                   f"{r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {share} | {r['decode_tok_s'] / dense:.2f}x |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke run of the same code)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu")
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not a.small:
        print("gpu_check: no CUDA device; run it where one is (or --small for a CPU smoke run)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    data = {"device": name, "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv), "small": a.small}
    t0 = time.perf_counter()
    data["bandwidth"] = bandwidth(device, 0.0625 if a.small else 4.0)
    print(f"[{time.perf_counter() - t0:.0f}s] bandwidth {data['bandwidth']['gbs']:.0f} GB/s", flush=True)
    data["estimation"] = estimation_peak(SMALL if a.small else ESTIMATION_MODEL, device, 4 if a.small else 16,
                                         32 if a.small else 128)
    print(f"[{time.perf_counter() - t0:.0f}s] estimation {data['estimation']}", flush=True)
    base = SMALL if a.small else LLAMA_7B
    dense_params = params_of(base, [base["num_attention_heads"]] * base["num_hidden_layers"],
                             [base["intermediate_size"]] * base["num_hidden_layers"])
    targets = [None] + ([dense_params * 0.85, dense_params * 0.7] if a.small else list(TABLE3_PARAMS))
    rows = []
    for target in targets:
        label = "dense" if target is None else f"SAAP {target / 1e9:.2f}B"
        rows.append(decode_row(label, shaped(base, target), device, 16 if a.small else 128, 8 if a.small else 128,
                               a.reps, data["bandwidth"]["gbs"]))
        print(f"[{time.perf_counter() - t0:.0f}s] {label}: {rows[-1]['decode_tok_s']:.1f} tok/s", flush=True)
    data["rows"] = rows
    data["wall_s"] = time.perf_counter() - t0
    a.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_check_small" if a.small else "gpu_check"
    for suffix, text in ((".json", json.dumps(data, indent=1) + "\n"), (".md", markdown(data))):
        tmp = a.out / f".{stem}{suffix}.tmp"
        tmp.write_text(text)
        tmp.replace(a.out / f"{stem}{suffix}")
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
