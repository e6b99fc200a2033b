"""The full training step: its speed on this CPU, and XLA's memory and FLOP counts for full-size SD1.5 and SDXL.

Run from the repository root as `python benchmarks/train_step.py --section demo|sd15-32|abstract|compile|all`; prints
markdown for BENCHMARKS.md. The step is the trainer's own: set up by `prepare_run` (adapters and frozen base split),
`compile_step`, lowered and compiled per case as `run_training` does, with adapters and optimizer state donated.

- demo: the tiny UNet and data of `python -m jaxlora.train` (LoRA rank 4, batch 2, fp32), remat on and off.
- sd15-32: a full-size SD1.5 UNet with random weights, 32x32 latents, batch 1, 77 tokens, rank 16, AdamW;
  fp32 and bf16, remat on and off.
- abstract: SD1.5 and SDXL at 64x64 and 128x128 latents, bf16, rank 16, AdamW, remat on and off, lowered from
  `jax.ShapeDtypeStruct` inputs: nothing is allocated, only compiled and measured by XLA.
- compile: SDXL's abstract step (bf16, rank 16, AdamW, remat on) at `--compile-latent` (default 32x32), its
  transformer blocks scanned (`UNet(scan=True)`, the default) or unrolled (`--blocks`), `--repeats` times
  alternating: the tracing, lowering and XLA:CPU compile seconds the scan saves.

Every case runs in a freshly spawned process, so compiler memory and caches never carry over.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import jax
import numpy as np
from fresh_process import in_fresh_process, in_fresh_processes
from jax.experimental.serialize_executable import serialize
from load_and_forward import memory_kib, timed

from jaxlora import load_model
from jaxlora.models.demo import demo_dataset, write_random_checkpoint
from jaxlora.models.diffusion import DiffusionModel, abstract_model
from jaxlora.models.unet import SD15, SDXL, UNetConfig
from jaxlora.models.unet_family import DEMO_UNET
from jaxlora.train.config import TrainConfig
from jaxlora.train.data import Bucket, Dataset, make_bucket, make_dataset
from jaxlora.train.loop import prepare_run
from jaxlora.train.memory_plan import StepMemory
from jaxlora.train.perf import matmul_flops
from jaxlora.train.step import compile_step, noise_key_data, permutation_key

SECTIONS = ("demo", "sd15-32", "abstract", "compile")
UNETS = {"SD1.5": SD15, "SDXL": SDXL}
TOKENS = 77
GIB = 2**30


@dataclass(frozen=True)
class Case:
    """One train step to compile: a UNet shape, the latent side (square), and the node's settings."""

    model: str
    latent: int
    config: TrainConfig
    scan: bool = True  # transformer blocks run by scan (False: unrolled)

    @property
    def unet(self) -> UNetConfig:
        return DEMO_UNET if self.model == "demo" else UNETS[self.model]

    @property
    def label(self) -> list[str]:
        remat = self.config.remat_policy if self.config.gradient_checkpointing else "off"
        blocks = "scan" if self.scan else "unrolled"
        return [self.model, f"{self.latent}x{self.latent}", self.config.training_dtype, remat, blocks]


def random_bucket(unet: UNetConfig, latent: int, count: int = 1, seed: int = 0) -> Bucket:
    """`count` raw latents [N, 4, side, side] with one shared 77-token caption (and SDXL's pooled vector)."""
    rng = np.random.default_rng(seed)
    conditioning = {"c_crossattn": rng.standard_normal((1, TOKENS, unet.context_dim), np.float32)}
    if unet.adm_in_channels is not None:
        conditioning["pooled_output"] = rng.standard_normal((1, 1280), np.float32)
    return make_bucket(rng.standard_normal((count, unet.in_channels, latent, latent), np.float32), conditioning)


def prepare(model: DiffusionModel, bucket: Bucket, config: TrainConfig) -> tuple[jax.stages.Wrapped, list]:
    """The jitted step and its state [adapters, opt_state, base, data], set up by the trainer's own `prepare_run`
    (on `config.mesh`, each array placed onto its sharding; abstract weights get it as their layout)."""
    run = prepare_run(model, Dataset((bucket,)), config)
    return compile_step(run.graph, run.settings, run.layout), [run.adapters, run.opt_state, run.base, run.data[0]]


