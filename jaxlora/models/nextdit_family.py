"""The NextDiT family: Z-Image (Turbo and Base, which share every key and shape) and Lumina 2, the models ComfyUI
loads through its Lumina 2 code (`comfy/ldm/lumina/model.py`). Both predict a flow velocity (CONST,
ModelSamplingDiscreteFlow, multiplier 1) on 16-channel Flux-VAE latents, conditioned on caption hidden states
alone: Qwen3-4B's (2560-d) for Z-Image, Gemma-2-2B's (2304-d) for Lumina 2.

The variants differ in how the blocks take the timestep (Z-Image: `adaLN_modulation.0` from a 256-d embedding,
no SiLU; Lumina 2: `adaLN_modulation.1` after a SiLU), so the key tells them apart, and in rules the weights do
not store, fixed per variant as in ComfyUI's `model_detection.py`: RoPE axes and theta, the timestep scale, and
Z-Image's padding of both token sequences to a multiple of 32 (when the file has pad tokens).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import jax.numpy as jnp

from jaxlora.models.family import (
    STYLES,
    AdapterNames,
    ConditioningField,
    ModelFamily,
    UnknownLayoutError,
    Variant,
    key_indices,
    refuse_prediction_override,
)
from jaxlora.models.flux_family import FLUX_LATENT
from jaxlora.models.nextdit import NextDiT, NextDiTConfig
from jaxlora.models.nextdit_names import export_names, import_aliases
from jaxlora.models.sampling import ModelSampling, discrete_flow_schedule

Z_IMAGE = Variant("z-image", "Z-Image", FLUX_LATENT, "z_image", "Z-Image/lora", resolution=1024)
LUMINA2 = Variant("lumina2", "Lumina 2", FLUX_LATENT, "lumina2", "lumina-2/lora", resolution=1024)


@dataclass(frozen=True)
class VariantRules:
    """What a variant fixes that the weights do not store (ComfyUI's `model_detection.py` and
    `supported_models.py`): RoPE axes (their sum is the head width) and theta, the timestep scale, SiLU before
    the block modulation, the flow shift, and the text encoder whose hidden states are the caption."""

    axes_dims: tuple[int, ...]
    rope_theta: float
    time_scale: float
    modulation_silu: bool
    shift: float
    encoder: str


RULES = {
    Z_IMAGE: VariantRules((32, 48, 48), 256.0, 1000.0, False, 3.0, "Qwen3-4B"),
    LUMINA2: VariantRules((32, 32, 32), 10000.0, 1.0, True, 6.0, "Gemma-2-2B"),
}
PAD_TOKENS_MULTIPLE = 32  # Z-Image files with `cap_pad_token` pad both sequences to a multiple of this

# Every block kind at a size that compiles in seconds. The head width is fixed by each variant's RoPE axes; the
# caption widths are the real encoders'. Z-Image's width 384 makes diffusers' feed-forward rule int(8/3 dim)
# and ComfyUI's rounding to 256 agree (1024); Lumina 2 keeps grouped-query attention (2 query heads, 1 kv head).
TINY_Z_IMAGE = NextDiTConfig(
    dim=384, n_layers=2, n_refiner_layers=1, n_heads=3, n_kv_heads=3, ffn_hidden=1024, cap_feat_dim=2560
)
TINY_LUMINA2 = NextDiTConfig(
    dim=192,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=1,
    ffn_hidden=768,
    cap_feat_dim=2304,
    t_hidden=192,
    adaln_dim=192,
    axes_dims=RULES[LUMINA2].axes_dims,
    rope_theta=RULES[LUMINA2].rope_theta,
    time_scale=RULES[LUMINA2].time_scale,
    modulation_silu=True,
    pad_tokens_multiple=None,
)
# The released models (ComfyUI's detection on their files): Z-Image 3840 wide, 30 layers; Lumina 2 2304, 26.
Z_IMAGE_FULL = NextDiTConfig()
_LUMINA2_WIDTHS = {"dim": 2304, "n_heads": 24, "n_kv_heads": 8, "ffn_hidden": 9216, "t_hidden": 1024, "adaln_dim": 1024}
LUMINA2_FULL = replace(TINY_LUMINA2, n_layers=26, n_refiner_layers=2, **_LUMINA2_WIDTHS)


def nextdit_sampling(variant: Variant, shift: float | None = None) -> ModelSampling:
    """ModelSamplingDiscreteFlow, multiplier 1 (the timestep is sigma), with the variant's shift by default."""
    return ModelSampling("const", discrete_flow_schedule(RULES[variant].shift if shift is None else shift, 1.0))


