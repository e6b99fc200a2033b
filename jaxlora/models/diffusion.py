"""A loaded diffusion model: the network (ldm UNet or Flux) with its family, parameterisation and latent format,
and what the network receives besides the latent, built from the conditioning fields of a dataset."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.models.checkpoint import PREDICTIONS, guess_v_prediction, load_network, read_index, resolve_dtype
from jaxlora.models.families import FluxFamily, UNetFamily
from jaxlora.models.flux import Flux, FluxConfig
from jaxlora.models.sampling import LatentFormat, ModelSampling, scaled_linear_schedule, sdxl_vector
from jaxlora.models.unet import UNet, UNetConfig
from jaxlora.parallel.mesh import make_mesh

SIZE_FIELDS = ("height", "width", "crop_h", "crop_w", "target_height", "target_width")
DEFAULT_GUIDANCE = 3.5  # ComfyUI's Flux guidance when the conditioning carries none


@dataclass
class DiffusionModel:
    """What training needs to know about a checkpoint. `network` takes NHWC latents, a timestep and the
    keyword inputs `network_inputs` builds."""

    network: UNet | Flux
    family: UNetFamily | FluxFamily
    sampling: ModelSampling
    source: Path | None = None

    @property
    def config(self) -> UNetConfig | FluxConfig:
        return self.network.config

    @property
    def latent_format(self) -> LatentFormat:
        return self.family.latent_format

    @property
    def dtype(self) -> jnp.dtype:
        return jax.tree.leaves(nnx.state(self.network, nnx.Param))[0].dtype

    @property
    def param_count(self) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(self.network, nnx.Param)))

    @property
    def latent_channels(self) -> int:
        return self.config.in_channels

    @property
    def context_dim(self) -> int:
        return self.config.context_dim

    @property
    def pooled_dim(self) -> int | None:
        """Width of the pooled text embedding the model needs (`pooled_output`), None if it takes none."""
        return self.config.pooled_dim

    @property
    def network_input_names(self) -> tuple[str, ...]:
        """The keyword inputs the network takes besides the latent and timestep."""
        if isinstance(self.family, FluxFamily):
            return ("context", "y", "guidance") if self.family.guidance else ("context", "y")
        return ("context",) if self.pooled_dim is None else ("context", "y")

    def network_inputs(
        self,
        conditioning: Mapping[str, np.ndarray],
        latent_hw: tuple[int, int],
        dtype: jnp.dtype,
        guidance: float | None = None,
    ) -> dict[str, jax.Array]:
        """The network's keyword inputs from a bucket's conditioning fields, each [N or 1, ...]: the context,
        SDXL's `y` (pooled output and size embeddings; sizes in pixels, default the latent size x 8), Flux's
        `y` (pooled CLIP-L) and, for dev, `guidance` (the data's, else `guidance`, else 3.5)."""
        inputs = {"context": jnp.asarray(conditioning["c_crossattn"], dtype)}
        if isinstance(self.family, FluxFamily):
            inputs["y"] = jnp.asarray(conditioning["pooled_output"], dtype)
            if self.family.guidance:
                default = [DEFAULT_GUIDANCE if guidance is None else guidance]
                inputs["guidance"] = jnp.asarray(conditioning.get("guidance", default), jnp.float32)
        elif self.pooled_dim is not None:
            inputs["y"] = _sdxl_y(conditioning, latent_hw).astype(dtype)
        return inputs


def _sdxl_y(conditioning: Mapping[str, np.ndarray], latent_hw: tuple[int, int]) -> jax.Array:
    height, width = 8 * latent_hw[0], 8 * latent_hw[1]
    defaults = {"height": height, "width": width, "crop_h": 0, "crop_w": 0}
    sizes = {name: conditioning.get(name, defaults.get(name)) for name in SIZE_FIELDS}
    sizes["target_height"] = conditioning.get("target_height", sizes["height"])
    sizes["target_width"] = conditioning.get("target_width", sizes["width"])
    pooled = jnp.asarray(conditioning["pooled_output"], jnp.float32)
    rows = max([pooled.shape[0]] + [np.size(v) for v in sizes.values()])
    pooled = jnp.broadcast_to(pooled, (rows, pooled.shape[-1]))
    return sdxl_vector(
        pooled, *(jnp.broadcast_to(jnp.asarray(sizes[n], jnp.float32).reshape(-1), (rows,)) for n in SIZE_FIELDS)
    )


def load_model(
    path: str | Path,
    dtype: str | jnp.dtype = "bf16",
    prediction: str = "auto",
    weights: bool = True,
    mesh: jax.sharding.Mesh | str | None = None,
) -> DiffusionModel:
    """Load a UNet or Flux checkpoint (.safetensors, as ComfyUI loads it) with its config inferred from the
    weights.

    `dtype` is the storage dtype of the frozen weights ("bf16", "fp32" or "fp16"). `prediction` is "eps" or
    "v" for UNets; "auto" follows ComfyUI's detection (a `v_pred` key, or the SD2 768-v weight statistics), which
    a v-prediction fine-tune without that key defeats: then pass prediction="v". Flux predicts a flow ("const"),
    with ModelSamplingFlux for dev and discrete flow for schnell. With `weights=False` only the header is read
    and the network stays abstract (shapes, no values): enough to convert adapter files.
    `mesh` (a `jax.sharding.Mesh` or a spec like "data=2,fsdp=4") places each weight straight onto its shards
    as it is read, split over the mesh's `fsdp` axis.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; use one of {PREDICTIONS}")
    dtype = resolve_dtype(dtype)
    index = read_index(path)
    if isinstance(mesh, str):
        mesh = make_mesh(mesh)
    network, family, prefix = load_network(index, dtype, weights, mesh)
    if isinstance(family, FluxFamily):
        if prediction != "auto":
            raise ValueError(f"{family.description} predicts a flow; prediction {prediction!r} does not apply")
        return DiffusionModel(network, family, family.sampling, Path(path))
    if prediction == "auto":
        prediction = "v" if guess_v_prediction(index, prefix, family) else "eps"
    return DiffusionModel(network, family, ModelSampling(prediction, scaled_linear_schedule()), Path(path))