def trace(step: jax.stages.Wrapped, state: list, config: TrainConfig) -> tuple[jax.stages.Traced, dict]:
    """The step traced for `state` (no compile), with its matrix-product count (`perf.matmul_flops`: every
    scanned block counted, unlike XLA's cost analysis)."""
    micro = config.grad_accumulation_steps
    inputs = (*state, noise_key_data(config.seed, 0, micro), permutation_key(config.seed), 0)
    traced, trace_s = timed(lambda: step.trace(*inputs))
    return traced, {"trace s": trace_s, "matmul TFLOP": matmul_flops(traced.jaxpr) / 1e12}


def lower_and_compile(step: jax.stages.Wrapped, state: list, config: TrainConfig) -> tuple[jax.stages.Compiled, dict]:
    traced, row = trace(step, state, config)
    lowered, lower_s = timed(traced.lower)
    compiled, compile_s = timed(lowered.compile)
    return compiled, row | {"lower s": lower_s, "compile s": compile_s}


def xla_counts(compiled: jax.stages.Compiled) -> dict:
    """XLA's buffer sizes (GiB), the serialized executable's size and the FLOP count.

    "total" = arguments + outputs - donated aliases + temporaries: the device memory the step needs."""
    plan = StepMemory.of(compiled)
    sizes = {"args": plan.arguments, "out": plan.outputs, "alias": plan.aliased, "temp": plan.temporaries}
    sizes["total"] = plan.total
    row = {f"{name} GiB": size / GIB for name, size in sizes.items()}
    row["exe MiB"] = len(serialize(compiled)[0]) / 2**20  # XLA:CPU reports generated_code_size_in_bytes = 0
    row["TFLOP"] = compiled.cost_analysis()["flops"] / 1e12
    return row


def run_concrete(case: Case, checkpoint: Path, bucket: Bucket, steps: int) -> dict:
    """Load the checkpoint, compile the step, run 2 warm-up steps and `steps` timed ones (each blocked on).

    "step RSS" is the process's peak resident memory during the steps (VmHWM reset after compiling), "RSS added"
    that peak less the resident memory before the first step: what executing the step allocates."""
    config = case.config
    model = load_model(checkpoint, dtype=config.training_dtype)
    step, (adapters, opt_state, base, data) = prepare(model, bucket, config)
    compiled, row = lower_and_compile(step, [adapters, opt_state, base, data], config)
    counts = xla_counts(compiled)
    micro, perm_key, seconds = config.grad_accumulation_steps, permutation_key(config.seed), []
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark: measure the steps only
    before = memory_kib()["VmRSS"]
    for i in range(2 + steps):
        key_data = noise_key_data(config.seed, i * micro, micro)
        call = functools.partial(compiled, adapters, opt_state, base, data, key_data, perm_key, i * micro)
        (adapters, opt_state, metrics), elapsed = timed(call)
        seconds.append(elapsed)
    losses = np.asarray(metrics["loss"])
    assert np.isfinite(losses).all(), f"{case}: non-finite loss {losses}"
    per_step = statistics.median(seconds[2:])
    return row | {
        "first step s": seconds[0],
        "s/step": per_step,
        "samples/s": min(config.batch_size, bucket.size) * micro / per_step,
        "GFLOP/s": counts["TFLOP"] * 1e3 / per_step,
        "temp GiB": counts["temp GiB"],
        "step RSS GiB": memory_kib()["VmHWM"] / 2**20,
        "RSS added GiB": (memory_kib()["VmHWM"] - before) / 2**20,
    }


def run_abstract(case: Case) -> dict:
    """Lower from abstract inputs and compile; no weights, adapters or optimizer state are ever allocated."""
    config = case.config
    model = abstract_model(case.unet, config.training_dtype)
    model.network.scan = case.scan
    step, state = prepare(model, random_bucket(case.unet, case.latent), config)
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    compiled, row = lower_and_compile(step, state, config)
    return row | xla_counts(compiled)


