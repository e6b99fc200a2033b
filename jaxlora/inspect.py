"""`python -m jaxlora.inspect [CHECKPOINT]`: load a checkpoint, print what it is, and run one forward.

With no checkpoint it runs the built-in demo: a tiny model of the demo family (`registry.DEMO_FAMILY`) with seeded
random weights, written to a temporary file and loaded through the same loader as a real checkpoint.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.dtypes import PREDICTIONS, WEIGHT_DTYPES
from jaxlora.models.demo import write_random_checkpoint
from jaxlora.models.diffusion import DiffusionModel, load_model
from jaxlora.models.registry import DEMO_FAMILY, demo_description, supported_models


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxlora.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", type=Path, help=".safetensors checkpoint (default: the demo)")
    parser.add_argument("--dtype", default="bf16", choices=WEIGHT_DTYPES, help="weight dtype")
    parser.add_argument("--prediction", default="auto", choices=PREDICTIONS)
    parser.add_argument("--latent-size", type=int, default=32, help="latent height and width of the test forward")
    parser.add_argument("--no-forward", action="store_true", help="only load and describe the checkpoint")
    return parser.parse_args(argv)


def describe(model: DiffusionModel, load_seconds: float) -> str:
    nbytes = model.param_count * jnp.dtype(model.dtype).itemsize
    rows = [
        ("file", str(model.source)),
        ("family", f"{model.variant.name} ({model.variant.description})"),
        ("prediction", model.sampling.prediction),
        ("parameters", f"{model.param_count:,} ({jnp.dtype(model.dtype).name}, {nbytes / 2**30:.2f} GiB)"),
        *model.family.describe(model.config),
        ("dataset", ", ".join(f"{f.name} {f.width}-d" for f in model.conditioning_fields)),
        ("latent format", model.latent_format.describe()),
        ("load time", f"{load_seconds:.2f} s"),
    ]
    return "\n".join(f"  {name:<14}{value}" for name, value in rows)


def latent_format_row(latent_format) -> str:
    if latent_format.channel_mean is not None:
        return f"per-channel mean and std ({len(latent_format.channel_mean)} channels), x {latent_format.scale_factor}"
    return f"x {latent_format.scale_factor}, shift {latent_format.shift}"


def test_forward(model: DiffusionModel, size: int) -> str:
    """One jitted forward on random inputs; the weights are a jit argument, never a closure constant."""
    rng = np.random.default_rng(0)
    dtype = model.dtype
    frames = (1,) if model.family.video else ()  # a video model's forward runs on one frame
    x = jnp.asarray(rng.standard_normal((1, *frames, size, size, model.latent_channels)), dtype)
    conditioning = {"c_crossattn": rng.standard_normal((1, 77, model.context_dim))}
    if model.pooled_dim is not None:
        conditioning["pooled_output"] = np.zeros((1, model.pooled_dim))
    inputs = model.network_inputs(conditioning, (size, size), dtype)
    timestep = model.sampling.timestep(model.sampling.percent_to_sigma(jnp.array([0.5])))
    graph, params = nnx.split(model.network)
    forward = jax.jit(lambda params, x, t, inputs: nnx.merge(graph, params)(x, t, **inputs))
    start = time.perf_counter()
    compiled = forward.lower(params, x, timestep, inputs).compile()
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    out = np.asarray(compiled(params, x, timestep, inputs), np.float32)
    run_seconds = time.perf_counter() - start
    status = "finite" if np.isfinite(out).all() else "NOT FINITE"
    return (
        f"  {'forward':<14}latent {size}x{size}: compile {compile_seconds:.1f} s, "
        f"run {run_seconds * 1e3:.0f} ms, "
        f"output {tuple(out.shape)} {status}, std {out.std():.3f}"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        path = args.checkpoint
        if path is None:
            print(f"No checkpoint given: running the built-in demo (a tiny {demo_description()}, random weights).")
            print(f"Pass a .safetensors checkpoint ({supported_models()}) to check a real model.\n")
            path = write_random_checkpoint(DEMO_FAMILY.demo_config, Path(scratch) / "jaxlora_demo_model.safetensors")
        start = time.perf_counter()
        model = load_model(path, dtype=args.dtype, prediction=args.prediction)
        print("jaxlora model check")
        print(describe(model, time.perf_counter() - start))
        if not args.no_forward:
            print(test_forward(model, args.latent_size))


if __name__ == "__main__":
    main()
