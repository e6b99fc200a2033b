"""LoRA weight patching vs bypass on single SD1.5/SDXL-sized layers: step time and XLA's memory analysis.

Run from the repository root as `python benchmarks/adapter_modes.py [--repeats N] [--dtypes bf16 fp32]
[--input-grad]`; prints markdown for BENCHMARKS.md. One "step" is the forward and the backward with respect to the
adapter only (and the input x with --input-grad), loss = mean(y**2), jitted, with the frozen base weight passed as
an argument. Patching forms W' = W + s * up @ down inside the layer (and the [in, out] gradient of W'); bypass
computes y = x W + s * up(down(x)) and never forms the full-size delta. The two modes alternate within each repeat
so machine drift hits both alike.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.adapters.base import AdapterParam, LayerAdapter, Target
from jaxlora.adapters.lora import LoRA
from jaxlora.models.layers import Conv2d, Linear, WeightLayer

RANK = 16
MODES = ("patch", "bypass")
DTYPES = {"bf16": jnp.bfloat16, "fp32": jnp.float32}
MIB = 2**20


@dataclass(frozen=True)
class Case:
    """One layer at one resolution: `make` builds the abstract layer; `x_shape` is its input ([B, T, C] or NHWC)."""

    name: str
    make: Callable[[], WeightLayer]
    x_shape: tuple[int, ...]


def linear(name: str, d_in: int, d_out: int, tokens: int) -> Case:
    return Case(f"{name} Linear {d_in}->{d_out}, {tokens} tok", lambda: Linear(d_in, d_out), (1, tokens, d_in))


def conv(name: str, c_in: int, c_out: int, side: int) -> Case:
    make = lambda: Conv2d(c_in, c_out, 3, padding=1)  # noqa: E731
    return Case(f"{name} Conv3x3 {c_in}->{c_out}, {side}x{side}", make, (1, side, side, c_in))


CASES = (
    linear("SD1.5 attn", 320, 320, 4096),
    conv("SD1.5", 320, 320, 64),
    linear("SD1.5 attn", 1280, 1280, 256),
    conv("SD1.5", 1280, 1280, 8),
    linear("SDXL attn", 640, 640, 4096),
    linear("SDXL attn", 1280, 1280, 1024),
    conv("SDXL", 640, 640, 64),
    conv("SDXL", 1280, 1280, 32),
    linear("SDXL GEGLU proj", 1280, 10240, 1024),
)


def adapted_layer(case: Case, bypass: bool, dtype: jnp.dtype) -> WeightLayer:
    """The layer with random base weights in `dtype` and a rank-16 LoRA whose `down` is non-zero (fp32 masters,
    rounded to `dtype` at use). Same seed in both modes, so both compute the same function."""
    layer = case.make()
    rng = np.random.default_rng(0)
    fan_in = math.prod(layer.weight.shape[:-1])
    layer.weight.set_value(jnp.asarray(rng.standard_normal(layer.weight.shape) / math.sqrt(fan_in), dtype))
    layer.bias.set_value(jnp.asarray(rng.standard_normal(layer.bias.shape) * 0.01, dtype))
    lora = LoRA.create(Target.of(layer), RANK, rng, dtype)
    lora.down.set_value(jnp.asarray(rng.standard_normal(lora.down.shape) / math.sqrt(fan_in), jnp.float32))
    layer.adapter = LayerAdapter(lora, None, bypass=bypass)
    return layer


def compiled_step(
    layer: WeightLayer, x: jax.Array, input_grad: bool = False
) -> tuple[Callable[[], tuple], jax.stages.Compiled]:
    """The jitted value-and-grad over the adapter tree (and `x` with `input_grad`, as for a layer inside a
    network), compiled for these arguments; returns a thunk that runs it and the executable (for its memory)."""
    graph, adapters, base = nnx.split(layer, AdapterParam, ...)

    def loss(adapters: nnx.State, base: nnx.State, x: jax.Array) -> jax.Array:
        y = nnx.merge(graph, adapters, base)(x)
        return jnp.mean(jnp.square(y.astype(jnp.float32)))

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 2) if input_grad else 0)).lower(adapters, base, x).compile()
    return (lambda: compiled(adapters, base, x)), compiled


def measure(case: Case, dtype: jnp.dtype, repeats: int, input_grad: bool) -> dict[str, dict[str, float]]:
    """Median ms/step and XLA memory (MiB) per mode. Repeats alternate the order (patch-bypass, bypass-patch)."""
    x = jnp.asarray(np.random.default_rng(1).standard_normal(case.x_shape), dtype)
    steps, results = {}, {}
    for mode in MODES:
        run, compiled = compiled_step(adapted_layer(case, mode == "bypass", dtype), x, input_grad)
        memory = compiled.memory_analysis()
        results[mode] = {
            "temp": memory.temp_size_in_bytes / MIB,
            "args": memory.argument_size_in_bytes / MIB,
            "out": memory.output_size_in_bytes / MIB,
            "loss": float(jax.block_until_ready(run())[0]),  # also the untimed first run
        }
        steps[mode] = run
    times = {mode: [] for mode in MODES}
    for i in range(repeats):
        for mode in MODES if i % 2 == 0 else MODES[::-1]:
            start = time.perf_counter()
            jax.block_until_ready(steps[mode]())
            times[mode].append(time.perf_counter() - start)
    for mode in MODES:
        results[mode]["ms"] = 1e3 * statistics.median(times[mode])
    losses = [results[mode]["loss"] for mode in MODES]
    if not math.isclose(*losses, rel_tol=2e-2 if dtype == jnp.bfloat16 else 1e-4):
        raise AssertionError(f"{case.name}: patch and bypass compute different losses {losses}")
    return results


def table(dtype_name: str, repeats: int, input_grad: bool) -> str:
    dtype = DTYPES[dtype_name]
    lines = [
        f"{dtype_name} compute (x and base weight {dtype_name}, adapter masters fp32), rank {RANK}, batch 1, "
        f"median of {repeats}; gradient w.r.t. {'adapter and x' if input_grad else 'adapter only'}",
        "",
        "| shape | mode | ms/step | temp MiB | args MiB | out MiB | bypass/patch time | bypass/patch temp |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in CASES:
        r = measure(case, dtype, repeats, input_grad)
        for mode in MODES:
            m = r[mode]
            ratio = (
                f"{r['bypass']['ms'] / r['patch']['ms']:.2f} | {r['bypass']['temp'] / r['patch']['temp']:.2f}"
                if mode == "bypass"
                else " | "
            )
            lines.append(
                f"| {case.name} | {mode} | {m['ms']:.1f} | {m['temp']:.2f} | {m['args']:.2f} | {m['out']:.2f} "
                f"| {ratio} |"
            )
        print(f"{dtype_name} {case.name}: done", file=sys.stderr, flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per mode and shape")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--input-grad", action="store_true", help="also differentiate w.r.t. the layer input")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, devices {jax.devices()}")
    tables = [table(name, args.repeats, args.input_grad) for name in args.dtypes]
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
