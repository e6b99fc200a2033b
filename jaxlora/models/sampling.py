"""The diffusion parameterisation: noise schedules, EPS/V/flow model sampling, latent formats. The values each
family uses (its latent format, shift, schedule) live in the family's file.

Everything lives in sigma space, as in ComfyUI's ``comfy/model_sampling.py`` and k-diffusion: a sample is
``x_t = x0 + sigma * noise``; the network sees ``calculate_input(sigma, x_t)`` and ``timestep(sigma)`` and
returns a raw output, which ``calculate_denoised`` turns into an x0 prediction. The networks know nothing of
this. Everything is jax.numpy-traceable; sigma may be a scalar or a per-sample [B] array.

Flow matching (CONST) is the ``"const"`` row of ``PARAMETERISATIONS`` on a ``FlowSchedule``, which has
the same ``sigma`` / ``timestep`` / ``percent_to_sigma`` methods as ``DiscreteSchedule``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

# ComfyUI's stand-in for "infinite noise" when a training draw hits percent 0 exactly.
_PERCENT_ZERO_SIGMA = 999999999.9


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class DiscreteSchedule:
    """A table of ``steps`` noise levels indexed by integer timestep, as ComfyUI's ModelSamplingDiscrete.

    ``sigmas`` and ``log_sigmas`` are read-only float32 numpy arrays of shape [steps], increasing with t, so
    they embed in a jitted function as small constants. Compared and hashed by identity, as it holds arrays.
    """

    sigmas: np.ndarray
    log_sigmas: np.ndarray

    @property
    def steps(self) -> int:
        return len(self.sigmas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma(self, t: ArrayLike) -> jax.Array:
        """Sigma at a (possibly fractional) timestep: t clamped to [0, steps-1], log sigma interpolated."""
        t = jnp.clip(jnp.asarray(t, jnp.float32), 0.0, self.steps - 1)
        low = jnp.floor(t)
        weight = t - low
        log_sigmas = jnp.asarray(self.log_sigmas)
        low_log = log_sigmas[low.astype(jnp.int32)]
        high_log = log_sigmas[jnp.ceil(t).astype(jnp.int32)]
        return jnp.exp((1.0 - weight) * low_log + weight * high_log)

    def timestep(self, sigma: ArrayLike) -> jax.Array:
        """The integer timestep whose sigma is nearest in log space, as float32 (what the network is fed).

        Ties go to the lower index, as torch's argmin does. Shape follows ``sigma``.
        """
        log_sigma = jnp.log(jnp.asarray(sigma, jnp.float32))
        distances = jnp.abs(log_sigma[..., None] - jnp.asarray(self.log_sigmas))
        return jnp.argmin(distances, axis=-1).astype(jnp.float32)

    def percent_to_sigma(self, percent: ArrayLike) -> jax.Array:
        """Sigma for a fraction of the denoising process: 0 is pure noise (1e9), 1 is clean (0).

        In between it is ``sigma((1 - percent) * (steps - 1))``, so a uniform draw of ``percent`` is uniform
        in continuous timestep; this is how ComfyUI's trainer draws each sample's noise level.
        """
        percent = jnp.asarray(percent, jnp.float32)
        sigma = self.sigma((1.0 - percent) * (self.steps - 1))
        return jnp.where(percent <= 0.0, _PERCENT_ZERO_SIGMA, jnp.where(percent >= 1.0, 0.0, sigma))


def scaled_linear_schedule(
    steps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012
) -> DiscreteSchedule:
    """The discrete 1000-step eps/v schedule ("linear" in ComfyUI, "scaled_linear" in diffusers).

    betas are linear in sqrt space. The cumulative product runs in float64 and only the resulting sigmas
    and their logs are rounded to float32, as in ComfyUI; diffusers computes in float32, which moves the
    smallest sigmas by up to 1.3e-5 relative.
    """
    betas = np.linspace(math.sqrt(linear_start), math.sqrt(linear_end), steps, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    sigmas = np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)
    return DiscreteSchedule(
        sigmas=_frozen(sigmas.astype(np.float32)), log_sigmas=_frozen(np.log(sigmas).astype(np.float32))
    )


@dataclass(frozen=True)
class FlowSchedule:
    """Continuous flow-matching noise levels in [0, 1]: sigma(t) = a t / (1 + (a - 1) t) (`time_snr_shift`).

    ComfyUI's e^mu shift is a = e^mu with timestep = sigma; ModelSamplingDiscreteFlow is a = shift with
    t = timestep / multiplier (shift 1, multiplier 1: sigma = timestep).
    """

    alpha: float
    multiplier: float = 1.0

    def _shift(self, t: jax.Array) -> jax.Array:
        return self.alpha * t / (1.0 + (self.alpha - 1.0) * t)

    def sigma(self, t: ArrayLike) -> jax.Array:
        return self._shift(jnp.asarray(t, jnp.float32) / self.multiplier)

    def timestep(self, sigma: ArrayLike) -> jax.Array:
        return jnp.asarray(sigma, jnp.float32) * self.multiplier

    def percent_to_sigma(self, percent: ArrayLike) -> jax.Array:
        """0 is pure noise (sigma 1), 1 is clean (0); in between the shifted 1 - percent."""
        percent = jnp.asarray(percent, jnp.float32)
        sigma = self._shift(1.0 - percent)
        return jnp.where(percent <= 0.0, 1.0, jnp.where(percent >= 1.0, 0.0, sigma))


def discrete_flow_schedule(shift: float = 1.0, multiplier: float = 1.0) -> FlowSchedule:
    """ComfyUI's ModelSamplingDiscreteFlow with its shift and multiplier (each family's file sets them)."""
    return FlowSchedule(alpha=shift, multiplier=multiplier)


def _unit_variance_input(sigma: jax.Array, x: jax.Array) -> jax.Array:
    # x_t = x0 + sigma * noise has variance sigma^2 + 1 for unit-variance latents (sigma_data = 1).
    return x / jnp.sqrt(sigma**2 + 1.0)


def _eps_denoised(sigma: jax.Array, model_output: jax.Array, x: jax.Array) -> jax.Array:
    return x - sigma * model_output


def _v_denoised(sigma: jax.Array, model_output: jax.Array, x: jax.Array) -> jax.Array:
    return x / (sigma**2 + 1.0) - model_output * sigma / jnp.sqrt(sigma**2 + 1.0)


def _add_noise(sigma: jax.Array, noise: jax.Array, x0: jax.Array) -> jax.Array:
    return x0 + sigma * noise


def _identity_input(sigma: jax.Array, x: jax.Array) -> jax.Array:
    return x


def _interpolate_noise(sigma: jax.Array, noise: jax.Array, x0: jax.Array) -> jax.Array:
    return sigma * noise + (1.0 - sigma) * x0


def _noise_target(sigma: jax.Array, noise: jax.Array, x0: jax.Array) -> jax.Array:
    return noise


def _v_target(sigma: jax.Array, noise: jax.Array, x0: jax.Array) -> jax.Array:
    # the output that _v_denoised turns into x0 exactly: (noise - sigma x0) / sqrt(sigma^2 + 1)
    return (noise - sigma * x0) / jnp.sqrt(sigma**2 + 1.0)


def _velocity_target(sigma: jax.Array, noise: jax.Array, x0: jax.Array) -> jax.Array:
    # d x_t / d sigma of x_t = sigma noise + (1 - sigma) x0
    return noise - x0


@dataclass(frozen=True)
class Parameterisation:
    """What a network's input and output mean in sigma space; one row per ComfyUI model-sampling type.

    Each function takes sigma already shaped to broadcast against the latent. `target` is the output a perfect
    network gives for a sample noised by `noise_scaling` (what a trainer with the native loss compares with).
    """

    calculate_input: Callable[[jax.Array, jax.Array], jax.Array]
    calculate_denoised: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
    noise_scaling: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
    target: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


EPS = Parameterisation(_unit_variance_input, _eps_denoised, _add_noise, _noise_target)
V_PREDICTION = Parameterisation(_unit_variance_input, _v_denoised, _add_noise, _v_target)
CONST = Parameterisation(_identity_input, _eps_denoised, _interpolate_noise, _velocity_target)
PARAMETERISATIONS: dict[str, Parameterisation] = {"eps": EPS, "v": V_PREDICTION, "const": CONST}


def _per_sample(sigma: ArrayLike, x: jax.Array) -> jax.Array:
    """Shape sigma to broadcast over x: [B] -> [B, 1, ..., 1], a scalar stays a scalar; layout-agnostic."""
    sigma = jnp.asarray(sigma)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(sigma.shape[:1] + (1,) * (x.ndim - 1))


@dataclass(frozen=True)
class ModelSampling:
    """A prediction type ("eps", "v" or "const") on a noise schedule: everything between a network and x0.

    ``x`` is any latent with the batch first (NCHW or NHWC alike); sigma is a scalar or one value per sample.
    """

    prediction: str
    schedule: DiscreteSchedule | FlowSchedule

    def __post_init__(self) -> None:
        if self.prediction not in PARAMETERISATIONS:
            raise ValueError(
                f"unknown prediction type {self.prediction!r}; expected one of {sorted(PARAMETERISATIONS)}"
            )

    @property
    def parameterisation(self) -> Parameterisation:
        return PARAMETERISATIONS[self.prediction]

    def calculate_input(self, sigma: ArrayLike, x: jax.Array) -> jax.Array:
        """The network input for a noisy sample x_t."""
        return self.parameterisation.calculate_input(_per_sample(sigma, x), x)

    def calculate_denoised(self, sigma: ArrayLike, model_output: jax.Array, x: jax.Array) -> jax.Array:
        """The x0 prediction from the network's raw output and the noisy sample x_t it was given."""
        return self.parameterisation.calculate_denoised(_per_sample(sigma, x), model_output, x)

    def noise_scaling(self, sigma: ArrayLike, noise: jax.Array, x0: jax.Array) -> jax.Array:
        """The noisy sample x_t for clean latents x0 (ComfyUI's max_denoise=False path)."""
        return self.parameterisation.noise_scaling(_per_sample(sigma, x0), noise, x0)

    def target(self, sigma: ArrayLike, noise: jax.Array, x0: jax.Array) -> jax.Array:
        """The raw output that denoises `noise_scaling(sigma, noise, x0)` to x0: eps, v or flow velocity."""
        return self.parameterisation.target(_per_sample(sigma, x0), noise, x0)

    def timestep(self, sigma: ArrayLike) -> jax.Array:
        return self.schedule.timestep(sigma)

    def percent_to_sigma(self, percent: ArrayLike) -> jax.Array:
        return self.schedule.percent_to_sigma(percent)


