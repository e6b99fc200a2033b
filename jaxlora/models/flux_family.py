"""The Flux.1 family: dev (guidance-distilled: a guidance embedding, ModelSamplingFlux with mu 1.15) and schnell
(no guidance input, discrete flow with shift 1), told apart by `guidance_in`. Both predict a flow velocity
(CONST) on 16-channel latents of the Flux VAE, conditioned on T5-XXL hidden states and the pooled CLIP-L output.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

import jax.numpy as jnp

from jaxlora.models.family import (
    AdapterNames,
    ConditioningField,
    ModelFamily,
    TextConditioning,
    TextTower,
    UnknownLayoutError,
    Variant,
    key_indices,
    refuse_prediction_override,
)
from jaxlora.models.flux import PATCH, Flux, FluxConfig
from jaxlora.models.flux_names import adapter_names
from jaxlora.models.sampling import FlowSchedule, LatentFormat, ModelSampling, discrete_flow_schedule

FLUX_LATENT = LatentFormat(scale_factor=0.3611, shift=0.1159)
FLUX_SHIFT = 1.15  # ModelSamplingFlux's default mu
DEFAULT_GUIDANCE = 3.5  # ComfyUI's Flux guidance when the conditioning carries none
FLUX_DEV = Variant("flux-dev", "Flux.1 dev", FLUX_LATENT, "flux1", "flux-1-dev/lora", resolution=1024)
FLUX_SCHNELL = Variant("flux-schnell", "Flux.1 schnell", FLUX_LATENT, "flux1", "flux-1-schnell/lora", resolution=1024)
# ComfyUI's FluxClipModel (comfy/text_encoders/flux.py): T5-XXL's final states (rows padded to at least 256 tokens)
# as the context, and CLIP-L's pooled output without its projection.
TEXT_CONDITIONING = TextConditioning(
    (TextTower("l", projected=False, hidden=False), TextTower("t5", min_length=256)), pooled_from="l"
)

# Flux with every block kind at a size that compiles in seconds. The head width is fixed by the RoPE axes
# (16 + 56 + 56 = 128), so two heads make a 256-wide model; text and pooled widths are the real T5/CLIP-L ones.
TINY_FLUX_DEV = FluxConfig(hidden_size=256, num_heads=2, mlp_hidden=1024, depth=2, depth_single_blocks=2)
TINY_FLUX_SCHNELL = replace(TINY_FLUX_DEV, guidance_embed=False)


def flux_schedule(shift: float = FLUX_SHIFT) -> FlowSchedule:
    """ModelSamplingFlux: flux_time_shift(mu, 1, t) = e^mu / (e^mu + 1/t - 1), i.e. time_snr_shift(e^mu, t)."""
    return FlowSchedule(alpha=math.exp(shift), table_size=10000)


def flux_resolution_shift(
    width: int, height: int, max_shift: float = 1.15, base_shift: float = 0.5, x1: int = 256, x2: int = 4096
) -> float:
    """The mu of ComfyUI's ModelSamplingFlux node for an image of width x height pixels: linear in the number
    of 2x2 latent patches (w h / 256), base_shift at x1 patches, max_shift at x2."""
    slope = (max_shift - base_shift) / (x2 - x1)
    return (width * height / (8 * 8 * 2 * 2)) * slope + base_shift - slope * x1


def flux_sampling(variant: Variant, shift: float | None = None) -> ModelSampling:
    """Flow (CONST) sampling; dev: ModelSamplingFlux with mu `shift` (default 1.15), schnell: discrete flow with
    `shift` (default 1)."""
    if variant == FLUX_DEV:
        return ModelSampling("const", flux_schedule(FLUX_SHIFT if shift is None else shift))
    return ModelSampling("const", discrete_flow_schedule(1.0 if shift is None else shift))


def infer_stream_fields(
    shapes: Mapping[str, tuple[int, ...]], family: str, *, patch: int = PATCH, mlp_in_factor: int = 1
) -> dict[str, int]:
    """The `StreamConfig` fields of any Flux-line file, from un-prefixed key shapes: widths from the embedders,
    depths from the block indices, the head width from the QK-norm scale. `patch` and `mlp_in_factor` are the
    network's (see `JointTransformer` and `DoubleStream`)."""
    try:
        hidden, patched_in = shapes["img_in.weight"]
        context_dim = shapes["txt_in.weight"][1]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        mlp_hidden = shapes["double_blocks.0.img_mlp.0.weight"][0]
        patched_out = shapes["final_layer.linear.weight"][0]
    except KeyError as error:
        raise UnknownLayoutError(f"{family} key {error} is missing") from error
    if hidden % head_dim:
        raise UnknownLayoutError(f"hidden size {hidden} is not a multiple of the QK-norm width {head_dim}")
    return {
        "hidden_size": hidden,
        "num_heads": hidden // head_dim,
        "mlp_hidden": mlp_hidden // mlp_in_factor,
        "depth": len(key_indices(shapes, r"double_blocks\.(\d+)\.")),
        "depth_single_blocks": len(key_indices(shapes, r"single_blocks\.(\d+)\.")),
        "in_channels": patched_in // (patch * patch),
        "out_channels": patched_out // (patch * patch),
        "context_dim": context_dim,
    }


