"""What a conditional network needs on every call, and how a recipe's `conditioning` section becomes it.

qtoolkit samples, calibrates and reports as an unconditional sampler does: every call of a conditional
network gets the same conditioning, tensors of batch 1 that `Denoiser` broadcasts to the batch
(`DiffusionModel.conditioning`). What each network class qtoolkit reads needs:

- UNet2DConditionModel: encoder_hidden_states (1, L, D), D its cross_attention_dim (encoder_hid_dim when it
  projects the sequence itself); class_labels as well when it has a class embedding (num_class_embeds);
- DiTTransformer2DModel: class_labels (1,), a class index below num_embeds_ada_norm;
- UNet2DModel: class_labels when it has a class embedding, nothing otherwise.

A recipe's encoder_hidden_states is `random` (standard normal from torch.Generator seeded with `seed`; L =
`sequence_length`, 77 unless set: CLIP's context length, what Stable Diffusion's UNets attend to), `zeros`
(same shape), or `file` (a (1, L, D) or (L, D) float tensor of a safetensors file). class_labels is an index.
Everything is checked against the network before any work: a needed key missing, a key the network does not
take, a class out of range, a file tensor of the wrong width are each one line naming the recipe key.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

import torch

from ..errors import QtoolkitError
from .loading import DiffusionModel, load_safetensors, model_reference
from .network_inputs import CONDITIONING_INPUTS, check_conditioning


class EncoderHiddenStates(Protocol):
    """What the recipe's conditioning.encoder_hidden_states section holds (qtoolkit.recipe, a layer above, validates
    it: this module reads it and knows no recipe)."""

    source: str  # random, zeros or file
    seed: int | None
    sequence_length: int | None
    path: str | None
    key: str | None


class Conditioning(Protocol):
    """What the recipe's conditioning section holds: one attribute per input of CONDITIONING_INPUTS, None when
    not given."""

    encoder_hidden_states: EncoderHiddenStates | None
    class_labels: int | None


def apply_conditioning(model: DiffusionModel, section: Conditioning) -> DiffusionModel:
    """`model` with the conditioning the recipe section describes (checked against its network), as its
    `conditioning` tensors of batch 1."""
    return dataclasses.replace(model, conditioning=conditioning_tensors(section, model.unet,
                                                                        model_reference(model.path)))


def conditioning_tensors(section: Conditioning, network: torch.nn.Module, source: str) -> dict[str, torch.Tensor]:
    """The batch-1 tensors of the recipe section for `network` (`source` names the model in errors)."""
    given = [name for name in CONDITIONING_INPUTS if getattr(section, name) is not None]
    check_conditioning(network, given, source)
    tensors = {}
    if section.encoder_hidden_states is not None:
        tensors["encoder_hidden_states"] = encoder_hidden_states(section.encoder_hidden_states, network)
    if section.class_labels is not None:
        tensors["class_labels"] = class_label(section.class_labels, network)
    return tensors


def encoder_hidden_states(spec: EncoderHiddenStates, network: torch.nn.Module) -> torch.Tensor:
    """The (1, L, width) float32 sequence `spec` describes, for `network`'s cross-attention width."""
    width = hidden_states_width(network)
    if spec.source == "file":
        return _hidden_states_from_file(spec, width)
    shape = (1, spec.sequence_length, width)
    if spec.source == "zeros":
        return torch.zeros(shape)
    return torch.randn(shape, generator=torch.Generator().manual_seed(spec.seed))


def hidden_states_width(network: torch.nn.Module) -> int:
    """The width of the token embeddings `network` attends to, from its diffusers config."""
    config = getattr(network, "config", None)
    width = getattr(config, "encoder_hid_dim", None) or getattr(config, "cross_attention_dim", None)
    if isinstance(width, (list, tuple)) and len(set(width)) == 1:  # one width per block, all the same
        width = width[0]
    if not isinstance(width, int):
        raise QtoolkitError(f"conditioning.encoder_hidden_states: the width of the sequence a {type(network).__name__} "
                            f"attends to is not one number in its config (cross_attention_dim {width!r}): qtoolkit "
                            "gives one sequence to every block")
    return width


def _hidden_states_from_file(spec: EncoderHiddenStates, width: int) -> torch.Tensor:
    key_path = "conditioning.encoder_hidden_states"
    path = Path(spec.path).expanduser()
    if not path.is_file():
        raise QtoolkitError(f"{key_path}.path: {path} is not a file: give a .safetensors file holding the "
                            f"(1, L, {width}) sequence")
    tensors = load_safetensors(path)
    key = spec.key
    if key is None:
        if len(tensors) != 1:
            raise QtoolkitError(f"{key_path}: {path} holds {len(tensors)} tensors ({', '.join(sorted(tensors))}): "
                                f"name one with {key_path}.key")
        key = next(iter(tensors))
    elif key not in tensors:
        raise QtoolkitError(f"{key_path}.key: {path} holds no tensor {key!r}; it holds: {', '.join(sorted(tensors))}")
    tensor = tensors[key]
    sequence = tensor[None] if tensor.dim() == 2 else tensor
    if sequence.dim() != 3 or sequence.shape[0] != 1 or sequence.shape[-1] != width or not tensor.is_floating_point():
        raise QtoolkitError(f"{key_path}: tensor {key!r} of {path} is {tensor.dtype} {tuple(tensor.shape)}: the network "
                            f"attends to one sequence of {width}-wide float embeddings, (1, L, {width}) or (L, {width})")
    return sequence.float()


def class_label(index: int, network: torch.nn.Module) -> torch.Tensor:
    """The class index as a (1,) int64 tensor, checked against the network's number of classes."""
    counted = class_count(network)
    if counted is not None and index >= counted[0]:
        count, where = counted
        raise QtoolkitError(f"conditioning.class_labels = {index} is not a class of this {type(network).__name__}: "
                            f"use 0 to {count - 1} ({where} = {count})")
    return torch.tensor([index], dtype=torch.long)


def class_count(network: torch.nn.Module) -> tuple[int, str] | None:
    """(number of classes, the config key that says it), or None when the network does not say."""
    from diffusers import DiTTransformer2DModel  # on use: qtoolkit.models.loading says why

    if isinstance(network, DiTTransformer2DModel):
        return network.config.num_embeds_ada_norm, "num_embeds_ada_norm"
    embedding = getattr(network, "class_embedding", None)
    if isinstance(embedding, torch.nn.Embedding):
        return embedding.num_embeddings, "num_class_embeds"
    return None
