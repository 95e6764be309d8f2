"""GPTQ into the same int4 groups: error-compensating rounding from the layers' input statistics.

Round-to-nearest (quant/int4.py) rounds every weight on its own. GPTQ (Frantar et al., arXiv
2210.17323) rounds the columns of a projection W [out, in] one input at a time and moves the
rounding error of column j onto the columns not yet rounded, weighted by the inverse of the
input second moment H = sum over tokens of x x^T, so that the layer's output W x, not the
weight, stays close. The result is exactly the format round-to-nearest writes (codes 0..15,
fp16 scale a and offset b per group of G consecutive inputs, a = (max - min) / 15, b = min),
so recovery, the checkpoint and both exporters read it unchanged: each group's a, b are taken
from the group's columns as they stand when its first column comes up (error already moved
into them), and act-order is off so groups stay contiguous along the input.

`gptq_model` quantizes a model layer by layer in order ("true sequential"): each projection's
H is gathered on the calibration windows as they come out of the already quantized prefix
(and, inside a layer, after the projections before it were quantized). One decoder layer is on
the compute device at a time; the hidden-state stream [N, T, hidden] stays on the host.

Written here because the libraries that run GPTQ (gptqmodel, llm-compressor) write their own
packed formats (symmetric or uint8 zero points) and model classes, not a / b groups of a
heterogeneous slim model that GGUF Q4_1 must reproduce bit for bit.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from saap_edge.models.int4_linear import QUANT_MODULES
from saap_edge.quant.int4 import Int4Groups, group_codes, group_params, prepare_quantization, replace_projection

__all__ = ["gptq_groups", "gptq_model", "SITES", "output_error"]

# The projections that read one input, in the order a decoder layer computes them.
SITES = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("self_attn", ("o_proj",)),
         ("mlp", ("gate_proj", "up_proj")), ("mlp", ("down_proj",)))


# --------------------------------------------------------------------------------------------
# The math: a pure function of one weight and its input second moment.

def _upper_inverse_factor(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """U with U^T U = (H + lambda I)^-1, U upper triangular; lambda = damp x mean diag H.
    Inputs that never fire (diag 0) get a unit diagonal (their columns round on their own)."""
    h = gram.clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    h.diagonal().add_(damp * h.diagonal().mean())
    for attempt in range(4):
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            del h  # at most two n x n matrices besides the caller's gram (memory.quantize_memory)
            inverse = torch.cholesky_inverse(chol)
            del chol
            return torch.linalg.cholesky(inverse, upper=True)
        h.diagonal().add_(h.diagonal().mean() * 10.0 ** (attempt - 2))  # more damping where H is singular
    raise ValueError("the input second moment is not positive definite even with damping")


def gptq_groups(weight: torch.Tensor, gram: torch.Tensor, group_size: int, damp: float = 0.01,
                block: int = 128, work_dtype: torch.dtype = torch.float64) -> Int4Groups:
    """Quantize `weight` [out, in] to int4 groups of `group_size` inputs by GPTQ.

    gram: sum over calibration tokens of x x^T [in, in] of the projection's input. block:
    columns whose errors are applied together to the rest (a multiple of group_size).
    With gram a multiple of the identity nothing is moved and the codes are round-to-nearest's.
    """
    out, n = weight.shape
    if n % group_size or gram.shape != (n, n):
        raise ValueError(f"weight {tuple(weight.shape)}, gram {tuple(gram.shape)}, group size {group_size} do not fit")
    w = weight.detach().to(work_dtype).clone()
    u = _upper_inverse_factor(gram.to(work_dtype), damp)
    block = max(group_size, block // group_size * group_size)
    codes = torch.zeros(out, n, dtype=torch.uint8, device=w.device)
    scales = torch.zeros(out, n // group_size, dtype=torch.float16, device=w.device)
    offsets = torch.zeros_like(scales)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            g = (i1 + i) // group_size
            if (i1 + i) % group_size == 0:  # a new group: its a, b from its columns as they stand now
                scales[:, g], offsets[:, g] = group_params(w1[:, i:i + group_size].float())
            q = group_codes(w1[:, i:i + 1].float(), scales[:, g], offsets[:, g])[:, 0]
            codes[:, i1 + i] = q.to(torch.uint8)
            rounded = (q * scales[:, g].float() + offsets[:, g].float()).to(work_dtype)
            err = (w1[:, i] - rounded) / u1[i, i]
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return Int4Groups(codes, scales, offsets, group_size)


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """Relative squared output error tr(D H D^T) / tr(W H W^T), D = approx - weight."""
    d = (approx.double() - weight.double())
    h = gram.double()
    return float(((d @ h) * d).sum() / ((weight.double() @ h) * weight.double()).sum().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------
# The model pass: layer by layer over calibration windows.

class _StopForward(Exception):
    """Raised by a capture hook once the input it waits for has been seen."""


def _gram_of(layer: nn.Module, run, module: nn.Module, n_in: int, device) -> torch.Tensor:
    """sum x x^T of `module`'s input over every batch `run` pushes through `layer` (float64;
    the layer stops at the module: nothing after it is computed)."""
    gram = torch.zeros(n_in, n_in, dtype=torch.float64, device=device)

    def hook(_m, args):
        x = args[0].reshape(-1, n_in).float()
        gram.add_((x.T @ x).double())
        raise _StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        run()
    finally:
        handle.remove()
    return gram


def gptq_model(model: nn.Module, samples: torch.Tensor, group_size: int | None = None, damp: float = 0.01,
               batch_size: int = 8, device=None, progress: bool = True, modules=QUANT_MODULES) -> dict:
    """Replace the model's projections by GPTQ-rounded Int4Linear layers, in place.

    samples: calibration token windows [N, T]. Returns what was done (group size, windows,
    per-projection relative output errors of GPTQ and of round-to-nearest on the same H, time).
    """
    from saap_edge.prune.groups import decoder_layers
    from saap_edge.quant.int4 import quantize_groups
    from saap_edge.reconstruct import layer_context, on_device, work_dtype

    t0 = time.perf_counter()
    group_size = prepare_quantization(model, group_size, modules)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    solve = work_dtype(device)
    dtype = next(model.parameters()).dtype
    embed = model.get_input_embeddings()
    batches = [slice(s, min(s + batch_size, len(samples))) for s in range(0, len(samples), batch_size)]
    with torch.no_grad():
        stream = torch.cat([embed(samples[b].to(embed.weight.device)).to("cpu", dtype) for b in batches])
    pos, mask = layer_context(model, samples.shape[1], dtype, device)
    errors: list[dict] = []
    layers = decoder_layers(model)
    for i, layer in enumerate(tqdm(layers, desc="gptq", disable=not progress)):
        with on_device(layer, device), torch.no_grad():
            def run(keep: list | None = None):
                for b in batches:
                    try:
                        out = layer(stream[b].to(device), position_embeddings=pos, attention_mask=mask)
                    except _StopForward:
                        continue
                    if keep is not None:
                        keep.append((out[0] if isinstance(out, tuple) else out).to("cpu"))

            for block_name, names in SITES:
                block = getattr(layer, block_name, None)
                members = [(n, getattr(block, n)) for n in names if isinstance(getattr(block, n, None), nn.Linear)
                           and n in modules]
                if not members:
                    continue
                gram = _gram_of(layer, run, members[0][1], members[0][1].in_features, device)
                for name, linear in members:
                    w = linear.weight.detach()
                    groups = gptq_groups(w.to(device), gram.to(solve), group_size, damp, work_dtype=solve)
                    errors.append({"layer": i, "proj": name,
                                   "gptq": output_error(w, groups.dequantize().to(w.device), gram.to(w.device)),
                                   "rtn": output_error(w, quantize_groups(w, group_size).dequantize().to(w.device),
                                                       gram.to(w.device))})
                    replace_projection(block, name, groups)
                del gram
            new_stream: list = []
            run(keep=new_stream)
            stream = torch.cat(new_stream)
            for m in layer.modules():
                if hasattr(m, "_cache"):
                    m._cache = None
    return {"quantizer": "gptq", "group_size": group_size, "windows": int(samples.shape[0]),
            "seq_len": int(samples.shape[1]), "damp": damp, "time_s": time.perf_counter() - t0,
            "output_error": {"gptq_mean": sum(e["gptq"] for e in errors) / max(1, len(errors)),
                             "rtn_mean": sum(e["rtn"] for e in errors) / max(1, len(errors))},
            "errors": errors}
