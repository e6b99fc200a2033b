"""A loaded diffusion model: the network with its family, variant, parameterisation and latent format, and what
the network receives besides the latent, built by the family from the conditioning fields of a dataset."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.dtypes import PREDICTIONS, resolve_dtype
from jaxlora.models.checkpoint import TensorFile, load_network, quantize_abstract, read_index, stored_quantization
from jaxlora.models.family import AdapterNames, ConditioningField, ModelFamily, Variant
from jaxlora.models.quantize import check_quantization, is_quantized
from jaxlora.models.registry import family_of_config
from jaxlora.models.sampling import LatentFormat, ModelSampling
from jaxlora.models.stack import layer_sites
from jaxlora.parallel.mesh import make_mesh


@dataclass
class DiffusionModel:
    """What training needs to know about a checkpoint. `network` takes NHWC latents, a timestep and the
    keyword inputs `network_inputs` builds."""

    network: nnx.Module
    family: ModelFamily
    variant: Variant
    sampling: ModelSampling
    source: Path | None = None
    quantization: str = "none"  # how the adapted weights are stored (`jaxlora.models.quantize`)

    @property
    def config(self) -> Any:
        return self.network.config

    @property
    def latent_format(self) -> LatentFormat:
        return self.variant.latent_format

    @property
    def dtype(self) -> jnp.dtype:
        """The dtype of the frozen weights that are not quantized (all of them without a quantization)."""
        leaves = jax.tree.leaves(nnx.state(self.network, nnx.Param))
        return next((leaf.dtype for leaf in leaves if not is_quantized(leaf.dtype)), leaves[0].dtype)

    @property
    def param_count(self) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(self.network, nnx.Param)))

    @property
    def latent_channels(self) -> int:
        return self.family.latent_channels(self.config)

    @cached_property
    def conditioning_fields(self) -> tuple[ConditioningField, ...]:
        """The dataset fields the network needs besides the latents, with their widths."""
        return self.family.conditioning(self.variant, self.config)

    @property
    def context_dim(self) -> int:
        return self._field_width("c_crossattn")

    @property
    def pooled_dim(self) -> int | None:
        """Width of the pooled text embedding the model needs (`pooled_output`), None if it takes none."""
        return self._field_width("pooled_output")

    def _field_width(self, name: str) -> int | None:
        return next((f.width for f in self.conditioning_fields if f.name == name), None)

    @property
    def network_input_names(self) -> tuple[str, ...]:
        """The keyword inputs the network takes besides the latent and timestep."""
        return self.family.input_names(self.variant, self.config)

    @cached_property
    def adapter_names(self) -> AdapterNames:
        """The adapter-file name tables of this network's adaptable layers."""
        paths = [site.path for site in layer_sites(self.network) if site.layer.adaptable]
        return self.family.adapter_names(self.variant, self.config, paths)

    def network_inputs(
        self,
        conditioning: Mapping[str, np.ndarray],
        latent_hw: tuple[int, int],
        dtype: jnp.dtype,
        guidance: float | None = None,
    ) -> dict[str, jax.Array]:
        """The network's keyword inputs from a bucket's conditioning fields, each [N or 1, ...] (the context,
        and what the family adds, such as a `y` vector from the pooled output and sizes, or guidance;
        `guidance` replaces the family's default for samples whose data carries none)."""
        return self.family.network_inputs(self.variant, self.config, conditioning, latent_hw, dtype, guidance)

    def run_sampling(self, prediction: str = "auto", shift: float | None = None) -> ModelSampling:
        """The model sampling a run trains with: this model's, with a prediction override or a flow shift."""
        return self.family.run_sampling(self.variant, self.sampling, prediction, shift)


def load_model(
    path: str | Path,
    dtype: str | jnp.dtype = "bf16",
    prediction: str = "auto",
    weights: bool = True,
    mesh: jax.sharding.Mesh | str | None = None,
    quantization: str = "none",
) -> DiffusionModel:
    """Load a checkpoint of any supported family (.safetensors, as ComfyUI loads it) with its config inferred
    from the weights.

    `dtype` is the storage dtype of the frozen weights ("bf16", "fp32" or "fp16"; "none" keeps each tensor's
    stored dtype, fp8 included). `quantization` ("int8", "fp8", "fp8_channel"; see `jaxlora.models.quantize`)
    stores the weights adapters patch quantized, each quantized as it is read. `prediction` is "eps" or
    "v" for eps/v families; "auto" follows ComfyUI's detection from the weights (a `v_pred` key, or a family's
    weight statistics), which a v-prediction fine-tune without that key defeats: then pass prediction="v". Flow models
    take "auto" only. With `weights=False` only the header is read and the network stays abstract (shapes, no
    values): enough to convert adapter files and check a run before loading.
    `mesh` (a `jax.sharding.Mesh` or a spec like "data=2,fsdp=4") places each weight straight onto its shards
    as it is read, split over the mesh's `fsdp` axis.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; use one of {PREDICTIONS}")
    dtype = None if dtype == "none" else resolve_dtype(dtype)
    index = read_index(path)
    if isinstance(mesh, str):
        mesh = make_mesh(mesh)
    loaded = load_network(index, dtype, weights, mesh, quantization)

    def read_tensor(key: str) -> np.ndarray:
        with TensorFile(index.path) as f:
            return f.get_tensor(loaded.prefix + key)

    keys = {key[len(loaded.prefix) :] for key in index.shapes if key.startswith(loaded.prefix)} | set(index.shapes)
    sampling = loaded.family.load_sampling(loaded.variant, loaded.network.config, read_tensor, keys, prediction)
    if weights and dtype is None and quantization == "none":
        quantization = stored_quantization(loaded.network)  # an fp8 file kept as stored is an fp8 base
    return DiffusionModel(loaded.network, loaded.family, loaded.variant, sampling, Path(path), quantization)


def abstract_model(config: Any, dtype: str | jnp.dtype = "bf16", quantization: str = "none") -> DiffusionModel:
    """A model of any family built from its config, whose frozen weights are `jax.ShapeDtypeStruct`s of `dtype`
    (the adapted ones stored as `quantization` stores them): it lowers and compiles a train step and holds no
    memory (memory and compile benchmarks of full-size models)."""
    family = family_of_config(config)
    variant = family.variant_of(config)
    graph, state = nnx.split(family.build(config))
    state = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, resolve_dtype(dtype)), state)
    sampling = family.load_sampling(variant, config, None, set(), "auto")
    network = nnx.merge(graph, state)
    if quantization != "none":
        check_quantization(quantization)
        quantize_abstract(network, quantization)
    return DiffusionModel(network, family, variant, sampling, quantization=quantization)