def markdown_table(
    rows: list[tuple[Case, dict]], labels: tuple[str, ...] = ("model", "latent", "dtype", "remat", "blocks")
) -> str:
    """One row per case: its `label` cells under `labels`, then the measured values."""
    columns = [*labels, *rows[0][1]]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for case, row in rows:
        cells = case.label + [f"{value:.3g}" if value < 100 else f"{value:.0f}" for value in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def remat_on_off(case: Case) -> list[Case]:
    return [replace(case, config=replace(case.config, gradient_checkpointing=on)) for on in (True, False)]


def demo_section(steps: int) -> str:
    """`python -m jaxlora.train`'s demo: DEMO_UNET from a random fp32 checkpoint, its 8 synthetic latents."""
    bucket = make_dataset(*demo_dataset()).buckets[0]
    side = bucket.shape[1]
    base = Case("demo", side, TrainConfig(batch_size=2, rank=4, learning_rate=0.002, training_dtype="fp32"))
    with tempfile.TemporaryDirectory() as folder:
        path = write_random_checkpoint(DEMO_UNET, Path(folder) / "demo.safetensors")
        rows = [(case, in_fresh_process(run_concrete, case, path, bucket, steps)) for case in remat_on_off(base)]
    title = f"Demo UNet, {bucket.size} latents of {side}x{side}, batch 2, LoRA rank 4, AdamW, median of {steps} steps"
    return f"{title}\n\n{markdown_table(rows)}"


def sd15_section(steps: int) -> str:
    """A full-size SD1.5 UNet with random weights, trained at 32x32 latents (256 px) in fp32 and bf16."""
    bucket = random_bucket(SD15, 32)
    cases = [
        case
        for dtype in ("fp32", "bf16")
        for case in remat_on_off(Case("SD1.5", 32, TrainConfig(rank=16, training_dtype=dtype)))
    ]
    with tempfile.TemporaryDirectory() as folder:
        path = in_fresh_process(write_random_checkpoint, SD15, Path(folder) / "sd15.safetensors")
        rows = [(case, in_fresh_process(run_concrete, case, path, bucket, steps)) for case in cases]
    title = f"SD1.5 UNet (random weights), batch 1, 77 tokens, LoRA rank 16, AdamW, median of {steps} steps"
    return f"{title}\n\n{markdown_table(rows)}"


def abstract_section(models: list[str], latents: list[int], jobs: int) -> str:
    """Each compile in its own spawned process, `jobs` at a time (XLA:CPU compiles on about one core)."""
    cases = [
        case
        for model in models
        for latent in latents
        for case in remat_on_off(Case(model, latent, TrainConfig(rank=16, training_dtype="bf16")))
    ]
    # the largest first, so that the cases compiled side by side end together
    rows = in_fresh_processes(run_abstract, [(case,) for case in cases[::-1]], jobs)[::-1]
    title = f"Abstract compiles, {jobs} at a time: batch 1, 77 tokens, bf16, LoRA rank 16 (fp32 masters), AdamW"
    return f"{title}\n\n{markdown_table(list(zip(cases, rows, strict=True)))}"


def compile_section(latent: int, blocks: list[str], repeats: int) -> str:
    """SDXL's step with its transformer blocks scanned and unrolled, one compile at a time in its own process,
    the variants alternating so that a change in the machine's load reaches both alike."""
    config = TrainConfig(rank=16, training_dtype="bf16")
    cases = [Case("SDXL", latent, config, scan=kind == "scan") for _ in range(repeats) for kind in blocks]
    rows = []
    for case in cases:
        rows.append((case, in_fresh_process(run_abstract, case)))
        print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)  # progress: one compile can take minutes
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    title = f"SDXL compile time: batch 1, 77 tokens, bf16, LoRA rank 16, AdamW, remat on; load average {load}"
    return f"{title}\n\n{markdown_table(rows)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=(*SECTIONS, "all"), default="all")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case (sd15-32; the demo runs 4x)")
    parser.add_argument("--models", nargs="+", choices=list(UNETS), default=list(UNETS), help="abstract section")
    parser.add_argument("--latents", nargs="+", type=int, default=[64, 128], help="abstract section, latent sides")
    parser.add_argument("--jobs", type=int, default=1, help="abstract section, compiles at a time")
    parser.add_argument("--compile-latent", type=int, default=32, help="compile section, latent side")
    parser.add_argument("--blocks", nargs="+", choices=("scan", "unrolled"), default=["scan", "unrolled"])
    parser.add_argument("--repeats", type=int, default=1, help="compile section, rounds of --blocks")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, devices {jax.devices()}, {os.cpu_count()} CPU cores\n")
    sections = SECTIONS if args.section == "all" else (args.section,)
    if "demo" in sections:
        print(demo_section(4 * args.steps) + "\n")
    if "sd15-32" in sections:
        print(sd15_section(args.steps) + "\n")
    if "abstract" in sections:
        print(abstract_section(args.models, args.latents, args.jobs) + "\n")
    if "compile" in sections:
        print(compile_section(args.compile_latent, args.blocks, args.repeats) + "\n")


if __name__ == "__main__":
    main()
