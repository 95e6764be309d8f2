"""Quantization: the one int4 group quantizer shared by recovery, checkpoints and exporters."""
