"""`python -m jaxlora.inspect [CHECKPOINT]`: load a checkpoint, print what it is, and run one forward.

With no checkpoint it runs the built-in demo: a tiny UNet in the SD1.x layout with seeded random weights,
written to a temporary file and loaded through the same loader as a real checkpoint.
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

from jaxlora.models.demo import TINY_SD1, write_random_checkpoint
from jaxlora.models.diffusion import DiffusionModel, load_model
from jaxlora.models.flux import FluxConfig
from jaxlora.models.unet import UNetConfig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxlora.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", type=Path, help=".safetensors checkpoint (default: the demo)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"], help="weight dtype")
    parser.add_argument("--prediction", default="auto", choices=["auto", "eps", "v"])
    parser.add_argument("--latent-size", type=int, default=32, help="latent height and width of the test forward")
    parser.add_argument("--no-forward", action="store_true", help="only load and describe the checkpoint")
    return parser.parse_args(argv)


def architecture_rows(config: UNetConfig | FluxConfig) -> list[tuple[str, str]]:
    if isinstance(config, FluxConfig):
        return [
            ("blocks", f"{config.depth} double, {config.depth_single_blocks} single"),
            ("width", f"{config.hidden_size}, {config.num_heads} heads of {config.head_dim}, mlp {config.mlp_hidden}"),
            ("context", f"{config.context_dim}-d, y {config.vec_in_dim}-d, guidance {config.guidance_embed}"),
        ]
    return [
        ("channels", f"{config.model_channels} x {config.channel_mult}, res blocks {config.num_res_blocks}"),
        ("transformers", f"in {config.transformer_depth}, mid {config.transformer_depth_middle}"),
        ("context", f"{config.context_dim}-d" + (f", y {config.adm_in_channels}-d" if config.adm_in_channels else "")),
    ]


def describe(model: DiffusionModel, load_seconds: float) -> str:
    nbytes = model.param_count * jnp.dtype(model.dtype).itemsize
    rows = [
        ("file", str(model.source)),
        ("family", f"{model.family.name} ({model.family.description})"),
        ("prediction", model.sampling.prediction),
        ("parameters", f"{model.param_count:,} ({jnp.dtype(model.dtype).name}, {nbytes / 2**30:.2f} GiB)"),
        *architecture_rows(model.config),
        ("latent format", f"x {model.latent_format.scale_factor}, shift {model.latent_format.shift}"),
        ("load time", f"{load_seconds:.2f} s"),
    ]
    return "\n".join(f"  {name:<14}{value}" for name, value in rows)


def test_forward(model: DiffusionModel, size: int) -> str:
    """One jitted forward on random inputs; the weights are a jit argument, never a closure constant."""
    rng = np.random.default_rng(0)
    dtype = model.dtype
    x = jnp.asarray(rng.standard_normal((1, size, size, model.latent_channels)), dtype)
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
            print("No checkpoint given: running the built-in demo (a tiny SD1.x UNet, random weights).")
            print("Pass a .safetensors checkpoint (SD1.x, SD2.x, SDXL or Flux.1) to check a real model.\n")
            path = write_random_checkpoint(TINY_SD1, Path(scratch) / "jaxlora_demo_unet.safetensors")
        start = time.perf_counter()
        model = load_model(path, dtype=args.dtype, prediction=args.prediction)
        print("jaxlora model check")
        print(describe(model, time.perf_counter() - start))
        if not args.no_forward:
            print(test_forward(model, args.latent_size))


if __name__ == "__main__":
    main()