def infer_flux_config(shapes: Mapping[str, tuple[int, ...]]) -> tuple[FluxConfig, Variant]:
    """Flux config from un-prefixed key shapes: the stream fields, the pooled width from `vector_in`, dev
    (guidance embedding) or schnell from `guidance_in`."""
    fields = infer_stream_fields(shapes, "Flux")
    if "vector_in.in_layer.weight" not in shapes:
        raise UnknownLayoutError("Flux key 'vector_in.in_layer.weight' is missing")
    try:
        config = FluxConfig(
            **fields,
            vec_in_dim=shapes["vector_in.in_layer.weight"][1],
            guidance_embed="guidance_in.in_layer.weight" in shapes,
        )
    except ValueError as error:
        raise UnknownLayoutError(f"unsupported Flux layout: {error}") from error
    return config, FLUX_FAMILY.variant_of(config)


def block_rows(config) -> list[tuple[str, str]]:
    """`inspect` rows about the blocks of any Flux-line config."""
    return [
        ("blocks", f"{config.depth} double, {config.depth_single_blocks} single"),
        ("width", f"{config.hidden_size}, {config.num_heads} heads of {config.head_dim}, mlp {config.mlp_hidden}"),
    ]


class FluxFamily(ModelFamily):
    name = "flux"
    variants = (FLUX_DEV, FLUX_SCHNELL)
    markers = ("img_in.weight", "vector_in.in_layer.weight")  # Chroma and Flux.2 have img_in but no vector_in
    foreign_layouts = {
        "single_transformer_blocks.": "a diffusers-format Flux transformer (convert it to the single-file BFL layout)"
    }
    number_fields = ("guidance",)  # dev's distilled guidance per sample
    config_type = FluxConfig
    demo_config = TINY_FLUX_DEV

    def infer_config(self, shapes):
        return infer_flux_config(shapes)

    def variant_of(self, config: FluxConfig) -> Variant:
        return FLUX_DEV if config.guidance_embed else FLUX_SCHNELL

    def build(self, config: FluxConfig) -> Flux:
        return Flux(config)

    def load_sampling(self, variant, config, read_tensor, keys, prediction):
        refuse_prediction_override(variant, prediction)
        return flux_sampling(variant)

    def run_sampling(self, variant, loaded, prediction, shift):
        refuse_prediction_override(variant, prediction)
        return loaded if shift is None else flux_sampling(variant, shift)

    def conditioning(self, variant, config: FluxConfig):
        return (
            ConditioningField("c_crossattn", config.context_dim, "T5-XXL hidden states"),
            ConditioningField("pooled_output", config.vec_in_dim, "pooled CLIP-L output"),
        )

    def input_names(self, variant, config: FluxConfig):
        return ("context", "y", "guidance") if config.guidance_embed else ("context", "y")

    def network_inputs(self, variant, config: FluxConfig, conditioning, latent_hw, dtype, guidance):
        """Context, `y` (pooled CLIP-L) and, for dev, `guidance`: the data's, else `guidance`, else 3.5."""
        inputs = {
            "context": jnp.asarray(conditioning["c_crossattn"], dtype),
            "y": jnp.asarray(conditioning["pooled_output"], dtype),
        }
        if config.guidance_embed:
            default = [DEFAULT_GUIDANCE if guidance is None else guidance]
            inputs["guidance"] = jnp.asarray(conditioning.get("guidance", default), jnp.float32)
        return inputs

    def text_conditioning(self, variant, config: FluxConfig) -> TextConditioning:
        return TEXT_CONDITIONING

    def adapter_names(self, variant, config: FluxConfig, layer_paths: Sequence[str]) -> AdapterNames:
        """ComfyUI's Flux key map (spec 8.4); `peft` writes diffusers names, row slices of fused weights."""
        return adapter_names(layer_paths, config.hidden_size)  # img_in's out features: the row-slice unit

    def describe(self, config: FluxConfig):
        return [
            *block_rows(config),
            ("context", f"{config.context_dim}-d, y {config.vec_in_dim}-d, guidance {config.guidance_embed}"),
        ]


FLUX_FAMILY = FluxFamily()
