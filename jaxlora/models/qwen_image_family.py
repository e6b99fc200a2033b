"""The Qwen-Image family: Qwen-Image and Qwen-Image-Edit (2509, 2511), which share every key and shape, so one
variant stands for all. ComfyUI (`supported_models.QwenImage`, `model_base.QwenImage`) samples it as a flow
(CONST) with ModelSamplingFlux at mu 1.15 (`sampling_settings` shift 1.15, multiplier 1: the timestep is sigma),
on the 16-channel latents of the Qwen-Image VAE (a Wan 2.1 VAE; latent format `Wan21`: per-channel mean and
std, scale 1), which ComfyUI keeps 5-D with a frame axis of 1. The conditioning is the Qwen2.5-VL-7B hidden
states (3584-d) with the chat template's system prompt cut off; ComfyUI's text encoder drops the attention mask
when it masks nothing and its Qwen-Image model passes none to the network, so none is read here.

Edit variants: ComfyUI appends reference-image latents (`reference_latents` of the conditioning) to the image
tokens; datasets carrying them are not supported yet (see `conditioning`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax.numpy as jnp

from jaxlora.models.family import (
    STYLES,
    AdapterNames,
    ConditioningField,
    ModelFamily,
    NameTarget,
    UnknownLayoutError,
    Variant,
    key_indices,
    kohya_transformer_name,
    refuse_prediction_override,
    transformer_export_names,
)
from jaxlora.models.flux_family import flux_schedule
from jaxlora.models.qwen_image import AXES_DIM, QwenImage, QwenImageConfig
from jaxlora.models.sampling import ModelSampling
from jaxlora.models.wan_family import WAN21_LATENT  # the Qwen-Image VAE is a Wan 2.1 VAE: ComfyUI's `Wan21`

QWEN_IMAGE_SHIFT = 1.15  # supported_models.QwenImage sampling_settings: ModelSamplingFlux's mu
# modelspec architecture and resolution as musubi-tuner writes them for Qwen-Image LoRAs.
QWEN_IMAGE = Variant(
    "qwen-image", "Qwen-Image", WAN21_LATENT, "qwen_image", "Qwen-Image/lora", resolution=1328
)  # fmt: skip
TEXT_ENCODER = "Qwen2.5-VL-7B"
LAYERED_KEY = "time_text_embed.addition_t_embedding.weight"

# Every block kind at a size that compiles in seconds: two heads of the fixed width 128 (the RoPE axes
# 16 + 56 + 56), the real text width.
TINY_QWEN_IMAGE = QwenImageConfig(hidden_size=256, num_heads=2, mlp_hidden=1024, depth=2)


def qwen_image_sampling(shift: float | None = None) -> ModelSampling:
    """Flow (CONST), ModelSamplingFlux with mu `shift` (default 1.15)."""
    return ModelSampling("const", flux_schedule(QWEN_IMAGE_SHIFT if shift is None else shift))


def infer_qwen_image_config(shapes: Mapping[str, tuple[int, ...]]) -> QwenImageConfig:
    """Config from un-prefixed key shapes: widths from the embedders, the head width from the QK-norm weight
    (it must equal the RoPE axes' 128), the MLP width from the first block, the depth from the block indices.
    Qwen-Image-Layered (an extra time embedding and layered RoPE) is refused by its key."""
    if LAYERED_KEY in shapes:
        raise UnknownLayoutError(f"{LAYERED_KEY}: a Qwen-Image-Layered transformer, which is not supported")
    try:
        hidden, patched_in = shapes["img_in.weight"]
        context_dim = shapes["txt_in.weight"][1]
        head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
        mlp_hidden = shapes["transformer_blocks.0.img_mlp.net.0.proj.weight"][0]
        patched_out = shapes["proj_out.weight"][0]
    except KeyError as error:
        raise UnknownLayoutError(f"Qwen-Image key {error} is missing") from error
    if head_dim != sum(AXES_DIM) or hidden % head_dim:
        raise UnknownLayoutError(
            f"transformer_blocks.0.attn.norm_q.weight: head width {head_dim}, but Qwen-Image's RoPE axes "
            f"{AXES_DIM} need {sum(AXES_DIM)} and the width {hidden} must split into such heads"
        )
    try:
        return QwenImageConfig(
            hidden_size=hidden,
            num_heads=hidden // head_dim,
            mlp_hidden=mlp_hidden,
            depth=len(key_indices(shapes, r"transformer_blocks\.(\d+)\.")),
            in_channels=patched_in // 4,
            out_channels=patched_out // 4,
            context_dim=context_dim,
        )
    except ValueError as error:
        raise UnknownLayoutError(f"unsupported Qwen-Image layout: {error}") from error


def import_aliases(paths: Sequence[str]) -> dict[str, NameTarget]:
    """ComfyUI's QwenImage key map (`comfy/lora.py`): every layer under `diffusion_model.<path>` and kohya's
    `lora_unet_<path>` (the generic names), and bare, `transformer.<path>` and `lycoris_<path with _>`; the
    paths are diffusers' names, so diffusers/PEFT, DiffSynth (bare), ai-toolkit (`diffusion_model.`) and
    musubi-tuner (`lora_unet_`) files all land on them."""
    aliases = {}
    for path in paths:
        whole = NameTarget(path)
        for alias in (
            f"diffusion_model.{path}",
            kohya_transformer_name(path),
            path,
            f"transformer.{path}",
            "lycoris_" + path.replace(".", "_"),
        ):
            aliases[alias] = whole
    return aliases


class QwenImageFamily(ModelFamily):
    name = "qwen-image"
    variants = (QWEN_IMAGE,)
    markers = ("txt_norm.weight", "transformer_blocks.0.attn.add_q_proj.weight")
    foreign_layouts = {"txt_in.text_norm.": "a Qwen-Image 2.1 transformer (not supported)"}
    number_fields = ()
    config_type = QwenImageConfig
    demo_config = TINY_QWEN_IMAGE

    def infer_config(self, shapes):
        return infer_qwen_image_config(shapes), QWEN_IMAGE

    def variant_of(self, config: QwenImageConfig) -> Variant:
        return QWEN_IMAGE

    def build(self, config: QwenImageConfig) -> QwenImage:
        return QwenImage(config)

    def load_sampling(self, variant, config, read_tensor, keys, prediction):
        refuse_prediction_override(variant, prediction)
        return qwen_image_sampling()

    def run_sampling(self, variant, loaded, prediction, shift):
        refuse_prediction_override(variant, prediction)
        return loaded if shift is None else qwen_image_sampling(shift)

    def conditioning(self, variant, config: QwenImageConfig):
        return (ConditioningField("c_crossattn", config.context_dim, f"{TEXT_ENCODER} hidden states"),)

    def input_names(self, variant, config):
        return ("context",)

    def network_inputs(self, variant, config, conditioning, latent_hw, dtype, guidance):
        """The text hidden states as they are: no mask and no padding, as ComfyUI's network gets them."""
        return {"context": jnp.asarray(conditioning["c_crossattn"], dtype)}

    def adapter_names(self, variant, config, layer_paths: Sequence[str]) -> AdapterNames:
        """ComfyUI's QwenImage key map; `peft` writes `transformer.<path>` (diffusers' names are the paths)."""
        exports = {
            style: {path: transformer_export_names(path, style, {path: NameTarget(path)}) for path in layer_paths}
            for style in STYLES
        }
        return AdapterNames(import_aliases(layer_paths), exports)

    def describe(self, config: QwenImageConfig):
        return [
            ("blocks", f"{config.depth} dual-stream"),
            ("width", f"{config.hidden_size}, {config.num_heads} heads of {config.head_dim}, mlp {config.mlp_hidden}"),
            ("context", f"{config.context_dim}-d ({TEXT_ENCODER})"),
        ]


QWEN_IMAGE_FAMILY = QwenImageFamily()
