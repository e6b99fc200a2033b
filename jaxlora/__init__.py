"""jaxlora: train LoRA-style adapters on diffusion models with JAX/Flax; outputs load in ComfyUI."""

from jaxlora.models.diffusion import DiffusionModel, load_model

__all__ = ["DiffusionModel", "load_model"]
