"""The supported model families: one line each. Everything outside the families' own files finds a family here,
by a checkpoint's keys, a network config or a variant's name."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from jaxlora.models.chroma_family import CHROMA_FAMILY
from jaxlora.models.family import ModelFamily, UnknownLayoutError, Variant
from jaxlora.models.flux2_family import FLUX2_FAMILY
from jaxlora.models.flux_family import FLUX_FAMILY
from jaxlora.models.nextdit_family import NEXTDIT_FAMILY
from jaxlora.models.qwen_image_family import QWEN_IMAGE_FAMILY
from jaxlora.models.unet_family import UNET_FAMILY
from jaxlora.models.wan_family import WAN_FAMILY

# A family whose markers include another's comes first (Chroma's include Flux's `img_in.weight`). Flux.1 is told
# from Chroma and Flux.2 by `vector_in`, which neither has.
FAMILIES: tuple[ModelFamily, ...] = (UNET_FAMILY, CHROMA_FAMILY, FLUX_FAMILY, FLUX2_FAMILY, NEXTDIT_FAMILY)
FAMILIES += (QWEN_IMAGE_FAMILY,)
FAMILIES += (WAN_FAMILY,)
DEMO_FAMILY = UNET_FAMILY  # the built-in demo trains its `demo_config`: the cheapest network to compile

# Per-sample numbers a dataset may carry for some family's network.
NUMBER_FIELDS = tuple(dict.fromkeys(name for family in FAMILIES for name in family.number_fields))
# Key prefixes of the diffusion model: inside a full checkpoint, a bare diffusion model, none.
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
# Key fragments of files that are not a supported diffusion model, so the error can say what the file is.
OTHER_FILES = {
    "joint_blocks.": "an SD3 MMDiT (not supported)",
    "lora_": "a LoRA/adapter file, not a model",
    "encoder.down.": "a VAE, not a diffusion model",
    "latents": "a training dataset (it has `latents`), not a model: pass it as the dataset",
}


def describe_keys(keys: Iterable[str], limit: int = 8) -> str:
    """The first `limit` keys in order and the count: messages stay short for files of thousands of keys."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def find_family(keys: Iterable[str]) -> tuple[ModelFamily, str]:
    """(family, prefix): which supported family the file holds and under which key prefix; an error saying what
    the file looks like otherwise."""
    keys = set(keys)
    for prefix in PREFIXES:
        for family in FAMILIES:
            if all(prefix + marker in keys for marker in family.markers):
                return family, prefix
    others = {fragment: what for family in FAMILIES for fragment, what in family.foreign_layouts.items()}
    for fragment, what in {**others, **OTHER_FILES}.items():
        if any(fragment in key for key in keys):
            raise UnknownLayoutError(f"this looks like {what}: keys like {describe_keys(keys, 4)}")
    markers = sorted(marker for family in FAMILIES for marker in family.markers)
    raise UnknownLayoutError(
        f"no diffusion model found: expected one of {markers} under one of the prefixes "
        f"{[p for p in PREFIXES if p]} or none; file keys: {describe_keys(keys, 6)}"
    )


def supported_models() -> str:
    """The variants users can load, for help texts and messages: "Stable Diffusion 1.x, ..., Lumina 2"."""
    return ", ".join(variant.description for family in FAMILIES for variant in family.variants)


def demo_description() -> str:
    """What the built-in demo model is, in words."""
    return f"{DEMO_FAMILY.variant_of(DEMO_FAMILY.demo_config).description} {DEMO_FAMILY.name}"


def family_of_config(config: Any) -> ModelFamily:
    """The family whose network a config describes."""
    for family in FAMILIES:
        if family.owns_config(config):
            return family
    raise TypeError(f"{type(config).__name__} is not the config of a supported family")


def find_variant(name: str) -> tuple[ModelFamily, Variant]:
    """The family and variant of a variant name as adapter metadata records it ("sdxl", "flux-dev")."""
    for family in FAMILIES:
        for variant in family.variants:
            if variant.name == name:
                return family, variant
    names = [variant.name for family in FAMILIES for variant in family.variants]
    raise ValueError(f"unknown model variant {name!r}; known: {names}")
