"""The full-size models the chip benchmarks train (`tpu_aot.py` compiles their step for TPUs from abstract inputs,
`chip_step.py` runs it on the accelerator at hand), and the batch of latents and captions each step takes."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from jaxlora.models.diffusion import DiffusionModel
from jaxlora.models.flux import FLUX_DEV
from jaxlora.models.unet import SD15, SDXL
from jaxlora.models.unet_family import DEMO_UNET
from jaxlora.train.data import Dataset, make_bucket

# name -> (network config, caption tokens); "tiny-flux" is a two-block Flux for a quick check of the whole path
MODELS: dict[str, tuple[Any, int]] = {
    "demo": (DEMO_UNET, 77),
    "sd15": (SD15, 77),
    "sdxl": (SDXL, 77),
    "flux-dev": (FLUX_DEV, 512),
    "tiny-flux": (
        replace(FLUX_DEV, hidden_size=256, num_heads=2, mlp_hidden=512, depth=1, depth_single_blocks=1),
        64,
    ),
}


def training_batch(model: DiffusionModel, name: str, pixels: int, batch: int) -> Dataset:
    """One bucket of `batch` square latents of `pixels` and captions of the model's training length (zeros: what
    the step costs does not depend on the values)."""
    network_config, tokens = MODELS[name]
    conditioning = {
        field.name: np.zeros((1, tokens, field.width) if field.name == "c_crossattn" else (1, field.width), np.float32)
        for field in model.conditioning_fields
    }
    latent = pixels // 8
    latents = np.zeros((batch, network_config.in_channels, latent, latent), np.float32)
    return Dataset((make_bucket(latents, conditioning),))
