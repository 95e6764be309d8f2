"""The fused ONNX decoder (GroupQueryAttention, fused RMSNorms, packed projections) and the
runtimes that run it: our onnxruntime loop (shared KV buffer) and onnxruntime-genai."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DATA_DIR, greedy_runtime, greedy_torch, hetero_model
from exporters.onnx import stored_weights_model
from exporters.onnx_fused import export_onnx_fused
from saap_edge.cli import main
from saap_edge.errors import UserError
from saap_edge.models.int4_linear import Int4Linear
from saap_edge.quant.int4 import quantize_model

pytest.importorskip("onnxruntime")

# onnxruntime float32 vs torch float32: ~1e-5 measured on these models (another summation order;
# the int4 offsets term is a separate sum). The same bound as the traced export's tests.
ORT_ATOL = 1e-4
IDS = [1, 17, 300, 45, 9, 211, 77, 5, 150, 480, 33, 2, 64, 128, 256, 3]


def model_of(kind: str, quant: str = "int4"):
    m = hetero_model(heads_and_modules=kind == "slots")
    if quant == "int4":
        quantize_model(m, 32)
    return m


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    """(model, folder) per layer layout: per-layer KV heads, and head slots with an attention-free layer."""
    out = {}
    for kind in ("hetero", "slots"):
        model = model_of(kind)
        folder = tmp_path_factory.mktemp("fused") / kind
        export_onnx_fused(model, folder, "int4", "f32")
        out[kind] = (model, folder)
    return out


@pytest.mark.parametrize("kind", ["hetero", "slots"])
def test_fused_graph_matches_torch_in_one_pass_and_through_the_shared_cache(fused, kind):
    from runtime.ort import OrtRuntime

    model, folder = fused[kind]
    rt = OrtRuntime(folder)
    assert rt.graph == "fused" and rt.shared_cache
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0].numpy()
    full, present = rt.forward(np.asarray([IDS]))  # one pass, no cache
    assert np.abs(full[0] - ref).max() < ORT_ATOL
    batch, _ = rt.forward(np.asarray([IDS, IDS[::-1]]))  # a batch: each row as alone (what perplexity scoring runs)
    assert np.array_equal(batch[0], full[0]) and np.array_equal(batch[1], rt.forward(np.asarray([IDS[::-1]]))[0][0])
    half = len(IDS) // 2  # a second prompt chunk after a cache (not the first prompt, not one token)
    first, past = rt.forward(np.asarray([IDS[:half]]))
    second, _ = rt.forward(np.asarray([IDS[half:]]), past, half)
    assert np.abs(np.concatenate([first, second], 1)[0] - ref).max() < ORT_ATOL
    rt.reset()  # generation: one buffer per layer shared by past and present, written in place
    steps = [rt.logits(IDS[:5])] + [rt.logits([t]) for t in IDS[5:]]
    assert np.abs(np.stack(steps) - ref[4:]).max() < ORT_ATOL
    assert rt.capacity >= len(IDS) and rt.n_past == len(IDS)


def test_shared_cache_grows_and_keeps_what_it_held(fused):
    from runtime.ort import OrtRuntime

    model, folder = fused["hetero"]
    ids = (IDS * 8)[:100]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    rt = OrtRuntime(folder)
    rt.cache_block = 8  # grow from 8 positions: 8 -> 16 -> ... -> 128 while decoding
    steps = [rt.logits(ids[:3])] + [rt.logits([t]) for t in ids[3:]]
    assert rt.capacity == 128
    assert np.abs(np.stack(steps) - ref[2:]).max() < ORT_ATOL
    from runtime.base import RuntimeLoadError

    with pytest.raises(RuntimeLoadError, match="exceed the model's 256 positions"):
        rt.logits(list(range(200)))


def test_graph_is_gqa_per_layer_with_fixed_cache_shapes(fused):
    import onnx

    model, folder = fused["slots"]
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in proto.graph.node]
    gqa = [n for n in proto.graph.node if n.op_type == "GroupQueryAttention"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in gqa]
    assert [(a["num_heads"], a["kv_num_heads"], a["do_rotary"]) for a in attrs] == [(4, 2, 1), (6, 3, 1)]
    assert "Concat" not in ops and "Expand" not in ops  # no cache concatenation, no repeat_kv
    assert ops.count("SkipSimplifiedLayerNormalization") == 5 and ops.count("SimplifiedLayerNormalization") == 1
    shapes = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert shapes["past_key_values.0.key"] == ["batch_size", 2, "past_sequence_length", 32]
    assert shapes["past_key_values.1.value"] == ["batch_size", 1, "past_sequence_length", 32]  # attention-free placeholder
    assert shapes["past_key_values.2.key"] == ["batch_size", 3, "past_sequence_length", 32]
    assert "position_ids" not in shapes  # positions come from the attention mask
    cfg = json.loads((folder / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    assert (dec["num_hidden_layers"], dec["head_size"], dec["num_key_value_heads"]) == (3, 32, 3)
    assert cfg["search"]["past_present_share_buffer"] and dec["inputs"]["past_key_names"] == "past_key_values.%d.key"


def test_packed_int4_initializers_are_the_checkpoint_groups_bit_for_bit(fused, tmp_path):
    """q/k/v and gate/up share one MatMulNBits whose rows are each projection's codes, scales,
    zero points and offsets unchanged; the validator slices them back and a flipped byte fails it."""
    import onnx
    from onnx import numpy_helper

    from exporters.onnx import OnnxInfo, kv_shapes, matmul_nbits_parts
    from exporters.validate import StoredValues, _rows_of, check_onnx_weights, int4_initializer_names

    model, folder = fused["hetero"]
    info = OnnxInfo(folder, "int4", "f32", 3, kv_shapes(model.config),
                    {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)})
    proto = onnx.load(str(folder / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    # stored bytes: scales and offsets as the checkpoint's fp16 (widened by a Cast), zero points
    # as a ConstantOfShape (no initializer)
    packed = "model.layers.0.self_attn.qkv_proj"
    assert inits[f"{packed}.scales"].dtype == inits[f"{packed}.offsets"].dtype == np.float16
    assert f"{packed}.zero_points" not in inits and not any("zero_points" in n for n in inits)
    found = int4_initializer_names(proto, packed)
    stored = StoredValues(proto)
    attn = model.model.layers[0].self_attn
    rows = 0
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        want = {k: v.numpy() for k, v in matmul_nbits_parts(proj, half=True).items()}
        got = _rows_of({k: stored(found[k]) for k in want}, rows, proj.out_features, proj.in_features // 32)
        for key in want:
            assert got[key].dtype == want[key].dtype and np.array_equal(got[key].reshape(want[key].shape), want[key])
        rows += proj.out_features
    assert np.array_equal(_rows_of({k: stored(found[k]) for k in want}, 0, attn.q_proj.out_features, 128 // 32)["scales"],
                          attn.q_proj.scales.reshape(-1).numpy())  # the fp16 a itself
    assert sum(n.op_type == "MatMulNBits" for n in proto.graph.node) == 4 * 3  # qkv, o, gate_up, down per layer
    info.packed = {}  # without the packing map the projections are not found: the check is not vacuous
    with pytest.raises(UserError, match="lacks the int4 initializers"):
        check_onnx_weights(info)
    # one code byte changed in a copy: the check names the projection
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    proto = onnx.load(str(bad / "model.onnx"))
    for t in proto.graph.initializer:
        if t.name == "model.layers.2.mlp.gate_up_proj.qweight":
            arr = numpy_helper.to_array(t).copy()
            arr.reshape(-1)[-1] ^= 0x10  # a code of up_proj's last row
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
    onnx.save_model(proto, str(bad / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    from exporters.onnx_fused import _Builder

    packed = _Builder(model, "int4", "f32")
    packed.build()
    info.path, info.packed = bad, packed.packed
    with pytest.raises(UserError, match="model.layers.2.mlp.up_proj.qweight"):
        check_onnx_weights(info)
    # one bit of a stored fp16 offset changed: the check names it
    proto = onnx.load(str(folder / "model.onnx"))
    for t in proto.graph.initializer:
        if t.name == "model.layers.1.mlp.gate_up_proj.offsets":
            arr = numpy_helper.to_array(t).copy()
            arr.reshape(-1).view(np.uint16)[0] ^= 1  # the last mantissa bit of gate_proj's first offset
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
    shutil.rmtree(bad)
    bad.mkdir()
    onnx.save_model(proto, str(bad / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    with pytest.raises(UserError, match="model.layers.1.mlp.gate_proj.offsets"):
        check_onnx_weights(info)


@pytest.mark.parametrize("quant,embed", [("f32", "f32"), ("f16", "f16"), ("int4", "int8")])
def test_fused_quant_and_embedding_types_match_the_stored_weights(tmp_path, quant, embed):
    from runtime.ort import OrtRuntime

    model = model_of("slots", quant)
    export_onnx_fused(model, tmp_path / "m", quant, embed)
    with torch.no_grad():
        ref = stored_weights_model(model, quant, embed)(torch.tensor([IDS])).logits[0].numpy()
    rt = OrtRuntime(tmp_path / "m")
    steps = [rt.logits(IDS[:4])] + [rt.logits([t]) for t in IDS[4:]]
    assert np.abs(np.stack(steps) - ref[3:]).max() < ORT_ATOL
    if embed == "int8":  # the stored 8-bit rows are Q8_0's codes and steps, and decode to them
        from exporters.onnx import initializer, q8_decode, q8_parts

        codes, scales = q8_parts(model.model.embed_tokens.weight)
        got_c, got_s = (initializer(tmp_path / "m" / "model.onnx", f"model.embed_tokens.{n}") for n in ("codes", "scales"))
        assert got_s.dtype == np.float16  # Q8_0's d, stored as the fp16 it is
        assert np.array_equal(got_c, codes.numpy()) and np.array_equal(got_s.astype(np.float32), scales.numpy())
        assert torch.equal(q8_decode(torch.from_numpy(got_c.copy()), torch.from_numpy(got_s.astype(np.float32))),
                           q8_decode(codes, scales))


def test_int8_activations_keep_the_cache_exact_and_the_top_token(tmp_path):
    """--matmul-accuracy int8: MatMulNBits quantizes activation blocks (accuracy_level 4); the
    logits move (bounded loosely, like llama.cpp's Q4_1) but a cached pass equals a full one."""
    import onnx

    from exporters.validate import probe_tokens, validate_onnx

    model = model_of("hetero")
    info = export_onnx_fused(model, tmp_path / "m", "int4", "int8", accuracy="int8")
    proto = onnx.load(str(tmp_path / "m" / "model.onnx"), load_external_data=False)
    levels = {onnx.helper.get_attribute_value(a) for n in proto.graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    v = validate_onnx(model, info, probe_tokens(512, 1))
    assert v.cache_max_abs_diff < 1e-4 and v.top1_agreement >= 0.5 and v.logits_max_abs_diff > 0
    # the graph itself still meets the strict bound: its float32-activation twin (removed after)
    assert v.fp32_graph_max_abs_diff < ORT_ATOL and sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted(
        p.name for p in (tmp_path / "m").iterdir() if not p.name.startswith("."))
    # a final norm off by 0.5%: the loose int8 checks still pass, the strict twin does not
    from onnx import numpy_helper

    proto = onnx.load(str(tmp_path / "m" / "model.onnx"))
    for t in proto.graph.initializer:
        if t.name == "model.norm.weight":
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1.005), t.name))
    onnx.save_model(proto, str(tmp_path / "m" / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    with pytest.raises(UserError, match="with float32 activations the ONNX graph's logits differ"):
        validate_onnx(model, info, probe_tokens(512, 1))


def test_genai_greedy_equals_torch_greedy_on_heterogeneous_layers(fused):
    pytest.importorskip("onnxruntime_genai")
    from runtime.genai import GenaiRuntime

    for kind in ("hetero", "slots"):
        model, folder = fused[kind]
        rt = GenaiRuntime(folder)
        assert rt.name == "onnxruntime-genai (CPU)"
        assert greedy_runtime(rt, IDS, 12) == greedy_torch(model, IDS, 12)
        with torch.no_grad():
            ref = model(torch.tensor([IDS])).logits[0].numpy()
        rt.reset()
        steps = [rt.logits(IDS[:5])] + [rt.logits([t]) for t in IDS[5:]]
        assert np.abs(np.stack(steps) - ref[4:]).max() < ORT_ATOL


def test_cli_exports_fused_by_default_and_run_uses_genai(tmp_path, tiny_tokenizer, capsys):
    from conftest import save_tiny32

    src = save_tiny32(tmp_path / "src", tiny_tokenizer)
    assert main(["export", str(src), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0, capsys.readouterr().err
    table = capsys.readouterr().out
    assert "fused decoder, GroupQueryAttention" in table and "max |diff| 0" in table
    # the defaults: 8-bit embedding / output matrix, int8 activations only there, the graph checked
    # strictly with float32 activations
    assert "| int8 " in table and "int8-head" in table and "same graph, float32 activations" in table
    folder = tmp_path / "onnx"
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json"} <= \
        {p.name for p in folder.iterdir()}
    saap = json.loads((folder / "config.json").read_text())["saap_onnx"]
    assert (saap["graph"], saap["embed_type"], saap["matmul_accuracy"]) == ("fused", "int8", "int8-head")
    engines = ["genai", "onnxruntime"] if _has_genai() else ["onnxruntime"]
    texts = []
    for engine in engines:  # the same greedy text from both loops, without torch in the process
        run = subprocess.run([sys.executable, "-m", "runtime", str(folder), "--prompt", "The cat", "-n", "8",
                              "--engine", engine], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        assert run.returncode == 0, run.stderr
        assert ("[onnxruntime-genai (CPU)]" if engine == "genai" else "[onnxruntime (CPU)]") in run.stderr
        texts.append(run.stdout)
    assert len(set(texts)) == 1 and texts[0].startswith("The cat")


def _has_genai() -> bool:
    from runtime.genai import genai_available

    return genai_available()


def test_bad_inputs_are_one_line_exit_2(fused, tmp_path, capsys, tiny_tokenizer):
    from conftest import save_tiny32
    from runtime.__main__ import main as runtime_main

    _, folder = fused["hetero"]
    traced = tmp_path / "traced"
    import shutil

    shutil.copytree(folder, traced)
    (traced / "genai_config.json").unlink()
    if _has_genai():
        assert runtime_main([str(traced), "--engine", "genai", "-n", "2"]) == 2
        err = capsys.readouterr().err.strip()
        assert "no genai_config.json" in err and "--onnx-graph fused" in err and len(err.splitlines()) == 1
        for change, needle in ((lambda d: d["model"]["decoder"].update(num_hidden_layers=5), "says 5 layers but"),
                               (lambda d: d["model"]["decoder"].update(head_size=16), "says head_size 16"),
                               (lambda d: d["model"]["decoder"].update(filename="gone.onnx"), "names gone.onnx")):
            bad = tmp_path / "mismatched"
            shutil.rmtree(bad, ignore_errors=True)
            shutil.copytree(folder, bad)
            cfg = json.loads((bad / "genai_config.json").read_text())
            change(cfg)
            (bad / "genai_config.json").write_text(json.dumps(cfg))
            assert runtime_main([str(bad), "-n", "2"]) == 2
            err = capsys.readouterr().err.strip()
            assert needle in err and "export the folder again" in err and len(err.splitlines()) == 1
    src = save_tiny32(tmp_path / "src", tiny_tokenizer)
    for argv, needle in (
        (["export", str(src), "--matmul-accuracy", "int8"], "applies to the fused ONNX graph only"),
        (["export", str(src), "--format", "onnx", "--onnx-graph", "dynamo", "--matmul-accuracy", "int8"],
         "applies to the fused ONNX graph only"),
        (["export", str(src), "--format", "onnx", "--embed-type", "f16", "--matmul-accuracy", "int8-head"],
         "--matmul-accuracy int8-head applies to an 8-bit output matrix; add --embed-type int8"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err
    assert not list(src.glob("onnx-*")) and not list(src.glob("*.gguf"))
    with pytest.raises(SystemExit):  # argparse: an unknown graph
        main(["export", str(src), "--format", "onnx", "--onnx-graph", "traced"])


def test_head_size_the_kernel_cannot_take_is_refused_naming_the_fallback(tmp_path):
    from saap_edge.models.slim import SlimLlamaConfig, SlimLlamaForCausalLM

    cfg = SlimLlamaConfig(vocab_size=64, hidden_size=36, num_hidden_layers=1, num_attention_heads=3, num_key_value_heads=3,
                          intermediate_size=32, head_dim=12, max_position_embeddings=32)
    with pytest.raises(UserError, match="head size 12 .* --onnx-graph dynamo"):
        export_onnx_fused(SlimLlamaForCausalLM(cfg).eval(), tmp_path / "m", "f32", "f32")
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_smollm2_pruned_20_percent_genai_greedy_equals_torch(tmp_path):
    """SmolLM2-135M pruned 20% (int4, no recovery), exported with float32 activations and the f16
    embedding (what computes torch's numbers; the defaults' int8 output-matrix activations move the
    logits by design): onnxruntime-genai's greedy tokens equal torch's."""
    pytest.importorskip("onnxruntime_genai")
    from transformers import AutoModelForCausalLM

    from runtime.genai import GenaiRuntime

    out = tmp_path / "s20"
    assert main(["compress", "--model", "smollm2-135m", "--ratio", "0.2", "--recovery", "none", "--out", str(out),
                 "--data-dir", str(DATA_DIR), "--no-progress"]) == 0
    assert main(["export", str(out), "--format", "onnx", "--embed-type", "f16", "--matmul-accuracy", "fp32"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    rt = GenaiRuntime(out / "onnx-int4")
    prompt = rt.tokenize("The three most important things about a healthy diet are")
    assert greedy_runtime(rt, prompt, 24) == greedy_torch(model, prompt, 24)


@pytest.mark.parametrize("rope", [None, {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                  {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128},
                                  {"rope_type": "dynamic", "factor": 2.0}])
def test_rotary_tables_computed_in_the_graph_match_the_model(tmp_path, rope):
    """A fixed inv_freq (default, llama3, yarn with its attention scaling): cos / sin are computed in
    the graph, no table on disk; a length-dependent one (dynamic): the torch tables are stored."""
    import onnx

    from runtime.ort import OrtRuntime

    model = hetero_model(seed=3)
    if rope:
        model.config.rope_scaling = rope
        model = type(model)(model.config)  # rebuilt so the rotary embedding reads the scaling
        torch.manual_seed(3)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.08) if p.dim() == 2 else p.uniform_(0.8, 1.2)
        model.eval()
    quantize_model(model, 32)
    export_onnx_fused(model, tmp_path / "m", "int4", "f32")
    inits = {t.name for t in onnx.load(str(tmp_path / "m" / "model.onnx"), load_external_data=False).graph.initializer}
    dynamic = bool(rope) and rope["rope_type"] == "dynamic"
    assert ("cos_cache" in inits) == dynamic and ("rotary.inv_freq" in inits) != dynamic
    ids = (IDS * 4)[:60]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    full, _ = OrtRuntime(tmp_path / "m").forward(np.asarray([ids]))
    assert np.abs(full[0] - ref).max() < ORT_ATOL


def test_bench_counts_the_fused_folder_weights(fused):
    """Logical parameters as torch counts them; stored bytes = the weight file; a step reads the fp16
    group parameters widened to float32."""
    import onnx

    from saap_edge.bench.weights import onnx_weights, torch_weights

    model, folder = fused["hetero"]
    got = onnx_weights(folder)
    assert got["params"] == torch_weights(model)["params"]
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    inline = sum(len(t.raw_data) for t in proto.graph.initializer if not t.external_data)
    assert got["weight_bytes"] == (folder / "model.onnx.data").stat().st_size + inline
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    codes = sum(m.in_features * m.out_features // 2 for m in layers)
    groups = sum(m.scales.numel() for m in layers)
    emb, head, norms = (model.model.embed_tokens.weight.numel(), model.lm_head.weight.numel(),
                        sum(p.numel() for n, p in model.named_parameters() if "norm" in n))
    assert got["bytes_per_token"] == codes + 2 * groups * 4 + head * 4 + norms * 4  # f32 embedding: one row, not counted
    assert got["weight_bytes"] >= codes + 2 * groups * 2 + (emb + head + norms) * 4


def test_export_defaults_follow_the_projections(tmp_path, tiny_tokenizer, capsys):
    """Next to int4 projections the embedding / output matrix is 8-bit by default (GGUF Q8_0, ONNX
    int8 with int8 activations in the output matrix only); next to f16 projections it stays f16,
    and an explicit f16 embedding keeps float32 activations."""
    from gguf import GGMLQuantizationType as QT
    from gguf import GGUFReader

    from conftest import save_tiny32

    src = save_tiny32(tmp_path / "src", tiny_tokenizer)

    def gguf_embedding(*extra):
        out = tmp_path / f"m{len(list(tmp_path.glob('*.gguf')))}.gguf"
        assert main(["export", str(src), "--out", str(out), *extra]) == 0, capsys.readouterr().err
        return {t.name: t.tensor_type for t in GGUFReader(str(out)).tensors}["token_embd.weight"]

    assert gguf_embedding() == QT.Q8_0
    assert gguf_embedding("--quant", "f16") == QT.F16
    assert gguf_embedding("--embed-type", "f16") == QT.F16

    def onnx_choice(*extra):
        out = tmp_path / f"onnx{len(list(tmp_path.glob('onnx*')))}"
        assert main(["export", str(src), "--format", "onnx", "--out", str(out), *extra]) == 0, capsys.readouterr().err
        saap = json.loads((out / "config.json").read_text())["saap_onnx"]
        return saap["embed_type"], saap["matmul_accuracy"]

    assert onnx_choice("--no-validate") == ("int8", "int8-head")
    assert onnx_choice("--embed-type", "f16") == ("f16", "fp32")
    assert onnx_choice("--quant", "f16") == ("f16", "fp32")
