"""One optimizer step as one compiled function: for each of `grad_accumulation_steps` micro-steps draw a batch,
noise it, denoise it, take the x0-space loss and its gradient with respect to the adapter tree only; then
apply the optimizer. Read this file top to bottom to know what training does.

On a device mesh (`jaxlora.parallel`) the same function runs sharded: each micro-step's batch is split over the
devices, the frozen base arrives split by its rule table, and XLA inserts the gathers and gradient reductions.

Randomness is stateless, so a resumed run repeats an uninterrupted one exactly: micro-step i draws its noise and
sigmas from a key made of the 64-bit value seed + 1000 i (ComfyUI's structure), and its batch indices from a
key folded from (seed, i). Batches are drawn without replacement within a micro-step, independently across them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlora.models.attention import batch_split_over
from jaxlora.models.sampling import ModelSampling
from jaxlora.models.stack import streamed_weights
from jaxlora.parallel.mesh import MeshLayout
from jaxlora.train.objective import (
    DROPOUT_STREAM,
    OFFSET_STREAM,
    Objective,
    draw_percent,
    drop_captions,
    offset_noise,
    prediction_and_target,
    restrict_sigma,
    weighted_loss,
)

PERMUTATION_STREAM = 0x5EED


def noise_key_data(seed: int, first_micro_step: int, count: int) -> np.ndarray:
    """Threefry key data [count, 2] (uint32 hi, lo) of seed + 1000 i for i in [first, first + count), mod 2^64."""
    values = np.uint64(seed) + np.uint64(1000) * np.arange(first_micro_step, first_micro_step + count, dtype=np.uint64)
    return np.stack(
        [(values >> np.uint64(32)).astype(np.uint32), (values & np.uint64(0xFFFFFFFF)).astype(np.uint32)], 1
    )


def permutation_key(seed: int) -> jax.Array:
    """The base key of batch selection: the 64-bit seed split into two 32-bit words, then a separate stream."""
    data = noise_key_data(seed, 0, 1)[0]
    return jax.random.fold_in(jax.random.wrap_key_data(data, impl="threefry2x32"), PERMUTATION_STREAM)


@dataclass(frozen=True)
class StepSettings:
    """The static part of a train step (a change recompiles)."""

    batch_size: int
    grad_accumulation_steps: int
    compute_dtype: jnp.dtype
    loss: Callable[[jax.Array, jax.Array], jax.Array]
    optimizer: optax.GradientTransformation
    sampling: ModelSampling
    batch_sharding: jax.sharding.Sharding | None = None  # on a mesh: the batch dimension split over its devices
    objective: Objective = Objective()  # noise levels, offset, weighting, target, caption dropout (the node's)
    streamed_weights: bool = False  # the stacked blocks' frozen weights are in host memory (offloading)


def _split_batch(array: jax.Array, settings: StepSettings) -> jax.Array:
    """Lay the batch dimension out over the mesh (nothing on one device): each device computes its samples."""
    if settings.batch_sharding is None:
        return array
    return jax.lax.with_sharding_constraint(array, settings.batch_sharding)


def _rows(array: jax.Array, index: jax.Array) -> jax.Array:
    """Per-sample rows of a conditioning array, or its single row repeated."""
    if array.shape[0] == 1:
        return jnp.broadcast_to(array, (index.shape[0], *array.shape[1:]))
    return array[index]


def micro_step_loss(graph, adapters, base, data, key_data, perm_key, micro_step, settings: StepSettings):
    """The loss of one micro-step: pick samples, noise them, denoise, compare with x0 (every family's objective;
    `settings.objective` may change the noise levels, add offset noise, weight samples, compare the native target
    or drop captions). `data["empty"]`, where present, holds the empty caption's network inputs."""
    count = data["latents"].shape[0]
    batch = min(settings.batch_size, count)
    index = jax.random.permutation(jax.random.fold_in(perm_key, micro_step), count)[:batch]
    prediction, target, sigma = denoise_batch(graph, adapters, base, data, index, key_data, settings)
    return weighted_loss(settings.loss, prediction, target, sigma, settings.sampling, settings.objective)


