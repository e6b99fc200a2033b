"""What a training step samples and compares, beyond the node's objective: the noise-level distribution, offset
noise, min-SNR-gamma weighting, the loss target and caption dropout. Pure jax.numpy functions of a key and arrays,
called from `train.step`; with the defaults (`Objective()`) the step is the node's, bit for bit.

Noise levels are drawn as t in (0, 1), the fraction of the way to pure noise (t = 1 - ComfyUI's percent), and
mapped to sigma by the model's own `percent_to_sigma`, so a flow model's shift (`flow_shift`) applies on top, as
rectified-flow trainers shift their sampled t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxlora.models.sampling import ModelSampling

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode")
LOSS_TARGETS = ("x0", "native")
OFFSET_STREAM, DROPOUT_STREAM = 1, 2  # fold_in streams of a micro-step's key, apart from its noise and sigma keys


@dataclass(frozen=True)
class Objective:
    """`timestep_sampling`: uniform (the node's), logit_normal (t = sigmoid(N(logit_mean, logit_std))) or mode
    (SD3's f(u) = 1 - u - mode_scale (cos^2(pi u / 2) - 1 + u)). `noise_offset`: per-sample, per-channel constant
    noise of that scale added to the noise (eps/v models). `min_snr_gamma`: weight each sample by min(SNR, gamma)
    in x0 terms (eps/v models). `loss_target`: x0 (the node's) or native (the network's own output against
    what it should output: noise for eps, v for v, the velocity noise - x0 for flow). `caption_dropout`: the
    probability that a sample is trained with the empty caption's conditioning instead of its own.
    `min_sigma`/`max_sigma`: the noise range a flow model trains on (one expert of a model whose experts
    split the noise levels)."""

    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    loss_target: str = "x0"
    caption_dropout: float = 0.0
    min_sigma: float = 0.0
    max_sigma: float = 1.0


def draw_percent(key: jax.Array, batch: int, objective: Objective) -> jax.Array:
    """Each sample's ComfyUI percent (0: pure noise, 1: clean) in (0, 1), from `objective.timestep_sampling`."""
    tiny = jnp.finfo(jnp.float32).tiny
    if objective.timestep_sampling == "uniform":
        # u in (0, 1): ComfyUI's u = 0 (odds 2^-24 per sample) would give sigma = 1e9 and wreck that step.
        return jax.random.uniform(key, (batch,), minval=tiny)
    if objective.timestep_sampling == "logit_normal":
        t = jax.nn.sigmoid(objective.logit_mean + objective.logit_std * jax.random.normal(key, (batch,)))
    else:
        u = jax.random.uniform(key, (batch,))
        t = 1.0 - u - objective.mode_scale * (jnp.cos(math.pi * u / 2) ** 2 - 1.0 + u)
    return jnp.clip(1.0 - t, tiny, jnp.nextafter(jnp.float32(1), jnp.float32(0)))


def restrict_sigma(sigma: jax.Array, objective: Objective) -> jax.Array:
    """A flow model's drawn sigma in (0, 1) rescaled onto [min_sigma, max_sigma], as musubi-tuner's
    `--min_timestep/--max_timestep` rescale its drawn (shifted) timesteps: how one expert of a two-expert model trains
    on its own noise range (the family's notes give the boundary). The full range leaves sigma as drawn."""
    if (objective.min_sigma, objective.max_sigma) == (0.0, 1.0):
        return sigma
    return objective.min_sigma + (objective.max_sigma - objective.min_sigma) * sigma


def offset_noise(key: jax.Array, shape: tuple[int, ...], scale: float) -> jax.Array:
    """`scale` times one normal value per sample and channel, broadcast over the spatial axes of NHWC latents."""
    return scale * jax.random.normal(key, (shape[0], *(1,) * (len(shape) - 2), shape[-1]))


def min_snr_weight(sigma: jax.Array, gamma: float) -> jax.Array:
    """min(SNR, gamma) with SNR = 1 / sigma^2 (x_t = x0 + sigma noise, unit-variance data): Hang et al.'s weight of
    the x0-space loss. For an eps target it is min(SNR, gamma) / SNR and for v min(SNR, gamma) / (SNR + 1): the same
    objective, since their errors are sqrt(SNR) and sqrt(SNR + 1) times the x0 error."""
    return jnp.minimum(1.0 / jnp.square(sigma), gamma)


def target_scale(sigma: jax.Array, prediction: str) -> jax.Array:
    """How much larger a squared error in the native target is than the same prediction's in x0: 1 for x0,
    SNR for eps, SNR + 1 for v; min-SNR weights divide by it."""
    snr = 1.0 / jnp.square(sigma)
    return {"eps": snr, "v": snr + 1.0}[prediction]


def prediction_and_target(
    sampling: ModelSampling,
    objective: Objective,
    sigma: jax.Array,
    output: jax.Array,
    noisy: jax.Array,
    noise: jax.Array,
    x0: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """What the loss compares: the denoised latents and x0 (the node's), or the raw output and its native
    target."""
    if objective.loss_target == "x0":
        return sampling.calculate_denoised(sigma, output, noisy), x0
    return output, sampling.target(sigma, noise, x0)


def weighted_loss(loss, prediction, target, sigma, sampling: ModelSampling, objective: Objective) -> jax.Array:
    """The batch's loss: the node's mean over everything, or with min-SNR-gamma the weighted mean of per-sample
    losses."""
    if objective.min_snr_gamma is None:
        return loss(prediction, target)
    return jnp.mean(sample_losses(loss, prediction, target, sigma, sampling, objective))


def sample_losses(loss, prediction, target, sigma, sampling: ModelSampling, objective: Objective) -> jax.Array:
    """Each sample's (weighted) loss, whose mean is `weighted_loss` (the losses are means over equal-sized
    samples): what validation averages over a held-out set of any size."""
    losses = jax.vmap(loss)(prediction, target)
    if objective.min_snr_gamma is None:
        return losses
    weight = min_snr_weight(sigma, objective.min_snr_gamma)
    if objective.loss_target == "native":
        weight = weight / target_scale(sigma, sampling.prediction)
    return weight * losses


def drop_captions(key: jax.Array, inputs: dict, empty: dict, probability: float) -> dict:
    """Each sample's conditioning inputs replaced by the empty caption's (`empty`, same shapes) with
    `probability`, all of a sample's fields together."""
    first = next(iter(inputs.values()))
    dropped = jax.random.bernoulli(key, probability, (first.shape[0],))
    return {
        name: jnp.where(dropped.reshape(-1, *(1,) * (value.ndim - 1)), empty[name], value)
        for name, value in inputs.items()
    }
