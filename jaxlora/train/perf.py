"""Model FLOP utilisation (MFU): the FLOPs of a step, the device's peak, and the achieved fraction.

The trainer counts a step's FLOPs from its jaxpr (`matmul_flops`), not from XLA's cost analysis: XLA counts the
body of a `while` loop once, so a network whose blocks run under `lax.scan` (the DiT families) would be reported
at a fraction of its work. Accelerators use their published dense bf16 peak; a CPU has no reliable published
figure for the cores we get, so its peak is measured with a large fp32 matmul, the best case for the same
compiler."""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

# Dense (no sparsity) bf16 peaks per device, FLOP/s, from the vendors' datasheets. Matched against
# `device.device_kind` by substring, case-insensitively, first match wins (so "h100 pcie" precedes "h100").
PUBLISHED_BF16_PEAKS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM and the "H100 80GB HBM3" kind string
    ("h200", 989e12),
    ("gh200", 989e12),
    ("b200", 2250e12),
    ("a100", 312e12),
    ("l40s", 362e12),
    ("l4", 121e12),
    ("a10g", 70e12),
    ("a10", 125e12),
    ("tpu v6 lite", 918e12),  # Trillium (v6e)
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),  # v5p reports "TPU v5"
    ("tpu v4", 275e12),
    ("tpu v3", 123e12),
)


def step_flops(compiled: jax.stages.Compiled) -> float | None:
    """FLOPs of one call of a compiled program from XLA's cost analysis (None when the backend gives none).

    The count is of what the program executes: a rematerialised forward is counted twice, as it runs twice."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # older jax: one dict per partition
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def matmul_flops(jaxpr: jax_core.ClosedJaxpr | jax_core.Jaxpr) -> float:
    """The multiply-add FLOPs (2 per multiply-accumulate) of every matrix product and convolution a jaxpr runs,
    the definition MFU is stated in. A `scan` body counts `length` times; a `cond` counts its costliest branch; a
    Pallas kernel's body counts once per grid point; a `shard_map` body once per device it runs on; any other
    nested jaxpr (jit, remat, custom derivatives) counts once per call. A `while` loop with
    a data-dependent trip count counts once (the step has none). Rematerialised forward passes are part of the
    differentiated jaxpr and so are counted, as XLA counts them. Elementwise work is left out, as in MFU."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs_shape[d] for d in lhs_contract)
        elif name == "conv_general_dilated":
            # each output element reduces over the kernel's (in features per group) x (spatial) entries
            kernel_shape = eqn.invars[1].aval.shape
            out_features = kernel_shape[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * (math.prod(kernel_shape) // out_features)
        elif name == "scan":
            total += eqn.params["length"] * matmul_flops(eqn.params["jaxpr"])
        elif name == "cond":
            total += max(matmul_flops(branch) for branch in eqn.params["branches"])
        elif name == "pallas_call":  # a kernel (splash attention): its body, on blocks, runs at every grid point
            total += math.prod(eqn.params["grid_mapping"].grid) * matmul_flops(eqn.params["jaxpr"])
        elif name == "shard_map":  # the body sees one device's shard and runs on every device of its axes
            mesh = eqn.params["mesh"]
            devices = math.prod(mesh.shape[axis] for axis in eqn.params["newly_manual_axes"])
            total += devices * matmul_flops(eqn.params["jaxpr"])
        else:
            total += sum(matmul_flops(sub) for sub in jax_core.jaxprs_in_params(eqn.params))
    return total


def published_peak(device: jax.Device) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None for a kind not in the table (and for CPUs)."""
    kind = device.device_kind.lower()
    return next((peak for name, peak in PUBLISHED_BF16_PEAKS if name in kind), None)


def measure_matmul_peak(size: int = 2048, repeats: int = 5, device: jax.Device | None = None) -> float:
    """FLOP/s of the fastest of `repeats` fp32 [size, size] @ [size, size] matmuls (compiled and warmed first)."""
    device = device or jax.devices()[0]
    a = jax.device_put(jnp.ones((size, size), jnp.float32), device)
    matmul = jax.jit(jnp.matmul)
    matmul(a, a).block_until_ready()
    seconds = []
    for _ in range(repeats):
        begin = time.perf_counter()
        matmul(a, a).block_until_ready()
        seconds.append(time.perf_counter() - begin)
    return 2 * size**3 / min(seconds)


def device_peak(device: jax.Device | None = None, measure_size: int = 1024) -> tuple[float | None, str]:
    """(peak FLOP/s, where it comes from): the published bf16 peak on a known accelerator, a measured fp32
    matmul on a CPU (`measure_size` 1024 costs about 2 GFLOP, a fraction of a second; measured once per process
    and device), else (None, reason)."""
    return _device_peak(device or jax.devices()[0], measure_size)


@functools.cache
def _device_peak(device: jax.Device, measure_size: int) -> tuple[float | None, str]:
    peak = published_peak(device)
    if peak is not None:
        return peak, f"{device.device_kind} published bf16 peak"
    if device.platform == "cpu":
        return measure_matmul_peak(measure_size, device=device), f"measured fp32 {measure_size}^3 matmul"
    return None, f"no published peak for {device.device_kind!r}"
