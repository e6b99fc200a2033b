"""Finding an encoder inside the files users have and loading it with the diffusion model's loader.

A VAE comes inside a full ldm checkpoint (`first_stage_model.`) or as a file of its own (ComfyUI's `models/vae/`,
keys without prefix). A CLIP text tower comes inside a checkpoint (the transformers layout under
`cond_stage_model.transformer.` or `conditioner.embedders.0.transformer.`, the OpenCLIP layout under
`cond_stage_model.model.` or `conditioner.embedders.1.model.`) or as a bare `clip_l` / `clip_g` file from
`models/text_encoders/`; T5 as a `t5xxl_*` file (wide, fp8, or ComfyUI's scaled fp8, whose weights are multiplied
by their scales as they are read: `jaxlora.models.scaled_fp8`). Keys and shapes are checked against the network built
from the inferred config before any tensor is read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from jaxlora.dtypes import resolve_dtype
from jaxlora.encoders.clip import CLIPTextModel, infer_clip_config
from jaxlora.encoders.open_clip import OPEN_CLIP_MARKER, TensorView, transformers_shapes
from jaxlora.encoders.t5 import T5Encoder, infer_t5_config
from jaxlora.encoders.vae import AutoencoderKL, infer_vae_config
from jaxlora.models.checkpoint import CheckpointIndex, TensorFile, check_keys, read_index, read_parameters
from jaxlora.models.family import CheckpointError
from jaxlora.models.scaled_fp8 import ScaledFp8Error, find_scales


class MissingEncoderError(CheckpointError):
    pass


@dataclass(frozen=True)
class Slot:
    """One place an encoder can sit in a file: its key prefix, the key that proves it is there, and whether the
    tensors are in the OpenCLIP layout (read through `open_clip.TensorView`)."""

    prefix: str
    marker: str
    open_clip: bool = False


VAE_MARKER = "encoder.conv_in.weight"
VAE_SLOTS = tuple(Slot(prefix, VAE_MARKER) for prefix in ("first_stage_model.", "vae.", ""))
VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")  # a bare VAE file's own keys
DIFFUSERS_VAE_MARKER = "encoder.down_blocks.0.resnets.0.conv1.weight"

CLIP_MARKER = "text_model.embeddings.token_embedding.weight"
CLIP_PARTS = ("text_model.", "text_projection.")
CLIP_BUFFERS = ("text_model.embeddings.position_ids", "logit_scale")  # stored by some exports, not weights
# The CLIP towers of a file by role: "l" CLIP-L, "g" OpenCLIP bigG, "h" OpenCLIP ViT-H (see `TextTower`).
# First match wins: SD-format checkpoints, checkpoints ComfyUI saves (`text_encoders.<name>.`), bare files.
CLIP_SLOTS = {
    "l": (
        Slot("cond_stage_model.transformer.", CLIP_MARKER),
        Slot("conditioner.embedders.0.transformer.", CLIP_MARKER),
        Slot("text_encoders.clip_l.transformer.", CLIP_MARKER),
        Slot("", CLIP_MARKER),
    ),
    "g": (
        Slot("conditioner.embedders.1.model.", OPEN_CLIP_MARKER, open_clip=True),
        Slot("text_encoders.clip_g.transformer.", CLIP_MARKER),
        Slot("", CLIP_MARKER),
    ),
    "h": (Slot("cond_stage_model.model.", OPEN_CLIP_MARKER, open_clip=True),),
}
T5_MARKER = "encoder.block.0.layer.0.SelfAttention.q.weight"
T5_PARTS = ("encoder.", "shared.")
T5_BUFFERS = ("encoder.embed_tokens.weight",)  # a second copy of `shared` in some exports
T5_SLOTS = (Slot("text_encoders.t5xxl.transformer.", T5_MARKER), Slot("", T5_MARKER))
TEXT_ENCODER_FILES = {
    "l": "clip_l.safetensors",
    "g": "clip_g.safetensors",
    "h": "a checkpoint with its ViT-H text encoder",
    "t5": "t5xxl_fp16.safetensors",
}


def find_slot(index: CheckpointIndex, slots: tuple[Slot, ...]) -> Slot | None:
    return next((slot for slot in slots if slot.prefix + slot.marker in index.shapes), None)


def _own_shapes(index: CheckpointIndex, slot: Slot, parts: tuple[str, ...], ignored: tuple[str, ...]) -> dict:
    """The slot's un-prefixed shapes; in a file without prefix only the keys that start with one of `parts`.
    Scaled-fp8 scales and markers are not the encoder's keys."""
    auxiliary = find_scales(index).auxiliary
    own = {
        k[len(slot.prefix) :]: s for k, s in index.shapes.items() if k.startswith(slot.prefix) and k not in auxiliary
    }
    return {k: s for k, s in own.items() if (slot.prefix or k.startswith(parts)) and k not in ignored}


