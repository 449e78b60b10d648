"""The built-in model loaders: bundled models by name, local diffusers folders, Hugging Face hub ids.

The readers are qtoolkit's model plumbing (`qtoolkit.models.loading`); this plugin only says which
sources each one claims. A third-party loader (another format, another hub) registers beside them.
"""

from __future__ import annotations

from qtoolkit import hookimpl
from qtoolkit.models.loading import (BUNDLED_DIFFUSION_MODELS, is_bundled_model, is_float_folder, load_bundled,
                                     load_folder, load_from_hub, looks_like_hub_id)
from qtoolkit.registry import ModelLoader


@hookimpl
def register_model_loaders(register):
    register(ModelLoader(name="bundled", claims=is_bundled_model, load=load_bundled,
                         description=f"a bundled model name ({', '.join(BUNDLED_DIFFUSION_MODELS)})"))
    register(ModelLoader(name="diffusers-folder", claims=is_float_folder, load=load_folder,
                         description="a local folder of a float model (diffusers pipeline, unet/ + scheduler/, "
                                     "bare network folder)"))
    register(ModelLoader(name="diffusers-hub", claims=looks_like_hub_id, load=load_from_hub,
                         description="a Hugging Face hub id owner/name (safetensors weights only)"))
