"""What a decode step reads: logical parameters and weight bytes per decoded token, and the
bytes of all stored weights (tensor data: a GGUF's tokenizer metadata and an ONNX folder's
tokenizer files aside).

A decode step at batch 1 reads every weight matrix once, except the token embedding, of
which it reads one row; with tied embeddings the output projection reads the whole table.
Norm weights and KV cache reads are small next to the matrices and are included / left out
as stated: norms included, KV cache left out (it depends on the position).
"""

from __future__ import annotations

import json
from pathlib import Path


def torch_weights(model) -> dict:
    """Logical parameters and bytes per token of a torch model. An Int4Linear computes with
    its cached dequantized weight, so a decode step reads that (in_features x out_features
    in the model's compute dtype, that of its embedding), not the packed codes."""
    from saap_edge.models.int4_linear import Int4Linear

    params, read = 0, 0
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight if model.get_output_embeddings() is not None else None
    seen = set()
    for module in model.modules():
        if isinstance(module, Int4Linear):
            params += module.in_features * module.out_features
            read += module.in_features * module.out_features * emb.element_size()
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            params += p.numel()
            if p is not emb or head is emb:
                read += p.numel() * p.element_size()
    return {"params": params, "bytes_per_token": read}


def gguf_weights(path: Path) -> dict:
    from gguf import GGUFReader

    tensors = GGUFReader(str(path)).tensors
    names = {t.name for t in tensors}
    params = sum(int(t.n_elements) for t in tensors)
    read = sum(int(t.n_bytes) for t in tensors if t.name != "token_embd.weight" or "output.weight" not in names)
    return {"params": params, "bytes_per_token": read, "weight_bytes": sum(int(t.n_bytes) for t in tensors)}


def onnx_weights(folder: Path) -> dict:
    """From the graph's initializers (external data lengths, no weights loaded); MatMulNBits B
    holds two weights a byte."""
    import onnx

    folder = Path(folder)
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    params, read, embed_bytes, has_head, stored = 0, 0, 0, False, 0
    for t in proto.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        ext = {e.key: e.value for e in t.external_data}
        size = int(ext["length"]) if "length" in ext else len(t.raw_data) or n * 4
        stored += size
        if t.name.startswith(("const.", "rotary.")):  # graph constants (shapes, inv_freq), not weights
            continue
        if t.name.endswith(("scales", "zero_points", "offsets")):  # group parameters, not weights
            # fp16 group parameters are widened to float32 when the session starts: that is what a step reads
            read += 2 * size if t.data_type == onnx.TensorProto.FLOAT16 else size
            continue
        params += 2 * n if t.name.endswith("qweight") else n
        if "embed_tokens" in t.name:
            embed_bytes += size
            continue
        has_head |= "lm_head" in t.name
        read += size
    cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    if not has_head or cfg.get("tie_word_embeddings"):
        read += embed_bytes
    return {"params": params, "bytes_per_token": read, "weight_bytes": stored}


def artifact_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in (".onnx", ".data", ".safetensors"))
    return path.stat().st_size
