"""The Chroma family: one variant (Chroma1-HD, Chroma1-Base and the v-numbered checkpoints share the layout),
told from Flux by its `distilled_guidance_layer`. It predicts a flow velocity (CONST) on the Flux VAE's
16-channel latents, conditioned on T5-XXL hidden states alone.

ComfyUI's sampling for it (`supported_models.Chroma`, `model_base.Chroma`): model type FLUX, i.e.
ModelSamplingFlux with mu 1.15 (its sampling settings name only `multiplier` 1), timestep = sigma; guidance 0
unless the conditioning carries one. ComfyUI's Chroma text encoder tokenizes T5 without padding (min length 1) and
hands the model no attention mask, so a dataset's `c_crossattn` is the prompt's tokens and nothing is masked.

Adapter names: ComfyUI's `model_base.Chroma` subclasses its Flux, so `model_lora_keys_unet` gives Chroma the Flux
key map (the generic `diffusion_model.`/`lora_unet_` names and `flux_to_diffusers`' diffusers names); the Flux
name tables serve unchanged. The approximator has no name in that diffusers map, so `peft` files leave it out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax.numpy as jnp

from jaxlora.models.chroma import CONDITION_DIM, Chroma, ChromaConfig
from jaxlora.models.family import (
    AdapterNames,
    ConditioningField,
    ModelFamily,
    UnknownLayoutError,
    Variant,
    key_indices,
    refuse_prediction_override,
)
from jaxlora.models.flux_family import FLUX_LATENT, FLUX_SHIFT, block_rows, flux_schedule, infer_stream_fields
from jaxlora.models.flux_names import adapter_names
from jaxlora.models.sampling import ModelSampling

CHROMA_VARIANT = Variant("chroma", "Chroma", FLUX_LATENT, "chroma", "chroma/lora", resolution=1024)  # Chroma1-HD's
DEFAULT_GUIDANCE = 0.0  # model_base.Chroma's guidance when the conditioning carries none

# Every block kind at a size that compiles in seconds: two heads of the RoPE-fixed width 128, a narrow
# approximator of two layers; the text width is the real T5-XXL one.
TINY_CHROMA = ChromaConfig(
    hidden_size=256,
    num_heads=2,
    mlp_hidden=1024,
    depth=2,
    depth_single_blocks=2,
    approximator_hidden=128,
    approximator_layers=2,
)


def chroma_sampling(shift: float | None = None) -> ModelSampling:
    """ModelSamplingFlux with mu `shift` (default 1.15), flow (CONST) prediction."""
    return ModelSampling("const", flux_schedule(FLUX_SHIFT if shift is None else shift))


def infer_chroma_config(shapes: Mapping[str, tuple[int, ...]]) -> tuple[ChromaConfig, Variant]:
    """Chroma config from un-prefixed key shapes: the stream fields as Flux's, the approximator's width and
    depth from `distilled_guidance_layer`."""
    fields = infer_stream_fields(shapes, "Chroma")
    try:
        approximator_hidden, approximator_in = shapes["distilled_guidance_layer.in_proj.weight"]
        approximator_out = shapes["distilled_guidance_layer.out_proj.weight"][0]
    except KeyError as error:
        raise UnknownLayoutError(f"Chroma key {error} is missing") from error
    if (approximator_in, approximator_out) != (4 * CONDITION_DIM, fields["hidden_size"]):
        raise UnknownLayoutError(
            f"distilled_guidance_layer maps {approximator_in} -> {approximator_out} features; Chroma's maps "
            f"{4 * CONDITION_DIM} -> the hidden size {fields['hidden_size']}"
        )
    try:
        config = ChromaConfig(
            **fields,
            approximator_hidden=approximator_hidden,
            approximator_layers=len(key_indices(shapes, r"distilled_guidance_layer\.layers\.(\d+)\.")),
        )
    except ValueError as error:
        raise UnknownLayoutError(f"unsupported Chroma layout: {error}") from error
    return config, CHROMA_VARIANT


class ChromaFamily(ModelFamily):
    name = "chroma"
    variants = (CHROMA_VARIANT,)
    markers = ("img_in.weight", "distilled_guidance_layer.in_proj.weight")
    foreign_layouts = {
        "distilled_guidance_layer.layers.0.linear_1.": "a diffusers-format Chroma transformer (convert it to the "
        "single-file layout ComfyUI loads)"
    }
    number_fields = ("guidance",)  # ComfyUI passes a conditioning's guidance (0 when it has none)
    config_type = ChromaConfig
    demo_config = TINY_CHROMA

    def infer_config(self, shapes):
        return infer_chroma_config(shapes)

    def variant_of(self, config: ChromaConfig) -> Variant:
        return CHROMA_VARIANT

    def build(self, config: ChromaConfig) -> Chroma:
        return Chroma(config)

    def load_sampling(self, variant, config, read_tensor, keys, prediction):
        refuse_prediction_override(variant, prediction)
        return chroma_sampling()

    def run_sampling(self, variant, loaded, prediction, shift):
        refuse_prediction_override(variant, prediction)
        return loaded if shift is None else chroma_sampling(shift)

    def conditioning(self, variant, config: ChromaConfig):
        return (ConditioningField("c_crossattn", config.context_dim, "T5-XXL hidden states"),)

    def input_names(self, variant, config: ChromaConfig):
        return ("context", "guidance")

    def network_inputs(self, variant, config: ChromaConfig, conditioning, latent_hw, dtype, guidance):
        """Context and `guidance`: the data's, else `guidance`, else 0 (ComfyUI's)."""
        default = [DEFAULT_GUIDANCE if guidance is None else guidance]
        return {
            "context": jnp.asarray(conditioning["c_crossattn"], dtype),
            "guidance": jnp.asarray(conditioning.get("guidance", default), jnp.float32),
        }

    def adapter_names(self, variant, config: ChromaConfig, layer_paths: Sequence[str]) -> AdapterNames:
        """ComfyUI's Flux key map over Chroma's layers (no `peft` name for the approximator)."""
        return adapter_names(layer_paths, config.hidden_size)

    def describe(self, config: ChromaConfig):
        return [
            *block_rows(config),
            ("context", f"{config.context_dim}-d T5, no pooled input"),
            ("approximator", f"{config.approximator_layers} layers of {config.approximator_hidden}"),
        ]


CHROMA_FAMILY = ChromaFamily()
