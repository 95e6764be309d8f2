"""Thread contention: the reconstruct stage and an int4 perplexity pass, alone and beside a
busy process, under the OpenMP / torch thread settings that matter.

The report: with one other CPU-heavy process on a 2-core machine, reconstruction of SmolLM2 went
from ~1.5 s to 45-100 s per decoder layer, and int4 WikiText-2 perplexity ran at 117 tok/s.
This measures which thread setting keeps both fast when the cores are shared.

Workloads (the library's own code, each trial a fresh subprocess):
  recon  `saap_edge.reconstruct.reconstruct` on --layers pruned decoder layers of SmolLM2-135M
         (layers 3.. of the model pruned 20% with compress's defaults except --method magnitude,
         which needs no calibration pass; local OBS selection and the ridge refit do the same
         work per layer whatever ranked the units), --samples calibration windows of 128
         tokens from books, batch 8: the reconstruct defaults except the sample count.
  ppl    `saap_edge.eval.ppl.window_perplexity` (fast path, oneDNN linears, batch 8) of SmolLM2-135M
         int4 (`quantize_model(model, 64)`) on the first --windows WikiText-2 test windows of 128
         tokens. One extra trial (alone, defaults) compares it with the fp32 model on the same
         windows, a second call on the same int4 model (warm cache), and both models through
         torch's plain F.linear (fast=False), counting the calls of int4 `dequantize`.
The models, plan and token windows are made once (the `prepare` child) and pickled, so a trial
costs its imports plus the work.

Conditions: alone, and beside a competitor: a second python process multiplying a
[1024, 576] x [576, 1536] float32 matmul in a loop with torch's default threads (2 here, the
shape of a SmolLM2 eval forward), started 2 s before the trial and stopped after it.
Settings of the measured process (the competitor keeps the defaults):
  default                   torch's defaults (2 OpenMP threads, libgomp's default wait policy)
  set_num_threads(1)        torch.set_num_threads(1) after import
  OMP_NUM_THREADS=1         environment variable
  OMP_WAIT_POLICY=PASSIVE   environment variable: idle OpenMP workers sleep at once
  OMP_WAIT_POLICY=ACTIVE    environment variable: idle OpenMP workers spin (worst case)
torch here uses GNU OpenMP (libgomp, see parallel_info in the JSON), so KMP_BLOCKTIME (Intel
OpenMP) does nothing and is not measured; GOMP_SPINCOUNT=0 is what PASSIVE sets.

A trial is soft-capped (--cap seconds): the stage stops at the next layer / batch boundary after
the cap, and rates are per completed layer / per scored token. Other users' load is not under
this script's control: before each trial it waits (up to --settle s) for the cores to be idle,
and during it records the CPU time of processes that are neither the trial nor the competitor
(`foreign_cpu`, as a share of both cores); rows with foreign_cpu > 0.1 are flagged.

    python benchmarks/thread_contention.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SETTINGS = {  # name: (environment of the measured process, torch.set_num_threads value or "adaptive")
    "default": ({}, None),
    "set_num_threads(1)": ({}, 1),
    "OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, None),
    "adaptive (CoreShare)": ({}, "adaptive"),
    "OMP_NUM_THREADS=1": ({"OMP_NUM_THREADS": "1"}, None),
    "OMP_WAIT_POLICY=ACTIVE": ({"OMP_WAIT_POLICY": "ACTIVE"}, None),
}  # in this order, so a run cut short by --budget has the important rows
THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "KMP_BLOCKTIME", "OMP_PROC_BIND")
FIRST_PRUNED = 3  # PruneSettings.keep_first


# --------------------------------------------------------------------------------------------
# CPU accounting: /proc/stat busy time minus the trial's and the competitor's own.

def _busy_ticks() -> int:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # minus idle and iowait


def _proc_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return int(parts[11]) + int(parts[12])  # utime + stime, all threads
    except (OSError, IndexError):
        return 0


TICK = os.sysconf("SC_CLK_TCK")


def _idle_share(seconds: float = 0.5) -> float:
    b0, t0 = _busy_ticks(), time.perf_counter()
    time.sleep(seconds)
    return (_busy_ticks() - b0) / TICK / ((time.perf_counter() - t0) * os.cpu_count())


def settle(limit: float) -> float:
    """Wait (up to `limit` s) until the machine's busy share over 0.5 s is below 10%; returns it."""
    t0 = time.perf_counter()
    while True:
        share = _idle_share()
        if share < 0.10 or time.perf_counter() - t0 > limit:
            return share


