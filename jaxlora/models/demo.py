"""Seeded random checkpoints in the real ldm and BFL layouts: the built-in demo model and the test fixtures.

The file is written from the network's own parameter list in torch layout, exactly as a real checkpoint
stores it, and then goes through the ordinary loader.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from jaxlora.models.checkpoint import torch_parameters
from jaxlora.models.flux import Flux, FluxConfig
from jaxlora.models.unet import UNet, UNetConfig

# A UNet with SD1.x's structure (8 heads, conv projections, 768-d context) at a size that runs in seconds.
TINY_SD1 = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=(2, 2, 2),
    transformer_depth=(1, 1, 1, 1, 0, 0),
    transformer_depth_middle=1,
    transformer_depth_output=(0, 0, 0, 1, 1, 1, 1, 1, 1),
    context_dim=768,
    num_heads=8,
)


# The smallest UNet with every block type (two levels, one ResBlock each): the training demo, and the tests
# that compile a backward pass.
DEMO_UNET = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=(1, 1),
    transformer_depth=(1, 0),
    transformer_depth_middle=1,
    transformer_depth_output=(0, 0, 1, 1),
    context_dim=768,
    num_heads=8,
)


# Flux with every block kind at a size that compiles in seconds. The head width is fixed by the RoPE axes
# (16 + 56 + 56 = 128), so two heads make a 256-wide model; text and pooled widths are the real T5/CLIP-L ones.
TINY_FLUX_DEV = FluxConfig(hidden_size=256, num_heads=2, mlp_hidden=1024, depth=2, depth_single_blocks=2)
TINY_FLUX_SCHNELL = replace(TINY_FLUX_DEV, guidance_embed=False)


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


def build_network(config: UNetConfig | FluxConfig) -> nnx.Module:
    """The (abstract) network a config describes."""
    return Flux(config) if isinstance(config, FluxConfig) else UNet(config)


def random_tensors(config: UNetConfig | FluxConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 tensors in torch layout, keyed as in a bare diffusion model.

    Weights ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2): every layer contributes,
    unlike a real initialisation whose zeroed output convs would hide layout errors.
    """
    rng = np.random.default_rng(seed)
    tensors = {}
    for key, site, name in torch_parameters(build_network(config)):
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
    config: UNetConfig | FluxConfig, path: str | Path, seed: int = 0, prefix: str = "model.diffusion_model."
) -> Path:
    """Write a random UNet or Flux as a .safetensors checkpoint with the given key prefix."""
    tensors = {prefix + key: value for key, value in random_tensors(config, seed).items()}
    save_file(tensors, str(path))
    return Path(path)
