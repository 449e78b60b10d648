"""The deployment folder (`qtoolkit export --format torch`): a frozen quantized model in int8, for PyTorch on a CPU.

    deploy.json                       format, the quantized model's description (how to rebuild the network
                                      and its quantized graph: qtoolkit.graph.serialization), which weights are
                                      stored as int8 codes, and the SHA-256 of every file
    model.safetensors                 the quantized graph's tensors: each int8-lowerable layer's weight as its
                                      int8 codes (its per-channel scales beside them), every other tensor as saved
    scheduler/scheduler_config.json   the training noise schedule, so sampling needs nothing else

Loading (qtoolkit.deploy.load) needs no calibration data, no training code and no network access: it checks the
hashes, rebuilds the network's architecture from its description and captures it, puts the codes back as the
weights the simulation holds (codes x scale, which re-quantize to the same codes: checked), and lowers the graph
to the chosen backend's int8 kernels. The codes are backend-neutral: fbgemm and qnnpack pack weights differently,
so packing happens at load, on the machine that runs the model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import fx

from .. import __version__
from ..errors import QtoolkitError
from ..export.int8_layers import int8_layers
from ..graph import quant_config_of, quant_ops
from ..graph.serialization import check_quantized_metadata, read_quantized_metadata, rebuild_quantized
from ..io import atomic_dir, read_description
from ..models.loading import load_diffusion_model, load_safetensors, locate_folders
from ..quant import QuantConfig
from ..quant.overflow import int8_arithmetic

DESCRIPTION_FILE = "deploy.json"
WEIGHTS_FILE = "model.safetensors"
SCHEDULER_FILE = "scheduler/scheduler_config.json"
FORMAT = "qtoolkit-torch-deployment"
FORMAT_VERSION = 1


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_deployment_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / DESCRIPTION_FILE).is_file()


def export_deployment(model_folder: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> dict:
    """Write the deployment folder of the quantized model in `model_folder` (a `qtoolkit run`/`quantize` run
    folder or its model/ folder) to `out`, atomically; return its description."""
    model = load_diffusion_model(model_folder)
    if not (isinstance(model.unet, fx.GraphModule) and quant_ops(model.unet)):
        raise QtoolkitError(f"{model_folder} holds a full-precision model: the torch deployment format is for models "
                            "quantized by qtoolkit (`qtoolkit run RECIPE` or `qtoolkit quantize` make one)")
    metadata = read_quantized_metadata(locate_folders(Path(model_folder))[1])
    return save_deployment(model.unet, metadata, model.scheduler_config, out, str(model.path), overwrite)


def save_deployment(qgraph: fx.GraphModule, metadata: dict, scheduler_config: dict, out: str | os.PathLike,
                    source: str, overwrite: bool = False) -> dict:
    """Write the frozen quantized graph `qgraph`, which quantization.json's `metadata` describes, as a deployment
    folder at `out`, atomically; return its description."""
    layers = int8_layers(qgraph)
    if not layers:
        raise QtoolkitError(f"{source} has no layer an int8 kernel can run (they need 8-bit asymmetric "
                            "activations and symmetric weights: the default QuantConfig)")
    ops = quant_ops(qgraph)
    config = quant_config_of(qgraph)
    state = {key: tensor.detach().contiguous() for key, tensor in qgraph.state_dict().items()}
    int8_weights = {}
    for name, layer in layers.items():
        state[ops[name].weight_target] = layer.weight_codes.contiguous()
        int8_weights[ops[name].weight_target] = f"{name}.weight.scale"
    from diffusers import DDPMScheduler  # on use: qtoolkit.models.loading says why

    with atomic_dir(Path(out), overwrite) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE))
        DDPMScheduler.from_config(scheduler_config).save_pretrained(tmp / Path(SCHEDULER_FILE).parent)
        description = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "sample_shape": list(metadata["sample_shape"]),
            "int8_layers": len(layers),
            "int8_weights": int8_weights,  # weight -> its per-channel scale
            "int8_arithmetic": int8_arithmetic(config),
            "quantized_model": metadata,
            "files": {name: _sha256(tmp / name) for name in (WEIGHTS_FILE, SCHEDULER_FILE)},
            "source_model": source,
            "versions": {"qtoolkit": __version__, "torch": torch.__version__.split("+")[0]},
        }
        (tmp / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2) + "\n")
    return description


def _how_to_fix(folder: Path) -> str:
    return f"re-export it with `qtoolkit export --model RUN_FOLDER --format torch --out {folder}`"


def deployment_quant_config(folder: str | os.PathLike) -> QuantConfig:
    """The quantization a deployment folder's model was made with, from deploy.json alone (what `auto` needs to
    choose a backend; loading checks the files' hashes)."""
    folder = Path(folder)
    description = read_description(folder / DESCRIPTION_FILE, FORMAT, FORMAT_VERSION, _how_to_fix(folder))
    return QuantConfig.from_dict(description["quantized_model"]["quant_config"])


