"""jaxlora: train LoRA-style adapters on diffusion models with JAX/Flax; outputs load in ComfyUI.

The public API is imported on first use, so `python -m jaxlora.train` can check its arguments before JAX loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jaxlora.adapters.attach import attach_adapters
    from jaxlora.adapters.lora_files import load_lora, save_lora
    from jaxlora.encoders.make_dataset import make_image_dataset
    from jaxlora.models.diffusion import DiffusionModel, load_model
    from jaxlora.train.data import load_dataset, save_dataset
    from jaxlora.train.loop import train_lora

_MODULES = {
    "DiffusionModel": "jaxlora.models.diffusion",
    "attach_adapters": "jaxlora.adapters.attach",
    "load_dataset": "jaxlora.train.data",
    "load_lora": "jaxlora.adapters.lora_files",
    "load_model": "jaxlora.models.diffusion",
    "make_image_dataset": "jaxlora.encoders.make_dataset",
    "save_dataset": "jaxlora.train.data",
    "save_lora": "jaxlora.adapters.lora_files",
    "train_lora": "jaxlora.train.loop",
}
__all__ = [
    "DiffusionModel",
    "attach_adapters",
    "load_dataset",
    "load_lora",
    "load_model",
    "make_image_dataset",
    "save_dataset",
    "save_lora",
    "train_lora",
]


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module 'jaxlora' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULES[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULES])
