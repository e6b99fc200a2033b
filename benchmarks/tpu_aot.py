"""The trainer's own step compiled for TPU chips without a TPU: XLA:TPU's per-chip memory, the step's FLOPs and a
roofline lower bound on its time.

XLA's TPU compiler (libtpu) runs on a CPU-only machine: the step is lowered from abstract inputs whose shardings
name the devices of a TPU topology description (`jax.experimental.topologies`), compiled, and measured by the
compiler's own buffer assignment. Nothing is allocated and no TPU is needed. Install the compiler with
`pip install -e ".[tpu]"` (it is also in the `test` extra); this script pins `JAX_PLATFORMS=cpu`, so libtpu is used
only as a compiler.

Run from the repository root, e.g.
    python benchmarks/tpu_aot.py --model flux-dev --pixels 1024 --chip v5e v6e --quantization none int8
Every combination of the listed options is one case, compiled in its own freshly spawned process; rows are printed
as markdown as each case finishes.

The step is set up by the trainer's `prepare_run` and `compile_step`: LoRA rank 16 with fp32 masters, AdamW,
bf16 frozen base (or int8 / fp8 stored: `--quantization`; the node's quantized_backward: `--quantized-backward on`,
"+qbwd" in the base column), remat per block (`--remat`; "off" disables it), the
prompt lengths the models train with (77 CLIP tokens, 512 T5 tokens). `--fsdp N` splits the frozen base over N chips
of the topology (`fsdp=N` mesh, one sample per chip at least); `--data N` replicates it on N chips, each training
its share of the batch (`data=N`; with both, `data=D,fsdp=F` on D x F chips); sizes are what one chip holds.
`--attention splash` is what the trainer picks on a TPU (`jaxlora.models.attention`), `xla` XLA's own attention.

Columns:
- args / temp / total GiB: XLA's buffer assignment per chip; total = arguments + outputs - donated aliases +
  temporaries, the memory the step needs. "fits" compares it with the chip's HBM.
- host GiB: what the step keeps in the host's memory instead (`--offloading on`: the stacked blocks' frozen
  weights, fetched to the chip one block at a time, and the block inputs saved for the backward pass), as XLA
  assigns it (host arguments + host temporaries).
- TFLOP: the step's matrix-product FLOPs (`perf.matmul_flops`: every scanned block counted, the count the trainer's
  MFU uses), per chip.
- GB accessed: XLA's "bytes accessed" (a scanned loop's body is counted once, so for scanned stacks it is low).
- bound ms: max(TFLOP / the chip's published bf16 peak, bytes accessed / its HBM bandwidth): a lower bound on the
  step's time, not a measurement (XLA's `optimal_seconds` is not usable for whole steps: it was negative for SD1.5).
- lower s / compile s: tracing and lowering, and XLA:TPU's compile, on this machine.
A step that cannot fit is refused by the compiler, which names the temporaries it needs: the row then shows those,
the arguments' per-chip bytes, and "-" where only a finished compile can tell.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu serves as a compiler only; the host runs on CPU
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import argparse  # noqa: E402
import itertools  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from fresh_process import in_fresh_process  # noqa: E402
from full_size import MODELS, add_case_options, markdown_row, step_config, training_batch  # noqa: E402
from jax.sharding import (
    Sharding,  # noqa: E402
    SingleDeviceSharding,  # noqa: E402
)
from load_and_forward import timed  # noqa: E402

from jaxlora.models.diffusion import abstract_model  # noqa: E402
from jaxlora.parallel.mesh import MeshLayout, make_mesh  # noqa: E402
from jaxlora.parallel.placement import in_host_memory  # noqa: E402
from jaxlora.train.config import TrainConfig  # noqa: E402
from jaxlora.train.loop import prepare_run  # noqa: E402
from jaxlora.train.memory_plan import StepMemory  # noqa: E402
from jaxlora.train.perf import matmul_flops, published_peak  # noqa: E402
from jaxlora.train.step import compile_step  # noqa: E402

GIB = 2**30
# chip -> (topology of 4 chips, topology of 8 chips, HBM GiB, HBM bandwidth bytes/s), published figures
CHIPS = {
    "v5e": ("v5e:2x2", "v5e:2x4", 16, 819e9),
    "v6e": ("v6e:2x2", "v6e:2x4", 32, 1640e9),
    "v5p": ("v5p:2x2x1", "v5p:2x2x2", 95, 2765e9),
    "v4": ("v4:2x2x1", "v4:2x2x2", 32, 1200e9),
}


@dataclass(frozen=True)
class Case:
    model: str
    pixels: int
    batch: int = 1
    chip: str = "v5e"
    fsdp: int = 1
    data: int = 1
    remat: str = "nothing_saveable"
    quantization: str = "none"
    offloading: bool = False
    attention: str = "splash"  # JAXLORA_ATTENTION: the TPU kernel (what "auto" picks on a TPU), or "xla"
    quantized_backward: bool = False  # the node's: narrow-operand input gradients of the quantized linear layers

    @property
    def config(self) -> TrainConfig:
        return step_config(
            self.batch,
            self.remat,
            training_dtype="bf16",
            offloading=self.offloading,
            base_quantization=self.quantization,
            quantized_backward=self.quantized_backward,
        )

    @property
    def chips(self) -> int:
        return self.data * self.fsdp

    @property
    def mesh(self) -> str:
        """The mesh in `--mesh` syntax, its trivial axes left out."""
        return ",".join(f"{axis}={size}" for axis, size in (("data", self.data), ("fsdp", self.fsdp)) if size > 1)

    @property
    def label(self) -> list[str]:
        chip = self.chip if self.chips == 1 else f"{self.chip}-{self.chips} {self.mesh}"
        base = "bf16" if self.quantization == "none" else self.quantization
        base += " +qbwd" if self.quantized_backward else ""
        remat = self.remat + (" +offload" if self.offloading else "")
        return [self.model, f"{self.pixels}x{self.pixels}", str(self.batch), chip, base, remat, self.attention]


LABELS = ("model", "pixels", "batch", "chip", "base", "remat", "attention")


def topology_devices(case: Case) -> list:
    """The TPU devices the step is compiled for: one chip of a 4-chip topology, or the mesh's chips of one."""
    from jax.experimental import topologies

    four, eight, _, _ = CHIPS[case.chip]
    if case.chips not in (1, 4, 8):
        raise ValueError(f"--data {case.data} --fsdp {case.fsdp}: this script compiles for 1, 4 or 8 chips")
    devices = topologies.get_topology_desc(eight if case.chips == 8 else four, "tpu").devices
    return devices[: case.chips]


