"""Saving and loading a frozen quantized graph: safetensors for tensors, one JSON file for everything else.

A saved folder (the `unet/` of a run's model/ pipeline folder) holds
- model.safetensors: the quantized graph's state_dict: the float weights (`network.*`), every quantizer's
  scale, zero point and frozen flag (`quantizers.*`) and the conditioning tensors (`conditioning.*`, the
  Denoiser's buffers), loaded with safetensors only;
- quantization.json (QUANTIZED_MARKER): format tag and version, how to rebuild the float network (a diffusers
  network: its class and config; any other: the model loader that made it and what that loader's `build`
  needs), the sample shape, the QuantConfig, the frozen quantization parameters in readable form (for people
  and exporters; the safetensors copy is the one loaded) and the caller's extra_config.

Loading needs neither calibration data nor the original model source: it rebuilds the float network, wraps it
in a Denoiser with the saved conditioning, captures it, re-applies quantize(graph, config) (the same quantizer
nodes under the same names) and loads the state strictly. The fake-quantized forward is a deterministic function
of these tensors, so outputs are bit-identical to the saved graph's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_file
from torch import fx, nn

from .. import plugins
from ..errors import QtoolkitError
from ..io import atomic_dir
from ..models.loading import (MODEL_LOADERS_HOOK, QUANTIZED_MARKER, Denoiser, DiffusionModel, load_safetensors,
                              locate_folders, scheduler_config_of)
from ..quant.config import QuantConfig
from ..quant.quantizer import QuantParams
from .capture import SAMPLE_SHAPE_META, capture
from ..quant.timestep_groups import GroupedFakeQuantize
from .quantize import quant_config_of, quant_ops, quantize, timestep_groups_of
from .timestep_bias import restore_timestep_bias, timestep_bias_layout

WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = QUANTIZED_MARKER
FORMAT = "qtoolkit-quantized-model"
# 1: module-swapped diffusers models (before the graph core); 2: captured graphs, any network.
FORMAT_VERSION = 2
_REQUIRED_KEYS = ("network", "sample_shape", "quant_config", "frozen_params")
# Where the float network's tensors and the conditioning live in the graph's state_dict: the Denoiser's
# children `network` and `conditioning`, whose paths capture keeps.
NETWORK_PREFIX = "network."
CONDITIONING_PREFIX = "conditioning."


def _params_to_json(params: QuantParams) -> dict:
    return {"bits": params.bits, "symmetric": params.symmetric, "axis": params.axis, "qmin": params.qmin,
            "qmax": params.qmax, "scale": params.scale.tolist(), "zero_point": params.zero_point.tolist()}


def _quantizer_to_json(quantizer: nn.Module) -> dict:
    if isinstance(quantizer, GroupedFakeQuantize):  # one per timestep group: scale and zero_point are lists
        groups = [_params_to_json(quantizer.group_params(g)) for g in range(quantizer.groups)]
        return {**groups[0], "per": "timestep_group", "scale": [g["scale"] for g in groups],
                "zero_point": [g["zero_point"] for g in groups]}
    return _params_to_json(quantizer.params)


def frozen_params(qgraph: fx.GraphModule) -> dict[str, dict]:
    """{quantizer module name: {path, kind, quantizers: {role: its parameters as JSON}}} for every quantized op of
    a frozen graph (roles: input, weight, output, bias; query, key, probs, value for attention). A timestep-grouped
    quantizer has a list of scales and zero points, one per group, and "per": "timestep_group"; the boundaries are
    under "timestep_boundaries" of the saved metadata."""
    return {name: {"path": op.path, "kind": op.kind,
                   "quantizers": {role: _quantizer_to_json(q) for role, q in op.quantizers().items()}}
            for name, op in quant_ops(qgraph).items()}


def describe_network(network: nn.Module) -> dict:
    """How load_quantized rebuilds `network`'s architecture: a diffusers network by its class and config, any
    other by the installed model loader whose `describe` recognises it. A network neither can rebuild is
    refused here; call it before a long job that ends in save_quantized."""
    import diffusers  # on use: qtoolkit.models.loading says why

    name = type(network).__name__
    if isinstance(network, diffusers.ConfigMixin) and getattr(diffusers, name, None) is type(network):
        return {"class": name, "model_loader": None, "config": json.loads(network.to_json_string())}
    loaders = plugins.registry().records[MODEL_LOADERS_HOOK].values()
    described = [(loader.name, config) for loader in loaders if loader.describe is not None
                 and (config := loader.describe(network)) is not None]
    if not described:
        raise QtoolkitError(f"a quantized {name} cannot be saved: it is not a diffusers model, and no installed model "
                            "loader describes it (a ModelLoader's describe and build, see docs/plugins.md), so it "
                            "could not be rebuilt from the saved folder")
    if len(described) > 1:
        raise QtoolkitError(f"a {name} is described by the model loaders {' and '.join(n for n, _ in described)}: "
                            "choose the plugins to load with QTOOLKIT_LOAD_PLUGINS")
    loader, config = described[0]
    return {"class": name, "model_loader": loader, "config": config}


def quantized_metadata(qgraph: fx.GraphModule, model: DiffusionModel, extra_config: dict | None = None) -> dict:
    """What quantization.json says about the frozen quantized graph `qgraph`, made from the FP `model`."""
    config = quant_config_of(qgraph)
    not_frozen = [name for name, op in quant_ops(qgraph).items() if not op.is_frozen]
    if not_frozen:
        raise QtoolkitError(f"{len(not_frozen)} quantized op(s) are not frozen (e.g. {not_frozen[0]!r}): calibrate "
                            "the graph and call freeze(qgraph) before saving")
    sample_shape = tuple(model.sample_shape)
    captured_shape = qgraph.meta.get(SAMPLE_SHAPE_META)
    if captured_shape is not None and tuple(captured_shape) != sample_shape:
        raise QtoolkitError(f"the graph was captured for samples of shape {tuple(captured_shape)}, the model's are "
                            f"{sample_shape}: pass the model the graph was made from")
    _check_made_from(qgraph.state_dict(), model.unet)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "network": describe_network(model.unet),
        "sample_shape": list(sample_shape),
        "quant_config": config.to_dict(),
        "frozen_params": frozen_params(qgraph),
        "extra_config": extra_config,
    }
    groups = timestep_groups_of(qgraph)
    if groups is not None:
        metadata["timestep_boundaries"] = groups.boundaries.tolist()
        metadata["timestep_bias"] = timestep_bias_layout(qgraph)
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as e:
        raise QtoolkitError(f"extra_config or the model loader's description cannot be written as JSON ({e}): pass "
                            "only plain numbers, strings, lists and dicts") from None
    return metadata


def save_quantized(qgraph: fx.GraphModule, folder: str | os.PathLike, model: DiffusionModel,
                   extra_config: dict | None = None, overwrite: bool = False) -> None:
    """Write the frozen quantized graph `qgraph`, made from the FP `model`, to `folder` atomically (nothing is left
    half-written on failure; an existing folder is replaced only with overwrite=True)."""
    text = json.dumps(quantized_metadata(qgraph, model, extra_config), indent=2) + "\n"
    state = {key: tensor.detach().cpu().contiguous() for key, tensor in qgraph.state_dict().items()}
    with atomic_dir(Path(folder), overwrite) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE))
        (tmp / METADATA_FILE).write_text(text)


def _check_made_from(state: dict, network: nn.Module) -> None:
    """The graph's float tensors are those of `network` (same names and shapes), or the saved description would
    rebuild a network its weights do not fit."""
    graph_shapes = {key[len(NETWORK_PREFIX):]: tuple(t.shape) for key, t in state.items()
                    if key.startswith(NETWORK_PREFIX)}
    network_shapes = {key: tuple(t.shape) for key, t in network.state_dict().items()}
    if graph_shapes != network_shapes:
        differing = sorted(set(graph_shapes.items()) ^ set(network_shapes.items()))
        raise QtoolkitError(f"the quantized graph was not made from this model's {type(network).__name__} (tensor "
                            f"{differing[0][0]!r} differs): pass the model the graph was captured from")


def read_quantized_metadata(folder: str | os.PathLike) -> dict:
    """The checked contents of a saved folder's quantization.json (e.g. to read back its extra_config)."""
    folder = Path(folder)
    for file in (METADATA_FILE, WEIGHTS_FILE):
        if not (folder / file).is_file():
            raise QtoolkitError(f"{folder} has no {file}: it is not a complete quantized-model folder "
                                "(re-save the model with qtoolkit.graph.save_quantized)")
    try:
        metadata = json.loads((folder / METADATA_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QtoolkitError(f"{folder / METADATA_FILE} is corrupt ({e}): re-save the model") from None
    return check_quantized_metadata(metadata, folder / METADATA_FILE)


def check_quantized_metadata(metadata, where: Path) -> dict:
    """`metadata` (a quantization.json's contents, read from `where`) if it is complete and of this version."""
    folder = where.parent
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise QtoolkitError(f"{where} is not a qtoolkit quantized-model description (format {FORMAT!r})")
    version = metadata.get("format_version")
    if isinstance(version, int) and version < FORMAT_VERSION:
        raise QtoolkitError(f"{folder} was saved by an older qtoolkit (format version {version}; this one reads "
                            f"{FORMAT_VERSION}): re-run the job that made it")
    if version != FORMAT_VERSION:
        raise QtoolkitError(f"{folder} was saved in format version {version!r}; this qtoolkit reads version "
                            f"{FORMAT_VERSION}: load it with the qtoolkit that saved it")
    missing = [key for key in _REQUIRED_KEYS if key not in metadata]
    network = metadata.get("network")
    if not missing and not (isinstance(network, dict) and {"class", "model_loader", "config"} <= set(network)):
        missing = ["network.class/model_loader/config"]
    if missing:
        raise QtoolkitError(f"{where} lacks {', '.join(missing)}: re-save the model")
    return metadata


def build_network(description: dict, folder: Path) -> nn.Module:
    """The float network (untrained weights) of a saved description (describe_network's dict)."""
    name, loader_name, config = description["class"], description["model_loader"], description["config"]
    if loader_name is None:
        import diffusers  # on use: qtoolkit.models.loading says why

        network_class = getattr(diffusers, str(name), None)
        if not (isinstance(network_class, type) and issubclass(network_class, diffusers.ModelMixin)):
            raise QtoolkitError(f"{folder} holds a {name!r}, which is not a model class of diffusers "
                                f"{diffusers.__version__}: cannot rebuild the network")
        build, origin = network_class.from_config, f"diffusers {diffusers.__version__}"
    else:
        loader = plugins.registry().records[MODEL_LOADERS_HOOK].get(loader_name)
        if loader is None or loader.build is None:
            raise QtoolkitError(f"{folder} holds a {name} of the model loader {loader_name!r}, which is not installed "
                                "(or cannot build networks): install the plugin that provides it (`qtoolkit plugins` "
                                "lists the installed ones)")
        build, origin = loader.build, f"model loader {loader_name!r}"
    try:
        network = build(config)
    except Exception as e:  # a config the builder refuses: any type, one line
        raise QtoolkitError(f"{folder}: {origin} cannot rebuild the saved {name} from its config "
                            f"({type(e).__name__}: {e}): re-save the model") from None
    if not isinstance(network, nn.Module):
        raise QtoolkitError(f"{origin} built a {type(network).__name__} for the saved {name}, not a torch module")
    return network.eval()


def load_quantized(folder: str | os.PathLike) -> fx.GraphModule:
    """The frozen quantized graph saved in `folder`, called `(sample, timestep) -> noise` (eval mode)."""
    folder = Path(folder)
    return rebuild_quantized(read_quantized_metadata(folder), load_safetensors(folder / WEIGHTS_FILE),
                             folder / WEIGHTS_FILE)


def load_quantized_model(source: str | os.PathLike) -> DiffusionModel:
    """A model quantized by qtoolkit, from its folder (a run folder, its model/ pipeline folder, or the network
    folder save_quantized wrote): the frozen quantized graph as its network. The graph is called (sample, timestep)
    and holds its conditioning itself, so the model has none of its own; its sample shape is the one it was
    captured at."""
    root, network_dir = locate_folders(Path(source).expanduser())
    qgraph = load_quantized(network_dir)
    return DiffusionModel(unet=qgraph, scheduler_config=scheduler_config_of(root), path=root,
                          shape=tuple(qgraph.meta[SAMPLE_SHAPE_META]))


def rebuild_quantized(metadata: dict, state: dict, weights: Path) -> fx.GraphModule:
    """The frozen quantized graph that `metadata` (read_quantized_metadata's dict) describes, holding `state`
    (its state_dict, read from the file `weights`)."""
    folder = weights.parent
    network = build_network(metadata["network"], folder)
    conditioning = {key[len(CONDITIONING_PREFIX):]: tensor for key, tensor in state.items()
                    if key.startswith(CONDITIONING_PREFIX)}
    try:
        # The same network code as when the model was first captured and checked at every batch size.
        graph = capture(Denoiser(network, conditioning), tuple(metadata["sample_shape"]), check_batches=False)
        qgraph = quantize(graph, QuantConfig.from_dict(metadata["quant_config"]))
        restore_timestep_bias(qgraph, metadata.get("timestep_bias", {}))
    except QtoolkitError as e:
        raise QtoolkitError(f"{folder}: rebuilding the saved quantized graph failed: {e}") from None
    _load_state(qgraph, state, weights)
    not_frozen = [name for name, op in quant_ops(qgraph).items() if not op.is_frozen]
    if not_frozen:
        raise QtoolkitError(f"{weights} holds {len(not_frozen)} quantized op(s) that are not frozen "
                            f"(e.g. {not_frozen[0]!r}): the file is damaged; re-save the model")
    return qgraph.eval()


def _load_state(qgraph: fx.GraphModule, state: dict, weights: Path) -> None:
    """Load `state` into the rebuilt graph strictly; tensors missing, unknown or of another shape or dtype are one
    line (load_state_dict would cast dtypes without a word and list every key)."""
    expected = qgraph.state_dict()
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    reshaped = sorted(key for key in set(expected) & set(state)
                      if (state[key].shape, state[key].dtype) != (expected[key].shape, expected[key].dtype))
    if missing or unknown or reshaped:
        example = (missing or unknown or reshaped)[0]
        raise QtoolkitError(f"{weights} does not fit the quantized graph its {METADATA_FILE} describes: "
                            f"{len(missing)} tensor(s) missing, {len(unknown)} unknown, {len(reshaped)} of another "
                            f"shape or dtype (e.g. {example!r}): the two files do not belong together; "
                            "re-save the model")
    qgraph.load_state_dict(state, strict=True)
