"""runtime/: sampling, the llama.cpp generator, `saap-edge export` and `saap-edge run`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA_DIR, hetero_model
from runtime.base import Generator, Sampling, sample
from saap_edge.cli import main

STORIES = DATA_DIR / "models" / "stories260K" / "stories260K.gguf"
REFERENCE = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


def test_sampling_rules():
    rng = np.random.default_rng(0)
    logits = np.array([0.0, 3.0, 1.0, 2.9, -1.0])
    assert sample(logits, Sampling(), rng) == 1  # greedy
    assert all(sample(logits, Sampling(temperature=1.0, top_k=1), rng) == 1 for _ in range(20))
    assert all(sample(logits, Sampling(temperature=1.0, top_p=0.01), rng) == 1 for _ in range(20))
    picks = [sample(logits, Sampling(temperature=1.0, top_k=2), rng) for _ in range(400)]
    assert set(picks) == {1, 3}  # only the two most likely
    p = np.exp(logits) / np.exp(logits).sum()
    draws = np.bincount([sample(logits, Sampling(temperature=1.0), rng) for _ in range(4000)], minlength=5) / 4000
    assert np.abs(draws - p).max() < 0.03
    with pytest.raises(ValueError):
        Sampling(top_p=0).validate()


def test_runtime_needs_no_torch():
    code = ("import sys, runtime.base, runtime.llamacpp, runtime.ort, runtime.bench, runtime.__main__\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


@pytest.fixture(scope="module")
def stories_f32(tmp_path_factory) -> Path:
    pytest.importorskip("llama_cpp")
    from exporters.gguf import read_gguf, write_gguf

    path = tmp_path_factory.mktemp("stories") / "stories-f32.gguf"
    model, _ = read_gguf(STORIES)
    write_gguf(model, path, "f32", "f32", source_gguf=STORIES)
    return path


def test_llama_cpp_generator_reproduces_the_reference_from_bos(stories_f32):
    from runtime.llamacpp import LlamaCppRuntime

    rt = LlamaCppRuntime(stories_f32, n_ctx=256)
    gen = Generator(rt)
    text = "".join(gen.stream([rt.bos_token_id], max_new_tokens=30))
    assert text.strip().startswith(REFERENCE[: len(text.strip()) - 5]) and text.strip().startswith("Once upon a time, there was")
    st = gen.stats
    assert st.prompt_tokens == 1 and st.generated_tokens == 30 and st.decode_tok_s > 0 and st.prefill_tok_s > 0


def test_run_streams_text_and_reports_speed(stories_f32, capsys):
    assert main(["run", str(stories_f32), "--prompt", "Once upon a time", "-n", "20"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("Once upon a time, there was a little girl named Lily")
    assert "tok/s" in out.err and "generated 20 tokens" in out.err


@pytest.mark.parametrize("make,needle", [
    (lambda p: p, "no such file"),
    (lambda p: (p.write_text("hello"), p)[1], "not a GGUF file"),
    (lambda p: (p.write_bytes(STORIES.read_bytes()[:4000]), p)[1], "cannot load"),
])
def test_run_bad_artifacts_exit_2(tmp_path, capsys, make, needle):
    pytest.importorskip("llama_cpp")
    path = make(tmp_path / "x.gguf")
    assert main(["run", str(path), "-n", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("saap-edge run: error: ") and needle in err[0], err


# ---------------------------------------------------------------- export


@pytest.fixture(scope="module")
def int4_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    from saap_edge.quant.int4 import quantize_model

    path = tmp_path_factory.mktemp("int4") / "ckpt"
    model = hetero_model()
    quantize_model(model, 32)
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("quant", ["q4_1", "f32"])
def test_export_validates_and_writes_the_file(int4_dir, capsys, quant):
    pytest.importorskip("llama_cpp")
    out = int4_dir.parent / f"m-{quant}.gguf"
    assert main(["export", str(int4_dir), "--quant", quant, "--embed-type", "f32", "--out", str(out)]) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert out.exists() and "deci" in text and "decode to a*q + b" in text
    if quant == "q4_1":
        assert "21 tensors" in text  # 3 layers x 7 projections packed from the checkpoint's groups
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_export_bad_inputs_exit_2(int4_dir, tmp_path, capsys):
    cases = [
        (["export", str(tmp_path / "nothing-here")], "does not exist"),
        (["export", str(int4_dir), "--quant", "q8_0", "--out", str(tmp_path / "a.gguf")], "--quant 'q8_0'"),
        (["export", str(int4_dir), "--out", str(tmp_path / "missing-dir" / "a.gguf")], "cannot write in"),
    ]
    (tmp_path / "exists.gguf").write_text("x")
    cases.append((["export", str(int4_dir), "--out", str(tmp_path / "exists.gguf")], "exists; pass --overwrite"))
    not_llama = tmp_path / "bert"
    not_llama.mkdir()
    (not_llama / "config.json").write_text(json.dumps({"model_type": "bert"}))
    cases.append((["export", str(not_llama), "--out", str(tmp_path / "b.gguf")], "unsupported architecture"))
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert", "exists.gguf"]


def test_onnxruntime_provider_choice():
    """auto takes CUDA where this onnxruntime has it (onnxruntime-gpu), else the CPU; cuda insists."""
    from runtime.base import RuntimeLoadError
    from runtime.ort import choose_providers

    gpu_build = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers("auto", gpu_build) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers("cpu", gpu_build) == ["CPUExecutionProvider"]
    assert choose_providers("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(RuntimeLoadError, match="onnxruntime-gpu"):
        choose_providers("cuda", ["CPUExecutionProvider"])
    with pytest.raises(RuntimeLoadError, match="not one of"):
        choose_providers("tpu", gpu_build)


def test_run_names_a_provider_it_cannot_use(stories_f32, int4_dir, tmp_path, capsys):
    """--provider cuda on an onnxruntime without CUDA names the wheel that has it; on a GGUF it
    says llama.cpp runs the file (no onnxruntime provider applies)."""
    pytest.importorskip("onnxruntime")
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    folder = tmp_path / "onnx"
    assert main(["export", str(int4_dir), "--format", "onnx", "--out", str(folder), "--no-validate"]) == 0
    capsys.readouterr()
    assert main(["run", str(folder), "--provider", "cuda", "--engine", "onnxruntime", "-n", "2"]) == 2
    err = capsys.readouterr().err
    assert "--provider cuda" in err and "onnxruntime-gpu" in err
    assert main(["run", str(stories_f32), "--provider", "cuda", "-n", "2"]) == 2
    assert "a .gguf runs on llama.cpp" in capsys.readouterr().err
