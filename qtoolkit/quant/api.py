"""The three verbs: quantize(model, config), `with calibrate(model):`, freeze(model)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from ..errors import QtoolkitError
from .attention import QuantAttnProcessor
from .config import QuantConfig
from .fake_quant import QuantUnit
from .layers import QuantConv2d, QuantLinear

# Exact float types only: a subclass (e.g. a LoRA-aware conv) may add behaviour a swap would drop.
QUANTIZED_TYPES = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
# The model attribute that remembers how it was quantized (read by save_quantized).
CONFIG_ATTRIBUTE = "_qtoolkit_quant_config"


def quantize(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Swap the selected Conv2d / Linear layers (and attention processors) of `model` in place; return it.

    Layers not selected are left as they are (same objects, same weights). The swapped layers keep the
    float Parameter objects. Next: run calibration batches inside `with calibrate(model):`, then freeze(model).
    """
    if quant_units(model):
        raise QtoolkitError("this model is already quantized: quantize a fresh full-precision copy instead")
    layers = {name: m for name, m in model.named_modules() if type(m) in QUANTIZED_TYPES}
    attentions = {name: m for name, m in model.named_modules() if isinstance(m, Attention)} \
        if config.quantize_attention_matmuls else {}
    selected = config.select(list(layers) + list(attentions))
    for name in selected:
        if name in attentions and not isinstance(attentions[name].processor, AttnProcessor2_0):
            raise QtoolkitError(
                f"attention {name!r} uses {type(attentions[name].processor).__name__}, but matmul quantization "
                "supports diffusers' AttnProcessor2_0 only: exclude it or set quantize_attention_matmuls to false"
            )
    splits = _shortcut_splits(model, selected) if config.split_shortcuts else {}
    for name in selected:
        if name in attentions:
            attentions[name].set_processor(QuantAttnProcessor(config, name).to(_device_of(attentions[name])))
        else:
            layer = layers[name]
            parent_name, _, child_name = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child_name, QUANTIZED_TYPES[type(layer)].from_float(layer, config, name, splits.get(name)))
    setattr(model, CONFIG_ATTRIBUTE, config)
    return model


def _shortcut_splits(model: nn.Module, selected: list[str]) -> dict[str, int]:
    from ..models.blocks import skip_concat_splits  # model plumbing: which layers read a skip concatenation

    splits = {name: split for name, split in skip_concat_splits(model).items() if name in selected}
    if not splits:
        raise QtoolkitError(f"split_shortcuts: {type(model).__name__} has no quantized layer that reads a UNet skip "
                          "concatenation (decoder resnets' conv_shortcut): turn split_shortcuts off for this model")
    return splits


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters(), torch.empty(0)).device


def quant_units(model: nn.Module) -> dict[str, QuantUnit]:
    """Every quantized layer and attention processor of `model`, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantUnit)}


def quant_config_of(model: nn.Module) -> QuantConfig:
    config = getattr(model, CONFIG_ATTRIBUTE, None)
    if config is None:
        raise QtoolkitError("this model was not quantized by qtoolkit: call qtoolkit.quant.quantize(model, config) first")
    return config


@contextmanager
def calibrate(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, forward passes run in full precision (without autograd) and feed every observer.

    Statistics accumulate over all batches of all `with calibrate(model):` blocks until freeze(model).
    """
    quant_config_of(model)
    units = quant_units(model).values()
    if any(unit.is_frozen for unit in units):
        raise QtoolkitError("this model is already frozen: calibrate a freshly quantized model instead")
    for unit in units:
        unit.calibrating = True
    try:
        with torch.no_grad():
            yield model
    finally:
        for unit in units:
            unit.calibrating = False


def freeze(model: nn.Module) -> nn.Module:
    """Fix every quantizer's scale and zero point from the calibration statistics; observing stops."""
    quant_config_of(model)
    units = quant_units(model)
    uncalibrated = [name for name, unit in units.items() if unit.lacks_calibration_data]
    if uncalibrated:
        raise QtoolkitError(
            f"{len(uncalibrated)} quantized module(s) saw no calibration data (e.g. {', '.join(uncalibrated[:3])}): "
            "run forward passes that reach them inside `with calibrate(model):` before freeze(model)"
        )
    with torch.no_grad():
        for unit in units.values():
            unit.freeze()
    return model
