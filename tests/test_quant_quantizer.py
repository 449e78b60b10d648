import pytest
import torch

from qtoolkit.errors import QtoolkitError
from qtoolkit.quant import MinMaxObserver, QuantParams, integer_range
from qtoolkit.quant.quantizer import check_bits


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(bits, symmetric):
    torch.manual_seed(bits)
    data = torch.randn(5000) * 3 + 0.7
    params = QuantParams.from_range(data.min(), data.max(), bits, symmetric, axis=None)
    low = ((params.qmin - params.zero_point) * params.scale).item()
    high = ((params.qmax - params.zero_point) * params.scale).item()
    inside = data[(data >= low) & (data <= high)]
    assert inside.numel() > 4000  # the grid covers (nearly) all of the range it was made for
    error = (params.fake_quantize(inside) - inside).abs().max()
    assert error <= params.scale / 2 * (1 + 1e-5)
    # Outside the range values saturate to the nearest end of the grid.
    assert params.fake_quantize(torch.tensor([1e6])).item() == pytest.approx(high)


@pytest.mark.parametrize("symmetric", [True, False])
def test_params_are_integer_friendly(symmetric):
    params = QuantParams.from_range(torch.tensor(-0.3), torch.tensor(2.0), 8, symmetric, axis=None)
    qmin, qmax = integer_range(8, symmetric)
    assert (params.qmin, params.qmax) == ((-127, 127) if symmetric else (0, 255))
    assert params.zero_point.dtype == torch.int32 and qmin <= params.zero_point.item() <= qmax
    assert params.scale.item() > 0
    if symmetric:
        assert params.zero_point.item() == 0
    # 0 is exactly representable, and fake quantization equals dequantize(quantize(x)) bit for bit,
    # so an ONNX QuantizeLinear/DequantizeLinear export with these numbers reproduces it.
    x = torch.randn(1000)
    assert params.fake_quantize(torch.zeros(1)).item() == 0.0
    assert torch.equal(params.fake_quantize(x), params.dequantize(params.quantize(x)))
    codes = params.quantize(x)
    assert codes.min() >= qmin and codes.max() <= qmax


def test_all_zero_tensor_gets_a_positive_scale():
    params = QuantParams.from_range(torch.zeros(3), torch.zeros(3), 8, True, axis=0)
    assert (params.scale > 0).all()
    assert torch.equal(params.fake_quantize(torch.zeros(3, 4)), torch.zeros(3, 4))


def test_per_channel_scales_beat_per_tensor_on_very_different_channels():
    torch.manual_seed(0)
    channel_ranges = torch.tensor([1e-3, 1e-2, 1.0, 10.0])
    weight = torch.randn(4, 3, 3, 3) * channel_ranges.reshape(4, 1, 1, 1)
    per_channel, per_tensor = MinMaxObserver(axis=0), MinMaxObserver(axis=None)
    per_channel.observe(weight)
    per_tensor.observe(weight)
    pc, pt = per_channel.compute_params(8, True), per_tensor.compute_params(8, True)
    assert pc.scale.shape == (4,) and pt.scale.shape == ()
    pc_error = (pc.fake_quantize(weight) - weight).pow(2).flatten(1).mean(1)
    pt_error = (pt.fake_quantize(weight) - weight).pow(2).flatten(1).mean(1)
    assert (pc_error <= pt_error).all()
    assert pc_error[0] < pt_error[0] / 100  # the small channel is no longer rounded to zero


def test_straight_through_gradient_is_one_inside_the_range_and_zero_outside():
    params = QuantParams.from_range(torch.tensor(-1.0), torch.tensor(1.0), 4, True, axis=None)
    x = torch.tensor([-5.0, -0.93, -0.2, 0.0, 0.41, 0.99, 3.0], requires_grad=True)
    params.fake_quantize(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("bits", [0, 1, 9, 33, 8.0, True, "8"])
def test_bad_bit_widths_are_refused(bits):
    with pytest.raises(QtoolkitError, match="2 to 8"):
        check_bits(bits, "weight_bits")
