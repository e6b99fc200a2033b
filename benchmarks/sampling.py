"""The cost of sampling images during training, against a training step, on the demo model.

Run from the repository root as `python benchmarks/sampling.py [--steps 20] [--train-steps 40]`; prints markdown
for BENCHMARKS.md. The demo UNet and data of `python -m jaxlora.train` (LoRA rank 4, batch 2, fp32) train
`--train-steps` steps through `run_training` with the sample hook `train.samples.ImageSamples` called at the
middle and at the end: the first call compiles, the second is timed. One prompt (a random caption embedding: the
text encoders run once before training and are not part of a pass), `--steps` sampler steps, the full-size
SD VAE (random weights, 84M parameters) decoding the 16x16 latents to 128x128 pixels. Each sampler/CFG case
is a separate run; training's seconds per step leave sampling out.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from jaxlora import load_model
from jaxlora.encoders.loading import load_vae
from jaxlora.encoders.vae import SD_VAE, AutoencoderKL
from jaxlora.models.demo import demo_dataset, random_network_tensors, write_random_checkpoint
from jaxlora.models.unet_family import DEMO_UNET
from jaxlora.train.__main__ import DEMO_SETTINGS
from jaxlora.train.config import TrainConfig
from jaxlora.train.data import make_dataset
from jaxlora.train.loop import run_training
from jaxlora.train.sample_prompts import SamplePrompt
from jaxlora.train.samples import ImageSamples, SampleSettings


def measure(folder: Path, sampler: str, cfg: float, steps: int, train_steps: int) -> list[str]:
    model = load_model(folder / "demo.safetensors", "fp32")
    vae = load_vae(folder / "vae.safetensors", "fp32")
    rng = np.random.default_rng(0)
    caption = {"c_crossattn": rng.standard_normal((1, 8, 768)).astype(np.float32)}
    negative = None if cfg == 1.0 else [caption]
    settings = SampleSettings(steps=steps, sampler=sampler, cfg=cfg)
    hook = ImageSamples(model, [SamplePrompt("p")], [caption], negative, vae, settings, (16, 16), folder / sampler)
    seconds = []

    def timed(total, run, adapters):
        begin = time.perf_counter()
        hook(total, run, adapters)
        seconds.append(time.perf_counter() - begin)

    config = TrainConfig(**{**DEMO_SETTINGS, "steps": train_steps})
    result = run_training(
        model,
        make_dataset(*demo_dataset()),
        config,
        sample_every=train_steps // 2,
        on_sample=timed,
        progress=lambda line: None,
    )
    step = result.stats.seconds_per_step
    return [
        sampler,
        f"{cfg:g}",
        str(steps),
        f"{step * 1000:.1f}",
        f"{seconds[0]:.2f}",
        f"{seconds[1]:.3f}",
        f"{seconds[1] / step:.0f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--train-steps", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        write_random_checkpoint(DEMO_UNET, folder / "demo.safetensors")
        save_file(random_network_tensors(AutoencoderKL(SD_VAE), 1), str(folder / "vae.safetensors"))
        rows = [
            measure(folder, s, c, args.steps, args.train_steps)
            for s, c in (("euler", 1.0), ("euler", 8.0), ("dpmpp_2m", 8.0))
        ]
    print(f"load average at the end: {os.getloadavg()[0]:.1f}\n")
    print("| sampler | cfg | steps | train step ms | compile + first pass s | pass s | pass / train step |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
