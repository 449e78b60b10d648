from .loading import DiffusionModel, load_diffusion_model, resolve_model_path, save_diffusion_model

__all__ = ["DiffusionModel", "load_diffusion_model", "resolve_model_path", "save_diffusion_model"]
