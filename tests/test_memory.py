"""The memory plan (saap_edge/memory.py): counts from the module tree, --max-memory as accelerate
spells it, --dry-run from config.json alone, and planned peaks against measured ones."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from saap_edge.errors import UserError
from saap_edge.memory import GIB, Devices, Shape, check_fits, devices_for, estimation_memory, parse_max_memory, recovery_memory

LLAMA_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
            "num_attention_heads": 32, "num_key_value_heads": 32, "num_hidden_layers": 32, "vocab_size": 32000,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
LLAMA_3_8B = {**LLAMA_7B, "intermediate_size": 14336, "num_key_value_heads": 8, "vocab_size": 128256,
              "max_position_embeddings": 8192, "rope_theta": 500000.0}


def test_counts_from_the_module_tree_equal_a_hand_count():
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    shape = Shape.of(cfg)
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128  # q, k, v, o, gate, up, down
    params = 2 * 512 * 64 + 2 * per_layer + (2 * 2 * 64 + 64)  # embedding + head, layers, norms
    assert shape.params() == params and shape.layer_params == [per_layer + 2 * 64] * 2
    est = estimation_memory(shape, 4, 16, 8)
    act = 2 * (16 * (4 * 64 + 4 * 64 + 3 * 32 + 4 * 128) * 4 + 4 * 16 * 16 * 4)
    assert est.card == {"weights": params * 4, "activations": act, "logits": 2 * 16 * 512 * 4,
                        "gradients in flight": 2 * 64 * 128 * (4 + 12), "unit statistics": 8 * 2 * (2 + 4 + 128) * 3 * 4}
    rec = recovery_memory(shape, 2, 0.0, 4, 32, True, 8, True, 32, live_teacher=True, quantized=False)
    lora = 2 * 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert rec.card["student weights"] == params * 2 and rec.card["teacher weights"] == params * 2
    assert rec.card["trained parameters and AdamW"] == lora * 16
    # the student trains alone once the teacher pass has filled the cache
    assert "teacher weights" not in recovery_memory(shape, 2, 0.0, 4, 32, True, 8, True, 32).card


def test_a_tied_slim_config_is_counted_once():
    from saap_edge.models.slim import SlimLlamaConfig

    cfg = SlimLlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
                          num_attention_heads_per_layer=[4, 2], num_key_value_heads_per_layer=[2, 1],
                          intermediate_size_per_layer=[64, 32])
    shape = Shape.of(cfg)
    assert shape.head_params == 0 and shape.embed_params == 100 * 32
    layer1 = 32 * 16 + 2 * 32 * 8 + 16 * 32 + 3 * 32 * 32 + 2 * 32
    assert shape.layer_params[1] == layer1


@pytest.mark.parametrize("text, expect", [
    ("0=20GiB", {0: 20 * GIB}),
    ("cuda:0=20GiB,cpu=64GiB", {0: 20 * GIB, "cpu": 64 * GIB}),
    ("0=20GiB, 1=18GiB ,CPU=64GB", {0: 20 * GIB, 1: 18 * GIB, "cpu": 64 * 10**9}),
    ("cpu=512MiB", {"cpu": 512 * 2**20}),
])
def test_max_memory_is_spelled_as_accelerate_spells_it(text, expect):
    parsed = parse_max_memory(text)
    assert parsed == expect and all(isinstance(k, int) for k in parsed if k != "cpu")


@pytest.mark.parametrize("text, message", [
    ("gpu0=20GiB", "unknown device 'gpu0'"),
    ("0=lots", "each entry is DEVICE=SIZE"),
    ("0=20GiB,cuda:0=10GiB", "given twice"),
    ("20GiB", "each entry is DEVICE=SIZE"),
])
def test_a_wrong_max_memory_entry_is_one_line(text, message):
    with pytest.raises(UserError, match=message) as info:
        parse_max_memory(text)
    assert "\n" not in str(info.value)


def test_the_host_budget_never_counts_as_card_memory():
    mm = parse_max_memory("0=20GiB,cpu=64GiB")
    d = devices_for("cuda:0", mm, probe=False)
    assert (d.card, d.host) == (20 * GIB, 64 * GIB)
    d = devices_for("cuda", parse_max_memory("0=20GiB,1=20GiB,cpu=64GiB"), device_map="auto", probe=False)
    assert (d.card, d.host) == (40 * GIB, 64 * GIB)
    assert devices_for("cpu", mm).card is None and devices_for("cpu", mm).host == 64 * GIB
    with pytest.raises(UserError, match="run uses cuda:1"):
        devices_for("cuda:1", mm, probe=False)
    with pytest.raises(UserError, match="needs the card's size"):
        devices_for("cuda", {"cpu": GIB}, probe=False)


def test_a_stage_too_big_for_the_card_is_refused_even_when_the_host_is_large():
    from saap_edge.memory import StageMemory

    st = StageMemory("estimation", {"weights": 30 * GIB}, {}, "lower --seq-len")
    with pytest.raises(UserError, match="estimation needs about 30.00 GiB and the card holds 24.00 GiB"):
        check_fits([st], Devices(24 * GIB, 256 * GIB, "cuda:0"), None)
    check_fits([st], Devices(None, 32 * GIB), None)  # a CPU run: the host is the card


def _write_config(root: Path, name: str, config: dict) -> Path:
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("config", [LLAMA_7B, LLAMA_3_8B], ids=["llama-7b", "llama-3-8b"])
def test_the_7b_defaults_plan_to_fit_one_24gb_card(tmp_path, config, capsys):
    """config.json alone (no weights, no tokenizer): every stage of the defaults, kd included,
    fits a 24 GiB card with a 64 GiB host, and the card never holds two models."""
    from saap_edge.cli import main

    model = _write_config(tmp_path, "m", config)
    out = tmp_path / "out"
    assert main(["compress", "--model", str(model), "--out", str(out), "--dry-run", "--device", "cuda",
                 "--max-memory", "0=24GiB,cpu=64GiB"]) == 0
    text = capsys.readouterr().out
    for stage in ("estimation", "slice + reconstruct", "teacher pass", "quantize", "recovery"):
        assert f"  {stage}: card" in text
    recovery = next(line for line in text.splitlines() if line.startswith("  recovery:"))
    assert "teacher weights" not in recovery and "student weights" in recovery
    assert not out.exists()


def test_a_dry_run_that_does_not_fit_names_the_stage_and_exits_2(tmp_path, capsys):
    from saap_edge.cli import main

    model = _write_config(tmp_path, "m", LLAMA_7B)
    argv = ["compress", "--model", str(model), "--out", str(tmp_path / "o"), "--dry-run", "--device", "cuda"]
    assert main(argv + ["--max-memory", "0=12GiB,cpu=64GiB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "estimation needs about" in err[0] and "card holds 12.00 GiB" in err[0] and "--seq-len" in err[0]
    assert main(argv + ["--max-memory", "gpu=24GiB"]) == 2
    assert "unknown device 'gpu'" in capsys.readouterr().err
    # live teacher (no cache): teacher and student would share the card
    assert main(argv + ["--max-memory", "0=16GiB,cpu=64GiB", "--teacher-cache", "off", "--seq-len", "16"]) == 2
    err = capsys.readouterr().err
    assert "recovery needs about" in err and "--teacher-cache folder" in err
    gpt2 = _write_config(tmp_path, "g", {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2})
    assert main(["compress", "--model", str(gpt2), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'gpt2'" in err[0]
    assert not (tmp_path / "o").exists()


def test_recover_and_export_dry_runs_read_the_config_alone(tmp_path, capsys):
    from saap_edge.cli import main

    model = _write_config(tmp_path, "m", LLAMA_7B)
    assert main(["recover", str(model), "--dry-run", "--device", "cuda", "--max-memory", "0=24GiB,cpu=64GiB"]) == 0
    assert "  recovery: card" in capsys.readouterr().out
    assert main(["export", str(model), "--format", "gguf", "--dry-run"]) in (0, 2)
    out = capsys.readouterr()
    assert "export:" in out.out and "artifact" in out.out


# --------------------------------------------------------------------------------------------
# Planned against measured: each stage in a fresh process, its peak RSS above the process's
# RSS before the model loaded (the host plays the card on a CPU run).

MEASURE = textwrap.dedent('''
    import json, sys, torch
    from pathlib import Path
    from saap_edge.memory import PeakRSS
    from saap_edge.memory import Shape
    stage, model_dir = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    if stage.startswith("export"):  # libraries imported first: the stage's own memory is measured
        import llama_cpp, onnxruntime, transformers, accelerate, gguf
        import exporters, exporters.gguf, exporters.onnx_fused, exporters.validate, saap_edge.models.stream
    with PeakRSS() as rss:
        if stage.startswith("export"):
            from exporters import ExportJob, export
            fmt = stage.split("-")[1]
            export(ExportJob(model=model_dir, format=fmt, out=Path(sys.argv[3])))
            print(json.dumps({"start": rss.start_mib, "peak": rss.peak_mib}))
            raise SystemExit(0)
        from transformers import AutoModelForCausalLM
        from saap_edge.models.load import own_weights
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        own_weights(model, Path(model_dir))  # what load_model does on the CPU
        if stage == "estimation":
            from saap_edge.config import PruneSettings
            from saap_edge.prune import prune
            s = PruneSettings(method="saap", ratio=0.3, calib_samples=2, seq_len=32, keep_first=1, keep_last=0, units="groups")
            prune(model, torch.randint(0, 1000, (2, 32)), s, progress=False, slice_now=False)
        elif stage == "slice":
            from saap_edge.compress import _slice_stage
            from saap_edge.config import PruneSettings, ReconstructSettings, RunSettings
            from saap_edge.prune import prune
            s = PruneSettings(method="magnitude", ratio=0.3, keep_first=1, keep_last=0)
            plan = prune(model, None, s, progress=False, slice_now=False).plan
            slim, _ = _slice_stage(model, plan, None, ReconstructSettings(method="none", select="global"),
                                   torch.device("cpu"), RunSettings(progress=False))
        elif stage == "full":  # distil-quantize's fp training: every weight, float32, AdamW, 2 steps
            from saap_edge.config import RecoverSettings
            from saap_edge.recover.data import RecoveryData
            from saap_edge.recover.params import enable_direct
            from saap_edge.recover.train import train
            windows = torch.randint(0, 1000, (4, 32))
            enable_direct(model, ("full",))
            s = RecoverSettings(steps=2, batch_size=1, seq_len=32, loss="lm", order="distil-quantize", train="full")
            train(model, RecoveryData(windows, windows[:1], "text", "0"), s, progress=False)
        elif stage == "gptq":
            from saap_edge.quant.gptq import gptq_model
            # the output projections only: the widest input (down_proj) sets the second-moment terms, and the
            # fp weights the plan's dominant term, at a third of the column loop's time
            gptq_model(model, torch.randint(0, 1000, (8, 32)), 32, batch_size=4, progress=False,
                       modules=("o_proj", "down_proj"))
    print(json.dumps({"start": rss.start_mib, "peak": rss.peak_mib}))
''')


def _measure(stage: str, model_dir: Path, *args) -> float:
    out = subprocess.run([sys.executable, "-c", MEASURE, stage, str(model_dir), *map(str, args)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return (data["peak"] - data["start"]) * 2**20


@pytest.fixture(scope="module")
def weighty_model(tmp_path_factory):
    """A LLaMA whose weights (~400 MB in float32) dominate every other allocation of a stage."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=8, max_position_embeddings=64, tie_word_embeddings=False)
    d = tmp_path_factory.mktemp("weighty")
    LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    return d, Shape.of(cfg)


