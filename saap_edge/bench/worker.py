"""A torch bench row in its own process: the loop of runtime.bench over a transformers model.

    python -m saap_edge.bench.worker MODEL --device cpu --dtype float32 [runtime.bench options]

Prints one JSON line like runtime.bench, plus the model's parameters and weight bytes read
per decoded token, and on CUDA the allocator's peak.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    import torch

    from runtime.bench import add_arguments, measure
    from saap_edge.bench.torch_runtime import TorchRuntime
    from saap_edge.bench.weights import torch_weights
    from saap_edge.models.load import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    loaded = load_model(a.artifact, a.device, a.dtype)
    rt = TorchRuntime(loaded.model, loaded.tokenizer, next(loaded.model.parameters()).device)
    load_s = time.perf_counter() - t0
    cuda = rt.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = {"artifact": a.artifact, "load_s": load_s, **measure(rt, a.prompt_tokens, a.new_tokens, a.reps, a.warmup),
              **torch_weights(rt.model), "dtype": a.dtype}
    if cuda:
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
