"""Q-Diffusion's shortcut splitting: layers reading [decoder features, encoder skip] get one range per part."""

import copy

import pytest
import torch
from torch import nn

from qtoolkit.errors import QtoolkitError
from qtoolkit.models.blocks import skip_concat_splits
from qtoolkit.quant import QuantConfig, calibrate, freeze, load_quantized, quant_units, quantize, save_quantized
from qtoolkit.quant.fake_quant import SplitFakeQuantize
from qtoolkit.quant.observers import MinMaxObserver


def test_split_points_are_where_the_skip_starts_in_the_real_forward(tiny_unet):
    splits = skip_concat_splits(tiny_unet)
    assert splits and all(".conv_shortcut" in name and name.startswith("up_blocks.") for name in splits)
    skips, inputs = {}, {}
    hooks = []
    for i, block in enumerate(tiny_unet.up_blocks):
        hooks.append(block.register_forward_pre_hook(
            lambda m, args, i=i: skips.__setitem__(i, args[1]), with_kwargs=False))
        for j, resnet in enumerate(block.resnets):
            hooks.append(resnet.register_forward_pre_hook(
                lambda m, args, i=i, j=j: inputs.__setitem__((i, j), args[0])))
    with torch.no_grad():
        tiny_unet(torch.randn(2, 1, 8, 8), torch.tensor([3, 600]))
    for h in hooks:
        h.remove()
    for name, split in splits.items():
        i, j = int(name.split(".")[1]), int(name.split(".")[3])
        x, skip = inputs[(i, j)], skips[i][-(j + 1)]  # resnet j of a block pops the skips from the end
        assert x.shape[1] - split == skip.shape[1]
        torch.testing.assert_close(x[:, split:], skip, rtol=0, atol=0)


def test_each_part_gets_its_own_range():
    quantizer = SplitFakeQuantize((MinMaxObserver(), MinMaxObserver()), 8, False, split=3, channels=8)
    x = torch.cat([torch.rand(4, 3, 5, 5), 50 * torch.rand(4, 5, 5, 5)], dim=1)  # decoder part small, skip large
    quantizer.observe(x)
    quantizer.freeze()
    params = quantizer.params
    assert params.axis == 1 and params.scale.shape == (8,)
    assert params.scale[5] > 20 * params.scale[0]
    whole = MinMaxObserver()
    whole.observe(x)
    per_tensor = whole.compute_params(8, False)
    small_part_error = (quantizer(x) - x)[:, :3].abs().max()
    assert small_part_error <= params.scale[0] / 2 + 1e-6
    assert small_part_error < (per_tensor.fake_quantize(x) - x)[:, :3].abs().max() / 10


def test_split_shortcuts_swaps_only_the_skip_layers_and_reloads_bit_identically(tiny_unet, tmp_path):
    q = quantize(copy.deepcopy(tiny_unet), QuantConfig(split_shortcuts=True))
    split_layers = {name for name, unit in quant_units(q).items() if isinstance(unit.input_quantizer, SplitFakeQuantize)}
    assert split_layers == set(skip_concat_splits(tiny_unet))
    x, t = torch.randn(6, 1, 8, 8), torch.randint(0, 1000, (6,))
    with calibrate(q):
        q(x, t)
    freeze(q)
    save_quantized(q, tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(tmp_path / "q")(x, t).sample, q(x, t).sample, rtol=0, atol=0)


def test_split_shortcuts_config_errors(tiny_unet):
    with pytest.raises(QtoolkitError, match="quantize_conv_outputs"):
        QuantConfig(split_shortcuts=True, quantize_conv_outputs=True)
    with pytest.raises(QtoolkitError, match="no quantized layer that reads a UNet skip"):
        quantize(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3)), QuantConfig(split_shortcuts=True, exclude=[]))
    with pytest.raises(QtoolkitError, match="no quantized layer that reads a UNet skip"):
        quantize(copy.deepcopy(tiny_unet), QuantConfig(split_shortcuts=True, exclude=["*conv_shortcut"]))