def test_estimation_peak_matches_its_plan(weighty_model):
    d, shape = weighty_model
    planned = estimation_memory(shape, 4, 32, 2, on_cpu=True).total
    measured = _measure("estimation", d)
    assert 0.8 * planned <= measured <= 1.2 * planned, (measured / 2**20, planned / 2**20)


def test_streamed_slicing_holds_the_dense_model_plus_one_layer_not_two_models(weighty_model):
    """The slim model grows as the dense one is freed layer by layer: the measured peak is the
    plan's dense weights + one layer, far below dense + slim (what slicing at once needs)."""
    from saap_edge.memory import reconstruct_memory

    d, shape = weighty_model
    planned = reconstruct_memory(shape, 4, 0.3, 0, 32, 8, on_cpu=True, refits=False).total
    measured = _measure("slice", d)
    assert 0.8 * planned <= measured <= 1.2 * planned, (measured / 2**20, planned / 2**20)
    both = shape.params() * 4 * (1 + 0.7)
    assert measured < 0.8 * both


def test_an_int4_checkpoint_counts_like_its_float_twin():
    """Int4 projections hold their weights as buffers (codes, scales, offsets): the plan counts
    in x out for each, so an int4 config's export and bench plans see the model's real size."""
    from saap_edge.memory import artifact_bytes, export_memory
    from saap_edge.models.slim import SlimLlamaConfig

    fields = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    fp, q = SlimLlamaConfig(**fields), SlimLlamaConfig(**fields, quantization={
        "scheme": "saap-int4-group", "bits": 4, "group_size": 32,
        "modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]})
    a, b = Shape.of(fp), Shape.of(q)
    assert a.params() == b.params() and a.layer_params == b.layer_params
    dense, int4 = export_memory(a, artifact_bytes(a, "q4_1", "q8_0"), None), export_memory(b, artifact_bytes(b, "q4_1", "q8_0"), 32)
    assert 0 < int4.host_total < dense.host_total


def test_a_config_transformers_will_not_build_empty_is_counted_by_the_block_formula():
    from transformers import LlamaConfig

    kwargs = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    good, odd = Shape.of(LlamaConfig(**kwargs)), Shape.of(LlamaConfig(**kwargs, pad_token_id=4096))
    assert odd.params() == good.params() and odd.layer_params == good.layer_params


def test_full_training_peak_matches_its_plan(weighty_model):
    """--train full: float32 weights, their gradients and two AdamW moments (16 B a weight)."""
    from saap_edge.memory import recovery_memory

    d, shape = weighty_model
    planned = recovery_memory(shape, 4, 0.0, 1, 32, False, 8, False, 32, quantized=False, full=True).total
    measured = _measure("full", d)
    assert 0.8 * planned <= measured <= 1.2 * planned, (measured / 2**20, planned / 2**20)


def test_gptq_quantize_peak_matches_its_plan(weighty_model):
    """GPTQ holds the fp weights while int4 layers replace them, one site's second moment at a time."""
    from saap_edge.memory import quantize_memory

    d, shape = weighty_model
    planned = quantize_memory(shape, 4, 0.0, 8, 32, 4).total
    measured = _measure("gptq", d)
    assert 0.8 * planned <= measured <= 1.2 * planned, (measured / 2**20, planned / 2**20)


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_a_streamed_export_holds_the_artifact_and_one_tensor_not_the_model(weighty_model, tiny_tokenizer, tmp_path, fmt):
    """Export from a safetensors directory (what compress writes) streams it module by module:
    the measured peak is within the plan's streamed terms (artifact + the largest tensor, the
    2 GiB slack for writers and readers aside; 64 MiB for the tokenizer, skeleton and allocator)
    and far below the float32 model that loading it whole would hold."""
    import shutil

    from saap_edge.memory import artifact_bytes, export_memory

    d, shape = weighty_model
    src = tmp_path / "m"
    shutil.copytree(d, src)
    tiny_tokenizer.save_pretrained(src)
    embed = "q8_0" if fmt == "gguf" else "int8"
    plan = export_memory(shape, artifact_bytes(shape, "q4_1" if fmt == "gguf" else "int4", embed, 128), None, streamed=True)
    terms = plan.host_total - plan.host["writers and readers"]
    measured = _measure(f"export-{fmt}", src, tmp_path / f"out-{fmt}")
    assert measured <= 1.2 * terms + 64 * 2**20, (measured / 2**20, terms / 2**20)
    assert measured < 0.6 * shape.params() * 4, (measured / 2**20, shape.params() * 4 / 2**20)