def on_devices(tree, shardings):
    """`tree` as `ShapeDtypeStruct`s laid out by `shardings` (one for all leaves, or a matching tree)."""
    if isinstance(shardings, Sharding):
        return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=shardings), tree)
    return jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), tree, shardings)


def run_case(case: Case, compiled_too: bool = True) -> dict:
    """Set the step up on the host as the trainer does (`prepare_run`), lay its inputs out on TPU devices,
    compile, measure."""
    os.environ["JAXLORA_ATTENTION"] = case.attention  # read when the step is traced (models.attention)
    config = case.config
    model = abstract_model(MODELS[case.model][0], config.training_dtype, config.base_quantization)
    run = prepare_run(model, training_batch(model, case.model, case.pixels, case.batch), config)
    devices = topology_devices(case)
    if case.chips == 1:
        layout, settings = None, run.settings
        same = base = SingleDeviceSharding(devices[0])
    else:
        layout = MeshLayout.of(make_mesh(case.mesh, devices), run.base)
        settings = replace(run.settings, batch_sharding=layout.batch)
        same, base = layout.replicated, layout.base
    if run.streamed:  # offloading: the stacked blocks' weight matrices in the chips' host memory, as prepare_run does
        base = in_host_memory(run.base, base, run.streamed)
        layout = layout and replace(layout, base=base)
    step = compile_step(run.graph, settings, layout)
    micro = config.grad_accumulation_steps
    inputs = (
        on_devices(run.adapters, same),
        on_devices(run.opt_state, same),
        on_devices(run.base, base),
        on_devices(run.data[0], same),
        jax.ShapeDtypeStruct((micro, 2), np.uint32, sharding=same),  # noise key data
        on_devices(run.perm_key, same),
        0,
    )
    traced, trace_s = timed(lambda: step.trace(*inputs))
    flops = matmul_flops(traced.jaxpr) / case.chips  # the batch, and its FLOPs, split over the chips
    if not compiled_too:
        return {"TFLOP": flops / 1e12, "trace s": trace_s}
    lowered, lower_s = timed(traced.lower)
    _, _, hbm_gib, bandwidth = CHIPS[case.chip]
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:  # XLA:TPU refuses a program that cannot fit the chip's HBM
        needed = re.search(r"HLO temporaries \(([\d.]+)G\)", str(error))
        if needed is None:
            raise
        temp = float(needed.group(1)) * GIB
        arguments = sum(per_chip_bytes(leaf) for leaf in jax.tree.leaves(inputs[:-1]) if in_hbm(leaf))
        memory = {"args GiB": arguments / GIB, "temp GiB": temp / GIB, "total GiB": (arguments + temp) / GIB}
        return memory | {
            "fits": f"no (>{hbm_gib})",
            "host GiB": "-",
            "TFLOP": flops / 1e12,
            "GB accessed": "-",
            "bound ms": "-",
            "lower s": trace_s + lower_s,
            "compile s": time.perf_counter() - start,
        }
    compile_s = time.perf_counter() - start
    memory, plan = compiled.memory_analysis(), StepMemory.of(compiled)
    accessed = compiled.cost_analysis()["bytes accessed"]
    bound = max(flops / published_peak(devices[0]), accessed / bandwidth)
    return {
        "args GiB": plan.arguments / GIB,
        "temp GiB": plan.temporaries / GIB,
        "total GiB": plan.total / GIB,
        "fits": "yes" if plan.total <= hbm_gib * GIB else f"no (>{hbm_gib})",
        "host GiB": (memory.host_argument_size_in_bytes + memory.host_temp_size_in_bytes) / GIB,
        "TFLOP": flops / 1e12,
        "GB accessed": accessed / 1e9,
        "bound ms": bound * 1e3,
        "lower s": trace_s + lower_s,
        "compile s": compile_s,
    }