def infer_nextdit_config(shapes: Mapping[str, tuple[int, ...]]) -> tuple[NextDiTConfig, Variant]:
    """Config from un-prefixed key shapes: widths from the embedders, the head width from the QK-norm weight,
    key/value heads from the fused qkv, depths from the block indices, the variant from the block modulation."""
    if "layers.0.adaLN_modulation.0.weight" in shapes:
        variant, modulation = Z_IMAGE, "layers.0.adaLN_modulation.0.weight"
    elif "layers.0.adaLN_modulation.1.weight" in shapes:
        variant, modulation = LUMINA2, "layers.0.adaLN_modulation.1.weight"
    else:
        raise UnknownLayoutError("NextDiT key layers.0.adaLN_modulation.{0,1}.weight is missing")
    try:
        dim, cap_feat_dim = shapes["cap_embedder.1.weight"]
        head_dim = shapes["layers.0.attention.q_norm.weight"][0]
        qkv_rows = shapes["layers.0.attention.qkv.weight"][0]
        ffn_hidden = shapes["layers.0.feed_forward.w1.weight"][0]
        patched_in = shapes["x_embedder.weight"][1]
        t_hidden = shapes["t_embedder.mlp.0.weight"][0]
        adaln_dim = shapes[modulation][1]
    except KeyError as error:
        raise UnknownLayoutError(f"NextDiT key {error} is missing") from error
    rules = RULES[variant]
    if sum(rules.axes_dims) != head_dim:
        raise UnknownLayoutError(
            f"layers.0.attention.q_norm.weight: head width {head_dim}, but {variant.description}'s RoPE axes "
            f"{rules.axes_dims} need {sum(rules.axes_dims)}"
        )
    refiners = {name: len(key_indices(shapes, rf"{name}\.(\d+)\.")) for name in ("noise_refiner", "context_refiner")}
    if len(set(refiners.values())) != 1:
        raise UnknownLayoutError(f"noise and context refiners differ in depth: {refiners}")
    try:
        config = NextDiTConfig(
            dim=dim,
            n_layers=len(key_indices(shapes, r"layers\.(\d+)\.")),
            n_refiner_layers=refiners["noise_refiner"],
            n_heads=dim // head_dim,
            n_kv_heads=(qkv_rows - dim) // (2 * head_dim),
            ffn_hidden=ffn_hidden,
            in_channels=patched_in // 4,
            cap_feat_dim=cap_feat_dim,
            t_hidden=t_hidden,
            adaln_dim=adaln_dim,
            axes_dims=rules.axes_dims,
            rope_theta=rules.rope_theta,
            time_scale=rules.time_scale,
            modulation_silu=rules.modulation_silu,
            pad_tokens_multiple=PAD_TOKENS_MULTIPLE if "cap_pad_token" in shapes else None,
        )
    except ValueError as error:
        raise UnknownLayoutError(f"unsupported NextDiT layout: {error}") from error
    return config, variant


class NextDiTFamily(ModelFamily):
    name = "nextdit"
    variants = (Z_IMAGE, LUMINA2)
    markers = ("cap_embedder.1.weight", "noise_refiner.0.attention.k_norm.weight")
    foreign_layouts = {
        "all_x_embedder.": "a Z-Image transformer in its original/diffusers layout (use ComfyUI's single-file "
        "layout, e.g. Comfy-Org's repackaged file)",
        "time_caption_embed.": "a diffusers-format Lumina 2 transformer (use the single-file layout)",
    }
    number_fields = ()
    ignored_keys = ("norm_final.weight",)  # Lumina 2's original files: an RMSNorm its forward never uses
    config_type = NextDiTConfig
    demo_config = TINY_Z_IMAGE

    def infer_config(self, shapes):
        return infer_nextdit_config(shapes)

    def variant_of(self, config: NextDiTConfig) -> Variant:
        return LUMINA2 if config.modulation_silu else Z_IMAGE

    def build(self, config: NextDiTConfig) -> NextDiT:
        return NextDiT(config)

    def load_sampling(self, variant, config, read_tensor, keys, prediction):
        refuse_prediction_override(variant, prediction)
        return nextdit_sampling(variant)

    def run_sampling(self, variant, loaded, prediction, shift):
        refuse_prediction_override(variant, prediction)
        return loaded if shift is None else nextdit_sampling(variant, shift)

    def conditioning(self, variant, config: NextDiTConfig):
        return (ConditioningField("c_crossattn", config.cap_feat_dim, f"{RULES[variant].encoder} hidden states"),)

    def input_names(self, variant, config):
        return ("context",)

    def network_inputs(self, variant, config, conditioning, latent_hw, dtype, guidance):
        """The caption hidden states; ComfyUI's NextDiT ignores an attention mask, so none is passed."""
        return {"context": jnp.asarray(conditioning["c_crossattn"], dtype)}

    def adapter_names(self, variant, config: NextDiTConfig, layer_paths: Sequence[str]) -> AdapterNames:
        """ComfyUI's Lumina2 key map (`comfy/lora.py` with `z_image_to_diffusers`); `peft` writes those names."""
        split_qkv = config.n_kv_heads == config.n_heads
        exports = {
            style: {path: n for path in layer_paths if (n := export_names(path, config.dim, split_qkv, style))}
            for style in STYLES
        }
        return AdapterNames(import_aliases(layer_paths, config.dim, split_qkv), exports)

    def describe(self, config: NextDiTConfig):
        return [
            ("blocks", f"{config.n_layers} joint, {config.n_refiner_layers} noise + {config.n_refiner_layers} context"),
            (
                "width",
                f"{config.dim}, {config.n_heads} heads of {config.head_dim} ({config.n_kv_heads} kv), "
                f"ffn {config.ffn_hidden}",
            ),
            (
                "context",
                f"{config.cap_feat_dim}-d" + (f", padded to {pad}s" if (pad := config.pad_tokens_multiple) else ""),
            ),
        ]


NEXTDIT_FAMILY = NextDiTFamily()