@dataclass(frozen=True)
class LatentFormat:
    """The affine map between raw VAE latents and the unit-variance latents the diffusion model works on.

    `channel_mean`/`channel_std`, when given, are per-channel statistics (ComfyUI's `latents_mean`/`latents_std`
    of video-VAE formats): then `(x - mean) * scale_factor / std` over the channel axis 1 (NCHW or NCTHW), as
    ComfyUI computes it, and `shift` is unused."""

    scale_factor: float
    shift: float = 0.0
    channel_mean: tuple[float, ...] | None = None
    channel_std: tuple[float, ...] | None = None

    def describe(self) -> str:
        if self.channel_mean is None:
            return f"x {self.scale_factor}, shift {self.shift}"
        return f"per-channel mean and std ({len(self.channel_mean)} channels), x {self.scale_factor}"

    def _channel(self, values: tuple[float, ...], x: jax.Array) -> jax.Array:
        if x.shape[1] != len(values):
            raise ValueError(f"latents have {x.shape[1]} channels, the latent format has {len(values)}")
        return jnp.asarray(values, x.dtype).reshape(1, -1, *(1,) * (x.ndim - 2))

    def process_in(self, x: jax.Array) -> jax.Array:
        """Raw VAE latent -> diffusion-model latent."""
        if self.channel_mean is None:
            return (x - self.shift) * self.scale_factor
        return (x - self._channel(self.channel_mean, x)) * self.scale_factor / self._channel(self.channel_std, x)

    def process_out(self, x: jax.Array) -> jax.Array:
        """Diffusion-model latent -> raw VAE latent."""
        if self.channel_mean is None:
            return x / self.scale_factor + self.shift
        return x * self._channel(self.channel_std, x) / self.scale_factor + self._channel(self.channel_mean, x)
