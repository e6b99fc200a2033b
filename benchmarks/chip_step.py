"""The trainer's step on the accelerator at hand (a GPU or a TPU): seconds per step, samples per second and MFU of a
full-size model with random weights, so no checkpoint or download is needed.

Run from the repository root, e.g.
    python benchmarks/chip_step.py --model sdxl --pixels 1024 --batch 1 --remat nothing_saveable off
Every combination of the listed options is one case, run in its own freshly spawned process (so each starts with
the device's memory empty); rows are printed as markdown as each case finishes.

The step is the trainer's own, set up by `prepare_run` and `compile_step` as `run_training` does: LoRA rank 16 with
fp32 masters, AdamW, bf16 frozen base, remat per block (`--remat`; "off" keeps every activation), attention as
`--attention` names it ("auto": what the trainer picks, cuDNN's fused kernel on a GPU, splash on a TPU). Weights are
drawn on the device (N(0, 0.02^2)); latents and captions are zeros: a step's cost does not depend on the values.
`--warmup` steps run first (the first call may autotune), then `--steps` steps are timed end to end, dispatched as
the trainer dispatches them, with one wait for the last step's outputs.

Columns:
- compile s: tracing, lowering and compiling the step.
- ms/step, samples/s: the timed steps.
- TFLOP: the step's matrix-product FLOPs (`perf.matmul_flops`, the count behind the trainer's MFU: every scanned
  block counted).
- MFU: achieved matrix-product FLOP/s over the device's peak (`perf.device_peak`: the published dense bf16 peak of
  a known accelerator, a measured fp32 matmul on a CPU).
- peak GiB: the device's peak memory in use over the case (from `memory_stats`, where the backend reports it).
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx
from fresh_process import in_fresh_process
from full_size import MODELS, add_case_options, markdown_row, step_config, training_batch

from jaxlora.dtypes import TRAINING_DTYPES
from jaxlora.models.diffusion import DiffusionModel, abstract_model
from jaxlora.train.config import TrainConfig
from jaxlora.train.loop import prepare_run
from jaxlora.train.perf import device_peak, matmul_flops
from jaxlora.train.step import compile_step, noise_key_data

GIB = 2**30
WEIGHT_STD = 0.02


@dataclass(frozen=True)
class Case:
    model: str
    pixels: int
    batch: int = 1
    remat: str = "nothing_saveable"
    attention: str = "auto"  # JAXLORA_ATTENTION: "auto" (the trainer's choice), "xla", "cudnn", "splash"
    dtype: str = "bf16"

    @property
    def config(self) -> TrainConfig:
        return step_config(self.batch, self.remat, training_dtype=self.dtype)

    @property
    def label(self) -> list[str]:
        return [self.model, f"{self.pixels}x{self.pixels}", str(self.batch), self.dtype, self.remat, self.attention]


LABELS = ("model", "pixels", "batch", "dtype", "remat", "attention")


def random_model(name: str, dtype: str, seed: int = 0) -> DiffusionModel:
    """A model of `MODELS[name]` whose frozen weights are drawn on the default device, in `dtype`: the real
    layout and sizes without a checkpoint file."""
    model = abstract_model(MODELS[name][0], dtype)
    graph, state = nnx.split(model.network)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    drawn = [
        (WEIGHT_STD * jax.random.normal(key, leaf.shape, jnp.float32)).astype(leaf.dtype)
        for key, leaf in zip(keys, leaves, strict=True)
    ]
    model.network = nnx.merge(graph, jax.tree.unflatten(treedef, drawn))
    return model


def run_case(case: Case, warmup: int, steps: int) -> dict:
    """Set the step up as the trainer does, compile it, run `warmup` steps, then time `steps` more."""
    os.environ["JAXLORA_ATTENTION"] = case.attention  # read when the step is traced (models.attention)
    config = case.config
    model = random_model(case.model, config.training_dtype)
    run = prepare_run(model, training_batch(model, case.model, case.pixels, case.batch), config)
    del model  # the base lives on in `run.base`
    micro = config.grad_accumulation_steps
    adapters, opt_state = run.adapters, run.opt_state

    def inputs(step: int) -> tuple:
        return run.base, run.data[0], noise_key_data(config.seed, step * micro, micro), run.perm_key, step * micro

    begin = time.perf_counter()
    traced = compile_step(run.graph, run.settings, run.layout).trace(adapters, opt_state, *inputs(0))
    flops = matmul_flops(traced.jaxpr)
    step_fn = traced.lower().compile()
    compile_s = time.perf_counter() - begin

    for step in range(warmup):
        adapters, opt_state, metrics = step_fn(adapters, opt_state, *inputs(step))
    jax.block_until_ready((adapters, opt_state, metrics))
    begin = time.perf_counter()
    for step in range(warmup, warmup + steps):
        adapters, opt_state, metrics = step_fn(adapters, opt_state, *inputs(step))
    jax.block_until_ready((adapters, opt_state, metrics))
    seconds = (time.perf_counter() - begin) / steps

    peak, _ = device_peak()
    memory = jax.devices()[0].memory_stats() or {}
    return {
        "compile s": compile_s,
        "ms/step": seconds * 1e3,
        "samples/s": case.batch / seconds,
        "TFLOP": flops / 1e12,
        "MFU": f"{flops / seconds / peak:.1%}" if peak else "-",
        "peak GiB": memory["peak_bytes_in_use"] / GIB if "peak_bytes_in_use" in memory else "-",
        "last loss": float(metrics["loss"][-1]),
    }


def device_line() -> str:
    device = jax.devices()[0]
    return f"jax {jax.__version__}, {device.device_kind} ({device.platform}), peak: {device_peak()[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_options(parser)
    parser.add_argument("--attention", nargs="+", choices=("auto", "xla", "cudnn", "splash"), default=["auto"])
    parser.add_argument("--dtype", nargs="+", choices=TRAINING_DTYPES, default=["bf16"])
    parser.add_argument("--warmup", type=int, default=3, help="steps run before the timed ones")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    args = parser.parse_args()
    print(in_fresh_process(device_line) + "\n")  # this process leaves the device alone: each case gets it whole
    combinations = itertools.product(args.model, args.pixels, args.batch, args.remat, args.attention, args.dtype)
    for index, values in enumerate(combinations):
        case = Case(*values)
        row = in_fresh_process(run_case, case, args.warmup, args.steps)
        print(markdown_row(case.label, row, LABELS if index == 0 else None), flush=True)


if __name__ == "__main__":
    main()
