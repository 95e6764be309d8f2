"""Read an exported artifact back and compare it with the torch model it came from.

GGUF: every Q4_1 projection decoded by gguf's own dequantizer must equal the checkpoint's
a*q + b bit for bit; the file's logits in llama.cpp (F32 KV cache) are compared with torch's
on a fixed token sequence. For F32 files the bound is LOGITS_ATOL_F32 (llama.cpp sums in
another order: ~1e-5 on small models, growing with depth). F16 and Q4_1 files differ from
the float model by design (llama.cpp quantizes activations to 8 bits for Q4_1 matmuls,
~2% relative): their logits difference is reported and bounded loosely (finite, the same
top token on most positions), their weights are what the exactness check covers.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import align_module_device
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from exporters.gguf import ROWS_AT_ONCE, GGUFInfo
from saap_edge.models.gguf_index import GGUFIndex
from saap_edge.errors import UserError
from saap_edge.models.stream import execution_device, weight_rows

LOGITS_ATOL_F32 = 1e-3  # absolute, on logits, F32 GGUF vs torch float32
MIN_TOP1_AGREEMENT = {"f32": 1.0, "f16": 0.9, "q4_1": 0.5}


@dataclass
class Validation:
    weights_checked: int = 0
    weights_exact: bool = True
    logits_max_abs_diff: float | None = None
    logits_scale: float | None = None
    top1_agreement: float | None = None
    tokens: list[int] = field(default_factory=list)
    runtime: str = ""
    weights_max_abs_diff: float = 0.0  # decoded artifact weights vs a*q + b (0: bit-exact)
    cache_max_abs_diff: float | None = None  # logits through the KV cache vs one full pass
    # int8 activations: the same graph and weights with float32 activations vs torch (the strict bound)
    fp32_graph_max_abs_diff: float | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def probe_tokens(vocab_size: int, bos: int | None, n: int = 24, seed: int = 0) -> list[int]:
    g = np.random.default_rng(seed)
    ids = g.integers(3, vocab_size, size=n).tolist()
    return ([bos] if bos is not None else []) + ids


def check_gguf_weights(info: GGUFInfo) -> int:
    """Q4_1 tensors of the file == the int4 groups written (gguf's decoder); UserError if not."""
    tensors = GGUFIndex(info.path).tensors
    for name, parts in info.int4_tensors.items():
        codes, a, b = parts()
        t = tensors[name]
        if t.tensor_type != QT.Q4_1:
            raise UserError(f"validation: {name} was written as {t.tensor_type.name}, expected Q4_1")
        raw = np.asarray(t.data).reshape(codes.shape[0], -1)
        groups = a.shape[1]
        for lo in range(0, codes.shape[0], ROWS_AT_ONCE):  # float32 temporaries of a block of rows at a time
            hi = lo + ROWS_AT_ONCE
            decoded = dequantize(raw[lo:hi], QT.Q4_1).reshape(-1, codes.shape[1])
            rows = codes[lo:hi]
            expect = (rows.reshape(len(rows), groups, -1).astype(np.float32) * a[lo:hi].astype(np.float32)[..., None]
                      + b[lo:hi].astype(np.float32)[..., None]).reshape(rows.shape)
            if not np.array_equal(decoded, expect):
                bad = np.abs(decoded - expect).max()
                raise UserError(f"validation: {name} in {info.path.name} decodes to other weights than the checkpoint "
                                f"(max difference {bad:.3g}); the file was not kept")
    for name, (module, weights) in info.q8_tensors.items():
        # 8-bit embedding rows: step d = max|x| / 127 per block of 32, stored in f16, so each
        # decoded weight lies within d / 2 (rounding) + 127 d 2^-11 (the f16 step) of the original
        t = tensors[name]
        n_rows = module.weight.shape[0]
        raw = np.asarray(t.data).reshape(n_rows, -1)
        for lo in range(0, n_rows, ROWS_AT_ONCE):  # a bounded slice at a time (a 128k-row matrix is GBs)
            rows = weight_rows(module, lo, lo + ROWS_AT_ONCE, weights).numpy()
            decoded = dequantize(raw[lo:lo + ROWS_AT_ONCE], QT.Q8_0).reshape(rows.shape)
            step = np.abs(rows).reshape(rows.shape[0], -1, 32).max(-1, keepdims=True) / 127
            bound = step * (0.5 + 127 * 2.0**-11) * (1 + 1e-6) + 1e-12
            if t.tensor_type != QT.Q8_0 or (np.abs(decoded - rows).reshape(step.shape[:2] + (32,)) > bound).any():
                raise UserError(f"validation: {name} in {info.path.name} does not decode to its weights within Q8_0's "
                                "step; the file was not kept")
    return len(info.int4_tensors) + len(info.q8_tensors)


def llama_cpp_logits(path: Path, ids: list[int], n_threads: int | None = None) -> np.ndarray:
    try:
        import llama_cpp
    except ImportError as exc:
        raise UserError("validation needs llama-cpp-python (pip install 'saap-edge[export]' with "
                        "CMAKE_ARGS=-DGGML_NATIVE=OFF), or pass --no-validate") from exc
    try:
        llm = llama_cpp.Llama(str(path), logits_all=True, verbose=False, n_ctx=max(64, len(ids) + 8), type_k=0, type_v=0,
                              n_threads=n_threads)
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"validation: llama.cpp cannot load {path.name} ({exc}); the file was not kept") from exc
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
        del llm
        gc.collect()