def denoise_batch(graph, adapters, base, data, index, key_data, settings: StepSettings):
    """The samples `index` of `data` noised with draws from `key_data`, denoised by the adapted network: (what the
    loss compares, its target, each sample's sigma). Shared by the train step and validation (`train.validation`),
    so both measure the same objective."""
    sampling, objective = settings.sampling, settings.objective
    batch = index.shape[0]
    x0 = _split_batch(data["latents"][index].astype(jnp.float32), settings)
    key = jax.random.wrap_key_data(key_data, impl="threefry2x32")
    noise_key, sigma_key = jax.random.split(key)
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    if objective.noise_offset:
        noise = noise + offset_noise(jax.random.fold_in(key, OFFSET_STREAM), x0.shape, objective.noise_offset)
    noise = _split_batch(noise.astype(settings.compute_dtype).astype(jnp.float32), settings)
    percent = _split_batch(draw_percent(sigma_key, batch, objective), settings)
    sigma = restrict_sigma(sampling.percent_to_sigma(percent), objective)
    noisy = sampling.noise_scaling(sigma, noise, x0)

    network = nnx.merge(graph, adapters, base)
    # Everything in `data` but the latents is a keyword input of the network (context, y, guidance).
    inputs = {name: _rows(value, index) for name, value in data.items() if name not in ("latents", "empty")}
    if objective.caption_dropout:
        empty = {name: _rows(value, index) for name, value in data["empty"].items()}
        inputs = drop_captions(jax.random.fold_in(key, DROPOUT_STREAM), inputs, empty, objective.caption_dropout)
    with batch_split_over(settings.batch_sharding), streamed_weights(settings.streamed_weights):
        output = network(
            sampling.calculate_input(sigma, noisy).astype(settings.compute_dtype),
            sampling.timestep(sigma),
            **{name: _split_batch(value, settings) for name, value in inputs.items()},
        )
    prediction, target = prediction_and_target(sampling, objective, sigma, output.astype(jnp.float32), noisy, noise, x0)
    return prediction, target, sigma


def train_step(graph, adapters, opt_state, base, data, key_data, perm_key, first_micro_step, settings: StepSettings):
    """Accumulate gradients over the micro-steps inside the compiled step (no Python round trip), then update.

    Returns the new adapters and optimizer state and the step's metrics: `loss`, the undivided loss of every
    micro-step, and `grad_norm`, the global norm of the averaged gradient (before any clipping), for the logs.
    """
    grad_fn = jax.value_and_grad(micro_step_loss, argnums=1)

    def accumulate(grads, inputs):
        key, offset = inputs
        loss, micro_grads = grad_fn(graph, adapters, base, data, key, perm_key, first_micro_step + offset, settings)
        return jax.tree.map(jnp.add, grads, micro_grads), loss

    zeros = jax.tree.map(jnp.zeros_like, adapters)
    offsets = jnp.arange(settings.grad_accumulation_steps)
    # XLA:TPU refuses host-memory operands carried through a while loop (error E1200): with frozen weights kept in
    # host memory (offloading) the micro-steps are unrolled, at the cost of compiling the network once per micro-step.
    grads, losses = jax.lax.scan(accumulate, zeros, (key_data, offsets), unroll=settings.streamed_weights)
    grads = jax.tree.map(lambda g: g / settings.grad_accumulation_steps, grads)
    updates, opt_state = settings.optimizer.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, {"loss": losses, "grad_norm": optax.tree.norm(grads)}


def compile_step(graph, settings: StepSettings, layout: MeshLayout | None = None):
    """The jitted step: the adapters and optimizer state are donated (updated in place), the frozen base is a
    plain argument (never a closure constant, never copied). With a mesh `layout`, the inputs and outputs keep
    their shardings from step to step: base split over fsdp, everything else replicated."""

    def step(adapters, opt_state, base, data, key_data, perm_key, first_micro_step):
        return train_step(graph, adapters, opt_state, base, data, key_data, perm_key, first_micro_step, settings)

    if layout is None:
        return jax.jit(step, donate_argnums=(0, 1))
    same = layout.replicated
    return jax.jit(
        step,
        in_shardings=(same, same, layout.base, same, same, same, same),
        out_shardings=(same, same, same),
        donate_argnums=(0, 1),
    )
