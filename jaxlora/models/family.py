"""The model-family interface: one record per network architecture holds everything that differs between
families, so the loader, the trainer, adapter files, metadata and the CLI ask the record instead of branching on
family names. A family is one network file, one family file (a `ModelFamily` subclass and its tables) and one
line in `registry.FAMILIES`; `docs/adding-a-model.md` is the recipe.

A family has variants: the model kinds users name and files record, which share one network and differ in widths,
inputs or sampling. The family tells them apart from tensor shapes.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.models.sampling import LatentFormat, ModelSampling

STYLES = ("comfyui", "kohya", "peft")
"""Adapter-file key styles: ComfyUI's own (`diffusion_model.<path>`), kohya's (`lora_unet_<path>`) and
diffusers/PEFT names."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file, key or shape at fault."""


class UnknownLayoutError(CheckpointError):
    """Keys or shapes that fit no supported family (or not the one the markers named)."""


def key_indices(shapes: Mapping[str, tuple], pattern: str) -> list[int]:
    """Sorted distinct integers N of keys matching `pattern` (a regex with one `(\\d+)` group): block counts."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in shapes if (m := regex.match(key))})


@dataclass(frozen=True)
class Variant:
    """A model kind as users and files name it: its latent format and the names adapter metadata gives it.

    `kohya_base_model` is kohya's `ss_base_model_version` (A1111/Forge read it), with `_v` appended for
    v-prediction where `kohya_v_suffix`; `kohya_v2` is kohya's `ss_v2` flag; `modelspec_architecture` is the
    `modelspec.architecture` of SAI's model spec."""

    name: str
    description: str
    latent_format: LatentFormat
    kohya_base_model: str
    modelspec_architecture: str
    kohya_v2: bool = False
    kohya_v_suffix: bool = False
    resolution: int = 512  # the side, in pixels, of the square area it was trained at (the default bucket area)


@dataclass(frozen=True)
class NameTarget:
    """What a base name in an adapter file patches: the layer's checkpoint path, the output rows [start, stop)
    of its weight (None: all rows; diffusers names slices of fused weights), and whether the name orders the two
    halves of those rows swapped (diffusers' scale/shift order against the checkpoint's shift/scale)."""

    path: str
    rows: tuple[int, int] | None = None
    swap_halves: bool = False

    @property
    def whole(self) -> bool:
        return self.rows is None and not self.swap_halves


@dataclass(frozen=True)
class AdapterNames:
    """A network's adapter-file names, as tables.

    `aliases`: every base name an adapter file may use -> what it patches (import). `exports[style][path]`: the
    base names an adapter of layer `path` is written under in `style`, each with the rows it covers (one whole
    name, or several row slices that together cover the weight once); a layer absent from a style's table has no
    name there that ComfyUI loads."""

    aliases: Mapping[str, NameTarget]
    exports: Mapping[str, Mapping[str, Mapping[str, NameTarget]]]


def kohya_transformer_name(path: str) -> str:
    """kohya's name of a layer of a network held in ComfyUI's own layout: `lora_unet_` and the path with `_`."""
    return "lora_unet_" + path.replace(".", "_")


def transformer_export_names(path: str, style: str, diffusers: Mapping[str, NameTarget]) -> dict[str, NameTarget]:
    """The base names under which an adapter of layer `path` of a DiT in ComfyUI's layout is written in `style`:
    `diffusion_model.<path>` (`comfyui`), the kohya name, or `transformer.<name>` for each of the layer's
    `diffusers` names (`peft`; row slices of a fused weight, or none where diffusers has no name for it)."""
    if style == "comfyui":
        return {f"diffusion_model.{path}": NameTarget(path)}
    if style == "kohya":
        return {kohya_transformer_name(path): NameTarget(path)}
    if style != "peft":
        raise ValueError(f"unknown adapter style {style!r}; use one of {STYLES}")
    return {f"transformer.{name}": target for name, target in diffusers.items()}


def refuse_prediction_override(variant: Variant, prediction: str) -> None:
    """Flow models have one parameterisation: an eps or v choice is refused by name."""
    if prediction != "auto":
        raise ValueError(f"{variant.description} predicts a flow; prediction {prediction!r} does not apply")


@dataclass(frozen=True)
class ConditioningField:
    """A dataset field the network needs: its name and width (last axis)."""

    name: str
    width: int
    meaning: str


@dataclass(frozen=True)
class TextTower:
    """One text encoder a family conditions on, run as ComfyUI's CLIPTextEncode runs it.

    `role` names the encoder ("l" CLIP-L, "g" OpenCLIP bigG, "h" OpenCLIP ViT-H, "t5" T5-XXL); for CLIP towers
    `layer` is the hidden layer counted from the end, `normed` whether it passes the final layer norm,
    `pad_with_end` the padding token (end token, or 0), `projected` whether the pooled output goes through the
    tower's projection when it has one; `hidden` whether its hidden states are part of `c_crossattn` (a family may
    take only a tower's pooled output); `min_length` the padded token count of a T5 row."""

    role: str
    layer: int = -1
    normed: bool = True
    pad_with_end: bool = True
    projected: bool = True
    hidden: bool = True
    min_length: int = 0


