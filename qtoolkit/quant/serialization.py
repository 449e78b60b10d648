"""Saving and loading frozen quantized models: safetensors for tensors, one JSON file for everything else.

A saved folder holds
- model.safetensors: the model's state_dict (float weights plus every quantizer's scale, zero point and
  frozen flag), loaded with safetensors only;
- quantization.json: format tag, the diffusers model class and config (to rebuild the architecture),
  the QuantConfig (to re-apply the same swaps), the frozen quantization parameters in readable form
  (for people and exporters; the safetensors copy is the one loaded) and the caller's extra_config.
Loading rebuilds the model, re-applies quantize(config) and loads the state: the fake-quantized forward
is a deterministic function of these tensors, so outputs are bit-identical to the saved model's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import diffusers
from diffusers import ConfigMixin, ModelMixin
from safetensors.torch import save_file
from torch import nn

from ..errors import QtoolkitError
from ..io import atomic_dir
from ..models.loading import load_safetensors
from .api import quant_config_of, quant_units, quantize
from .config import QuantConfig
from .fake_quant import FakeQuantize
from .quantizer import QuantParams

WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "quantization.json"
FORMAT = "qtoolkit-quantized-model"
FORMAT_VERSION = 1
_REQUIRED_KEYS = ("format", "format_version", "model_class", "model_config", "quant_config")


def _params_to_json(params: QuantParams) -> dict:
    return {"bits": params.bits, "symmetric": params.symmetric, "axis": params.axis, "qmin": params.qmin,
            "qmax": params.qmax, "scale": params.scale.tolist(), "zero_point": params.zero_point.tolist()}


def frozen_params(model: nn.Module) -> dict[str, dict[str, dict]]:
    """{module name: {quantizer name: its parameters as JSON}} for every quantizer of a frozen model."""
    return {name: {child: _params_to_json(q.params) for child, q in unit.named_children() if isinstance(q, FakeQuantize)}
            for name, unit in quant_units(model).items()}


def save_quantized(model: nn.Module, folder: str | os.PathLike, extra_config: dict | None = None,
                   overwrite: bool = False) -> None:
    """Write a frozen quantized model to `folder` atomically (nothing is left half-written on failure)."""
    config = quant_config_of(model)
    not_frozen = [name for name, unit in quant_units(model).items() if not unit.is_frozen]
    if not_frozen:
        raise QtoolkitError(f"{len(not_frozen)} quantized module(s) are not frozen (e.g. {not_frozen[0]!r}): "
                          "calibrate the model and call freeze(model) before saving")
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "model_config": json.loads(model.to_json_string()) if isinstance(model, ConfigMixin) else None,
        "quant_config": config.to_dict(),
        "quant_params": frozen_params(model),
        "extra_config": extra_config,
    }
    try:
        text = json.dumps(metadata, indent=2) + "\n"
    except (TypeError, ValueError) as e:
        raise QtoolkitError(f"extra_config cannot be written as JSON ({e}): pass only plain numbers, strings, "
                          "lists and dicts") from None
    state = {key: tensor.detach().contiguous() for key, tensor in model.state_dict().items()}
    with atomic_dir(Path(folder), overwrite) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE))
        (tmp / METADATA_FILE).write_text(text)


def read_quantized_metadata(folder: str | os.PathLike) -> dict:
    """The checked contents of a saved folder's quantization.json (e.g. to read back its extra_config)."""
    folder = Path(folder)
    for file in (METADATA_FILE, WEIGHTS_FILE):
        if not (folder / file).is_file():
            raise QtoolkitError(f"{folder} has no {file}: it is not a complete save_quantized folder "
                              "(re-save the model with qtoolkit.quant.save_quantized)")
    try:
        metadata = json.loads((folder / METADATA_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QtoolkitError(f"{folder / METADATA_FILE} is corrupt ({e}): re-save the model") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise QtoolkitError(f"{folder / METADATA_FILE} is not a qtoolkit quantized-model file (format {FORMAT!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise QtoolkitError(f"{folder} was saved in format version {metadata.get('format_version')!r}; this qtoolkit "
                          f"reads version {FORMAT_VERSION}: load it with the qtoolkit version that saved it")
    missing = [key for key in _REQUIRED_KEYS if key not in metadata]
    if missing:
        raise QtoolkitError(f"{folder / METADATA_FILE} lacks {missing}: re-save the model")
    return metadata


def _diffusers_model_class(name: str) -> type[ModelMixin]:
    model_class = getattr(diffusers, str(name), None)
    if not (isinstance(model_class, type) and issubclass(model_class, ModelMixin)):
        raise QtoolkitError(f"model class {name!r} is not a diffusers model class known to diffusers "
                          f"{diffusers.__version__}: cannot rebuild the model")
    return model_class


def load_quantized(folder: str | os.PathLike) -> nn.Module:
    """Rebuild a model saved by save_quantized: architecture from its config, same swaps, same tensors (eval mode)."""
    folder = Path(folder)
    metadata = read_quantized_metadata(folder)
    if metadata["model_config"] is None:
        raise QtoolkitError(f"{folder} holds a {metadata['model_class']} without a diffusers config, which cannot be "
                          "rebuilt automatically: build the model, quantize(model, config), then load_state_dict "
                          f"from {WEIGHTS_FILE}")
    model_class = _diffusers_model_class(metadata["model_class"])
    state = load_safetensors(folder / WEIGHTS_FILE)
    model = model_class.from_config(metadata["model_config"]).eval()
    quantize(model, QuantConfig.from_dict(metadata["quant_config"]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise QtoolkitError(f"{folder / WEIGHTS_FILE} does not match the saved model description ({e}); "
                          "re-save the model") from None
    return model