def read_deployment(folder: str | os.PathLike) -> dict:
    """The checked description of a deployment folder: format, version, and every file's hash."""
    folder = Path(folder)
    how_to_fix = _how_to_fix(folder)
    if not is_deployment_folder(folder):
        raise QtoolkitError(f"{folder} is not a torch deployment folder (no {DESCRIPTION_FILE}): {how_to_fix}")
    description = read_description(folder / DESCRIPTION_FILE, FORMAT, FORMAT_VERSION, how_to_fix)
    files = description.get("files")
    if not isinstance(files, dict) or set(files) != {WEIGHTS_FILE, SCHEDULER_FILE}:
        raise QtoolkitError(f"{folder / DESCRIPTION_FILE} records no hashes for {WEIGHTS_FILE} and "
                            f"{SCHEDULER_FILE}: {how_to_fix}")
    for name, expected in files.items():
        if not (folder / name).is_file():
            raise QtoolkitError(f"{folder} has no {name}: {how_to_fix}")
        if _sha256(folder / name) != expected:
            raise QtoolkitError(f"{folder / name} does not match the SHA-256 that {DESCRIPTION_FILE} records: the "
                                f"file was changed or damaged after export; {how_to_fix}")
    return description


def rebuild_frozen_graph(folder: str | os.PathLike) -> tuple[fx.GraphModule, dict, dict]:
    """(the frozen quantized graph, the description, the scheduler config) of a deployment folder."""
    folder = Path(folder)
    description = read_deployment(folder)
    weights = folder / WEIGHTS_FILE
    state = load_safetensors(weights)
    codes = {}
    for key, scale_key in description["int8_weights"].items():
        if key not in state or scale_key not in state or state[key].dtype != torch.int8:
            raise QtoolkitError(f"{weights} lacks the int8 codes {key!r} or their scales, which {DESCRIPTION_FILE} "
                                "records: the files do not belong together; re-export the model")
        codes[key] = state[key]
        scale = state[scale_key].float()
        # The simulation's own weight: codes x scale, which QuantParams.quantize maps back to the same codes.
        state[key] = codes[key].float() * scale.reshape(-1, *[1] * (codes[key].ndim - 1))
    metadata = check_quantized_metadata(description.get("quantized_model"), folder / DESCRIPTION_FILE)
    qgraph = rebuild_quantized(metadata, state, weights)
    ops = quant_ops(qgraph)
    recomputed = {ops[name].weight_target: layer.weight_codes for name, layer in int8_layers(qgraph).items()}
    if recomputed.keys() != codes.keys() or any(not torch.equal(recomputed[k], codes[k]) for k in codes):
        raise QtoolkitError(f"{weights}: the rebuilt graph's int8 layers do not reproduce the stored codes: the "
                            "files do not belong together; re-export the model")
    scheduler = {k: v for k, v in json.loads((folder / SCHEDULER_FILE).read_text()).items() if not k.startswith("_")}
    return qgraph, description, scheduler

