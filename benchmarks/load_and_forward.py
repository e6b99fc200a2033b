"""Loading and forward speed of the tiny UNets; with --memory, the loader's host memory on a full-size SD1.5.

Run from anywhere as `python benchmarks/load_and_forward.py [--memory]`; prints markdown for BENCHMARKS.md.
The forward is jitted with the parameters as an argument, as training calls it, so the weights are never baked
into the compiled program as constants.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from fresh_process import in_fresh_process

from jaxlora import load_model
from jaxlora.models.checkpoint import torch_parameters
from jaxlora.models.demo import write_random_checkpoint
from jaxlora.models.unet import SD15, UNet, UNetConfig
from jaxlora.models.unet_family import sdxl_vector

LATENT, BATCH, TOKENS = 32, 1, 77  # 256 px images
LOAD_REPEATS, FORWARD_REPEATS = 3, 20
PREFIX = "model.diffusion_model."


def tiny_families() -> dict:
    """The test suite's tiny UNets by family name; tests/ is not installed, so import it from the checkout."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.models.tiny_unets import FAMILIES

    return {name: family.config for name, family in FAMILIES.items()}


def timed(fn: Callable) -> tuple[object, float]:
    """(fn(), seconds) with outputs blocked on, so asynchronous dispatch is not mistaken for speed."""
    start = time.perf_counter()
    result = jax.block_until_ready(fn())
    return result, time.perf_counter() - start


def forward_inputs(config: UNetConfig) -> tuple:
    """NHWC latents, timesteps [B], context [B, T, D] and, for SDXL, y [B, 2816] from a pooled vector."""
    kx, kc, ky = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (BATCH, LATENT, LATENT, config.in_channels))
    t = jnp.full((BATCH,), 500.0)
    context = jax.random.normal(kc, (BATCH, TOKENS, config.context_dim))
    pixels = 8 * LATENT
    y = sdxl_vector(jax.random.normal(ky, (BATCH, 1280)), pixels, pixels) if config.adm_in_channels else None
    return x, t, context, y


def time_family(config: UNetConfig, path: Path) -> dict:
    """Load s (median), lowering and compile s of the jitted forward, steady-state forward ms (median)."""
    loads = [timed(lambda: load_model(path, dtype="fp32")) for _ in range(LOAD_REPEATS)]
    model = loads[-1][0]
    graph, params = nnx.split(model.network)
    forward = jax.jit(lambda params, *inputs: nnx.merge(graph, params)(*inputs))
    inputs = forward_inputs(config)
    lowered, lower_s = timed(lambda: forward.lower(params, *inputs))
    compiled, compile_s = timed(lowered.compile)
    _, first_s = timed(lambda: compiled(params, *inputs))
    runs = [timed(lambda: compiled(params, *inputs))[1] for _ in range(FORWARD_REPEATS)]
    return {
        "parameters": model.param_count,
        "load s": statistics.median(seconds for _, seconds in loads),
        "lower s": lower_s,
        "compile s": compile_s,
        "first run ms": 1000 * first_s,
        "forward ms": 1000 * statistics.median(runs),
    }


def markdown_table(rows: dict[str, dict]) -> str:
    columns = list(next(iter(rows.values())))
    lines = ["| family | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        cells = [f"{v:,}" if isinstance(v, int) else f"{v:.3g}" for v in row.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_fp16_checkpoint(config: UNetConfig, path: Path) -> None:
    """A random fp16 UNet in the ldm layout, written tensor by tensor (8-byte header length, JSON header, raw
    bytes) so the writer holds one tensor, not the model."""
    entries = [
        (PREFIX + key, layer.torch_shape(name, getattr(layer, name).shape))
        for key, layer, name in torch_parameters(UNet(config))
    ]
    header, offset = {}, 0
    for key, shape in entries:
        end = offset + 2 * math.prod(shape)
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for _, shape in entries:
            (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16).tofile(f)


def memory_kib() -> dict[str, int]:
    """This process's memory counters from /proc/self/status in KiB: VmRSS, VmHWM (peak RSS), RssAnon
    (heap and other private memory), RssFile (resident pages of mapped files, e.g. the mmapped checkpoint)."""
    fields = (line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(value.split()[0]) for key, value in fields if value.strip().endswith("kB")}


def sample_peaks(peaks: dict[str, int], stop: threading.Event, every_s: float = 0.005) -> None:
    """Raise each counter in `peaks` to the largest value seen until `stop` is set; the kernel keeps only
    the peak of their sum (VmHWM)."""
    while not stop.wait(every_s):
        now = memory_kib()
        for key in peaks:
            peaks[key] = max(peaks[key], now[key])


def measure_load(path: Path) -> dict:
    """Host memory in KiB around `load_model(path, dtype="bf16")` in this process: before, peak, after."""
    jax.devices()  # the backend's own memory belongs to the baseline, not to the loader
    before = memory_kib()
    peaks, stop = {"RssAnon": 0, "RssFile": 0}, threading.Event()
    sampler = threading.Thread(target=sample_peaks, args=(peaks, stop))
    sampler.start()
    model = load_model(path, dtype="bf16")
    jax.block_until_ready(nnx.state(model.network))
    stop.set()
    sampler.join()
    after = memory_kib()
    return {
        "parameters": model.param_count,
        "model": model.param_count * model.dtype.itemsize // 1024,
        "RSS": (before["VmRSS"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, after["VmRSS"]),
        "RssAnon": (before["RssAnon"], peaks["RssAnon"], after["RssAnon"]),
        "RssFile": (before["RssFile"], peaks["RssFile"], after["RssFile"]),
    }


def memory_report(m: dict) -> str:
    """A markdown table in GiB; "peak - before" is what loading added, also as a multiple of the model."""
    gib, model = 1024**2, m["model"]
    lines = [
        f"{m['parameters']:,} parameters, {model / gib:.2f} GiB loaded (bf16)\n",
        "| memory | before GiB | peak GiB | after GiB | peak - before | x model |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("RSS", "RssAnon", "RssFile"):
        before, peak, after = m[name]
        cells = [f"{kib / gib:.2f}" for kib in (before, peak, after, peak - before)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {(peak - before) / model:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", action="store_true", help="loader host memory, full-size SD1.5 (1.7 GB)")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, devices {jax.devices()}, {os.cpu_count()} CPU cores\n")
    with tempfile.TemporaryDirectory() as folder:
        if args.memory:
            path = Path(folder) / "sd15_fp16.safetensors"
            in_fresh_process(write_fp16_checkpoint, SD15, path)
            print(f"SD1.5 UNet, fp16 file of {path.stat().st_size / 1024**3:.2f} GiB, loaded as bf16:\n")
            print(memory_report(in_fresh_process(measure_load, path)))
        else:
            rows = {}
            for name, config in tiny_families().items():
                path = write_random_checkpoint(config, Path(folder) / f"{name}.safetensors")
                rows[name] = time_family(config, path)
            print(markdown_table(rows))


if __name__ == "__main__":
    main()
