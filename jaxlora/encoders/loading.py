"""Finding an encoder inside the files users have and loading it with the diffusion model's loader.

A VAE comes inside a full checkpoint (`first_stage_model.` in SD1.x/SD2.x/SDXL files) or as a file of its own
(ComfyUI's `models/vae/`: `ae.safetensors` for Flux, `sdxl_vae.safetensors`, keys without prefix). Keys and shapes
are checked against the network built from the inferred config before any tensor is read.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from safetensors import safe_open

from jaxlora.dtypes import resolve_dtype
from jaxlora.encoders.vae import AutoencoderKL, infer_vae_config
from jaxlora.models.checkpoint import check_keys, read_index, read_parameters
from jaxlora.models.family import CheckpointError

VAE_PREFIXES = ("first_stage_model.", "vae.", "")
VAE_MARKER = "encoder.conv_in.weight"
DIFFUSERS_VAE_MARKER = "encoder.down_blocks.0.resnets.0.conv1.weight"
VAE_PARTS = ("encoder", "decoder", "quant_conv", "post_quant_conv")  # top-level names of a bare VAE file


class MissingEncoderError(CheckpointError):
    pass


def vae_prefix(path: Path, keys: set[str]) -> str:
    """The key prefix of the ldm VAE in a file; an error saying what to pass instead when there is none."""
    for prefix in VAE_PREFIXES:
        if prefix + VAE_MARKER in keys:
            return prefix
    if any(key.endswith(DIFFUSERS_VAE_MARKER) for key in keys):
        raise CheckpointError(
            f"{path} holds a VAE in the diffusers layout (encoder.down_blocks...); pass the single-file VAE "
            "(the .safetensors ComfyUI loads from models/vae/)"
        )
    raise MissingEncoderError(
        f"{path} has no VAE (no {VAE_PREFIXES[0]}{VAE_MARKER} or {VAE_MARKER}): pass the VAE file ComfyUI keeps "
        "in models/vae/ (ae.safetensors for Flux.1, or the VAE of your SD checkpoint)"
    )


def load_vae(path: str | Path, dtype: str | jnp.dtype = "fp32") -> AutoencoderKL:
    """The ldm VAE of a checkpoint or VAE file, its config inferred from shapes, weights stored in `dtype`."""
    index = read_index(path)
    prefix = vae_prefix(index.path, set(index.shapes))
    own = {key[len(prefix) :]: shape for key, shape in index.shapes.items() if key.startswith(prefix)}
    if prefix == "":  # a bare VAE file: other top-level keys (a diffusion model, text encoders) are not its own
        own = {key: shape for key, shape in own.items() if key.split(".")[0] in VAE_PARTS}
    vae = AutoencoderKL(infer_vae_config(own))
    check_keys(vae, {prefix + key: shape for key, shape in own.items()}, prefix)
    with safe_open(index.path, framework="numpy") as f:
        read_parameters(vae, f, prefix, resolve_dtype(dtype), mesh=None)
    return vae
