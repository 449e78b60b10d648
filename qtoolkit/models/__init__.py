"""Diffusion models: loading float networks (diffusers UNet2D, UNet2DCondition, DiT, or a loader plugin's),
what each network is called with, and the conditioning a recipe gives it.

Layer: networks (loading float networks, their inputs and conditioning). May import quant and the foundation;
it neither saves nor loads quantized graphs and knows no recipe.
"""

from .loading import DiffusionModel, load_diffusion_model, resolve_model_path, save_diffusion_model

__all__ = ["DiffusionModel", "load_diffusion_model", "resolve_model_path", "save_diffusion_model"]
