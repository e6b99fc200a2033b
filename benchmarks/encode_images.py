"""Encoding captioned images for a dataset: images/s of the full-size VAE encoders and captions/s of the text towers
on this machine, through the same jitted functions `make_image_dataset` uses.

Run from the repository root as
`python benchmarks/encode_images.py [--images 1] [--captions 2] [--sides 512 1024]`; prints markdown for
BENCHMARKS.md. Weights are random at the real sizes (SD VAE 84M parameters at 512 and 1024 px; CLIP-L 123M;
OpenCLIP bigG 695M): the speed does not depend on the values. Compile time is reported apart: the first call.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.encoders.clip import CLIP_L, OPEN_CLIP_BIG_G, CLIPTextModel
from jaxlora.encoders.make_dataset import IMAGES_PER_CALL, _vae_function
from jaxlora.encoders.text import ROWS_PER_CALL, _tower_function
from jaxlora.encoders.vae import SD_VAE, AutoencoderKL
from jaxlora.models.checkpoint import set_parameters
from jaxlora.models.demo import random_network_tensors
from jaxlora.models.family import TextTower


def random_network(network: nnx.Module) -> nnx.Module:
    """Fill an abstract network with random weights through the checkpoint loader's own reader."""
    set_parameters(network, random_network_tensors(network), jnp.float32)
    return network


def timed_calls(call, batch, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, seconds per later call)."""
    started = time.perf_counter()
    jax.block_until_ready(call(batch))
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(call(batch))
    return first, (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1, help="timed VAE batches after the first")
    parser.add_argument("--captions", type=int, default=2, help="timed text batches after the first")
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 1024], help="image sides in pixels")
    args = parser.parse_args()
    print("| encoder | input | batch | compile + first call (s) | per batch (s) | per item/s |")
    print("|---|---|---|---|---|---|")
    vae = _vae_function(random_network(AutoencoderKL(SD_VAE)))
    for side in args.sides:
        images = np.random.default_rng(0).uniform(0, 1, (IMAGES_PER_CALL, side, side, 3)).astype(np.float32)
        first, each = timed_calls(vae, images, args.images)
        print(
            f"| SD VAE encoder (fp32) | {side}x{side} px | {IMAGES_PER_CALL} | {first:.1f} | {each:.1f} | "
            f"{IMAGES_PER_CALL / each:.2f} images/s |"
        )
    tokens = np.zeros((ROWS_PER_CALL, 77), np.int32)
    for name, config, tower in (
        ("CLIP-L", CLIP_L, TextTower("l")),
        ("OpenCLIP bigG", OPEN_CLIP_BIG_G, TextTower("g", layer=-2, normed=False)),
    ):
        run = _tower_function(random_network(CLIPTextModel(config)), tower, end=49407)
        first, each = timed_calls(run, tokens, args.captions)
        print(
            f"| {name} (fp32) | 77 tokens | {ROWS_PER_CALL} | {first:.1f} | {each:.2f} | "
            f"{ROWS_PER_CALL / each:.1f} captions/s |"
        )


if __name__ == "__main__":
    main()
