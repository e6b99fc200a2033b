"""The cost of one validation pass against one training step, both the trainer's own (`prepare_run` with a
held-out dataset, `compile_step`, `train.validation.Validation`), on the built-in demo UNet (CPU-sized).

Run from the repository root as `python benchmarks/validation.py [--held-out 8] [--repeats 5]`; prints a
markdown row for BENCHMARKS.md. The training step takes one batch forward and backward and updates the adapter;
a validation pass runs the forward only, over every held-out sample in chunks of the batch size.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import jax
from load_and_forward import timed

from jaxlora import load_model
from jaxlora.models.demo import demo_dataset, write_random_checkpoint
from jaxlora.models.unet_family import DEMO_UNET
from jaxlora.train.config import TrainConfig
from jaxlora.train.data import make_dataset
from jaxlora.train.loop import prepare_run
from jaxlora.train.step import compile_step, noise_key_data


def measure(held_out: int, repeats: int, config: TrainConfig) -> dict[str, float]:
    """Median seconds of a training step and of a validation pass (after a first, compiling call of each)."""
    with tempfile.TemporaryDirectory() as folder:
        model = load_model(write_random_checkpoint(DEMO_UNET, Path(folder) / "demo.safetensors"), "fp32")
    latents, context = demo_dataset(8 + held_out)
    shared = context.shape[0] == 1  # one caption for all samples
    train = make_dataset(latents[:8], context if shared else context[:8])
    held = make_dataset(latents[8:], context if shared else context[8:])
    run = prepare_run(model, train, config, validation=held)
    step = compile_step(run.graph, run.settings)
    adapters, opt_state = run.adapters, run.opt_state

    def train_step(i: int):
        nonlocal adapters, opt_state
        adapters, opt_state, metrics = step(
            adapters, opt_state, run.base, run.data[0], noise_key_data(config.seed, i, 1), run.perm_key, i
        )
        return metrics

    seconds = {"step": [], "validation": []}
    for i in range(repeats + 1):
        _, step_seconds = timed(lambda i=i: train_step(i))
        _, validation_seconds = timed(lambda: run.validation(adapters, run.base))
        if i:  # the first calls compile
            seconds["step"].append(step_seconds)
            seconds["validation"].append(validation_seconds)
    return {name: statistics.median(values) for name, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held-out", type=int, default=8, help="held-out samples")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = TrainConfig(batch_size=2, rank=4, learning_rate=0.002, training_dtype="fp32")
    result = measure(args.held_out, args.repeats, config)
    chunks = -(-args.held_out // config.batch_size)
    ratio = result["validation"] / result["step"]
    print(f"backend {jax.default_backend()}, {args.repeats} repeats, medians")
    print("| model | batch | held-out samples | step ms | validation pass ms | pass / step | per chunk / step |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| demo UNet (fp32, LoRA rank 4) | {config.batch_size} | {args.held_out} | {1000 * result['step']:.1f} | "
        f"{1000 * result['validation']:.1f} | {ratio:.2f} | {ratio / chunks:.2f} |"
    )


if __name__ == "__main__":
    main()
