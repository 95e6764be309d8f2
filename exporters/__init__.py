"""Exporters: a saap-edge (or plain LLaMA) checkpoint -> a file a device runs.

The export stage is exporters/export.py: it loads the checkpoint, writes the artifact under a
temporary name, reads it back and compares it with the torch model (exporters/validate.py),
and only then renames it into place. The writers: gguf.py, onnx_fused.py (the default ONNX
graph), onnx.py (torch.export's graph, and what the ONNX graphs share), modelfile.py (Ollama).
"""

from exporters.export import (  # noqa: F401
    DEFAULT_ACCURACY,
    DEFAULT_EMBED,
    ExportJob,
    ExportResult,
    FORMATS,
    GGUF_QUANTS,
    ONNX_GRAPHS,
    default_out,
    export,
    plan_export,
    streams,
)
