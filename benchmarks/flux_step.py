"""The full-size Flux.1-dev (or Chroma) train step compiled from abstract inputs: XLA's memory and FLOP counts,
the compile time of the scanned block stacks against unrolled blocks, and the step's matrix-product FLOPs.

Run from the repository root as `python benchmarks/flux_step.py --section memory|compile|flops|all`, with
`--model chroma` and `--latent 64` to choose; prints markdown for BENCHMARKS.md. The step is the trainer's own
(`prepare` and `lower_and_compile` of train_step.py): LoRA rank 16 with fp32 masters, AdamW, bf16 frozen base
given as `jax.ShapeDtypeStruct`s, batch 1, 512 T5 tokens (and the pooled vector where the model takes one).
Nothing is allocated; each case compiles in a freshly spawned process.

- memory: 512x512 and 1024x1024 pixels (latents 64x64 and 128x128, 16 channels), remat per block on and off.
- compile: 512x512, remat on, blocks scanned vs unrolled (19 double and 38 single blocks).
- flops: 512x512 and 1024x1024, remat on and off, traced only (no compile): `perf.matmul_flops` of the step,
  the count the trainer's MFU uses.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import jax
import numpy as np
from fresh_process import in_fresh_process
from load_and_forward import timed
from train_step import lower_and_compile, markdown_table, prepare, trace, xla_counts

from jaxlora.models.chroma import CHROMA
from jaxlora.models.diffusion import abstract_model
from jaxlora.models.flux import FLUX_DEV
from jaxlora.train.config import TrainConfig
from jaxlora.train.data import make_bucket

SECTIONS = ("memory", "compile", "flops")
TOKENS = 512
MODELS = {"flux-dev": ("Flux.1-dev", FLUX_DEV), "chroma": ("Chroma", CHROMA)}


@dataclass(frozen=True)
class Case:
    latent: int
    remat: bool
    scan: bool = True
    model: str = "flux-dev"

    @property
    def config(self) -> TrainConfig:
        return TrainConfig(rank=16, training_dtype="bf16", gradient_checkpointing=self.remat)

    @property
    def label(self) -> list[str]:
        pixels = 8 * self.latent
        return [f"{pixels}x{pixels}", "on" if self.remat else "off", "scan" if self.scan else "unrolled"]


def run_case(case: Case, compile_step: bool = True) -> dict:
    config = case.config
    network_config = MODELS[case.model][1]
    model, building_s = timed(lambda: abstract_model(network_config, config.training_dtype))
    model.network.scan = case.scan
    conditioning = {
        field.name: np.zeros((1, TOKENS, field.width) if field.name == "c_crossattn" else (1, field.width), np.float32)
        for field in model.conditioning_fields
    }
    latents = np.zeros((1, network_config.in_channels, case.latent, case.latent), np.float32)
    bucket = make_bucket(latents, conditioning)
    (step, state), prepare_s = timed(lambda: prepare(model, bucket, config))
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    if not compile_step:
        return {"adapters s": prepare_s + building_s} | trace(step, state, config)[1]
    compiled, row = lower_and_compile(step, state, config)
    return {"adapters s": prepare_s + building_s} | row | xla_counts(compiled)


def run_all(cases: list[Case], title: str, compile_step: bool = True) -> None:
    """Print the table row by row as each case finishes (a full-size unrolled compile can take very long)."""
    print(f"{title}\n")
    labels = ("pixels", "remat", "blocks")
    for index, case in enumerate(cases):
        table = markdown_table([(case, in_fresh_process(run_case, case, compile_step))], labels)
        print("\n".join(table.splitlines()[2 * bool(index) :]), flush=True)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=(*SECTIONS, "all"), default="all")
    parser.add_argument("--model", choices=tuple(MODELS), default="flux-dev")
    parser.add_argument("--latent", type=int, nargs="+", default=[64, 128], help="latent sizes of the memory section")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, devices {jax.devices()}, {os.cpu_count()} CPU cores\n")
    sections = SECTIONS if args.section == "all" else (args.section,)
    title = (
        f"{MODELS[args.model][0]}, abstract compile: bf16 base, LoRA rank 16 (fp32 masters), AdamW, batch 1, "
        f"{TOKENS} tokens"
    )
    if "memory" in sections:
        cases = [Case(latent, remat, model=args.model) for latent in args.latent for remat in (True, False)]
        run_all(cases, title)
    if "compile" in sections:
        run_all([Case(64, True, scan, args.model) for scan in (True, False)], title + ", scanned vs unrolled")
    if "flops" in sections:
        cases = [Case(latent, remat, model=args.model) for latent in args.latent for remat in (True, False)]
        run_all(cases, title + ", traced only", compile_step=False)


if __name__ == "__main__":
    main()
