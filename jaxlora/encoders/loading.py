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
from jaxlora.encoders.clip import CLIPTextModel, infer_clip_config
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


# Where a transformers-layout CLIP tower sits in the files ComfyUI loads, first match wins: SD1.x checkpoints,
# SDXL's first encoder, checkpoints ComfyUI saves (`text_encoders.<name>.`), bare clip_l / clip_g files.
CLIP_PREFIXES = (
    "cond_stage_model.transformer.",
    "conditioner.embedders.0.transformer.",
    "text_encoders.clip_l.transformer.",
    "text_encoders.clip_g.transformer.",
    "",
)
CLIP_MARKER = "text_model.embeddings.token_embedding.weight"
CLIP_BUFFERS = ("text_model.embeddings.position_ids", "logit_scale")  # stored by some exports, not weights


def load_clip(path: str | Path, dtype: str | jnp.dtype = "fp32", prefix: str | None = None) -> CLIPTextModel:
    """A CLIP text tower from a checkpoint or text-encoder file (`prefix`: which one, when a file holds several;
    the first of `CLIP_PREFIXES` present otherwise)."""
    index = read_index(path)
    candidates = CLIP_PREFIXES if prefix is None else (prefix,)
    found = next((p for p in candidates if p + CLIP_MARKER in index.shapes), None)
    if found is None:
        raise MissingEncoderError(
            f"{path} has no CLIP text encoder (no {CLIP_MARKER} under {', '.join(repr(p) for p in candidates)}): "
            "pass the text-encoder file ComfyUI keeps in models/text_encoders/ (clip_l.safetensors, clip_g.safetensors)"
        )
    own = {
        key: shape
        for key, shape in index.shapes.items()
        if key.startswith(found)
        and key[len(found) :].split(".")[0] in ("text_model", "text_projection")
        and key[len(found) :] not in CLIP_BUFFERS
    }
    model = CLIPTextModel(infer_clip_config({key[len(found) :]: shape for key, shape in own.items()}))
    check_keys(model, own, found)
    with safe_open(index.path, framework="numpy") as f:
        read_parameters(model, f, found, resolve_dtype(dtype), mesh=None)
    return model
