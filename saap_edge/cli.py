"""The saap-edge command line: argv -> settings dataclasses -> stage functions.

Each subcommand is an (add_arguments, run) pair in COMMANDS; adding one is one entry.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from saap_edge.config import (
    CPU_RECOVER_STEPS, METHODS, QUANTIZERS, RECON_TARGETS, RECONSTRUCTIONS, RECOVER_LOSSES, RECOVER_ORDERS, RECOVERIES,
    SELECTIONS, PruneSettings, ReconstructSettings, HywiaSettings, RecoverSettings, RunSettings, SearchSettings, default_cache_dir,
)
from saap_edge.errors import UserError
from saap_edge.models.load import DEFAULT_MODEL


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16 (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="folder with local copies of named datasets (default: $SAAP_EDGE_DATA_DIR, else the hub)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--device-map", default=None, choices=["auto"], help="auto: spread the decoder layers over every visible "
                   "GPU (and CPU RAM where --max-memory allows) with accelerate, for models larger than one GPU (default: one device)")
    p.add_argument("--max-memory", default=None, help="budgets for --device-map and the memory check, e.g. 0=20GiB,1=20GiB,cpu=64GiB "
                   "(default: what the devices have free)")
    p.add_argument("--solve-dtype", default="auto", choices=["auto", "float32", "float64"],
                   help="the refit's solves and OBS selection: auto = float32 on CUDA, float64 on the CPU (float32 moved "
                        "SmolLM2's refit errors by < 1e-6 relative: benchmarks/results/reconstruct_precision.md) "
                        "(default: %(default)s)")


def _run_settings(a: argparse.Namespace) -> RunSettings:
    return RunSettings(device=a.device, dtype=a.dtype, data_dir=a.data_dir, progress=not a.no_progress,
                       device_map=getattr(a, "device_map", None), max_memory=getattr(a, "max_memory", None),
                       solve_dtype=getattr(a, "solve_dtype", "auto"))


def _add_recover_args(p: argparse.ArgumentParser, in_compress: bool) -> None:
    d = RecoverSettings()
    g = p.add_argument_group("recovery (int4 groups + QA-LoRA)")
    if in_compress:
        g.add_argument("--no-recover", action="store_true", help="stop after pruning: keep the fp weights, no int4, no training")
    g.add_argument("--recovery", default=d.recovery, choices=RECOVERIES,
                   help="qalora: int4 groups + group-pooled LoRA merged into the offsets; lora: fp LoRA merged into fp weights; "
                        "none: int4 round-to-nearest, no training (default: %(default)s)")
    g.add_argument("--recover-data", default=d.data,
                   help="books, wikitext2, ptb, a .txt file or folder, an Alpaca .json/.jsonl file, or a hub dataset such as "
                        "yahma/alpaca-cleaned (default: %(default)s)")
    g.add_argument("--recover-steps", type=int, default=None,
                   help=f"optimizer steps (default: 2 epochs on a GPU as in the paper, {CPU_RECOVER_STEPS} on a CPU)")
    g.add_argument("--epochs", type=float, default=None, help="passes over the recovery windows (instead of --recover-steps)")
    g.add_argument("--rank", type=int, default=d.rank, help="LoRA rank (default: %(default)s)")
    g.add_argument("--lora-alpha", type=float, default=d.alpha, help="LoRA alpha (default: %(default)s)")
    g.add_argument("--lora-dropout", type=float, default=d.dropout, help="LoRA dropout (default: %(default)s)")
    g.add_argument("--group-size", type=int, default=None, help="int4 group size G, a multiple of 32 (default: 128, 64 or 32, the largest dividing every projection)")
    g.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (default: %(default)s)")
    g.add_argument("--warmup", type=float, default=d.warmup, help="share of steps warming up linearly, then linear decay (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per micro-batch (default: %(default)s)")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step (default: %(default)s)")
    g.add_argument("--recover-seq-len", type=int, default=d.seq_len, help="tokens per training window (default: %(default)s)")
    g.add_argument("--recover-seed", type=int, default=d.seed, help="seed of the data order, held-out pick and dropout (default: %(default)s)")
    g.add_argument("--recover-loss", default=d.loss, choices=RECOVER_LOSSES,
                   help="lm: next-token cross-entropy; kd: KL to the dense model's distribution (distillation); "
                        "kd+lm: both, weighted by --kd-weight (default: %(default)s)")
    g.add_argument("--train", default=None,
                   help="what training changes, a comma list of lora (QA-LoRA adapters; plain LoRA before int4 with "
                        "distil-quantize), offsets and scales (the int4 groups' own, codes never change), norms (RMSNorm "
                        "weights), full (every fp weight, distil-quantize only) (default: offsets with --recovery qalora, "
                        "full with --recover-order distil-quantize, lora with --recovery lora)")
    g.add_argument("--recover-order", default=d.order, choices=RECOVER_ORDERS,
                   help="quantize-distil: int4 first, then train the groups; distil-quantize: train the fp model, then "
                        "quantize it (and --offset-steps of the offsets) (default: %(default)s)")
    g.add_argument("--quantizer", default=d.quantizer, choices=QUANTIZERS,
                   help="rtn: round to nearest; gptq: error-compensating rounding from each layer's input statistics on "
                        "--quant-samples windows of the recovery text; same int4 format (default: %(default)s)")
    g.add_argument("--quant-samples", type=int, default=d.quant_samples,
                   help="gptq: calibration windows of --recover-seq-len tokens (default: %(default)s)")
    g.add_argument("--offset-steps", type=int, default=d.offset_steps,
                   help="distil-quantize: optimizer steps training the int4 offsets after quantizing (default: %(default)s)")
    g.add_argument("--group-lr", type=float, default=d.group_lr,
                   help="AdamW rate of trained offsets and norms; scales take a tenth of it (default: %(default)s)")
    g.add_argument("--kd-temperature", type=float, default=d.kd_temperature, help="distillation temperature (default: %(default)s)")
    g.add_argument("--kd-topk", type=int, default=d.kd_topk,
                   help="teacher tokens kept per position, the rest as one bucket; 0: the whole vocabulary, no cache (default: %(default)s)")
    g.add_argument("--kd-weight", type=float, default=d.kd_weight, help="share of the kd term in kd+lm (default: %(default)s)")
    g.add_argument("--teacher", default=None,
                   help="the dense model to distil from (default: the model the pruned one was made from, as recorded)")
    g.add_argument("--teacher-cache", default=str(default_cache_dir()),
                   help="folder caching the teacher's top-k targets; 'off' computes them every run (default: %(default)s)")
    g.add_argument("--teacher-cache-mib", type=int, default=4096,
                   help="the cache folder's size limit; the least recently used entries go first (default: %(default)s)")
    g.add_argument("--heldout-every", type=int, default=0,
                   help="score the held-out recovery windows every N steps (report.json: recovery.heldout_curve; default: off)")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps into <out>.checkpoints (default: about ten per run)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run from <out>.checkpoints with the same settings")
    g.add_argument("--keep-checkpoints", action="store_true", help="keep <out>.checkpoints (peft adapters, optimizer state) after success")


def _recover_settings(a: argparse.Namespace) -> RecoverSettings | None:
    if getattr(a, "no_recover", False):
        return None
    return RecoverSettings(
        recovery=a.recovery, data=a.recover_data, steps=a.recover_steps, epochs=a.epochs, rank=a.rank,
        alpha=a.lora_alpha, dropout=a.lora_dropout, group_size=a.group_size, lr=a.lr, warmup=a.warmup,
        batch_size=a.batch_size, grad_accum=a.grad_accum, seq_len=a.recover_seq_len, seed=a.recover_seed,
        loss=a.recover_loss, kd_temperature=a.kd_temperature, kd_topk=a.kd_topk, kd_weight=a.kd_weight, train=a.train,
        group_lr=a.group_lr, order=a.recover_order, quantizer=a.quantizer, quant_samples=a.quant_samples,
        offset_steps=a.offset_steps,
    )


def _teacher_args(a: argparse.Namespace) -> dict:
    if a.teacher_cache_mib < 1:
        raise UserError(f"--teacher-cache-mib must be >= 1, got {a.teacher_cache_mib}")
    cache = None if a.teacher_cache.lower() in ("off", "none", "") else Path(a.teacher_cache).expanduser()
    if a.heldout_every < 0:
        raise UserError(f"--heldout-every must be >= 0, got {a.heldout_every}")
    return {"teacher": a.teacher, "teacher_cache": cache, "teacher_cache_mib": a.teacher_cache_mib,
            "curve_every": a.heldout_every}


def add_compress(p: argparse.ArgumentParser) -> None:
    d = PruneSettings()
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF directory or hub id, LLaMA .gguf file, or alias (default: %(default)s)")
    p.add_argument("--ratio", type=float, default=d.ratio, help="share of ALL parameters to remove (default: %(default)s)")
    p.add_argument("--method", default=d.method, choices=METHODS, help="pruning method (default: %(default)s)")
    p.add_argument("--calib", default=d.calib, help="calibration text: books, wikitext2, ptb, or a .txt file / folder (default: %(default)s)")
    p.add_argument("--calib-samples", type=int, default=d.calib_samples, help="calibration samples (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per calibration sample (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the calibration draw and of random (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("saap-out"), help="output directory (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    g = p.add_argument_group("SAAP settings")
    g.add_argument("--fusion", default=d.fusion, help="adaptive (eq. 9, l^2 = mean), learned (l by gradient descent), sum, vector, element (default: %(default)s)")
    g.add_argument("--fusion-scope", default=d.fusion_scope, help="units fused and standardised together: all, global (per module kind), layer (default: %(default)s)")
    g.add_argument("--indicator", default=d.indicator, help="fluctuation (eq. 10: var x ||W||^2), bound (mean + std of the fused importance), none (mean) (default: %(default)s)")
    g.add_argument("--cost-exponent", type=float, default=d.cost_exponent, help="rank by score / unit parameter cost ** this, in [0, 1] (default: %(default)s)")
    g.add_argument("--weight-norm", default=d.weight_norm, help="||W||^2 of eq. 10 over the whole group, or out (output projection only) (default: %(default)s)")
    g.add_argument("--direction", default=d.direction, help="with --indicator fluctuation: high prunes the most volatile units first (paper's wording), low the least (default: %(default)s)")
    g.add_argument("--layer-cap", type=float, default=d.layer_cap, help="saap: most of a layer's KV groups / MLP channels one plan removes; raised only if --ratio needs it (default: %(default)s)")
    g.add_argument("--taylor", default=d.taylor, help="llm-pruner importance: vectorize or param_mix (default: %(default)s)")
    g.add_argument("--units", default=d.units, help="attention units that may leave, comma list: groups (KV groups), heads "
                   "(query-head slots: one head of every KV group), modules (a whole attention module; the layer keeps its MLP); "
                   "heads and modules need saap, flap or hywia; auto: groups,heads for saap and hywia with --reconstruct lsq, groups otherwise "
                   "(default: %(default)s)")
    g.add_argument("--keep-first", type=int, default=d.keep_first, help="first layers never pruned (default: %(default)s)")
    g.add_argument("--keep-last", type=int, default=d.keep_last, help="last layers never pruned (default: %(default)s)")
    g.add_argument("--align", type=int, default=d.align, help="kept MLP widths are multiples of this (default: %(default)s)")
    q = SearchSettings()
    g = p.add_argument_group("AdaPruner search (--method adapruner: which calibration windows and importance metric)")
    g.add_argument("--calib-pool", default=q.pool, help="text the candidate windows come from (default: %(default)s)")
    g.add_argument("--pool-size", type=int, default=q.pool_size, help="candidate windows of --seq-len tokens; a point picks "
                   "--calib-samples of them (default: %(default)s)")
    g.add_argument("--search-trials", type=int, default=q.trials, help="completed trials; a killed search resumes, a finished "
                   "one is reused, from <out>.search.db (default: %(default)s)")
    g.add_argument("--search-startup", type=int, default=q.startup, help="random trials before TPE (default: %(default)s)")
    g.add_argument("--search-objective", default=q.objective, help="perplexity on this text's validation split: a dataset "
                   "name or a file (default: %(default)s)")
    g.add_argument("--search-windows", type=int, default=q.objective_windows, help="128-token windows of the objective "
                   "(default: %(default)s)")
    g.add_argument("--search-sampler", default=q.sampler, help="tpe or random (default: %(default)s)")
    g.add_argument("--search-space", default=q.space, help="both, data (metric fixed) or metric (windows fixed) "
                   "(default: %(default)s)")
    g.add_argument("--new-search", action="store_true", help="replace a stored search made for another model, pool or objective")
    g.add_argument("--pool-cache-mib", type=int, default=q.cache_mib, help="bound of the pool-statistics cache "
                   "(~/.cache/saap-edge/adapruner); least recently used entries leave first (default: %(default)s)")
    y = HywiaSettings()
    g = p.add_argument_group("HyWIA fusion (--method hywia: coarse and fine importance blended per layer by a learned attention)")
    g.add_argument("--hywia-blend", default=y.blend, help="learned, or the ablations fixed (50/50), coarse, fine (default: %(default)s)")
    g.add_argument("--hywia-fine", default=y.fine, help="fine granularity: first (sum |g*w|) or second (sum |g*w - (g*w)^2/2|) "
                   "order (default: %(default)s)")
    g.add_argument("--hywia-loss", default=y.loss, help="kd (KL to the dense model) or lm, under the soft keep-mask (default: %(default)s)")
    g.add_argument("--hywia-steps", type=int, default=y.steps, help="optimizer steps of the fusion learning (default: %(default)s)")
    g.add_argument("--hywia-batch", type=int, default=y.batch, help="calibration windows per step (default: %(default)s)")
    g.add_argument("--hywia-lr", type=float, default=y.lr, help="Adam rate of the fusion parameters (default: %(default)s)")
    r = ReconstructSettings()
    g = p.add_argument_group("reconstruction (refit the kept weights of o_proj and down_proj, layer by layer)")
    g.add_argument("--reconstruct", default=r.method, choices=RECONSTRUCTIONS,
                   help="lsq: ridge least-squares refit on activations of the pruned prefix; none: slicing only (default: %(default)s)")
    g.add_argument("--recon-target", default=r.target, choices=RECON_TARGETS,
                   help="prefix: the dense layer applied to the pruned prefix's inputs; dense: the dense model's own activations "
                        "(one more forward pass) (default: %(default)s)")
    g.add_argument("--recon-samples", type=int, default=r.samples, help="calibration windows for the refit, drawn from --calib with --seed (default: %(default)s)")
    g.add_argument("--recon-seq-len", type=int, default=r.seq_len, help="tokens per refit window (default: %(default)s)")
    g.add_argument("--recon-damp", type=float, default=r.damp, help="ridge damping, share of the mean diagonal of X X^T (default: %(default)s)")
    g.add_argument("--recon-batch-size", type=int, default=r.batch_size, help="windows per forward pass of the refit (default: %(default)s)")
    g.add_argument("--select", default=r.select, choices=SELECTIONS,
                   help="global: the method's ranking picks the units removed; local: it sets how many each layer loses and "
                        "structured OBS on the pruned prefix's activations picks which (default: %(default)s)")
    e = p.add_argument_group("quick check")
    e.add_argument("--eval-ppl", nargs="*", default=["wikitext2"], help="datasets scored before and after, 128-token windows (default: %(default)s; none to skip)")
    e.add_argument("--eval-limit", type=int, default=64, help="windows per dataset for that check, 0 for all (default: %(default)s)")
    _add_recover_args(p, in_compress=True)
    _add_run_args(p)
    _add_dry_run(p)


def _add_dry_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="read config.json alone, print each stage's planned peak memory "
                   "on the card and the host, and exit: 0 if every stage fits, 2 naming the stage and the flags otherwise")


def _dry_run_done(stages: list) -> int:
    print(f"every stage fits ({len(stages)} planned)" if stages else "nothing to plan: the config cannot be read alone")
    return 0


def run_compress(a: argparse.Namespace) -> int:
    from saap_edge.compress import CompressJob, compress
    from saap_edge.render import before_after_table

    settings = PruneSettings(
        method=a.method, ratio=a.ratio, calib=a.calib, calib_samples=a.calib_samples, seq_len=a.seq_len,
        seed=a.seed, keep_first=a.keep_first, keep_last=a.keep_last, align=a.align, fusion=a.fusion,
        fusion_scope=a.fusion_scope, weight_norm=a.weight_norm, direction=a.direction,
        indicator=a.indicator, cost_exponent=a.cost_exponent, layer_cap=a.layer_cap, taylor=a.taylor, units=a.units,
    )
    recon = ReconstructSettings(method=a.reconstruct, target=a.recon_target, samples=a.recon_samples, seq_len=a.recon_seq_len,
                                damp=a.recon_damp, select=a.select, batch_size=a.recon_batch_size)
    eval_ppl = [] if a.eval_ppl in ([], ["none"]) else a.eval_ppl
    job = CompressJob(a.model, a.out, settings, recon, _run_settings(a), a.overwrite, eval_ppl, a.eval_limit or None,
                      recover=_recover_settings(a), resume=a.resume, save_every=a.save_every, keep_checkpoints=a.keep_checkpoints,
                      **_teacher_args(a),
                      search=SearchSettings(a.calib_pool, a.pool_size, a.search_trials, a.search_startup, a.search_objective,
                                            a.search_windows, a.search_sampler, a.search_space, a.new_search,
                                            a.pool_cache_mib),
                      hywia=HywiaSettings(blend=a.hywia_blend, fine=a.hywia_fine, loss=a.hywia_loss, steps=a.hywia_steps,
                                          batch=a.hywia_batch, lr=a.hywia_lr))
    if a.dry_run:
        from saap_edge.compress import dry_run

        return _dry_run_done(dry_run(job))
    report = compress(job)
    print(before_after_table(report))
    print(f"saved the {_model_kind(report)}, prune_plan.json, report.json and layers.png to {a.out}")
    return 0


def _model_kind(report) -> str:
    recovery = report.recovery
    if recovery and "group_size" in recovery:
        return f"int4 model (G={recovery['group_size']}, {recovery['recovery']})"
    return "slim model" + (f" ({recovery['recovery']})" if recovery else "")


def add_recover(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a pruned saap-edge directory (or any LLaMA HF directory)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: <model>-<recovery>)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--eval-ppl", nargs="*", default=["wikitext2"], help="datasets scored before and after (default: %(default)s; none to skip)")
    p.add_argument("--eval-limit", type=int, default=64, help="windows per dataset for that check, 0 for all (default: %(default)s)")
    _add_recover_args(p, in_compress=False)
    _add_run_args(p)
    _add_dry_run(p)


def run_recover(a: argparse.Namespace) -> int:
    from saap_edge.compress import RecoverJob, recover_dir
    from saap_edge.render import before_after_table

    out = a.out or Path(f"{a.model.rstrip('/')}-{a.recovery}")
    eval_ppl = [] if a.eval_ppl in ([], ["none"]) else a.eval_ppl
    job = RecoverJob(a.model, out, _recover_settings(a), _run_settings(a), a.overwrite, eval_ppl, a.eval_limit or None,
                     resume=a.resume, save_every=a.save_every, keep_checkpoints=a.keep_checkpoints, **_teacher_args(a))
    if a.dry_run:
        from saap_edge.compress import recover_dry_run

        return _dry_run_done(recover_dry_run(job))
    report = recover_dir(job)
    print(before_after_table(report))
    print(f"saved the {_model_kind(report)} and report.json to {out}")
    return 0


def add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="saap-edge output directory, HF directory or hub id, .gguf file, or alias")
    p.add_argument("--ppl", nargs="+", default=None, help="wikitext2, ptb, or a text file path (one or more)")
    p.add_argument("--tasks", nargs="+", default=None,
                   help="zero-shot multiple-choice tasks: arc_easy (arc-e), arc_challenge (arc-c), boolq, hellaswag, piqa, "
                        "winogrande, openbookqa (obqa), or all; a .gguf model is scored by llama.cpp")
    p.add_argument("--split", default="test", help="dataset split of --ppl (default: %(default)s)")
    p.add_argument("--window", type=int, default=128, help="tokens per non-overlapping window (default: %(default)s; e.g. 2048 for long context)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N windows (--ppl) and items of each task (--tasks) (default: all)")
    p.add_argument("--max-length", type=int, default=2048, help="--tasks: most tokens a request feeds the model; longer "
                                                                 "ones lose their oldest tokens (default: %(default)s, capped at the model's context)")
    p.add_argument("--batch-size", type=int, default=8, help="windows or task requests per forward pass (default: %(default)s)")
    p.add_argument("--scorer", default="auto", choices=["auto", "torch", "llama.cpp", "lm-eval"],
                   help="--tasks: who computes the log-likelihoods; auto = llama.cpp for a .gguf path (the artifact as a "
                        "device runs it), torch otherwise; lm-eval: lm-evaluation-harness's hf model on a model directory, "
                        "over the same items (default: %(default)s)")
    p.add_argument("--lm-eval-configs", type=Path, default=None,
                   help="--tasks: write lm-eval task configs (saap_<task>) over these items to this folder, for "
                        "`lm_eval --include_path`; with --scorer lm-eval they are kept there")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    _add_run_args(p)


def run_eval(a: argparse.Namespace) -> int:
    from saap_edge.eval.zeroshot import load_tasks
    from saap_edge.models.load import check_architecture, load_model, resolve_model

    if not a.ppl and not a.tasks:
        raise UserError("nothing to evaluate: give --ppl DATASET..., --tasks TASK..., or both")
    if a.lm_eval_configs and not a.tasks:
        raise UserError("--lm-eval-configs writes task configs for --tasks; give --tasks TASK...")
    tasks = load_tasks(a.tasks, a.data_dir, a.limit) if a.tasks else None  # bad names fail before loading
    kind, location = resolve_model(a.model)
    if a.scorer == "lm-eval" and tasks:
        if kind != "hf" or not Path(location).is_dir():
            raise UserError(f"--scorer lm-eval runs lm-eval's hf model on a model directory; {a.model} is not one "
                            "(give a saap-edge output or HF directory, or use --scorer torch)")
    elif a.lm_eval_configs and tasks:
        from saap_edge.eval.lmeval import write_task_configs

        names = write_task_configs(a.tasks, a.data_dir, a.lm_eval_configs, a.limit)
        print(f"wrote lm-eval task configs {', '.join(names)} to {a.lm_eval_configs}; run them with\n"
              f"  lm_eval --model hf --model_args pretrained={a.model},trust_remote_code=True "
              f"--include_path {a.lm_eval_configs} --tasks {','.join(names)}")
    if a.scorer == "llama.cpp" and kind not in ("gguf", "alias"):
        raise UserError(f"--scorer llama.cpp scores GGUF files; export {a.model} first (saap-edge export) or use --scorer torch")
    on_llama_cpp = bool(tasks) and (a.scorer == "llama.cpp" or (a.scorer == "auto" and kind == "gguf"))
    outside = on_llama_cpp or a.scorer == "lm-eval"  # the tasks are scored by another process' model
    loaded = load_model(a.model, a.device, a.dtype) if a.ppl or not outside else None
    if loaded is None:
        check_architecture(kind, location)
    result: dict = {"model": loaded.source if loaded else {"model": a.model, "kind": kind, "path": str(location)}}
    if a.ppl:
        from saap_edge.models.load import check_positions

        check_positions(loaded.model, {"--window": a.window})
        result.update(split=a.split, ppl=_eval_ppl(a, loaded))
    if tasks and a.scorer == "lm-eval":
        result.update(_eval_lm_eval(a, location))
    elif tasks:
        result.update(_eval_tasks(a, tasks, loaded, location if on_llama_cpp else None))
    if a.json:
        from saap_edge.outputs import write_json

        write_json(a.json, result)
    if kind == "hf" and (Path(location) / "report.json").is_file():  # a saap-edge output: its card shows the numbers
        from saap_edge.card import record_eval

        record_eval(Path(location), result)
    return 0


def _eval_ppl(a: argparse.Namespace, loaded) -> dict:
    from saap_edge.eval.ppl import evaluate_ppl
    from saap_edge.render import format_table

    results = evaluate_ppl(
        loaded.model, loaded.tokenizer, a.ppl, a.split, a.window, a.limit, a.data_dir,
        batch_size=a.batch_size, progress=not a.no_progress,
    )
    rows = [[name, r["ppl"], r["windows"], r["window"], r["tokens_scored"], f"{r['seconds']:.0f}",
             f"{r['windows'] * r['window'] / r['seconds']:.0f}"] for name, r in results.items()]
    print(format_table(["dataset", "perplexity", "windows", "window", "tokens scored", "seconds", "tokens/s"], rows))
    return results


def _eval_tasks(a: argparse.Namespace, tasks: dict, loaded, gguf: Path | None) -> dict:
    """Zero-shot accuracy: llama.cpp on the GGUF file when `gguf` is set, else the torch model."""
    from saap_edge.eval.zeroshot import LlamaCppScorer, TorchScorer, score_tasks
    from saap_edge.render import format_table

    if gguf is not None:
        scorer = LlamaCppScorer(gguf, max_length=a.max_length)
    else:
        scorer = TorchScorer(loaded.model, loaded.tokenizer, a.batch_size, max_length=a.max_length)
    try:
        results = score_tasks(scorer, tasks, progress=not a.no_progress)
    finally:
        scorer.close()
    rows = [[name, r["acc"], r["acc_norm"], r["n"]] for name, r in results.items()]
    print(format_table(["task", "acc", "acc_norm", "n"], rows))
    return {"tasks": results, "limit": a.limit, "scorer": "llama.cpp" if gguf is not None else "torch"}


def _eval_lm_eval(a: argparse.Namespace, location) -> dict:
    """Zero-shot accuracy by lm-eval's hf model over our items (configs in a temporary folder
    unless --lm-eval-configs names one)."""
    import tempfile

    from saap_edge.eval.lmeval import evaluate_lm_eval
    from saap_edge.models.load import resolve_device
    from saap_edge.render import format_table

    with tempfile.TemporaryDirectory(prefix="saap-lm-eval-") as tmp:
        results = evaluate_lm_eval(location, a.tasks, a.data_dir, a.lm_eval_configs or tmp, a.limit, a.batch_size,
                                   str(resolve_device(a.device)))
    rows = [[name, r["acc"], r.get("acc_norm", "-"), r["n"]] for name, r in results.items()]
    print(format_table(["task", "acc", "acc_norm", "n"], rows))
    return {"tasks": results, "limit": a.limit, "scorer": "lm-eval"}


def add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="saap-out", help="saap-edge output directory, LLaMA HF directory or .gguf (default: %(default)s)")
    p.add_argument("--format", default="gguf", choices=["gguf", "onnx"], help="artifact format (default: %(default)s)")
    p.add_argument("--quant", default=None, help="projection tensors. GGUF: q4_1 (default), f16, f32; ONNX: int4 (default; "
                                                 "MatMulNBits), f16, f32. int4/q4_1 carry the checkpoint's int4 groups bit for bit; "
                                                 "fp weights are quantized by the same group quantizer first")
    p.add_argument("--embed-type", default=None, help="token embedding / output matrix: f16, f32, (GGUF) q4_1, q8_0 or (ONNX) int8: "
                                                       "8-bit blocks of 32 (default: q8_0 / int8 with int4 projections, f16 otherwise)")
    p.add_argument("--onnx-graph", default="fused", choices=["fused", "dynamo"],
                   help="ONNX: fused (GroupQueryAttention with rotary inside and a shareable KV buffer, fused "
                        "RMSNorms; runs in onnxruntime-genai, genai_config.json written) or dynamo (the traced Hugging Face "
                        "forward, optimum's layout) (default: %(default)s)")
    p.add_argument("--matmul-accuracy", default=None, choices=["fp32", "int8-head", "int8"],
                   help="ONNX fused graph: activations of the int4 / 8-bit matmuls. fp32 computes what torch computes on the "
                        "stored weights; int8-head keeps fp32 in every layer and quantizes the final hidden state to int8 "
                        "blocks for the 8-bit output matrix (--embed-type int8); int8 quantizes every activation block in "
                        "the kernel (as llama.cpp does for Q4_1). int8 modes: logits bounded loosely, the same graph with "
                        "fp32 activations strictly (default: int8-head with an int8 embedding, fp32 otherwise)")
    p.add_argument("--out", type=Path, default=None, help="output file or folder (default: <model>/model-<quant>.gguf, "
                                                          "<model>/onnx-<quant>/)")
    p.add_argument("--tokenizer-pre", default=None, metavar="NAME",
                   help="GGUF: llama.cpp's pre-tokenizer for a byte-level BPE tokenizer (llama-bpe, smollm, gpt-2, default, "
                        "...); by default it is recognised from llama.cpp's check-text hash or tokenizer.json's "
                        "pre-tokenizer. Either way the export tokenizes a check text in llama.cpp and in the source "
                        "tokenizer and keeps the file only if the ids are equal")
    p.add_argument("--no-validate", action="store_true", help="skip reading the artifact back and comparing it with torch "
                   "(weights, logits and tokenization)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar over the layers being written")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _add_dry_run(p)


def run_export(a: argparse.Namespace) -> int:
    from exporters import ExportJob, export, plan_export
    from saap_edge.render import format_table

    job = ExportJob(a.model, a.format, a.quant, a.embed_type, a.out, not a.no_validate, a.overwrite,
                    onnx_graph=a.onnx_graph, matmul_accuracy=a.matmul_accuracy, progress=not a.no_progress,
                    tokenizer_pre=a.tokenizer_pre)
    if a.dry_run:
        return _dry_run_done(plan_export(job))
    result = export(job)
    info = result.info
    rows = [["file", str(result.path)], ["bytes", result.bytes], ["architecture", info["arch"]],
            ["projections", info["quant"]], ["embeddings", info["embed_type"]], ["int4 tensors packed", info["int4_tensors"]]]
    if info.get("modelfile"):
        rows.insert(1, ["Ollama Modelfile", info["modelfile"]])
    if info.get("matmul_accuracy"):
        rows.insert(5, ["matmul activations", info["matmul_accuracy"]])
    for check in info.get("tokenizer_check") or []:
        rows.append([f"tokenizer ids equal ({check['runtime']})", check["summary"]])
    v = info.get("validation")
    if v:
        rows += [["int4 weights decode to a*q + b", f"{v['weights_checked']} tensors, max |diff| {v['weights_max_abs_diff']:.2g}"],
                 ["logits max |diff| vs torch", f"{v['logits_max_abs_diff']:.3g} (logit scale {v['logits_scale']:.3g}, {len(v['tokens'])} tokens, {v['runtime']})"],
                 ["top-1 agreement", f"{v['top1_agreement']:.0%}"]]
        if v.get("cache_max_abs_diff") is not None:
            rows.append(["logits through the KV cache vs one pass", f"{v['cache_max_abs_diff']:.3g}"])
        if v.get("fp32_graph_max_abs_diff") is not None:
            rows.append(["same graph, float32 activations, vs torch", f"{v['fp32_graph_max_abs_diff']:.3g}"])
    print(format_table(["export", ""], rows))
    return 0


def add_run(p: argparse.ArgumentParser) -> None:
    from runtime.__main__ import add_arguments

    add_arguments(p)


def run_run(a: argparse.Namespace) -> int:
    from runtime.__main__ import run
    from runtime.base import RuntimeLoadError

    try:
        return run(a)
    except RuntimeLoadError as exc:
        raise UserError(str(exc)) from exc


def add_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", help="what to compare: .gguf files, exported ONNX folders, saap-edge output "
                   "directories (their exported artifact) or smollm2-135m")
    p.add_argument("--prompts", type=Path, default=None, help="a file of prompts, one a line (or a JSON list); default: "
                   "three built-in chat prompts")
    p.add_argument("--raw", action="store_true", help="continue each prompt as raw text instead of a chat turn")
    p.add_argument("--system", default=None, help="a system message for every chat turn")
    p.add_argument("-n", "--max-new-tokens", type=int, default=128, help="tokens an answer at most (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="(default: %(default)s: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="(default: %(default)s: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ppl", type=int, nargs="?", const=64, default=None, metavar="WINDOWS",
                   help="add WikiText-2 perplexity over the first WINDOWS test windows (default when given: 64)")
    p.add_argument("--data-dir", default=None, help="offline datasets folder (for --ppl)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of the runtimes (default: their choice)")
    p.add_argument("--out", type=Path, default=None, help="also write the Markdown table to this file")
    p.add_argument("--no-progress", action="store_true")


def run_compare(a: argparse.Namespace) -> int:
    from runtime.base import Sampling
    from saap_edge.outputs import write_file
    from saap_edge.compare import compare, read_prompts

    prompts = read_prompts(a.prompts)
    try:
        sampling = Sampling(a.temperature, a.top_k, a.top_p, a.seed).validate()
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    if a.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    _, text = compare(a.models, prompts, not a.raw, a.max_new_tokens, sampling, a.threads, a.system, a.ppl, a.data_dir,
                      progress=not a.no_progress)
    print(text)
    if a.out:
        write_file(a.out, text)
        print(f"written: {a.out}")
    return 0


def add_bench(p: argparse.ArgumentParser) -> None:
    from saap_edge.config import BENCH_RUNTIMES, EXTRA_BENCH_RUNTIMES

    p.add_argument("models", nargs="*", help="saap-edge output directories to compare with the dense model (default: saap-out)")
    p.add_argument("--dense", default=None, help="the dense model: HF directory, .gguf or alias (default: the source "
                                                 "recorded in the first model's report.json, else smollm2-135m)")
    p.add_argument("--runtimes", nargs="+", default=list(BENCH_RUNTIMES), help=f"rows per model (default: {' '.join(BENCH_RUNTIMES)}; also {' '.join(EXTRA_BENCH_RUNTIMES)})")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prefill length (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens per run (default: %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="timed runs per row; median, min and max reported (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of every runtime (default: each runtime's own)")
    p.add_argument("--device", default="cpu", help="torch rows: cpu, or cuda (fp16, allocator peak) (default: %(default)s)")
    p.add_argument("--no-validate", action="store_true", help="skip the read-back check of each exported artifact")
    p.add_argument("--provider", default="auto", help="ONNX rows: onnxruntime execution provider, auto (CUDA where "
                   "onnxruntime-gpu has it, else CPU), cpu or cuda; the table names the one that ran (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="results folder: bench.json, bench.md, PNG charts, "
                                                                     "artifacts/ (default: %(default)s)")
    p.add_argument("--artifacts", type=Path, default=None, help="where exported artifacts and row logs go (default: <out>/artifacts)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_dry_run(p)


def run_bench(a: argparse.Namespace) -> int:
    from saap_edge.bench import default_models, plan_bench, run_bench as bench
    from saap_edge.render import bench_markdown
    from saap_edge.config import BenchSettings

    settings = BenchSettings(tuple(a.runtimes), a.prompt_tokens, a.new_tokens, a.reps, a.warmup, a.threads, a.device,
                             not a.no_validate, a.provider).validate()
    if a.dry_run:
        return _dry_run_done(plan_bench(default_models(a.models, a.dense), settings))
    data = bench(default_models(a.models, a.dense), settings, a.out, progress=not a.no_progress, artifacts=a.artifacts)
    print(bench_markdown(data))
    print(f"written: {a.out / 'bench.json'}, {a.out / 'bench.md'}, {a.out / 'bench_memory.png'}, {a.out / 'bench_speed.png'}")
    return 0


COMMANDS = {
    "compress": (add_compress, run_compress, "prune a LLaMA-family model with SAAP (or a baseline), then recover it as an int4 model"),
    "recover": (add_recover, run_recover, "int4 + QA-LoRA recovery of a pruned directory (the stage compress runs after pruning)"),
    "export": (add_export, run_export, "write a compressed model as GGUF (llama.cpp) or ONNX (onnxruntime) with its int4 groups packed"),
    "run": (add_run, run_run, "generate text from an exported artifact (streams; prints prefill and decode tokens/s)"),
    "compare": (add_compare, run_compare, "the same prompts (chat or raw) through several models or artifacts, answers "
                                          "side by side in Markdown, with tokens/s and optionally perplexity"),
    "bench": (add_bench, run_bench, "memory, parameters and tokens/s of dense vs compressed models in torch, llama.cpp and onnxruntime"),
    "eval": (add_eval, run_eval, "perplexity on WikiText-2, PTB or a text file, and zero-shot accuracy on ARC, BoolQ, HellaSwag, PIQA, WinoGrande, OpenBookQA"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saap-edge", description="Compress LLaMA-family models for edge devices (SAAP).")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, _, help_text) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # our own messages say what matters; keep HF's notices out
    if args.command in ("compress", "recover"):
        from saap_edge.seeding import deterministic_cuda

        deterministic_cuda()  # the same command, the same bytes (CPU kernels already are)
    try:
        return COMMANDS[args.command][1](args)
    except UserError as exc:
        print(f"saap-edge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"saap-edge {args.command}: interrupted; nothing was written to the output (recovery checkpoints stay for --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