# --------------------------------------------------------------------------------------------
# Children.

class CoreShare:
    """The candidate fix, as the library would hold it: before each step of a stage (a decoder
    layer, a perplexity batch), give torch as many threads as there are cores that other
    processes left idle since the previous step (at least 1). Other processes' share is the
    machine's busy CPU time minus this process's own, over the wall time between the calls."""

    def __init__(self):
        import psutil

        self.cores = len(os.sched_getaffinity(0))
        self.proc = psutil.Process()
        self.psutil = psutil
        self.last = self._sample()
        self.chosen: list[int] = []

    def _sample(self) -> tuple[float, float, float]:
        t = self.psutil.cpu_times()
        own = self.proc.cpu_times()
        return time.perf_counter(), sum(t) - t.idle - getattr(t, "iowait", 0.0), own.user + own.system

    def adjust(self) -> int:
        import torch

        if time.perf_counter() - self.last[0] < 0.1:  # too short a look (the first step): look 0.1 s
            time.sleep(0.1)
        now = self._sample()
        wall = now[0] - self.last[0]
        foreign = max(0.0, (now[1] - self.last[1]) - (now[2] - self.last[2])) / wall
        self.last = now
        n = max(1, min(self.cores, round(self.cores - foreign)))
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        self.chosen.append(n)
        return n


def _apply_threads(threads: str | None):
    import torch

    if threads and threads != "adaptive":
        torch.set_num_threads(int(threads))
    return torch


def _timed_iter(iterable, times: list, cap: float, t_start: float, share: CoreShare | None = None):
    """Yield the items of `iterable`, appending the seconds each step took; stop after `cap` s.
    With `share`, the thread count is chosen before each step."""
    last = time.perf_counter()
    times.append(("setup", last - t_start))
    for item in iterable:
        if share is not None:
            share.adjust()
        yield item
        now = time.perf_counter()
        times.append(("step", now - last))
        last = now
        if now - t_start > cap:
            return


def child_prepare(a) -> None:
    import copy

    import torch
    from torch import nn

    from saap_edge.config import PruneSettings
    from saap_edge.data import calibration_samples, load_text
    from saap_edge.eval.ppl import token_windows
    from saap_edge.models.load import load_model
    from saap_edge.prune import prune
    from saap_edge.quant.int4 import quantize_model
    from saap_edge.seeding import set_seed

    set_seed(0)
    loaded = load_model("smollm2-135m", "cpu", "float32")
    model, tok = loaded.model, loaded.tokenizer
    windows = token_windows(tok, load_text("wikitext2", "test", a.data_dir), 128, a.windows)
    samples, _ = calibration_samples(tok, "books", a.samples, 128, 0, a.data_dir, flag="--recon-samples")
    int4 = copy.deepcopy(model)
    quantize_model(int4, 64)
    torch.save({"int4": int4, "windows": windows}, a.fixture_dir / "ppl.pt")
    torch.save(model, a.fixture_dir / "fp32.pt")  # read by the comparison trial only
    del int4
    result = prune(model, None, PruneSettings(method="magnitude").validate(), progress=False)
    keep = slice(FIRST_PRUNED, FIRST_PRUNED + a.layers)
    for m in (model, result.model):
        m.model.layers = nn.ModuleList(list(m.model.layers)[keep])
    plan = result.plan
    plan.layers = plan.layers[keep]
    torch.save({"dense": model, "slim": result.model, "plan": plan, "samples": samples,
                "removed": [{"kv_groups": len(lp.kv_groups), "heads": lp.kept_heads, "channels": len(lp.channels)}
                            for lp in plan.layers]},
               a.fixture_dir / "recon.pt")


