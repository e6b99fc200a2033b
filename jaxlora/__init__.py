"""jaxlora: train LoRA-style adapters on diffusion models with JAX/Flax; outputs load in ComfyUI."""

from jaxlora.adapters.attach import attach_adapters
from jaxlora.adapters.lora_files import load_lora, save_lora
from jaxlora.models.diffusion import DiffusionModel, load_model
from jaxlora.train.data import load_dataset, save_dataset
from jaxlora.train.loop import train_lora

__all__ = [
    "DiffusionModel",
    "attach_adapters",
    "load_dataset",
    "load_lora",
    "load_model",
    "save_dataset",
    "save_lora",
    "train_lora",
]
