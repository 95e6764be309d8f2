"""GPTQ into int4 groups: the same format as round-to-nearest, a lower layer output error."""

import pytest
import torch

from conftest import hetero_model
from saap_edge.models.int4_linear import Int4Linear
from saap_edge.quant.gptq import gptq_groups, gptq_model, output_error
from saap_edge.quant.int4 import quantize_groups, quantize_model


def _correlated_inputs(n_tokens=2048, n_in=128, seed=0):
    """Inputs whose features are strongly correlated (a few latent factors plus noise)."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n_tokens, 8, generator=g, dtype=torch.float64)
    mix = torch.randn(8, n_in, generator=g, dtype=torch.float64)
    return latent @ mix + 0.1 * torch.randn(n_tokens, n_in, generator=g, dtype=torch.float64)


def test_identity_second_moment_gives_round_to_nearest():
    """With H = c I no error is moved to other columns: the codes, scales and offsets are RTN's."""
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(1))
    rtn = quantize_groups(w, 32)
    for block in (32, 64, 128):
        g = gptq_groups(w, 5.0 * torch.eye(96, dtype=torch.float64), 32, damp=0.0, block=block)
        assert torch.equal(g.codes, rtn.codes) and torch.equal(g.scales, rtn.scales) and torch.equal(g.offsets, rtn.offsets)


@pytest.mark.parametrize("group_size", [32, 64])
def test_gptq_output_error_below_round_to_nearest_on_correlated_inputs(group_size):
    x = _correlated_inputs()
    gram = x.T @ x
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    rtn = output_error(w, quantize_groups(w, group_size).dequantize(), gram)
    g = gptq_groups(w, gram, group_size)
    gptq = output_error(w, g.dequantize(), gram)
    # the format is the RTN format: codes 0..15, fp16 a and b, w_hat = a q + b
    assert g.codes.dtype == torch.uint8 and int(g.codes.max()) <= 15
    assert g.scales.dtype == g.offsets.dtype == torch.float16 and g.scales.shape == (64, 128 // group_size)
    assert gptq < 0.5 * rtn, (gptq, rtn)


def test_gptq_model_quantizes_every_projection_and_lowers_the_error():
    model = hetero_model(seed=3)
    samples = torch.randint(3, 512, (6, 16), generator=torch.Generator().manual_seed(0))
    info = gptq_model(model, samples, group_size=32, batch_size=4, progress=False)
    projections = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1].endswith("_proj")]
    assert projections and all(isinstance(m, Int4Linear) for m in projections)
    assert model.config.quantization["group_size"] == 32
    assert len(info["errors"]) == len(projections)
    assert info["output_error"]["gptq_mean"] < info["output_error"]["rtn_mean"]
    with torch.no_grad():
        logits = model(samples[:2]).logits
    assert torch.isfinite(logits).all()


def test_gptq_model_output_is_closer_to_the_float_model_than_rtn():
    """Per layer GPTQ minimises the output error on calibration inputs, so the quantized model's
    logits on those windows are closer to the float model's than round-to-nearest's."""
    samples = torch.randint(3, 512, (8, 24), generator=torch.Generator().manual_seed(1))
    ref = hetero_model(seed=4)
    with torch.no_grad():
        dense = ref(samples).logits
    rtn, gptq = hetero_model(seed=4), hetero_model(seed=4)
    quantize_model(rtn, 32)
    gptq_model(gptq, samples, group_size=32, progress=False)
    with torch.no_grad():
        err_rtn = (rtn(samples).logits - dense).pow(2).mean()
        err_gptq = (gptq(samples).logits - dense).pow(2).mean()
    assert err_gptq < err_rtn, (float(err_gptq), float(err_rtn))