def in_hbm(leaf: jax.ShapeDtypeStruct) -> bool:
    return leaf.sharding.memory_kind != "pinned_host"


def per_chip_bytes(leaf: jax.ShapeDtypeStruct) -> int:
    """What one chip holds of an abstract input: its shard."""
    return math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_options(parser)
    parser.add_argument("--chip", nargs="+", choices=list(CHIPS), default=["v5e"])
    parser.add_argument("--fsdp", nargs="+", type=int, default=[1], help="chips the frozen base is split over")
    parser.add_argument("--data", nargs="+", type=int, default=[1], help="chips the frozen base is replicated on")
    parser.add_argument("--quantization", nargs="+", default=["none"], help="none, int8, fp8, fp8_channel")
    parser.add_argument("--offloading", nargs="+", choices=("off", "on"), default=["off"])
    parser.add_argument("--attention", nargs="+", choices=("splash", "xla"), default=["splash"])
    parser.add_argument("--quantized-backward", nargs="+", choices=("off", "on"), default=["off"])
    parser.add_argument("--trace-only", action="store_true", help="only the FLOP count: trace, no compile")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, XLA:TPU compile from abstract inputs (libtpu), {os.cpu_count()} CPU cores\n")
    combinations = itertools.product(
        args.model,
        args.pixels,
        args.batch,
        args.chip,
        args.fsdp,
        args.data,
        args.remat,
        args.quantization,
        [value == "on" for value in args.offloading],
        args.attention,
        [value == "on" for value in args.quantized_backward],
    )
    for index, values in enumerate(combinations):
        case = Case(*values)
        row = in_fresh_process(run_case, case, not args.trace_only)
        print(markdown_row(case.label, row, LABELS if index == 0 else None), flush=True)


if __name__ == "__main__":
    main()
