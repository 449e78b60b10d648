"""What each network class qtoolkit reads needs on every call besides the sample and the timestep, and the check
that a model's conditioning fits its network (qtoolkit.models.conditioning makes the tensors)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import QtoolkitError

CONDITIONING_INPUTS = ("encoder_hidden_states", "class_labels")  # what qtoolkit can give a network
# How each conditioning input is written in a recipe, for the error that asks for it.
RECIPE_EXAMPLES = {"encoder_hidden_states": "{source: random, seed: 0}", "class_labels": "0"}
# UNet2DConditionModel options whose extra inputs (added_cond_kwargs: pooled text, time ids, image embeddings)
# are not a fixed tensor qtoolkit can give: only these values are read.
SUPPORTED_ADDITION_EMBED_TYPES = (None, "text")  # "text" embeds encoder_hidden_states itself
SUPPORTED_ENCODER_HID_DIM_TYPES = (None, "text_proj")


def required_conditioning(network: torch.nn.Module) -> tuple[str, ...] | None:
    """The conditioning inputs `network` needs on every call; None for a network class qtoolkit does not know
    (a plain module: it is called with what its model gives). A diffusers network that needs inputs qtoolkit
    cannot give is refused here."""
    from diffusers import DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel  # on use: qtoolkit.models.loading

    if isinstance(network, DiTTransformer2DModel):
        return ("class_labels",)
    if not isinstance(network, (UNet2DModel, UNet2DConditionModel)):
        return None
    needed = ()
    if isinstance(network, UNet2DConditionModel):
        _check_supported_unet(network)
        needed = ("encoder_hidden_states",)
    if network.class_embedding is not None:
        if not isinstance(network.class_embedding, torch.nn.Embedding):
            raise QtoolkitError(f"a {type(network).__name__} with class_embed_type "
                                f"{network.config.class_embed_type!r} takes class_labels that are not class indices: "
                                "qtoolkit conditions on a class index (a num_class_embeds embedding) only")
        needed += ("class_labels",)
    return needed


def _check_supported_unet(network: torch.nn.Module) -> None:
    config = network.config
    for option, supported in (("addition_embed_type", SUPPORTED_ADDITION_EMBED_TYPES),
                              ("encoder_hid_dim_type", SUPPORTED_ENCODER_HID_DIM_TYPES)):
        if config.get(option) not in supported:
            raise QtoolkitError(f"a UNet2DConditionModel with {option} {config.get(option)!r} needs added_cond_kwargs "
                                "(pooled text, time ids or image embeddings), which qtoolkit does not give: it "
                                "drives cross-attention UNets on encoder_hidden_states (and class labels) only")


def check_conditioning(network: torch.nn.Module, given: Iterable[str], source: str) -> None:
    """Refuse, in one line naming the recipe keys, conditioning that does not fit `network`: an input it needs
    and is not given, or one it does not take."""
    needed = required_conditioning(network)
    if needed is None:
        return
    given = list(given)
    what = f"model {source} ({type(network).__name__})"
    missing = [name for name in needed if name not in given]
    if missing:
        keys = " and ".join(f"conditioning.{name}" for name in missing)
        example = ", ".join(f"{name}: {RECIPE_EXAMPLES[name]}" for name in missing)
        raise QtoolkitError(f"{what} is conditional and needs {' and '.join(missing)} on every call: set {keys} "
                            f"in the recipe, e.g. conditioning: {{{example}}}")
    unused = [name for name in given if name not in needed]
    if unused:
        keys = " and ".join(f"conditioning.{name}" for name in unused)
        takes = ", ".join(needed) or "no conditioning"
        raise QtoolkitError(f"{what} takes {takes}, not {' and '.join(unused)}: remove {keys} from the recipe")
