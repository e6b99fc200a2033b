"""The full-size models the chip benchmarks train (`tpu_aot.py` compiles their step for TPUs from abstract inputs,
`chip_step.py` runs it on the accelerator at hand), and the batch of latents and captions each step takes."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

import numpy as np

from jaxlora.models.diffusion import DiffusionModel
from jaxlora.models.flux import FLUX_DEV
from jaxlora.models.unet import SD15, SDXL
from jaxlora.models.unet_family import DEMO_UNET
from jaxlora.train.config import TrainConfig
from jaxlora.train.data import Dataset, make_bucket

# name -> (network config, caption tokens); "tiny-flux" is a two-block Flux for a quick check of the whole path
MODELS: dict[str, tuple[Any, int]] = {
    "demo": (DEMO_UNET, 77),
    "sd15": (SD15, 77),
    "sdxl": (SDXL, 77),
    "flux-dev": (FLUX_DEV, 512),
    "tiny-flux": (
        replace(FLUX_DEV, hidden_size=256, num_heads=2, mlp_hidden=512, depth=1, depth_single_blocks=1),
        64,
    ),
}


def step_config(batch: int, remat: str, **settings) -> TrainConfig:
    """The benchmarks' run: LoRA rank 16 (fp32 masters, AdamW, the defaults) at `batch`, remat per block with the
    `remat` policy ("off": none), and the given TrainConfig `settings`."""
    on = remat != "off"
    return TrainConfig(
        rank=16,
        batch_size=batch,
        gradient_checkpointing=on,
        remat_policy=remat if on else "nothing_saveable",
        **settings,
    )


def training_batch(model: DiffusionModel, name: str, pixels: int, batch: int) -> Dataset:
    """One bucket of `batch` square latents of `pixels` and captions of the model's training length (zeros: what
    the step costs does not depend on the values)."""
    network_config, tokens = MODELS[name]
    conditioning = {
        field.name: np.zeros((1, tokens, field.width) if field.name == "c_crossattn" else (1, field.width), np.float32)
        for field in model.conditioning_fields
    }
    latent = pixels // 8
    latents = np.zeros((batch, network_config.in_channels, latent, latent), np.float32)
    return Dataset((make_bucket(latents, conditioning),))


def add_case_options(parser: argparse.ArgumentParser) -> None:
    """The options both chip benchmarks take; each lists values, and every combination is one case."""
    parser.add_argument("--model", nargs="+", choices=list(MODELS), default=["sdxl"])
    parser.add_argument("--pixels", nargs="+", type=int, default=[1024])
    parser.add_argument("--batch", nargs="+", type=int, default=[1])
    parser.add_argument("--remat", nargs="+", default=["nothing_saveable"], help='a remat policy, or "off"')


def markdown_row(labels: list[str], row: dict, header: tuple[str, ...] | None = None) -> str:
    """A case's row of a markdown table (its `labels`, then the measured `row`), below the table's header when
    `header` names the label columns."""
    cells = [v if isinstance(v, str) else f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}" for v in row.values()]
    lines = [f"| {' | '.join(labels + cells)} |"]
    if header is not None:
        columns = [*header, *row]
        lines[:0] = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    return "\n".join(lines)
