"""Samplers in ComfyUI's sigma space: the sigma schedules of its "simple" and "normal" schedulers and the Euler
and DPM++ 2M update rules of k-diffusion, as pure functions of a denoiser `denoise(x, sigma) -> x0`.

The schedules are computed once on the host (numpy float32, as ComfyUI's FloatTensor); the samplers loop over
the steps with `lax.scan`, so a sampler inside `jax.jit` compiles one step whatever the number of steps, and the
sigmas are an argument, not a constant. `x` is any latent with the batch first.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.models.sampling import ModelSampling

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t, scalar sigma) -> the x0 prediction


def simple_sigmas(sampling: ModelSampling, steps: int) -> np.ndarray:
    """ComfyUI's "simple" scheduler: `steps` entries of the model's ascending sigma table, evenly spaced from
    its top (index -(1 + int(i * len / steps))), then 0. Float32 [steps + 1]."""
    table = sampling.schedule.table()
    stride = len(table) / steps
    picked = [table[-(1 + int(i * stride))] for i in range(steps)]
    return np.asarray([*picked, 0.0], np.float32)


def normal_sigmas(sampling: ModelSampling, steps: int) -> np.ndarray:
    """ComfyUI's "normal" scheduler: sigma at `steps` timesteps linear from timestep(sigma_max) to
    timestep(sigma_min), then 0 (no 0 appended when the last sigma is already 0). Float32."""
    schedule = sampling.schedule
    start = float(schedule.timestep(schedule.sigma_max))
    end = float(schedule.timestep(schedule.sigma_min))
    append_zero = not math.isclose(float(schedule.sigma(end)), 0.0, abs_tol=1e-5)
    timesteps = np.linspace(start, end, steps if append_zero else steps + 1, dtype=np.float32)
    sigmas = np.asarray(schedule.sigma(timesteps), np.float32)
    return np.concatenate([sigmas, np.zeros(1 if append_zero else 0, np.float32)])


SCHEDULERS: dict[str, Callable[[ModelSampling, int], np.ndarray]] = {
    "simple": simple_sigmas,
    "normal": normal_sigmas,
}


def euler(denoise: Denoiser, x: jax.Array, sigmas: jax.Array) -> jax.Array:
    """k-diffusion's `sample_euler` without churn: x += (x - denoised) / sigma * (sigma_next - sigma)."""

    def step(x, pair):
        sigma, sigma_next = pair
        derivative = (x - denoise(x, sigma)) / sigma
        return x + derivative * (sigma_next - sigma), None

    x, _ = jax.lax.scan(step, x, (sigmas[:-1], sigmas[1:]))
    return x


def dpmpp_2m(denoise: Denoiser, x: jax.Array, sigmas: jax.Array) -> jax.Array:
    """k-diffusion's `sample_dpmpp_2m`: the second-order multistep DPM-Solver++ in t = -log sigma, first order on
    the first step and on a step to sigma 0 (which lands on the denoised sample)."""

    def step(carry, pair):
        x, old_denoised, sigma_prev, first = carry
        sigma, sigma_next = pair
        denoised = denoise(x, sigma)
        last = sigma_next == 0.0
        t = -jnp.log(sigma)
        h = jnp.where(last, 1.0, -jnp.log(jnp.where(last, 1.0, sigma_next)) - t)  # t_next - t (unused when last)
        r = jnp.where(first, 1.0, (t + jnp.log(sigma_prev)) / h)  # h_last / h
        corrected = (1.0 + 1.0 / (2.0 * r)) * denoised - (1.0 / (2.0 * r)) * old_denoised
        d = jnp.where(first | last, denoised, corrected)
        x_next = jnp.where(last, denoised, (sigma_next / sigma) * x - jnp.expm1(-h) * d)
        return (x_next, denoised, sigma, jnp.asarray(False)), None

    start = (x, jnp.zeros_like(x), sigmas[0], jnp.asarray(True))
    (x, *_), _ = jax.lax.scan(step, start, (sigmas[:-1], sigmas[1:]))
    return x


SAMPLERS: dict[str, Callable[[Denoiser, jax.Array, jax.Array], jax.Array]] = {"euler": euler, "dpmpp_2m": dpmpp_2m}
FLOW_SAMPLERS = ("euler",)  # what flow (CONST) models sample with here


def guided(conditional: Denoiser, unconditional: Denoiser, cfg: float) -> Denoiser:
    """Classifier-free guidance on x0 predictions, as ComfyUI's cfg_function: uncond + cfg (cond - uncond); at
    cfg 1 the conditional prediction alone (the unconditional pass is skipped, as ComfyUI skips it)."""
    if math.isclose(cfg, 1.0):
        return conditional

    def denoise(x, sigma):
        uncond = unconditional(x, sigma)
        return uncond + cfg * (conditional(x, sigma) - uncond)

    return denoise
