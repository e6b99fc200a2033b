"""The Wan family: Wan 2.1 T2V (1.3B, 14B), Wan 2.2 T2V A14B (its high-noise and low-noise experts, each a Wan 2.1
14B-shaped file) and Wan 2.2 TI2V-5B (48-channel latents of the Wan 2.2 VAE), as ComfyUI loads them
(`supported_models.WAN21_T2V` and `WAN22_T2V`): flow prediction (CONST), ModelSamplingDiscreteFlow with shift 8
and multiplier 1000 (the network sees 1000 sigma), conditioned on umT5-XXL hidden states (4096-d, ComfyUI pads
them to 512 tokens with zeros past the prompt).

The variants are told apart by the output channels, as ComfyUI does (48: Wan 2.2 TI2V-5B and the Wan 2.2 latent
format; else Wan 2.1's format). The head width is 128 in every release (ComfyUI: `num_heads = dim // 128`).

The two Wan 2.2 A14B experts have identical shapes: the user picks one by the file they train, and trains it on
its own noise range (a run's `min_sigma`/`max_sigma`): the high-noise expert denoises sigma in [0.875, 1] (Wan's
T2V `boundary` 0.875 on the shifted schedule; 0.9 for I2V), the low-noise expert [0, 0.875], as musubi-tuner
(`--min_timestep 875 --max_timestep 1000` for the high-noise file) and ai-toolkit (`train_high_noise`,
`train_low_noise`) split them.

Refused with the key named: image-to-video files (Wan 2.1 I2V/FLF `img_emb.*` with CLIP-vision features, and any
file whose patch embedding takes more channels than the head returns: Wan 2.2 I2V's image latents and mask
concatenated to the noise), which need conditioning a ComfyUI training dataset does not carry; VACE, camera,
S2V, HuMo and Animate files (their extra modules).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
from jaxlora.models.sampling import LatentFormat, ModelSampling, discrete_flow_schedule
from jaxlora.models.wan import Wan, WanConfig
from jaxlora.models.wan_names import export_names, import_aliases

# comfy/latent_formats.py Wan21 and Wan22: per-channel mean and std of the VAE latents, scale 1.
WAN21_LATENT = LatentFormat(
    scale_factor=1.0,
    channel_mean=(
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    ),
    channel_std=(
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    ),
)  # fmt: skip
WAN22_LATENT = LatentFormat(
    scale_factor=1.0,
    channel_mean=(
        -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
        -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
        -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
        -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
        -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
        0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
    ),
    channel_std=(
        0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
        0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
        0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
        0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
        0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
        0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
    ),
)  # fmt: skip

WAN21 = Variant(
    "wan2.1-t2v",
    "Wan 2.1 T2V (or a Wan 2.2 A14B T2V expert)",
    WAN21_LATENT,
    "wan_2.1",
    "wan-2.1-t2v/lora",
    resolution=480,
)
WAN22_TI2V = Variant(
    "wan2.2-ti2v-5b", "Wan 2.2 TI2V-5B", WAN22_LATENT, "wan_2.2", "wan-2.2-ti2v-5b/lora", resolution=704
)
SHIFT = 8.0  # supported_models.WAN21_T2V sampling_settings (WAN22_T2V inherits it)
MULTIPLIER = 1000.0  # ModelSamplingDiscreteFlow's default: the timestep is 1000 sigma
WAN22_CHANNELS = 48
# Wan 2.2 A14B: the denoising boundary between its experts, as a fraction of the schedule (Wan's own
# `boundary`, musubi-tuner's `--timestep_boundary`, ai-toolkit's switch): sigma >= it is the high-noise expert's.
A14B_BOUNDARY = {"t2v": 0.875, "i2v": 0.9}
TEXT = "umT5-XXL"

# Every block kind at a size that compiles in seconds: two heads of the fixed width 128 and the real umT5 width.
TINY_WAN21 = WanConfig(dim=256, ffn_dim=512, num_layers=2)
TINY_WAN22_TI2V = WanConfig(dim=256, ffn_dim=512, num_layers=2, in_channels=48, out_channels=48)
# The released models (ComfyUI's detection on their files).
WAN21_1_3B = WanConfig()
WAN21_14B = WanConfig(dim=5120, ffn_dim=13824, num_layers=40)  # also each Wan 2.2 A14B T2V expert
WAN22_TI2V_5B = WanConfig(dim=3072, ffn_dim=14336, num_layers=30, in_channels=48, out_channels=48)

# Keys of Wan files this family does not train, and why.
UNSUPPORTED = {
    "img_emb.proj.0.bias": "a Wan 2.1 image-to-video (or first-last-frame) model: it conditions on CLIP-vision "
    "features and image latents a ComfyUI training dataset does not carry",
    "vace_patch_embedding.weight": "a Wan VACE model",
    "control_adapter.conv.weight": "a Wan camera-control model",
    "casual_audio_encoder.encoder.final_linear.weight": "a Wan 2.2 S2V model",
    "audio_proj.audio_proj_glob_1.layer.bias": "a Wan HuMo model",
    "face_adapter.fuser_blocks.0.k_norm.weight": "a Wan 2.2 Animate model",
}


def wan_sampling(shift: float | None = None) -> ModelSampling:
    """ModelSamplingDiscreteFlow, multiplier 1000, shift 8 by default."""
    return ModelSampling("const", discrete_flow_schedule(SHIFT if shift is None else shift, MULTIPLIER))


def infer_wan_config(shapes: Mapping[str, tuple[int, ...]]) -> tuple[WanConfig, Variant]:
    """Config from un-prefixed key shapes, as ComfyUI's `model_detection.py`: width from `head.modulation`, output
    channels from `head.head`, input channels from the patch embedding, text width from `text_embedding.0`, the
    feed-forward width from `blocks.0.ffn.0`, depth from the block indices."""
    for key, what in UNSUPPORTED.items():
        if key in shapes:
            raise UnknownLayoutError(f"{key}: this is {what}; jaxlora trains Wan text-to-video models")
    try:
        dim = shapes["head.modulation"][-1]
        out_rows = shapes["head.head.weight"][0]
        in_channels = shapes["patch_embedding.weight"][1]
        text_dim = shapes["text_embedding.0.weight"][1]
        ffn_dim = shapes["blocks.0.ffn.0.weight"][0]
    except KeyError as error:
        raise UnknownLayoutError(f"Wan key {error} is missing") from error
    out_channels = out_rows // 4
    if in_channels != out_channels:
        raise UnknownLayoutError(
            f"patch_embedding.weight takes {in_channels} channels for {out_channels} output channels: an "
            "image-to-video model (image latents and mask concatenated to the noise), which needs conditioning a "
            "ComfyUI training dataset does not carry; jaxlora trains Wan text-to-video models"
        )
    try:
        config = WanConfig(
            dim=dim,
            ffn_dim=ffn_dim,
            num_layers=len(key_indices(shapes, r"blocks\.(\d+)\.")),
            in_channels=in_channels,
            out_channels=out_channels,
            text_dim=text_dim,
        )
    except ValueError as error:
        raise UnknownLayoutError(f"unsupported Wan layout (head.modulation): {error}") from error
    return config, WAN_FAMILY.variant_of(config)


class WanFamily(ModelFamily):
    name = "wan"
    variants = (WAN21, WAN22_TI2V)
    markers = ("head.modulation", "patch_embedding.weight")
    foreign_layouts = {
        "condition_embedder.time_embedder.": "a diffusers-format Wan transformer (use the single-file layout, e.g. "
        "Comfy-Org's repackaged files)"
    }
    number_fields = ()
    video = True
    config_type = WanConfig
    demo_config = TINY_WAN21

    def infer_config(self, shapes):
        return infer_wan_config(shapes)

    def variant_of(self, config: WanConfig) -> Variant:
        return WAN22_TI2V if config.out_channels == WAN22_CHANNELS else WAN21

    def build(self, config: WanConfig) -> Wan:
        return Wan(config)

    def load_sampling(self, variant, config, read_tensor, keys, prediction):
        refuse_prediction_override(variant, prediction)
        return wan_sampling()

    def run_sampling(self, variant, loaded, prediction, shift):
        refuse_prediction_override(variant, prediction)
        return loaded if shift is None else wan_sampling(shift)

    def conditioning(self, variant, config: WanConfig):
        return (ConditioningField("c_crossattn", config.text_dim, f"{TEXT} hidden states"),)

    def input_names(self, variant, config):
        return ("context",)

    def network_inputs(self, variant, config, conditioning, latent_hw, dtype, guidance):
        """The umT5 hidden states as the dataset holds them (ComfyUI's encoder already pads them to 512)."""
        return {"context": jnp.asarray(conditioning["c_crossattn"], dtype)}

    def adapter_names(self, variant, config: WanConfig, layer_paths: Sequence[str]) -> AdapterNames:
        """ComfyUI's generic key map (Wan has no other): `comfyui` and `kohya` names; none in `peft`."""
        exports = {style: {path: n for path in layer_paths if (n := export_names(path, style))} for style in STYLES}
        return AdapterNames(import_aliases(layer_paths), exports)

    def describe(self, config: WanConfig):
        return [
            ("blocks", str(config.num_layers)),
            ("width", f"{config.dim}, {config.num_heads} heads of {config.head_dim}, ffn {config.ffn_dim}"),
            ("latents", f"{config.in_channels} channels, [C, T, H, W] video (patch 1x2x2)"),
            ("context", f"{config.text_dim}-d {TEXT}"),
        ]


WAN_FAMILY = WanFamily()
