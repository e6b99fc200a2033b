"""A loaded diffusion model: the network with its family, parameterisation and latent format."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora.models.checkpoint import (
    PREDICTIONS,
    guess_v_prediction,
    load_unet,
    read_index,
    resolve_dtype,
)
from jaxlora.models.families import UNetFamily
from jaxlora.models.sampling import LatentFormat, ModelSampling, scaled_linear_schedule
from jaxlora.models.unet import UNet, UNetConfig
from jaxlora.parallel.mesh import make_mesh


@dataclass
class DiffusionModel:
    """What training needs to know about a checkpoint. `network` takes NHWC latents."""

    network: UNet
    family: UNetFamily
    sampling: ModelSampling
    source: Path | None = None

    @property
    def config(self) -> UNetConfig:
        return self.network.config

    @property
    def latent_format(self) -> LatentFormat:
        return self.family.latent_format

    @property
    def dtype(self) -> jnp.dtype:
        return self.network.input_blocks[0][0].weight.dtype

    @property
    def param_count(self) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(self.network, nnx.Param)))


def load_model(
    path: str | Path,
    dtype: str | jnp.dtype = "bf16",
    prediction: str = "auto",
    weights: bool = True,
    mesh: jax.sharding.Mesh | str | None = None,
) -> DiffusionModel:
    """Load a UNet checkpoint (.safetensors, as ComfyUI loads it) with its config inferred from the weights.

    `dtype` is the storage dtype of the frozen weights ("bf16", "fp32" or "fp16"). `prediction` is "eps" or
    "v"; "auto" follows ComfyUI's detection (a `v_pred` key, or the SD2 768-v weight statistics), which a
    v-prediction fine-tune without that key defeats: then pass prediction="v". With `weights=False` only the
    header is read and the network stays abstract (shapes, no values): enough to convert adapter files.
    `mesh` (a `jax.sharding.Mesh` or a spec like "data=2,fsdp=4") places each weight straight onto its shards
    as it is read, split over the mesh's `fsdp` axis.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; use one of {PREDICTIONS}")
    dtype = resolve_dtype(dtype)
    index = read_index(path)
    if isinstance(mesh, str):
        mesh = make_mesh(mesh)
    network, family, prefix = load_unet(index, dtype, weights, mesh)
    if prediction == "auto":
        prediction = "v" if guess_v_prediction(index, prefix, family) else "eps"
    return DiffusionModel(network, family, ModelSampling(prediction, scaled_linear_schedule()), Path(path))
