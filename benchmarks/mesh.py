"""Sharded training on a device mesh: per-device memory of full-size models, and step-time overhead on this CPU.

Run from the repository root as `python benchmarks/mesh.py --section memory|scaling|all`; prints markdown for
BENCHMARKS.md. The process simulates 8 CPU devices (`--xla_force_host_platform_device_count=8`).

- memory: the trainer's step for a full-size model (`--model`, any of `train_step.UNETS`), lowered from abstract
  inputs (`jax.ShapeDtypeStruct`s carrying their shardings: no weights are allocated), compiled, and measured by
  XLA's memory analysis, which reports what one device holds. One sample per device; the base split 1, 4 and 8
  ways (`data=8` replicates it, `data=2,fsdp=4` splits it over 4 devices, `fsdp=8` over 8).
- weights: the frozen base's bytes per device for a full-size model, from the rule table applied to its
  abstract parameter shapes (each weight's shard shape under its sharding); no compile.
- scaling: the demo UNet trained with a global batch of 8 on one device and on meshes of 8 simulated devices.
  The simulated devices share this machine's cores, so compute does not speed up: the rows show what sharding
  costs (collectives, partitioned programs), not what it gains on real chips.

Every case runs in a freshly spawned process, as in train_step.py.
"""

from __future__ import annotations

import os

# LLVM's optimisation passes change neither XLA's buffer assignment (the memory figures) nor the numerics; without
# them a full-size SPMD step compiles in minutes instead of much longer on a small CPU.
CPU_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", CPU_FLAGS) + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
from flax import nnx  # noqa: E402
from fresh_process import in_fresh_process  # noqa: E402
from train_step import (  # noqa: E402
    UNETS,
    Case,
    abstract_model,
    demo_dataset,
    markdown_table,
    run_abstract,
    run_concrete,
)

from jaxlora.models.demo import write_random_checkpoint  # noqa: E402
from jaxlora.models.unet_family import DEMO_UNET  # noqa: E402
from jaxlora.parallel.mesh import base_shardings, make_mesh  # noqa: E402
from jaxlora.train.config import TrainConfig  # noqa: E402
from jaxlora.train.data import make_dataset  # noqa: E402

MEMORY_MESHES = ("data=8", "data=2,fsdp=4", "fsdp=8")
SCALING_MESHES = ("none", "data=8", "fsdp=8", "data=2,fsdp=4")


def with_mesh(rows: list[tuple[Case, dict]]) -> str:
    """train_step's table with the mesh as the first column."""
    table = markdown_table(rows).splitlines()
    meshes = ["mesh", "---"] + [case.config.mesh or "one device" for case, _ in rows]
    return "\n".join(f"| {mesh} {line}" for mesh, line in zip(meshes, table, strict=True))


def memory_section(model: str, latent: int) -> str:
    """One sample per device (batch = devices), bf16 base, LoRA rank 16 with fp32 masters, AdamW, remat."""
    cases = [
        Case(model, latent, TrainConfig(rank=16, training_dtype="bf16", batch_size=jax.device_count(), mesh=mesh))
        for mesh in MEMORY_MESHES
    ]
    rows = []
    for case in cases:
        rows.append((case, in_fresh_process(run_abstract, case)))
        print(with_mesh(rows[-1:]), flush=True)  # progress: each row as it is measured
    title = (
        f"{model} step, abstract compile, latent {latent}x{latent}, one sample per device, 77 tokens, bf16, "
        "LoRA rank 16, AdamW, remat nothing_saveable; sizes per device"
    )
    return f"{title}\n\n{with_mesh(rows)}"


def weights_section(model: str) -> str:
    """Bytes of the bf16 base one device holds with the base split 1, 2, 4 and 8 ways (sum of shard shapes)."""
    base = nnx.state(abstract_model(UNETS[model], jax.numpy.bfloat16).network, nnx.Param)
    leaves = jax.tree.leaves(base)
    total = sum(leaf.size * leaf.dtype.itemsize for leaf in leaves)
    lines = ["| fsdp | mesh | base GiB per device | x whole base |", "|---|---|---|---|"]
    for fsdp in (1, 2, 4, 8):
        spec = f"data={jax.device_count() // fsdp},fsdp={fsdp}"
        shardings = jax.tree.leaves(base_shardings(make_mesh(spec), base))
        held = sum(
            math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
            for leaf, sharding in zip(leaves, shardings, strict=True)
        )
        lines.append(f"| {fsdp} | {spec} | {held / 2**30:.3f} | {held / total:.3f} |")
    return f"{model} frozen base, bf16, {total / 2**30:.3f} GiB whole\n\n" + "\n".join(lines)


def scaling_section(steps: int, meshes: list[str]) -> str:
    """The demo UNet from a random fp32 checkpoint, 8 latents of 16x16, batch 8, LoRA rank 4, AdamW."""
    bucket = make_dataset(*demo_dataset()).buckets[0]
    config = TrainConfig(batch_size=8, rank=4, learning_rate=0.002, training_dtype="fp32")
    cases = [Case("demo", bucket.shape[1], replace(config, mesh=None if m == "none" else m)) for m in meshes]
    with tempfile.TemporaryDirectory() as folder:
        path = write_random_checkpoint(DEMO_UNET, Path(folder) / "demo.safetensors")
        rows = [(case, in_fresh_process(run_concrete, case, path, bucket, steps)) for case in cases]
    keep = ("compile s", "first step s", "s/step", "samples/s")
    rows = [(case, {k: row[k] for k in keep}) for case, row in rows]
    title = f"Demo UNet, batch 8 (global), LoRA rank 4, AdamW, fp32, median of {steps} steps, 8 simulated devices"
    return f"{title}\n\n{with_mesh(rows)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=("weights", "memory", "scaling", "all"), default="all")
    parser.add_argument("--model", choices=list(UNETS), default="SDXL", help="memory section: the full-size model")
    parser.add_argument("--latent", type=int, default=128, help="memory section: latent side (128 = 1024 px)")
    parser.add_argument("--steps", type=int, default=10, help="scaling section: timed steps per mesh")
    parser.add_argument("--meshes", nargs="+", default=SCALING_MESHES, help="scaling section ('none': one device)")
    args = parser.parse_args()
    platform = jax.devices()[0].platform
    print(f"jax {jax.__version__}, {jax.device_count()} {platform} devices, {os.cpu_count()} cores\n")
    if args.section in ("weights", "all"):
        print(weights_section(args.model) + "\n")
    if args.section in ("memory", "all"):
        print(memory_section(args.model, args.latent) + "\n")
    if args.section in ("scaling", "all"):
        print(scaling_section(args.steps, args.meshes) + "\n")


if __name__ == "__main__":
    main()