def validate_gguf(model, info: GGUFInfo, ids: list[int]) -> Validation:
    v = Validation(tokens=ids, runtime="llama-cpp-python")
    v.weights_checked = check_gguf_weights(info)
    with torch.no_grad():
        ref = model(torch.tensor([ids], device=execution_device(model))).logits[0].float().cpu().numpy()
    got = llama_cpp_logits(info.path, ids)
    if not np.isfinite(got).all():
        raise UserError(f"validation: llama.cpp computes non-finite logits from {info.path.name}; the file was not kept")
    v.logits_max_abs_diff = float(np.abs(got - ref).max())
    v.logits_scale = float(np.abs(ref).max())
    v.top1_agreement = float((got.argmax(-1) == ref.argmax(-1)).mean())
    if info.quant == "f32" and info.embed_type not in ("q4_1", "q8_0") and v.logits_max_abs_diff > LOGITS_ATOL_F32 * max(1.0, v.logits_scale / 10):
        raise UserError(f"validation: F32 GGUF logits differ from torch by {v.logits_max_abs_diff:.3g} "
                        f"(bound {LOGITS_ATOL_F32 * max(1.0, v.logits_scale / 10):.3g}); the file was not kept")
    if v.top1_agreement < MIN_TOP1_AGREEMENT[info.quant]:
        raise UserError(f"validation: llama.cpp's top token agrees with torch on only {v.top1_agreement:.0%} of "
                        f"positions for {info.quant} (at least {MIN_TOP1_AGREEMENT[info.quant]:.0%} expected); "
                        "the file was not kept")
    return v


# ---------------------------------------------------------------------------------------------
# ONNX: MatMulNBits initializers decode to the checkpoint's groups; onnxruntime logits vs torch
# ---------------------------------------------------------------------------------------------

# ORT float32 vs torch float32 (another summation order): ~1e-5 measured on small models; the
# int4 graph sums its offsets term (group sums of x times b) separately, another order again.
LOGITS_ATOL_ONNX = 1e-3
ONNX_MIN_TOP1 = 0.9  # near-ties may flip within the bound above


def int4_initializer_names(proto, module: str) -> dict[str, str]:
    """Value names of one int4 projection's stored numbers, read off its MatMulNBits node (the
    exporter's optimizer shares equal constants, e.g. the all-zero zero points, between
    projections); the offsets by their initializer's name."""
    names = {}
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits" and node.input[1].endswith(f"{module}.qweight"):
            names = dict(zip(("qweight", "scales", "zero_points"), node.input[1:4]))
    offsets = [t.name for t in proto.graph.initializer if t.name.endswith(f"{module}.offsets")]
    if offsets:
        names["offsets"] = offsets[0]
    return names


