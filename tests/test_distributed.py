"""Data-parallel stages: two CPU processes (gloo) under `accelerate launch` against one process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DATA_DIR, book_text, tiny_llama

pytest.importorskip("accelerate")
ROOT = Path(__file__).resolve().parents[1]
# Two processes against one. Estimation: equal bit for bit (each row of the per-sample tensors
# is one process's, the others add 0), so the plan is the same. Reconstruction: the moments are
# float sums over other batches in another order, so the refit weights agree to rounding
# (~5e-6 measured here). Recovery from one pruned model: each step's gradient is the same two
# micro-batch gradients added once (g0 + g1 in one process, all-reduce in two), the same
# dropout seeds and the same teacher targets, so losses and trained parameters are equal.
RECON_ATOL = 1e-4  # refit weights, 1 vs 2 processes
TRAIN_ATOL = 1e-6  # trained parameters, 1 vs 2 processes, from the same pruned model


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, *argv: str) -> subprocess.CompletedProcess:
    """`saap-edge` in `processes` processes: accelerate's torchrun launcher (gloo on a CPU) or plain python."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cli = ["-m", "saap_edge.cli", *argv]
    if processes == 1:
        cmd = [sys.executable, *cli]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(_port()), *cli]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("dp")
    model = root / "tiny"
    tiny_llama(n_heads=4, n_kv=2, hidden=128, ffn=256, layers=4).save_pretrained(model, safe_serialization=True)
    tiny_tokenizer.save_pretrained(model)
    text = root / "recovery.txt"
    text.write_text(book_text(60_000))
    return root, model, text


def compress_argv(model: Path, out: Path, *extra: str) -> list[str]:
    return ["compress", "--model", str(model), "--data-dir", str(DATA_DIR), "--calib-samples", "8", "--recon-samples", "6",
            "--ratio", "0.25", "--keep-first", "1", "--out", str(out), "--no-recover", "--no-progress", *extra]


def recover_argv(pruned: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return ["recover", str(pruned), "--out", str(out), "--data-dir", str(DATA_DIR), "--recover-data", str(text), "--recover-steps", "4",
            "--recover-seq-len", "64", "--batch-size", "2", "--grad-accum", "2", "--teacher-cache", "off",
            "--no-progress", *extra]


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def layers_of(directory: Path) -> list:
    return json.loads((directory / "prune_plan.json").read_text())["layers"]


@pytest.fixture(scope="module")
def pruned(setup):
    """The same compress (estimation, reconstruction) in 1 and in 2 processes."""
    root, model, _ = setup
    out = {}
    for n in (1, 2):
        directory = root / f"pruned{n}"
        run = launch(n, *compress_argv(model, directory))
        assert run.returncode == 0, run.stderr[-3000:]
        out[n] = directory
    return out


def test_two_processes_give_the_one_process_plan(pruned):
    one, two = pruned[1], pruned[2]
    assert layers_of(one) == layers_of(two)  # estimation: the same per-sample statistics, the same plan
    report = json.loads((two / "report.json").read_text())
    assert report["processes"] == 2 and report["reconstruction"]["processes"] == 2
    assert json.loads((one / "report.json").read_text())["processes"] == 1
    assert 0 < max_diff(tensors(one), tensors(two)) < RECON_ATOL  # the refit, from moments summed across processes
    # only process 0 wrote: one output, no temporary folders beside it
    assert sorted(p.name for p in two.parent.iterdir() if p.name.startswith("pruned2")) == ["pruned2"]


@pytest.fixture(scope="module")
def recovered(setup, pruned):
    """4 recovery steps (global batch 2 x 2) of the one-process pruned model in 1 and 2 processes."""
    root, _, text = setup
    out = {}
    for n in (1, 2):
        directory = root / f"rec{n}"
        run = launch(n, *recover_argv(pruned[1], text, directory, "--keep-checkpoints", "--save-every", "2"))
        assert run.returncode == 0, run.stderr[-3000:]
        out[n] = directory
    return out


def test_two_process_recovery_equals_one_process_recovery(recovered):
    est = json.loads((recovered[1] / "report.json").read_text())["memory_estimate"]["recovery"]["card"]
    # processes compute the teacher's targets on the fly: the teacher (the dense model the report
    # records) stays beside the student, and the plan counts it
    assert est["teacher weights"] > est["student weights"] > 0
    a, b = (json.loads((recovered[n] / "report.json").read_text())["recovery"] for n in (1, 2))
    assert a["steps"] == b["steps"] == 4
    assert max(abs(x - y) for x, y in zip(a["losses"], b["losses"])) < 1e-6
    assert max_diff(tensors(recovered[1]), tensors(recovered[2])) < TRAIN_ATOL
    assert sorted(p.name for p in recovered[2].parent.iterdir() if p.name.startswith("rec2")) == ["rec2", "rec2.checkpoints"]


def test_a_two_process_checkpoint_resumes_in_one_process(recovered, pruned, setup):
    root, _, text = setup
    resumed = root / "resumed"
    shutil.copytree(recovered[2].with_name("rec2.checkpoints"), resumed.with_name("resumed.checkpoints"))
    shutil.rmtree(resumed.with_name("resumed.checkpoints") / "step-000004")  # as if killed after step 2
    run = launch(1, *recover_argv(pruned[1], text, resumed, "--resume", "--save-every", "2"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((resumed / "report.json").read_text())["recovery"]["resumed_from"] == 2
    assert max_diff(tensors(resumed), tensors(recovered[2])) < TRAIN_ATOL


def test_a_process_count_that_does_not_divide_the_global_batch_is_refused(setup, pruned):
    root, _, text = setup
    out = root / "bad"
    argv = recover_argv(pruned[1], text, out)
    argv[argv.index("--grad-accum") + 1] = "3"
    run = launch(2, *argv)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if "error:" in line and "saap-edge" in line]
    assert errors and "do not divide the global batch of --grad-accum 3" in errors[0]
    assert not out.exists() and not out.with_name("bad.checkpoints").exists()


def test_one_process_takes_no_distributed_path(monkeypatch):
    from saap_edge import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    distributed.processes.cache_clear()
    p = distributed.processes()
    assert (p.rank, p.world, p.parallel, p.main) == (0, 1, False, True)
    assert p.share(5) == [0, 1, 2, 3, 4] and distributed.Processes(1, 2).share(5) == [1, 3]
    t = torch.ones(3)
    p.sum_(t)
    assert torch.equal(t, torch.ones(3))
    with pytest.raises(ValueError, match="boom"):
        p.agree(ValueError("boom"))


def test_a_run_the_devices_cannot_hold_is_refused_before_loading(setup, capsys):
    from saap_edge.cli import main

    root, model, _ = setup
    out = root / "too-big"
    assert main(compress_argv(model, out, "--max-memory", "cpu=1MiB")) == 2
    err = capsys.readouterr().err
    assert "estimation needs about" in err and "host holds 1.0 MiB" in err and "--device-map auto" in err
    assert not out.exists()
    # a map whose budget holds the weights (1.1 MiB here) but not the activations at --seq-len 128
    assert main(compress_argv(model, out, "--device-map", "auto", "--max-memory", "cpu=3MiB")) == 2
    err = capsys.readouterr().err
    assert "fit but leave no room for activations" in err and "--seq-len" in err and "--max-memory with a cpu=" in err
    assert not out.exists()
    assert main(compress_argv(model, out, "--max-memory", "cpu=lots")) == 2
    assert "each entry is DEVICE=SIZE" in capsys.readouterr().err


def test_a_model_dispatched_over_a_device_map_scores_like_the_undispatched_one(setup):
    """accelerate's hooks on every layer (a CPU-only map): the same per-sample Taylor statistics."""
    import copy

    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM

    from saap_edge.prune.estimate import collect_taylor
    from saap_edge.prune.groups import discover

    _, model_dir, _ = setup
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    dispatched = copy.deepcopy(model)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "cpu" for i in range(4)}}
    dispatched = dispatch_model(dispatched, device_map, force_hooks=True)
    assert hasattr(dispatched.model.layers[1], "_hf_hook")
    samples = torch.randint(3, 500, (3, 24), generator=torch.Generator().manual_seed(0))
    shapes = discover(model)
    a = collect_taylor(model, samples, shapes, list(range(4)), progress=False, heads=True)
    b = collect_taylor(dispatched, samples, shapes, list(range(4)), progress=False, heads=True)
    for store in ("vector", "element", "first"):
        x, y = getattr(a, store), getattr(b, store)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert a.losses == b.losses