def _load(
    index: CheckpointIndex, slot: Slot, own: Mapping, build: Callable[[Mapping], nnx.Module], dtype
) -> nnx.Module:
    """Build from the (transformers-layout) shapes, check every key, then stream the tensors in, scaled-fp8
    weights multiplied by their scales."""
    scales = {key: scale for key, scale in find_scales(index).scales.items() if key.startswith(slot.prefix)}
    if scales and slot.open_clip:
        raise ScaledFp8Error(f"{index.path}: the OpenCLIP text encoder under {slot.prefix} is scaled fp8; not read")
    shapes = transformers_shapes(own) if slot.open_clip else own
    network = build(shapes)
    check_keys(network, {slot.prefix + key: shape for key, shape in shapes.items()}, slot.prefix)
    with TensorFile(index.path) as f:
        source = TensorView(f, slot.prefix, own) if slot.open_clip else f
        prefix = "" if slot.open_clip else slot.prefix
        read_parameters(network, source, prefix, resolve_dtype(dtype), mesh=None, file_scales=scales)
    return network


def load_vae(path: str | Path, dtype: str | jnp.dtype = "fp32") -> AutoencoderKL:
    """The ldm VAE of a checkpoint or VAE file, its config inferred from shapes, weights stored in `dtype`."""
    index = read_index(path)
    slot = find_slot(index, VAE_SLOTS)
    if slot is None and any(key.endswith(DIFFUSERS_VAE_MARKER) for key in index.shapes):
        raise CheckpointError(
            f"{path} holds a VAE in the diffusers layout (encoder.down_blocks...); pass the single-file VAE "
            "(the .safetensors ComfyUI loads from models/vae/)"
        )
    if slot is None:
        raise MissingEncoderError(
            f"{path} has no VAE (no first_stage_model.{VAE_MARKER} or {VAE_MARKER}): pass the VAE file ComfyUI "
            "keeps in models/vae/ (e.g. ae.safetensors)"
        )
    own = _own_shapes(index, slot, VAE_PARTS, ())
    return _load(index, slot, own, lambda shapes: AutoencoderKL(infer_vae_config(shapes)), dtype)


def load_clip(path: str | Path, role: str = "l", dtype: str | jnp.dtype = "fp32") -> CLIPTextModel:
    """The CLIP text tower of `role` ("l", "g" or "h": see `CLIP_SLOTS`) from a checkpoint or text-encoder file."""
    slot = find_slot(index := read_index(path), CLIP_SLOTS[role])
    if slot is None:
        raise MissingEncoderError(
            f"{path} has no CLIP-{role.upper()} text encoder (looked under "
            f"{', '.join(repr(s.prefix) for s in CLIP_SLOTS[role])}): pass {TEXT_ENCODER_FILES[role]} "
            "(ComfyUI keeps text encoders in models/text_encoders/)"
        )
    own = _own_shapes(index, slot, CLIP_PARTS, CLIP_BUFFERS)
    return _load(index, slot, own, lambda shapes: CLIPTextModel(infer_clip_config(shapes)), dtype)


def load_t5(path: str | Path, dtype: str | jnp.dtype = "fp32") -> T5Encoder:
    """The T5 v1.1 encoder of a `t5xxl_*.safetensors` file (or a checkpoint ComfyUI saved with it)."""
    slot = find_slot(index := read_index(path), T5_SLOTS)
    if slot is None:
        raise MissingEncoderError(
            f"{path} has no T5 encoder (no {T5_MARKER}): pass {TEXT_ENCODER_FILES['t5']} or another "
            "t5xxl_*.safetensors (ComfyUI keeps text encoders in models/text_encoders/)"
        )
    own = _own_shapes(index, slot, T5_PARTS, T5_BUFFERS)
    return _load(index, slot, own, lambda shapes: T5Encoder(infer_t5_config(shapes)), dtype)


ROLE_SLOTS = {**CLIP_SLOTS, "t5": T5_SLOTS}  # where each text-encoder role can sit in a file