class StoredValues:
    """The numbers behind a graph's constant values, as the file stores them: an initializer
    itself, the initializer a Cast widens (its stored dtype: the fused graph keeps fp16 scales
    and offsets so), or the tensor a ConstantOfShape of a constant shape fills. None for a value
    computed from the inputs."""

    def __init__(self, proto, folder: Path | None = None):
        from onnx import numpy_helper

        self._to_array = numpy_helper.to_array
        self.inits = {t.name: t for t in proto.graph.initializer}
        self.producer = {out: node for node in proto.graph.node for out in node.output}
        self.folder = folder  # where external data lies (a graph loaded without it)

    def __call__(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            from onnx import TensorProto

            # a copy of the entry, so the bytes read for it are not kept in the graph after
            tensor = TensorProto()
            tensor.CopyFrom(self.inits[name])
            return self._to_array(tensor, str(self.folder) if self.folder else "")
        node = self.producer.get(name)
        if node is not None and node.op_type == "Cast":
            return self(node.input[0])
        if node is not None and node.op_type == "ConstantOfShape":
            shape = self(node.input[0])
            value = next((self._to_array(a.t) for a in node.attribute if a.name == "value"), np.zeros(1, np.float32))
            return None if shape is None else np.full(tuple(int(d) for d in shape), value.reshape(-1)[0], value.dtype)
        return None


def check_onnx_weights(info) -> tuple[int, float]:
    """The int4 initializers of the saved model against each Int4Linear, every number exact:
    MatMulNBits B == the packed codes, scales == a, zero points == 0, offsets == b; and the
    weights they decode to, (q - 0) * a + b in float32, equal the checkpoint's a*q + b.
    Returns (tensors checked, max |decoded - a*q + b|), the latter 0 when it passes."""
    import onnx

    proto = onnx.load(str(info.path / "model.onnx"), load_external_data=False)  # each tensor read when checked
    stored = StoredValues(proto, info.path)
    for name, layer in info.int4_tensors.items():
        prefix, row = info.packed.get(name, (name, None))
        found = int4_initializer_names(proto, prefix)
        got = {k: stored(n) for k, n in found.items()}
        if len(found) != 4 or any(v is None for v in got.values()):
            raise UserError(f"validation: the ONNX graph lacks the int4 initializers of {name}; the folder was not kept")
        if row is not None:  # this projection's rows of the stacked tensors (fused graph: q, k, v / gate, up)
            got = _rows_of(got, row, layer.out_features, layer.in_features // layer.group_size)
        with align_module_device(layer):  # a streamed model's groups are read for this check
            _check_int4_layer(name, layer, got)
    return len(info.int4_tensors), 0.0


def _check_int4_layer(name: str, layer, got: dict[str, np.ndarray]) -> None:
    from exporters.onnx import matmul_nbits_parts

    # scales / offsets stored as fp16 (fused) or widened to float32 (traced): either way every bit
    want = {k: v.numpy() for k, v in matmul_nbits_parts(layer, half=got["scales"].dtype == np.float16).items()}
    for key, value in want.items():
        if got[key].dtype != value.dtype or got[key].size != value.size or not np.array_equal(
                np.ascontiguousarray(got[key]).reshape(-1).view(np.uint8), np.ascontiguousarray(value).reshape(-1).view(np.uint8)):
            raise UserError(f"validation: {name}.{key} in the ONNX graph differs from the checkpoint; the folder was not kept")
    n, k, g = layer.out_features, layer.in_features, layer.group_size
    q = layer.codes.numpy().reshape(n, k // g, g).astype(np.float32)
    scales, offsets = got["scales"].astype(np.float32), got["offsets"].astype(np.float32)
    decoded = q * scales.reshape(n, -1, 1) + offsets.reshape(k // g, n).T[..., None]
    if not np.array_equal(decoded.reshape(n, k), layer.dequantized(torch.float32).numpy()):
        raise UserError(f"validation: {name}: the ONNX int4 weights do not decode to a*q + b; the folder was not kept")


def _rows_of(stacked: dict[str, np.ndarray], row: int, n: int, groups: int) -> dict[str, np.ndarray]:
    """Rows row .. row + n of stacked MatMulNBits tensors (all row-major in N; offsets [K/G, N])."""
    total = stacked["offsets"].reshape(groups, -1).shape[1]
    rows = slice(row, row + n)
    return {"qweight": stacked["qweight"].reshape(total, groups, -1)[rows],
            "scales": stacked["scales"].reshape(total, groups)[rows].reshape(-1),
            "zero_points": stacked["zero_points"].reshape(total, -1)[rows].reshape(-1),
            "offsets": np.ascontiguousarray(stacked["offsets"].reshape(groups, total)[:, rows])}


def validate_onnx(model, info, ids: list[int], in_place: bool = False) -> Validation:
    """Weights (int4) and logits of the exported folder through onnxruntime, full and cached.
    `in_place`: the reference rounds `model` itself to the stored weights (no second copy)."""
    from runtime.base import RuntimeLoadError
    from runtime.ort import OrtRuntime

    from exporters.onnx import stored_weights_model

    v = Validation(tokens=ids, runtime="onnxruntime")
    if info.int4_tensors:
        v.weights_checked, v.weights_max_abs_diff = check_onnx_weights(info)
    with torch.no_grad():  # torch on the weights as stored (f16 embeddings / projections rounded)
        ref = stored_weights_model(model, info.quant, info.embed_type, in_place)(
            torch.tensor([ids], device=execution_device(model))).logits[0].float().cpu().numpy()
    try:
        rt = OrtRuntime(info.path)
    except RuntimeLoadError as exc:
        raise UserError(f"validation: {exc}; the folder was not kept") from exc
    full, _ = rt.forward(np.asarray([ids]))
    half = len(ids) // 2
    first, past = rt.forward(np.asarray([ids[:half]]))
    second, _ = rt.forward(np.asarray([ids[half:]]), past, half)
    cached = np.concatenate([first, second], axis=1)[0]
    rt.close()  # its weights go before the float32-activations twin below loads them again
    del rt, past
    gc.collect()
    full = full[0].astype(np.float32)
    if not np.isfinite(full).all():
        raise UserError(f"validation: onnxruntime computes non-finite logits from {info.path.name}; the folder was not kept")
    v.logits_max_abs_diff = float(np.abs(full - ref).max())
    v.cache_max_abs_diff = float(np.abs(cached - full).max())
    v.logits_scale = float(np.abs(ref).max())
    v.top1_agreement = float((full.argmax(-1) == ref.argmax(-1)).mean())
    bound = LOGITS_ATOL_ONNX * max(1.0, v.logits_scale / 10)
    # int8 activations (--matmul-accuracy int8) differ from torch by design, like llama.cpp's Q4_1
    # path: their logits are bounded loosely (top-1 agreement); the cache must still agree
    int8 = getattr(info, "accuracy", "fp32") != "fp32"  # int8 or int8-head
    if (v.logits_max_abs_diff > bound and not int8) or v.cache_max_abs_diff > bound:
        raise UserError(f"validation: ONNX logits differ from torch by {v.logits_max_abs_diff:.3g} (with the KV cache: "
                        f"{v.cache_max_abs_diff:.3g}; bound {bound:.3g}); the folder was not kept")
    least = MIN_TOP1_AGREEMENT["q4_1"] if int8 else ONNX_MIN_TOP1
    if v.top1_agreement < least:
        raise UserError(f"validation: onnxruntime's top token agrees with torch on only {v.top1_agreement:.0%} of "
                        f"positions for {info.quant} (at least {least:.0%} expected); the folder was not kept")
    if int8:  # the graph itself is held to the strict bound: the same nodes and weights, float32 activations
        v.fp32_graph_max_abs_diff = float(np.abs(fp32_twin_logits(info.path, ids) - ref).max())
        if v.fp32_graph_max_abs_diff > bound:
            raise UserError(f"validation: with float32 activations the ONNX graph's logits differ from torch by "
                            f"{v.fp32_graph_max_abs_diff:.3g} (bound {bound:.3g}); the folder was not kept")
    return v


def fp32_twin_logits(folder: Path, ids: list[int]) -> np.ndarray:
    """Logits of the folder's graph with every MatMulNBits at accuracy_level 0 (float32
    activations). The twin graph is written beside model.onnx under a temporary name, reads the
    same weight file, and is removed after."""
    import onnx
    from runtime.ort import OrtRuntime

    proto = onnx.load(str(Path(folder) / "model.onnx"), load_external_data=False)
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = 0
    twin = Path(folder) / ".fp32-activations-check.onnx"
    try:
        onnx.save_model(proto, str(twin))
        logits, _ = OrtRuntime(twin).forward(np.asarray([ids]))
    finally:
        twin.unlink(missing_ok=True)
    return logits[0].astype(np.float32)
