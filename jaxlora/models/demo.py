"""Seeded random checkpoints in each family's real layout: the built-in demo model and the test fixtures.

The file is written from the network's own parameter list in torch layout, exactly as a real checkpoint
stores it, and then goes through the ordinary loader.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from jaxlora.models.checkpoint import torch_parameters
from jaxlora.models.registry import family_of_config


def demo_dataset(count: int = 8, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic raw latents [count, 4, size, size] (smooth patterns at VAE-latent scale) and one caption
    embedding [1, 8, 768] shared by all: a small fixed problem the demo adapter can visibly learn."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(-1.0, 1.0, size)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    phases = rng.uniform(0, 2 * np.pi, (count, 4, 1, 1))
    frequencies = rng.uniform(1.0, 3.0, (count, 4, 1, 1))
    latents = 4.0 * np.sin(frequencies * (xx + yy) * np.pi + phases)
    return latents.astype(np.float32), rng.standard_normal((1, 8, 768)).astype(np.float32)


def random_tensors(config: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 tensors in torch layout, keyed as in a bare diffusion model of any family (its config)."""
    return random_network_tensors(family_of_config(config).build(config), seed)


def random_network_tensors(network: nnx.Module, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 tensors in torch layout for every parameter of `network` (a diffusion model or an encoder), keyed
    by its module paths.

    Weights ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2): every layer contributes,
    unlike a real initialisation whose zeroed output convs would hide layout errors.
    """
    rng = np.random.default_rng(seed)
    tensors = {}
    for key, site, name in torch_parameters(network):
        shape = site.torch_shape(name)
        if name == "bias":
            value = 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / math.sqrt(math.prod(shape[1:]))
        tensors[key] = value.astype(np.float32)
    return tensors


def write_random_checkpoint(
    config: Any, path: str | Path, seed: int = 0, prefix: str = "model.diffusion_model."
) -> Path:
    """Write a random network of any family (its config) as a .safetensors checkpoint with the given key prefix."""
    tensors = {prefix + key: value for key, value in random_tensors(config, seed).items()}
    save_file(tensors, str(path))
    return Path(path)
