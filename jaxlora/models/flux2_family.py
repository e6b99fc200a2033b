"""The Flux.2 family: dev (about 32B, guidance-distilled: a guidance embedding, Mistral-Small-3.1 text) and
klein 4B and 9B (no guidance input; Qwen3-4B and Qwen3-8B text), told apart by `guidance_in` and the text width.
All predict a flow velocity (CONST) with ComfyUI's ModelSamplingFlux at mu 2.02 (`supported_models.Flux2`) on
the 128-channel latents ComfyUI's Flux.2 VAE produces, whose latent format is the identity (scale 1, no shift).
Klein's undistilled "base" checkpoints have the same shapes and are the same variants here.

ComfyUI (`model_base.Flux2.extra_conds`) pads the text context with zeros at the front to 512 tokens before the
model sees it; `network_inputs` does the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax.numpy as jnp

from jaxlora.models.family import (
    AdapterNames,
    ConditioningField,
    ModelFamily,
    UnknownLayoutError,
    Variant,
    refuse_prediction_override,
)
from jaxlora.models.flux2 import Flux2, Flux2Config, Flux2DoubleStream
from jaxlora.models.flux2_names import WRITTEN
from jaxlora.models.flux_family import DEFAULT_GUIDANCE, block_rows, flux_schedule, infer_stream_fields
from jaxlora.models.flux_names import adapter_names
from jaxlora.models.sampling import LatentFormat, ModelSampling

FLUX2_LATENT = LatentFormat(scale_factor=1.0, shift=0.0)
FLUX2_SHIFT = 2.02  # supported_models.Flux2 sampling_settings: ModelSamplingFlux's mu
TEXT_TOKENS = 512  # model_base.Flux2.extra_conds pads the context to this length
FLUX2_DEV = Variant("flux2-dev", "Flux.2 dev", FLUX2_LATENT, "flux2", "flux-2-dev/lora")
FLUX2_KLEIN_4B = Variant("flux2-klein-4b", "Flux.2 klein 4B", FLUX2_LATENT, "flux2", "flux-2-klein-4b/lora")
FLUX2_KLEIN_9B = Variant("flux2-klein-9b", "Flux.2 klein 9B", FLUX2_LATENT, "flux2", "flux-2-klein-9b/lora")
# Text widths: three hidden layers of the text encoder, concatenated.
KLEIN_TEXT = {7680: (FLUX2_KLEIN_4B, "Qwen3-4B"), 12288: (FLUX2_KLEIN_9B, "Qwen3-8B")}
DEV_TEXT = "Mistral-Small-3.1"

# Flux.2 with every block kind at a size that compiles in seconds: two heads of the fixed width 128, the real
# text widths (dev 15360, klein 4B 7680) so the variants are told apart as in real files.
TINY_FLUX2_KLEIN = Flux2Config(
    hidden_size=256, num_heads=2, mlp_hidden=768, depth=2, depth_single_blocks=2, context_dim=7680,
    guidance_embed=False,
)  # fmt: skip
TINY_FLUX2_DEV = Flux2Config(hidden_size=256, num_heads=2, mlp_hidden=768, depth=2, depth_single_blocks=2)


def flux2_sampling(shift: float | None = None) -> ModelSampling:
    """Flow (CONST), ModelSamplingFlux with mu `shift` (default 2.02)."""
    return ModelSampling("const", flux_schedule(FLUX2_SHIFT if shift is None else shift))


def infer_flux2_config(shapes: Mapping[str, tuple[int, ...]]) -> tuple[Flux2Config, Variant]:
    """Flux.2 config from un-prefixed key shapes: the stream fields (one latent pixel per token, SwiGLU MLPs),
    dev (guidance embedding) or klein from `guidance_in`, klein's size from the text width."""
    fields = infer_stream_fields(shapes, "Flux.2", patch=Flux2.patch, mlp_in_factor=Flux2DoubleStream.mlp_in_factor)
    guidance = "guidance_in.in_layer.weight" in shapes
    context_dim = fields["context_dim"]
    if not guidance and context_dim not in KLEIN_TEXT:
        widths = {width: name for width, (_, name) in KLEIN_TEXT.items()}
        raise UnknownLayoutError(
            f"Flux.2 txt_in.weight takes {context_dim}-d text; a klein model (no guidance_in) takes one of {widths}"
        )
    try:
        config = Flux2Config(**fields, guidance_embed=guidance)
    except ValueError as error:
        raise UnknownLayoutError(f"unsupported Flux.2 layout: {error}") from error
    return config, FLUX2_FAMILY.variant_of(config)


class Flux2Family(ModelFamily):
    name = "flux2"
    variants = (FLUX2_DEV, FLUX2_KLEIN_4B, FLUX2_KLEIN_9B)
    markers = ("double_stream_modulation_img.lin.weight",)
    foreign_layouts = {
        "double_stream_modulation_img.linear.": "a diffusers-format Flux.2 transformer "
        "(convert it to the single-file BFL layout)"
    }
    number_fields = ("guidance",)  # dev's distilled guidance per sample
    config_type = Flux2Config
    demo_config = TINY_FLUX2_KLEIN

    def infer_config(self, shapes):
        return infer_flux2_config(shapes)

    def variant_of(self, config: Flux2Config) -> Variant:
        if config.guidance_embed:
            return FLUX2_DEV
        return KLEIN_TEXT.get(config.context_dim, (FLUX2_KLEIN_4B, ""))[0]

    def build(self, config: Flux2Config) -> Flux2:
        return Flux2(config)

    def load_sampling(self, variant, config, read_tensor, keys, prediction):
        refuse_prediction_override(variant, prediction)
        return flux2_sampling()

    def run_sampling(self, variant, loaded, prediction, shift):
        refuse_prediction_override(variant, prediction)
        return loaded if shift is None else flux2_sampling(shift)

    def conditioning(self, variant, config: Flux2Config):
        encoder = DEV_TEXT if variant == FLUX2_DEV else KLEIN_TEXT.get(config.context_dim, (None, "text"))[1]
        return (ConditioningField("c_crossattn", config.context_dim, f"{encoder} hidden states (3 layers)"),)

    def input_names(self, variant, config: Flux2Config):
        return ("context", "guidance") if config.guidance_embed else ("context",)

    def network_inputs(self, variant, config: Flux2Config, conditioning, latent_hw, dtype, guidance):
        """The context, zero-padded at the front to 512 tokens as ComfyUI does, and, for dev, `guidance`: the
        data's, else `guidance`, else 3.5."""
        context = jnp.asarray(conditioning["c_crossattn"], dtype)
        padding = max(TEXT_TOKENS - context.shape[1], 0)
        inputs = {"context": jnp.pad(context, ((0, 0), (padding, 0), (0, 0)))}
        if config.guidance_embed:
            default = [DEFAULT_GUIDANCE if guidance is None else guidance]
            inputs["guidance"] = jnp.asarray(conditioning.get("guidance", default), jnp.float32)
        return inputs

    def adapter_names(self, variant, config: Flux2Config, layer_paths: Sequence[str]) -> AdapterNames:
        """ComfyUI's Flux key map (it loads Flux.2 through it); `peft` writes diffusers Flux.2 names."""
        return adapter_names(layer_paths, config.hidden_size, WRITTEN)

    def describe(self, config: Flux2Config):
        return [*block_rows(config), ("context", f"{config.context_dim}-d, guidance {config.guidance_embed}")]


FLUX2_FAMILY = Flux2Family()
