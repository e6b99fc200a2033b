"""Model FLOP utilisation (MFU): the FLOPs of a compiled step as XLA counts them, the device's peak, and the
achieved fraction. Accelerators use their published dense bf16 peak; a CPU has no reliable published figure for
the cores we get, so its peak is measured with a large fp32 matmul, the best case for the same compiler."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

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
