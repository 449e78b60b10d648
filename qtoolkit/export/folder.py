"""The exported-model folder written by `qtoolkit export` and read by the engines.

    model.onnx                          the graph (onnx_graph.py); model.onnx.data beside it for > 1 GiB of weights
    scheduler/scheduler_config.json     the training noise schedule, so sampling needs nothing else
    export.json                         what the graph expects and holds (inputs, dtypes, quantization, source)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..errors import QtoolkitError
from ..graph import quant_config_of, quant_ops
from ..io import atomic_dir, read_description
from ..models.loading import DiffusionModel
from ..quant.overflow import PAIR_LIMIT, WEIGHT_PAIRS, int8_arithmetic
from .onnx_graph import BATCH, export_onnx, graph_summary, network_graph, require_exporter

ONNX_FILE = "model.onnx"
DESCRIPTION_FILE = "export.json"
SCHEDULER_FILE = Path("scheduler") / "scheduler_config.json"
FORMAT = "qtoolkit-onnx-export"
FORMAT_VERSION = 1


def _quantization(graph: torch.fx.GraphModule) -> dict | None:
    """How the exported graph is quantized (None for a float graph), for people reading export.json."""
    ops = list(quant_ops(graph).values())
    if not ops:
        return None
    config = quant_config_of(graph)
    layers = [op for op in ops if op.kind != "attention"]
    weights, inputs = "float32 (not quantized)", "float32 (not quantized)"
    if config.weight_bits is not None:
        granularity = "per output channel (axis 0)" if config.weight_granularity == "per_channel" else "per tensor"
        codes = "symmetric int8" if config.weight_symmetric else "asymmetric uint8"
        weights = f"{config.weight_grid_bits}-bit {granularity}: {codes} codes -> DequantizeLinear"
        if config.overflow_fix == WEIGHT_PAIRS:
            weights += f" (adjacent input channels' same-sign codes sum to at most {PAIR_LIMIT})"
    if config.activation_bits is not None:
        inputs = ("8-bit per tensor: QuantizeLinear (uint8, zero point) -> DequantizeLinear before each quantized "
                  "layer; layers that read the same tensor with the same parameters share one pair")
    attention = "float32 (not quantized)"
    if config.quantize_attention_matmuls:
        attention = ("Q, K, softmax output and V each through QuantizeLinear (uint8) -> DequantizeLinear before "
                     "Q.K^T and softmax.V")
    outputs = "float32 (not quantized)"
    if config.quantize_conv_outputs:
        outputs = ("convolutions: int32 bias codes -> DequantizeLinear, output QuantizeLinear (uint8) -> "
                   "DequantizeLinear (ONNX Runtime fuses these into QLinearConv); linear layers: float32")
    return {
        "quantized_layers": len(layers),
        "quantized_convolutions": sum(op.kind == "conv2d" for op in layers),
        "quantized_linears": sum(op.kind == "linear" for op in layers),
        "quantized_attention_matmuls": 2 * (len(ops) - len(layers)),  # Q.K^T and softmax.V of each attention
        "layers_with_quantized_weights": sum(op.weight is not None for op in layers),
        "layers_with_quantized_inputs": sum(op.input is not None for op in layers),
        "weights": weights,
        "inputs": inputs,
        "outputs": outputs,
        "attention_matmuls": attention,
        "int8_arithmetic": int8_arithmetic(config),
        "quant_config": config.to_dict(),
    }


def export_model(model: DiffusionModel, out: str | os.PathLike, overwrite: bool = False) -> dict:
    """Export `model` (its network float, or a frozen quantized graph) to an ONNX folder at `out`; return its
    description."""
    out = Path(out)
    require_exporter()  # before capturing the network, which takes a while
    graph = network_graph(model)
    from diffusers import DDPMScheduler  # on use: qtoolkit.models.loading says why

    with atomic_dir(out, overwrite) as tmp:
        export_onnx(graph, model.sample_shape, tmp / ONNX_FILE)
        # from_config, not DDPMScheduler(**config): a config written for another scheduler class may carry keys
        # that DDPMScheduler does not take, and sampling rebuilds its own scheduler from these values anyway.
        DDPMScheduler.from_config(model.scheduler_config).save_pretrained(tmp / SCHEDULER_FILE.parent)
        quantization = _quantization(graph)
        description = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "onnx_file": ONNX_FILE,
            "precision": "fp32" if quantization is None else "int8-qdq",
            **graph_summary(tmp / ONNX_FILE),
            "batch": f"dynamic ({BATCH!r}): the captured graph holds for every batch size (qtoolkit.graph.capture)",
            "timestep": "int64 (batch,), as the scheduler loop passes it; cast to float32 inside the graph",
            "sample_shape": list(model.sample_shape),
            "quantization": quantization,
            "source_model": str(model.path),
            "versions": {"qtoolkit": __version__, "torch": torch.__version__.split("+")[0]},
        }
        (tmp / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2) + "\n")
    return description


def is_exported_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / DESCRIPTION_FILE).is_file()


@dataclass
class ExportedModel:
    """An exported folder: its ONNX graph and what sampling needs besides a noise predictor.

    It offers `sample_shape` and `scheduler_config` like a DiffusionModel, which is all that
    qtoolkit.sampling.sample reads when it is given the noise predictor (`eps=`) of an engine.
    """

    path: Path
    description: dict
    scheduler_config: dict

    @property
    def onnx_file(self) -> Path:
        return self.path / self.description["onnx_file"]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.description["sample_shape"])


def load_exported(folder: str | os.PathLike) -> ExportedModel:
    """Read and check a folder written by export_model."""
    folder = Path(folder)
    how_to_fix = f"re-export it with `qtoolkit export --model MODEL --format onnx --out {folder}`"
    if not is_exported_folder(folder):
        raise QtoolkitError(f"{folder} is not an exported model folder (no {DESCRIPTION_FILE}): {how_to_fix}")
    try:
        scheduler = json.loads((folder / SCHEDULER_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QtoolkitError(f"{folder} is incomplete or corrupt ({e}): {how_to_fix}") from None
    description = read_description(folder / DESCRIPTION_FILE, FORMAT, FORMAT_VERSION, how_to_fix)
    exported = ExportedModel(folder, description, {k: v for k, v in scheduler.items() if not k.startswith("_")})
    if not exported.onnx_file.is_file():
        raise QtoolkitError(f"{folder} has no {exported.onnx_file.name}: {how_to_fix}")
    return exported
