"""Adapter files: `save_lora` writes the attached adapters in a key style with metadata; `load_lora` reads a
file in any style ComfyUI accepts and attaches it to the model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from jaxlora.adapters.attach import attach_imported
from jaxlora.adapters.formats import export_adapter, import_adapter
from jaxlora.adapters.metadata import AdapterInfo, adapter_info, adapter_metadata
from jaxlora.dtypes import resolve_dtype
from jaxlora.files import write_new_file
from jaxlora.models.diffusion import DiffusionModel


def save_lora(
    model: DiffusionModel,
    path: str | Path,
    style: str = "comfyui",
    lora_dtype: str = "bf16",
    info: AdapterInfo | None = None,
) -> Path:
    """Write the model's adapters to a new .safetensors file (never over an existing one), tensors in
    `lora_dtype`, keys in `style` ("comfyui", "kohya" or "peft"), with metadata."""
    dtype = resolve_dtype(lora_dtype)
    info = info or adapter_info(model, dtype)
    tensors = export_adapter(model, style, dtype)
    return write_new_file(path, save(tensors, metadata=adapter_metadata(info, style)))


@dataclass(frozen=True)
class LoadedLora:
    path: Path
    layers: int
    metadata: dict[str, str]


def read_lora_file(path: str | Path):
    """(tensors as numpy arrays, metadata) of an adapter file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    try:
        with safe_open(path, framework="numpy") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable .safetensors file: {error}") from error


def load_lora(model: DiffusionModel, path: str | Path, lora_dtype: str | jnp.dtype = "bf16") -> LoadedLora:
    """Attach the adapters of a file (any key style ComfyUI loads) to the model's layers; every key must fit."""
    tensors, metadata = read_lora_file(path)
    adapters = import_adapter(model, tensors, resolve_dtype(lora_dtype))
    attach_imported(model.network, adapters)
    return LoadedLora(Path(path), len(adapters), metadata)