def child_recon(a) -> dict:
    torch = _apply_threads(a.threads)
    import saap_edge.reconstruct as R
    from saap_edge.config import ReconstructSettings

    fx = torch.load(a.fixture_dir / "recon.pt", weights_only=False)
    phases: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    for name in ("obs_select", "refit", "output_error", "_reslice"):
        setattr(R, name, timed(name, getattr(R, name)))
    for name in ("_dense_pass", "_advance"):
        setattr(R._Stage, name, timed(name, getattr(R._Stage, name)))
    R._Moments.add = timed("moments_add", R._Moments.add)
    steps: list = []
    share = CoreShare() if a.threads == "adaptive" else None
    t0 = time.perf_counter()
    R.tqdm = lambda it, **kw: _timed_iter(it, steps, a.cap, t0, share)
    r = ReconstructSettings(samples=len(fx["samples"]), seq_len=fx["samples"].shape[1]).validate()
    R.reconstruct(fx["dense"], fx["slim"], fx["plan"], fx["samples"], r, device="cpu", progress=False)
    wall = time.perf_counter() - t0
    layers = [s for k, s in steps if k == "step"]
    return {"wall_s": wall, "setup_s": steps[0][1], "layer_s": layers, "layers_done": len(layers),
            "s_per_layer": sum(layers) / max(1, len(layers)), "phases_s": phases,
            "threads": torch.get_num_threads(), **({"threads_chosen": share.chosen} if share else {})}


def child_ppl(a) -> dict:
    torch = _apply_threads(a.threads)
    import saap_edge.eval.ppl as P
    import saap_edge.models.int4_linear as Q

    fx = torch.load(a.fixture_dir / "ppl.pt", weights_only=False)
    windows = fx["windows"]
    calls = {"dequantize": 0}
    plain = Q.dequantize

    def counting(*args, **kwargs):
        calls["dequantize"] += 1
        return plain(*args, **kwargs)

    Q.dequantize = counting
    out = {"threads": torch.get_num_threads()}
    share = CoreShare() if a.threads == "adaptive" else None
    runs = [("int4", fx["int4"], True)]
    if a.compare:  # alone only: the second int4 call (cache warm) and the plain-MKL path of both
        fp32 = torch.load(a.fixture_dir / "fp32.pt", weights_only=False)
        runs = [("int4", fx["int4"], True), ("int4_again", fx["int4"], True), ("fp32", fp32, True),
                ("int4_plain", fx["int4"], False), ("fp32_plain", fp32, False)]
    for key, model, fast in runs:
        model.eval()
        steps: list = []
        calls["dequantize"] = 0
        t0 = time.perf_counter()
        P.tqdm = lambda it, **kw: _timed_iter(it, steps, a.cap, t0, share)
        res = P.window_perplexity(model, windows, batch_size=8, progress=False, fast=fast)
        wall = time.perf_counter() - t0
        batches = [s for k, s in steps if k == "step"]
        tokens = min(len(batches) * 8, len(windows)) * (windows.shape[1] - 1)
        out[key] = {"wall_s": wall, "setup_s": steps[0][1], "batches": len(batches), "tokens": tokens,
                    "tok_per_s": tokens / max(sum(batches), 1e-9), "tok_per_s_with_setup": tokens / wall,
                    "dequantize_calls": calls["dequantize"], **({"threads_chosen": list(share.chosen)} if share else {}),
                    **({"ppl": res["ppl"]} if len(batches) * 8 >= len(windows) else {})}
    int4_layers = [m for m in fx["int4"].modules() if isinstance(m, Q.Int4Linear)]
    out["int4_cache"] = {"layers": len(int4_layers), "cached": sum(m._cache is not None for m in int4_layers),
                         "cached_mib": sum(m._cache[1].numel() * m._cache[1].element_size() for m in int4_layers
                                           if m._cache is not None) / 2**20}
    return out


