"""Why the ONNX int4 graph uses uint8 zero points: onnxruntime's MatMulNBits with float zero
points (which would carry b as zp = -b/a, to ~1 float32 ulp) against uint8 zero points and fp32 MatMul.

Protocol: one node, batch 1 (decode), a SmolLM2 MLP shape N=1536 x K=576, G=32, CPU
provider, --threads intra-op threads, 5 warm-up runs then the mean of --runs runs.

    python benchmarks/matmulnbits_zero_points.py
    python benchmarks/matmulnbits_zero_points.py --smoke   # N=256, K=128, 20 runs (matmulnbits_zero_points_smoke.*)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine, write_results  # noqa: E402

from saap_edge.render import format_table  # noqa: E402


def graph(kind: str, n: int, k: int, g: int, accuracy: int, rng) -> bytes:
    x = helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, k])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])
    if kind == "fp32 MatMul":
        inits = [numpy_helper.from_array(rng.random((k, n), dtype=np.float32), "W")]
        node = helper.make_node("MatMul", ["A", "W"], ["Y"])
    else:
        groups = k // g
        inits = [numpy_helper.from_array(rng.integers(0, 256, (n, groups, g // 2), dtype=np.uint8), "B"),
                 numpy_helper.from_array(rng.random(n * groups, dtype=np.float32), "S")]
        if kind == "float zero points":
            inits.append(numpy_helper.from_array(rng.random(n * groups, dtype=np.float32), "Z"))
        else:
            inits.append(numpy_helper.from_array(np.zeros(n * ((groups + 1) // 2), dtype=np.uint8), "Z"))
        node = helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
                                block_size=g, accuracy_level=accuracy)
    model = helper.make_model(helper.make_graph([node], "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model.SerializeToString()


def time_us(blob: bytes, k: int, threads: int, runs: int) -> float:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
    a = np.random.default_rng(1).random((1, k), dtype=np.float32)
    for _ in range(5):
        sess.run(None, {"A": a})
    t0 = time.perf_counter()
    for _ in range(runs):
        sess.run(None, {"A": a})
    return (time.perf_counter() - t0) / runs * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1536)
    p.add_argument("--k", type=int, default=576)
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--smoke", action="store_true", help="N=256, K=128, 20 runs: a check of this script; results "
                                                        "matmulnbits_zero_points_smoke.*")
    a = p.parse_args(argv)
    if a.smoke:
        a.n, a.k, a.runs = 256, 128, 20
    rng = np.random.default_rng(0)
    rows = []
    for kind, acc in (("float zero points", 0), ("uint8 zero points", 0), ("uint8 zero points", 4), ("fp32 MatMul", 0)):
        us = time_us(graph(kind, a.n, a.k, a.group, acc, rng), a.k, a.threads, a.runs)
        rows.append({"graph": kind, "accuracy_level": acc if kind != "fp32 MatMul" else None, "us": us})
    base = next(r["us"] for r in rows if r["graph"] == "uint8 zero points" and r["accuracy_level"] == 0)
    data = {"shape": {"N": a.n, "K": a.k, "G": a.group}, "threads": a.threads, "runs": a.runs, "onnxruntime": ort.__version__,
            "machine": machine(), "rows": rows, "command": "python benchmarks/matmulnbits_zero_points.py " + " ".join(sys.argv[1:])}
    table = format_table(["graph", "accuracy_level", "us per call", "vs uint8 zp"],
                         [[r["graph"], r["accuracy_level"] if r["accuracy_level"] is not None else "-", f"{r['us']:.1f}",
                           f"{r['us'] / base:.1f}x"] for r in rows])
    md = "\n".join(["# MatMulNBits zero points in onnxruntime (batch 1)", "",
                    f"N={a.n}, K={a.k}, G={a.group}, {a.threads} thread(s), mean of {a.runs} runs after 5 warm-up, "
                    f"onnxruntime {ort.__version__}, {machine()}. accuracy_level 4 quantizes activations to int8 "
                    "(not what saap-edge exports: it keeps float32 activations, level 0).", "", table, "",
                    f"Command: `{data['command']}`", ""])
    write_results(a.out, "matmulnbits_zero_points" + ("_smoke" if a.smoke else ""), data, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
