"""The int4 group quantizer: codes in range, exact dequantization, error bound, packing."""

import pytest
import torch

from saap_edge.errors import UserError
from saap_edge.quant.int4 import check_group_size, choose_group_size, pack_nibbles, quantize_groups, unpack_nibbles


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_codes_in_range_and_dequantization_is_exactly_a_q_plus_b(group_size):
    torch.manual_seed(0)
    w = torch.randn(24, 256) * 0.05
    g = quantize_groups(w, group_size)
    assert g.codes.dtype == torch.uint8 and int(g.codes.max()) <= 15
    assert g.scales.dtype == g.offsets.dtype == torch.float16
    assert g.scales.shape == g.offsets.shape == (24, 256 // group_size)
    q = g.codes.float().reshape(24, -1, group_size)
    expect = (q * g.scales.float()[..., None] + g.offsets.float()[..., None]).reshape(24, 256)
    assert torch.equal(g.dequantize(), expect)


def test_error_bounded_by_half_a_step():
    torch.manual_seed(1)
    w = torch.randn(16, 128)
    g = quantize_groups(w, 32)
    err = (g.dequantize() - w).abs().reshape(16, 4, 32)
    groups = w.reshape(16, 4, 32)
    a_exact = (groups.amax(-1) - groups.amin(-1)) / 15
    a, b = g.scales.float(), g.offsets.float()
    # half a step, plus what rounding a and b to fp16 can add (b moves, 15 steps of a drift)
    bound = a / 2 + (b - groups.amin(-1)).abs() + 15 * (a - a_exact).abs() + 1e-7
    assert (err <= bound[..., None]).all()
    assert float(err.max()) < float(a.max())


def test_constant_group_is_exact():
    w = torch.full((2, 32), 0.25)
    g = quantize_groups(w, 32)
    assert torch.equal(g.dequantize(), w) and int(g.codes.max()) == 0


def test_pack_unpack_round_trip_and_layout():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (5, 32)
    assert torch.equal(unpack_nibbles(packed), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)


def test_group_size_choice_and_errors():
    assert choose_group_size({"a": 576, "b": 1536}) == 64
    assert choose_group_size({"a": 4096, "b": 11008}) == 128
    with pytest.raises(UserError, match="172 of layers.3.mlp.down_proj"):
        choose_group_size({"layers.3.self_attn.o_proj": 64, "layers.3.mlp.down_proj": 172})
    with pytest.raises(UserError, match="does not divide the input dimension 96"):
        check_group_size(64, {"x": 96})
    with pytest.raises(UserError, match="multiple of 32"):
        check_group_size(48, {"x": 96})


@pytest.mark.parametrize("parts", [("offsets",), ("scales",), ("scales", "offsets"), ()])
def test_int4_matmul_gradients_equal_autograd_through_the_dequantized_weight(parts):
    """The training forward (dequantize, matmul, dequantize again in the backward, nothing kept)
    gives the gradients plain autograd gives through w = a q + b; with offsets alone they come
    from group sums of the input."""
    import torch

    from saap_edge.models.int4_linear import Int4Linear, dequantize
    from saap_edge.quant.int4 import quantize_groups

    torch.manual_seed(0)
    g = quantize_groups(torch.randn(48, 128), 32)
    layers = [Int4Linear.from_parts(g.codes, g.scales, g.offsets) for _ in range(2)]
    trained = [m.train_groups(scales="scales" in parts, offsets="offsets" in parts) for m in layers]
    x = [torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1)).requires_grad_(True) for _ in range(2)]
    y = layers[0](x[0])
    ref = torch.nn.functional.linear(x[1], dequantize(layers[1].codes, layers[1]._stored("scales"), layers[1]._stored("offsets")))
    (y.square().sum()).backward()
    (ref.square().sum()).backward()
    assert torch.equal(y, ref) and torch.allclose(x[0].grad, x[1].grad, rtol=1e-5, atol=1e-5)
    for p, q in zip(*trained):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-4)
    assert layers[0]._cache is None  # training kept no float copy of the weight


def test_reading_weight_never_caches_a_float_copy():
    import torch

    from saap_edge.models.int4_linear import Int4Linear, weight_cache
    from saap_edge.quant.int4 import quantize_groups

    g = quantize_groups(torch.randn(16, 64), 32)
    layer = Int4Linear.from_parts(g.codes, g.scales, g.offsets)
    assert layer.weight.dtype == torch.float32 and layer._cache is None
    with torch.no_grad():
        layer(torch.randn(2, 64))
        assert layer._cache is not None  # evaluation keeps its dequantized weight (speed)
        with weight_cache(layer, False):
            assert layer._cache is None
            layer(torch.randn(2, 64))
            assert layer._cache is None