def child_compete(a) -> None:
    """The competing busy process: a matmul loop with torch's default threads until SIGTERM."""
    import torch

    x, w = torch.randn(1024, 576), torch.randn(576, 1536)
    n, stop = 0, []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    Path(a.ready).write_text("1")
    t0 = time.perf_counter()
    while not stop:
        torch.mm(x, w)
        n += 1
    Path(a.ready).write_text(json.dumps({"iters_per_s": n / (time.perf_counter() - t0), "threads": torch.get_num_threads()}))


# --------------------------------------------------------------------------------------------
# Parent.

def _child_cmd(a, role: str, extra: list[str]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--role", role, "--fixture-dir", str(a.fixture_dir),
            "--cap", str(a.cap), "--data-dir", str(a.data_dir), *extra]


SOURCE = {"root": ROOT}  # where the children import saap_edge from (run() may point it at a git export)


def _clean_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(SOURCE["root"]), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["TOKENIZERS_PARALLELISM"] = "false"
    return {**env, **extra}


def start_competitor(a) -> tuple[subprocess.Popen, Path]:
    ready = Path(tempfile.mktemp(prefix="compete-", dir=a.fixture_dir))
    proc = subprocess.Popen(_child_cmd(a, "compete", ["--ready", str(ready)]), env=_clean_env({}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not ready.exists():
        time.sleep(0.05)
    time.sleep(2.0)  # warm: its threads are spinning before the trial starts
    return proc, ready


def stop_competitor(proc: subprocess.Popen, ready: Path) -> dict:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    try:
        return json.loads(ready.read_text())
    except (OSError, ValueError):
        return {}


def trial(a, role: str, setting: str, contended: bool, compare: bool = False) -> dict:
    env_extra, threads = SETTINGS[setting]
    busy_before = settle(a.settle)
    comp = start_competitor(a) if contended else None
    result_file = a.fixture_dir / f"{role}-result.json"
    result_file.unlink(missing_ok=True)
    extra = ["--result", str(result_file)] + (["--threads", str(threads)] if threads else []) + (["--compare"] if compare else [])
    b0, t0 = _busy_ticks(), time.perf_counter()
    c0 = _proc_ticks(comp[0].pid) if comp else 0
    proc = subprocess.Popen(_child_cmd(a, role, extra), env=_clean_env(env_extra), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=a.cap * 4 + 120)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    wall = time.perf_counter() - t0
    c1 = _proc_ticks(comp[0].pid) if comp else 0
    busy = (_busy_ticks() - b0) / TICK
    own = json.loads(result_file.read_text()).pop("_cpu_s", 0.0) if proc.returncode == 0 else 0.0
    comp_info = stop_competitor(*comp) if comp else None
    row = {"role": role, "setting": setting, "contended": contended, "rc": proc.returncode,
           "child_wall_s": wall, "busy_before": busy_before,
           "child_cpu_s": own, "competitor_cpu_s": (c1 - c0) / TICK,
           "foreign_cpu": max(0.0, busy - own - (c1 - c0) / TICK) / (wall * os.cpu_count())}
    if comp_info is not None:
        row["competitor"] = comp_info
    if proc.returncode == 0:
        row.update(json.loads(result_file.read_text()))
        row.pop("_cpu_s", None)
    else:
        row["stderr_tail"] = err[-2000:]
    print(json.dumps({k: row[k] for k in row if k in ("role", "setting", "contended", "rc", "child_wall_s", "s_per_layer",
                                                       "layers_done", "foreign_cpu")}
                     | ({k: row[k]["tok_per_s"] for k in ("int4", "fp32") if k in row})), flush=True)
    return row


def source_info(a) -> dict:
    """Point the children at the code to measure: the working tree, or `git archive` of a revision
    (another engineer may be editing the working tree while this runs)."""
    git = lambda *args: subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.rstrip()  # noqa: E731
    dirty = [line.strip() for line in git("status", "--short", "--", "saap_edge").splitlines()]
    if a.source == "worktree":
        return {"source": "working tree", "head": git("rev-parse", "HEAD"), "dirty_saap_edge": dirty}
    rev = git("rev-parse", a.source)
    if not rev:
        raise SystemExit(f"--source {a.source}: not a git revision of {ROOT}")
    export = a.fixture_dir / "src"
    export.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "saap_edge"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(export)], input=archive, check=True)
    SOURCE["root"] = export
    return {"source": f"git archive {a.source}", "commit": rev, "working_tree_dirty_saap_edge": dirty}