def test_compress_with_device_map_auto_gives_the_same_plan(setup, pruned, capsys):
    """--device-map auto on a machine with no GPU: accelerate places every layer on the CPU; the
    plan equals the one of the plain run."""
    from saap_edge.cli import main

    root, model, _ = setup
    out = root / "mapped"
    assert main(compress_argv(model, out, "--device-map", "auto")) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    card = report["memory_estimate"]["estimation"]["card"]
    assert card["total"] > card["weights"] > 0
    assert layers_of(out) == layers_of(pruned[1])


def test_a_process_group_that_cannot_start_is_one_error_line(setup):
    """A peer that never answers (an address that does not resolve): exit 2, the backend named,
    nothing written."""
    root, model, _ = setup
    out = root / "no-group"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), WORLD_SIZE="2", RANK="1", LOCAL_RANK="1",
               MASTER_ADDR="peer.invalid", MASTER_PORT=str(_port()), SAAP_EDGE_DIST_TIMEOUT="3")
    run = subprocess.run([sys.executable, "-m", "saap_edge.cli", *compress_argv(model, out)], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=300)
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("saap-edge compress: error:")]
    assert len(errors) == 1 and "the gloo process group cannot start" in errors[0] and "MASTER_ADDR" in errors[0]
    assert not out.exists()


def test_a_spread_model_leaves_its_hooks_for_reconstruction_and_is_spread_again(setup):
    """The device-map path of compress with accelerate's hooks forced on (a CPU-only map): the
    slim model is built off the hooks, the hooks come off for reconstruction and both models
    are dispatched again with working forwards."""
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM

    from saap_edge.models.load import dispatch, undispatch

    _, model_dir, _ = setup
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 17, 300, 45, 9]])
    with torch.no_grad():
        ref = model(ids).logits
    model = dispatch_model(model, {"": "cpu"}, force_hooks=True)
    assert hasattr(model.model.layers[0], "_hf_hook")
    undispatch(model)
    assert not hasattr(model.model.layers[0], "_hf_hook") and not hasattr(model, "hf_device_map")
    model = dispatch(model, {"cpu": 2**30})
    assert model.hf_device_map and all(v == "cpu" for v in model.hf_device_map.values())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