@dataclass(frozen=True)
class TextConditioning:
    """How captions become a family's `c_crossattn` (the towers' hidden states side by side, in this order) and
    `pooled_output` (the pooled output of the tower `pooled_from`; None: the family takes none)."""

    towers: tuple[TextTower, ...]
    pooled_from: str | None = None


class ModelFamily(ABC):
    """One network architecture with its variants: a subclass in the family's own file, instantiated once.

    Class attributes every family sets:
    - `name`: the registry key; `variants`: its model kinds;
    - `markers`: keys (without prefix) that every checkpoint of the family holds and no other family's does;
    - `foreign_layouts`: key fragments of the family's other layouts (e.g. diffusers folders) -> what to tell
      the user when a file has them instead;
    - `number_fields`: per-sample numbers a dataset may carry for the network (sizes, guidance), read from
      ComfyUI's conditioning as floats;
    - `ignored_keys`: keys (without prefix) the family's files may hold that its network never uses; the loader
      skips them;
    - `video`: whether the network takes video latents (datasets [N, C, T, H, W]; image latents [N, C, H, W]
      train as 1-frame videos) rather than images;
    - `config_type`: the network config class; `demo_config`: a tiny config with every block kind, for the
      built-in demo and tests.
    """

    name: str
    variants: tuple[Variant, ...]
    markers: tuple[str, ...]
    foreign_layouts: Mapping[str, str]
    number_fields: tuple[str, ...]
    ignored_keys: tuple[str, ...] = ()
    video: bool = False
    config_type: type
    demo_config: Any

    @abstractmethod
    def infer_config(self, shapes: Mapping[str, tuple[int, ...]]) -> tuple[Any, Variant]:
        """The whole network config and the variant, from un-prefixed key shapes in torch layout. Raises
        `checkpoint.UnknownLayoutError` naming the key or shape that does not fit."""

    @abstractmethod
    def variant_of(self, config: Any) -> Variant:
        """The variant a network config is (for networks built from a config, not read from a file)."""

    @abstractmethod
    def build(self, config: Any) -> nnx.Module:
        """The (abstract) network a config describes."""

    @abstractmethod
    def load_sampling(self, variant: Variant, config: Any, read_tensor, keys, prediction: str) -> ModelSampling:
        """The model sampling a loaded checkpoint gets: `prediction` ("auto" or a parameterisation a user
        chose); `read_tensor(key)` reads one un-prefixed tensor and `keys` are the file's keys, for detection
        rules that look at the weights. Raises ValueError for a prediction the family cannot have."""

    @abstractmethod
    def run_sampling(
        self, variant: Variant, loaded: ModelSampling, prediction: str, shift: float | None
    ) -> ModelSampling:
        """The loaded sampling changed by a run's settings (`prediction` override, flow `shift`); ValueError
        naming the setting where it does not apply to this family."""

    @abstractmethod
    def conditioning(self, variant: Variant, config: Any) -> tuple[ConditioningField, ...]:
        """The dataset fields the network needs besides the latents (checked before weights are read)."""

    @abstractmethod
    def input_names(self, variant: Variant, config: Any) -> tuple[str, ...]:
        """The keyword inputs the network takes besides the latent and the timestep."""

    @abstractmethod
    def network_inputs(
        self,
        variant: Variant,
        config: Any,
        conditioning: Mapping[str, np.ndarray],
        latent_hw: tuple[int, int],
        dtype: jnp.dtype,
        guidance: float | None,
    ) -> dict[str, jax.Array]:
        """The network's keyword inputs from a bucket's conditioning fields (each [N or 1, ...])."""

    @abstractmethod
    def adapter_names(self, variant: Variant, config: Any, layer_paths: Sequence[str]) -> AdapterNames:
        """Import aliases and export names, in every style, of the adaptable layers at `layer_paths`."""

    @abstractmethod
    def describe(self, config: Any) -> list[tuple[str, str]]:
        """Rows (label, value) that `python -m jaxlora.inspect` prints about the architecture."""

    def text_conditioning(self, variant: Variant, config: Any) -> TextConditioning:
        """The text encoders that turn captions into this family's conditioning (datasets from images)."""
        raise ValueError(
            f"{variant.description}: datasets from captioned images are not supported for this family yet; "
            "encode the dataset in ComfyUI (MakeTrainingDataset + SaveTrainingDataset)"
        )

    def latent_channels(self, config: Any) -> int:
        return config.in_channels

    def owns_config(self, config: Any) -> bool:
        return isinstance(config, self.config_type)