def parallel_info() -> dict:
    import torch

    return {"parallel_info": torch.__config__.parallel_info(), "torch": torch.__version__,
            "openmp_runtime": [p.name for p in sorted((Path(torch.__file__).parent / "lib").glob("lib*")) if p.name.startswith(("libgomp", "libiomp", "libomp"))]}


def markdown(data: dict) -> str:
    p = data["protocol"]
    rows = {(r["role"], r["setting"], r["contended"]): r for r in data["trials"]}
    lines = [
        "# Thread contention: reconstruct and int4 perplexity, alone vs beside a busy process", "",
        f"Machine: {data['machine']['cores']} cores ({data['machine']['cpu']}), torch {data['torch']['torch']}, "
        f"OpenMP runtime {', '.join(data['torch']['openmp_runtime']) or '?'}. Script: benchmarks/thread_contention.py.", "",
        "Protocol: each number is one fresh subprocess running the library's own code. "
        f"**recon**: `reconstruct` (defaults: lsq, prefix target, local OBS selection, batch 8) on {p['layers']} pruned "
        f"SmolLM2-135M decoder layers (layers {FIRST_PRUNED}.. of the model pruned 20% with --method magnitude), "
        f"{p['samples']} calibration windows of 128 tokens; seconds per layer. "
        f"**ppl**: `window_perplexity` (fast path, batch 8) of SmolLM2-135M int4 (G=64) on the first "
        f"{p['windows']} WikiText-2 test windows of 128 tokens; scored tokens per second (excluding the oneDNN "
        "weight conversion before the first batch, which is in `setup_s` of the JSON). "
        "**contended**: a second python process loops a [1024,576]x[576,1536] float32 matmul with torch's default "
        "threads (2), started 2 s before the trial. "
        f"Code measured: {data['source']['source']} ({data['source'].get('commit', data['source'].get('head', ''))[:10]}). "
        f"A trial stops at the first layer / batch boundary after {p['cap']} s (then the rate is over what completed). "
        "`foreign` = CPU share of both cores used by other users' processes during the trial (not controllable "
        "here; > 0.10 flagged with !).", "",
        "| setting | recon alone s/layer | recon contended s/layer | slowdown | int4 ppl alone tok/s | int4 ppl contended tok/s | slowdown |",
        "|---|---|---|---|---|---|---|",
    ]

    def flag(r):
        return "!" if r and r.get("foreign_cpu", 0) > 0.10 else ""

    def ok(*rs):
        return all(r and r.get("rc") == 0 for r in rs)

    def cell(r, get):
        if not ok(r):
            return "failed" if r else "-"
        partial = r.get("layers_done", p["layers"]) < p["layers"] or r.get("int4", {}).get("batches", 1e9) * 8 < p["windows"]
        return f"{get(r):.2f}{'*' if partial else ''}{flag(r)}"

    spl = lambda r: r["s_per_layer"]  # noqa: E731
    tps = lambda r: r["int4"]["tok_per_s"]  # noqa: E731
    for s in data["settings"]:
        ra, rc = rows.get(("recon", s, False)), rows.get(("recon", s, True))
        pa, pc = rows.get(("ppl", s, False)), rows.get(("ppl", s, True))
        slow_r = f"{spl(rc) / spl(ra):.1f}x" if ok(ra, rc) else "-"
        slow_p = f"{tps(pa) / tps(pc):.1f}x" if ok(pa, pc) else "-"
        lines.append(f"| {s} | {cell(ra, spl)} | {cell(rc, spl)} | {slow_r} | {cell(pa, tps)} | {cell(pc, tps)} | {slow_p} |")
    alone = [r for r in data["trials"] if not r["contended"] and r.get("rc") == 0]
    busy = [r for r in alone if r["foreign_cpu"] > 0.10]
    if busy:
        share = sum(r["foreign_cpu"] for r in busy) / len(busy)
        lines += ["", f"**Caution: {len(busy)} of {len(alone)} 'alone' trials were not alone**: other users' processes held "
                  f"{share:.0%} of the two cores on average during them (about {2 * share:.1f} cores), so 'alone' there "
                  "means beside that load, and 'contended' beside that load plus the competitor. No row measures idle cores."]
    lines += ["", "`*`: stopped at the cap before the last layer / batch (rate over what completed). "
              "`!`: other users' processes took > 10% of the cores during the trial.", ""]
    chosen = [(r["role"], r["contended"], r.get("threads_chosen") or r.get("int4", {}).get("threads_chosen"))
              for r in data["trials"] if r["setting"].startswith("adaptive") and r.get("rc") == 0]
    if chosen:
        lines += ["Threads the adaptive setting chose per step: "
                  + "; ".join(f"{role} {'contended' if c else 'alone'}: {t}" for role, c, t in chosen), ""]
    lines += ["Foreign CPU share per trial (other users' processes, both cores = 1.0): "
              + ", ".join(f"{r['role']}/{r['setting']}/{'c' if r['contended'] else 'a'} {r['foreign_cpu']:.2f}"
                          for r in data["trials"]), ""]
    if data.get("skipped_for_budget"):
        lines += ["Not run (the --budget was spent): " + ", ".join(
            f"{r['role']}/{r['setting']}/{'contended' if r['contended'] else 'alone'}" for r in data["skipped_for_budget"]), ""]
    lines += ["Recon time by phase (seconds over the completed layers; dense_pass includes moments_add):", "",
              "| setting | contended | layers | dense_pass | moments_add | obs_select | refit | output_error | advance |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in data["trials"]:
        if r["role"] == "recon" and r.get("rc") == 0:
            ph = r["phases_s"]
            lines.append(f"| {r['setting']} | {r['contended']} | {r['layers_done']} | "
                         + " | ".join(f"{ph.get(k, 0):.2f}" for k in ("_dense_pass", "moments_add", "obs_select", "refit",
                                                                       "output_error", "_advance")) + " |")
    cmp_ = data.get("compare")
    if cmp_ and cmp_.get("rc") == 0:
        origin = (f" From {cmp_['run_file']} (commit {str(cmp_.get('commit'))[:10]}, {cmp_['protocol']['windows']} windows)"
                  if "run_file" in cmp_ else "")
        lines += ["", "int4 vs fp32 perplexity on the same windows (alone, default threads; tok/s over the batches, "
                  f"and including the set-up before the first batch; foreign {cmp_['foreign_cpu']:.2f}).{origin}", "",
                  "| run | tok/s | tok/s incl. setup | setup s | dequantize calls | ppl |", "|---|---|---|---|---|---|"]
        for k in ("int4", "int4_again", "fp32", "int4_plain", "fp32_plain"):
            v = cmp_.get(k)
            if v:
                lines.append(f"| {k} | {v['tok_per_s']:.0f} | {v['tok_per_s_with_setup']:.0f} | {v['setup_s']:.2f} | "
                             f"{v['dequantize_calls']} | {v.get('ppl', float('nan')):.4f} |")
        c = cmp_["int4_cache"]
        lines += ["", f"After the runs {c['cached']} of {c['layers']} Int4Linear layers hold a cached fp32 weight "
                      f"({c['cached_mib']:.0f} MiB). int4 = fast path, first call; int4_again = second call on the same model; "
                      "*_plain = fast=False (torch's F.linear / MKL sgemm)."]
    if data.get("merged_from"):
        used = {}
        for r in data["trials"]:
            used.setdefault((r["run_file"], str(r.get("commit"))[:10]), []).append(
                f"{r['role']}/{r['setting']}/{'c' if r['contended'] else 'a'}")
        lines += ["", "Merged from runs of this script (`--merge`), each row from the newest file that has it:", ""]
        lines += [f"- {f} (commit {c}): {len(rs)} rows: {', '.join(rs)}" for (f, c), rs in used.items()]
        if cmp_ and "run_file" in cmp_:
            lines.append(f"- {cmp_['run_file']} (commit {str(cmp_.get('commit'))[:10]}): the int4 / fp32 comparison")
    what = "Total time of the merged runs" if data.get("merged_from") else "Total script time"
    lines += ["", f"{what}: {data['total_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def run(a) -> dict:
    sys.path.insert(0, str(HERE))
    from harness import machine

    t_all = time.perf_counter()
    a.out.mkdir(parents=True, exist_ok=True)
    a.fixture_dir = Path(tempfile.mkdtemp(prefix="thread-contention-"))
    try:
        return _run(a, t_all, machine)
    finally:
        shutil.rmtree(a.fixture_dir, ignore_errors=True)


def _run(a, t_all: float, machine) -> dict:
    source = source_info(a)
    t = time.perf_counter()
    settle(a.settle)
    prep = subprocess.run(_child_cmd(a, "prepare", ["--layers", str(a.layers), "--samples", str(a.samples),
                                                    "--windows", str(a.windows)]),
                          env=_clean_env({}), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if prep.returncode:
        raise SystemExit("prepare failed:\n" + prep.stderr[-3000:])
    print(f"prepared in {time.perf_counter() - t:.0f} s", flush=True)
    settings = [s for s in SETTINGS if s in a.settings]
    meta = {
        "name": "thread_contention",
        "machine": machine(),
        "torch": parallel_info(),
        "protocol": {"layers": a.layers, "samples": a.samples, "windows": a.windows, "cap": a.cap, "settle": a.settle,
                     "competitor": "python: torch.mm([1024,576],[576,1536]) float32 loop, torch default threads",
                     "prune": "SmolLM2-135M, PruneSettings(method='magnitude') (ratio 0.2, keep_first 3, align 32)",
                     "reconstruct": "ReconstructSettings defaults except samples",
                     "ppl": "window_perplexity(fast=True, batch_size=8), window 128, WikiText-2 test"},
        "settings": settings,
        "roles": a.roles,
        "conditions": a.conditions,
        "source": source,
    }
    trials, skipped = [], []
    partial = a.out / "thread_contention.partial.json"
    compare = None
    # by priority: every setting's reconstruction, then every setting's perplexity, then the
    # int4 / fp32 comparison, so a run cut short by --budget (a loaded machine) keeps what matters
    conditions = [c == "contended" for c in ("alone", "contended") if c in a.conditions]
    plan = [(role, s, contended) for role in ("recon", "ppl") if role in a.roles for s in settings for contended in conditions]
    for role, s, contended in plan + ([("compare", "default", False)] if "compare" in a.roles else []):
        if time.perf_counter() - t_all > a.budget:
            skipped.append({"role": role, "setting": s, "contended": contended})
            continue
        if role == "compare":
            compare = trial(a, "ppl", "default", False, compare=True)
        else:
            trials.append(trial(a, role, s, contended))
        partial.write_text(json.dumps({"run": {**meta, "total_s": time.perf_counter() - t_all}, "compare": compare,
                                       "trials": trials}, indent=1, default=str))
    partial.unlink(missing_ok=True)
    return {**meta, "compare": compare, "trials": trials, "skipped_for_budget": skipped, "total_s": time.perf_counter() - t_all}


def _total_s(part: dict) -> float:
    return part.get("total_s") or part.get("run", {}).get("total_s", 0.0)


def merge(paths: list[Path]) -> dict:
    """One result from several runs' files (full results or `.partial.json` of a run that was cut
    short, with a `run` entry naming its protocol); each row records which run it came from."""
    data, rows, compare = None, {}, None
    for i, path in enumerate(paths):
        part = json.loads(path.read_text())
        meta = part if "protocol" in part else part.get("run", {})
        if data is None and "protocol" in meta:
            data = {k: v for k, v in meta.items() if k not in ("trials", "compare", "skipped_for_budget")}
        for r in part.get("trials", []):
            rows[(r["role"], r["setting"], r["contended"])] = {**r, "run": i, "run_file": path.name,
                                                               "commit": meta.get("source", {}).get("commit")}
        if part.get("compare"):
            compare = {**part["compare"], "run": i, "run_file": path.name, "commit": meta.get("source", {}).get("commit"),
                       "protocol": meta.get("protocol")}
    if data is None:
        raise SystemExit("--merge: no file carries the protocol (a full result or a partial file with 'run')")
    data.update({"trials": list(rows.values()), "compare": compare, "merged_from": [str(p) for p in paths],
                 "settings": [s for s in SETTINGS if any(k[1] == s for k in rows)], "skipped_for_budget": [],
                 "total_s": sum(_total_s(json.loads(p.read_text())) for p in paths)})
    return data


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("SAAP_EDGE_DATA_DIR"))
    p.add_argument("--layers", type=int, default=2, help="pruned decoder layers reconstructed per trial")
    p.add_argument("--samples", type=int, default=16, help="reconstruction calibration windows (compress default: 128)")
    p.add_argument("--windows", type=int, default=24, help="WikiText-2 windows of 128 tokens per perplexity pass")
    p.add_argument("--cap", type=float, default=20.0, help="soft cap of one stage in a trial, seconds")
    p.add_argument("--budget", type=float, default=540.0, help="start no trial after this many seconds of the run")
    p.add_argument("--settle", type=float, default=20.0, help="wait at most this long for idle cores before a trial")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--source", default="worktree",
                   help="code to measure: worktree (default) or a git revision, e.g. HEAD, exported to a temporary folder")
    p.add_argument("--roles", nargs="+", default=["recon", "ppl", "compare"], choices=["recon", "ppl", "compare"],
                   help="which trials: reconstruction, perplexity, the int4 / fp32 comparison")
    p.add_argument("--conditions", nargs="+", default=["alone", "contended"], choices=["alone", "contended"])
    p.add_argument("--merge", nargs="+", type=Path, default=None,
                   help="measure nothing: combine the trials of earlier runs' JSON files (a run cut short writes "
                        "results/thread_contention.partial.json) into one table; a later file's row replaces an earlier one's")
    p.add_argument("--out", type=Path, default=HERE / "results")
    # child roles
    p.add_argument("--role", default="main", choices=["main", "prepare", "recon", "ppl", "compete"], help=argparse.SUPPRESS)
    p.add_argument("--fixture-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--ready", default=None, help=argparse.SUPPRESS)
    p.add_argument("--compare", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.role == "prepare":
        return child_prepare(a)
    if a.role == "compete":
        return child_compete(a)
    if a.role in ("recon", "ppl"):
        out = (child_recon if a.role == "recon" else child_ppl)(a)
        cpu = os.times()
        out["_cpu_s"] = cpu.user + cpu.system
        a.result.write_text(json.dumps(out))
        return None
    if not a.data_dir and not a.merge:
        raise SystemExit("--data-dir (or SAAP_EDGE_DATA_DIR) is needed: the offline data folder")
    sys.path.insert(0, str(HERE))
    from harness import write_results

    data = merge(a.merge) if a.merge else run(a)
    paths = write_results(a.out, "thread_contention", data, markdown(data))
    print(markdown(data))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
