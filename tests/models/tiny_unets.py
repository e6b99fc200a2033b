"""Tiny UNets of each family that follow the family's real rules (context width, head rule, projections, y),
with the matching diffusers config for the oracle."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp

from jaxlora.models.checkpoint import set_parameters
from jaxlora.models.demo import random_tensors
from jaxlora.models.unet import UNet, UNetConfig
from jaxlora.models.unet_family import DEMO_UNET, TINY_SD1


@dataclass(frozen=True)
class TinyFamily:
    name: str
    config: UNetConfig
    diffusers_config: dict

    def write_diffusers_config(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(
            json.dumps({"_class_name": "UNet2DConditionModel", **self.diffusers_config})
        )
        return folder


_COMMON = {
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "sample_size": 32,
}

SD1 = TinyFamily(
    "sd1",
    TINY_SD1,
    {
        **_COMMON,
        "attention_head_dim": 8,  # diffusers' name for the head count of SD1.x
        "block_out_channels": [32, 64, 64],
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    },
)

SD2 = TinyFamily(
    "sd2",
    UNetConfig(
        in_channels=4,
        out_channels=4,
        model_channels=64,
        channel_mult=(1, 2, 2),
        num_res_blocks=(2, 2, 2),
        transformer_depth=(1, 1, 1, 1, 0, 0),
        transformer_depth_middle=1,
        transformer_depth_output=(0, 0, 0, 1, 1, 1, 1, 1, 1),
        context_dim=1024,
        num_head_channels=64,
        use_linear_in_transformer=True,
    ),
    {
        **_COMMON,
        "attention_head_dim": [1, 2, 2],  # head counts at head width 64
        "block_out_channels": [64, 128, 128],
        "cross_attention_dim": 1024,
        "use_linear_projection": True,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    },
)

SDXL = TinyFamily(
    "sdxl",
    UNetConfig(
        in_channels=4,
        out_channels=4,
        model_channels=64,
        channel_mult=(1, 2, 2),
        num_res_blocks=(2, 2, 2),
        transformer_depth=(0, 0, 1, 1, 2, 2),
        transformer_depth_middle=2,
        transformer_depth_output=(2, 2, 2, 1, 1, 1, 0, 0, 0),
        context_dim=2048,
        num_head_channels=64,
        use_linear_in_transformer=True,
        adm_in_channels=2816,
    ),
    {
        **_COMMON,
        "attention_head_dim": [1, 2, 2],
        "block_out_channels": [64, 128, 128],
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "transformer_layers_per_block": [1, 1, 2],
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    },
)

FAMILIES = {family.name: family for family in (SD1, SD2, SDXL)}


MINIMAL = DEMO_UNET  # two levels, one ResBlock each: quick to compile a backward pass


def loaded_unet(config, dtype=jnp.float32):
    network = UNet(config)
    set_parameters(network, random_tensors(network.config, seed=3), dtype)
    return network
