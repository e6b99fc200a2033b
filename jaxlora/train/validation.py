"""Validation loss: the training objective on samples the run does not train on, at noise and noise levels drawn
once from the seed, so every evaluation of a run (and of runs with the same seed) sees the same draws and the
curve moves only because the adapter does.

The held-out samples are a separate dataset or a fraction of the training dataset (`split_dataset`, chosen from
the seed). Each bucket's samples are evaluated in chunks of the training batch size by one compiled function per
bucket (a `lax.scan` over the chunks), which returns a device scalar: the caller fetches it with the training
losses, so validation adds no host synchronisation of its own. Caption dropout is not applied (each sample is
scored with its own caption); everything else (noise levels, offset noise, weighting, loss target) is training's.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.train.data import Bucket, Dataset
from jaxlora.train.objective import sample_losses
from jaxlora.train.step import StepSettings, denoise_batch, noise_key_data

SPLIT_STREAM = 0x5A11D  # numpy seed word of the held-out choice
NOISE_STREAM = 0x7A1  # fold_in stream of the validation noise keys


def held_out_count(size: int, fraction: float) -> int:
    """round(fraction * size) samples, at least 1 when the fraction is positive."""
    return max(1, round(fraction * size)) if fraction > 0 else 0


def _take(bucket: Bucket, rows: np.ndarray) -> Bucket:
    """The bucket's samples `rows` (conditioning shared by all samples stays shared)."""
    conditioning = {
        name: value if value.shape[0] == 1 and bucket.size > 1 else value[rows]
        for name, value in bucket.conditioning.items()
    }
    return replace(bucket, latents=bucket.latents[rows], conditioning=conditioning)


def split_dataset(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(training samples, held-out samples): `held_out_count(size, fraction)` samples of the whole dataset, chosen
    by a permutation seeded from `seed`, are held out; buckets left empty on either side are dropped. A split that
    would leave nothing to train on is refused."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation_split must be between 0 and 1 (exclusive), got {fraction}")
    count = held_out_count(dataset.size, fraction)
    if count >= dataset.size:
        raise ValueError(
            f"validation_split {fraction} holds out {count} of the dataset's {dataset.size} samples, leaving none to "
            "train on: use a smaller fraction or a separate validation_dataset"
        )
    order = np.random.default_rng([seed % 2**63, SPLIT_STREAM]).permutation(dataset.size)
    held = np.zeros(dataset.size, bool)
    held[order[:count]] = True
    starts = np.cumsum([0, *(b.size for b in dataset.buckets)])
    train, valid = [], []
    for bucket, start in zip(dataset.buckets, starts, strict=False):
        mask = held[start : start + bucket.size]
        for rows, side in ((np.flatnonzero(~mask), train), (np.flatnonzero(mask), valid)):
            if len(rows):
                side.append(_take(bucket, rows))
    return Dataset(tuple(train)), Dataset(tuple(valid))


class _Chunks(NamedTuple):
    """One bucket's evaluation plan: sample indices [chunks, batch] (the last chunk padded with repeats), a mask of
    the real ones, and each chunk's noise key data [chunks, 2]."""

    index: jax.Array
    mask: jax.Array
    keys: jax.Array


def _chunks(size: int, batch: int, seed: int, first_chunk: int) -> _Chunks:
    count = -(-size // batch)
    flat = np.arange(count * batch)
    keys = noise_key_data(seed, first_chunk, count)
    streamed = jax.vmap(lambda k: jax.random.key_data(jax.random.fold_in(_wrap(k), NOISE_STREAM)))(keys)
    return _Chunks(
        jnp.asarray((flat % size).reshape(count, batch)), jnp.asarray(flat < size).reshape(count, batch), streamed
    )


def _wrap(data: jax.Array) -> jax.Array:
    return jax.random.wrap_key_data(data, impl="threefry2x32")


def _bucket_loss_sum(graph, adapters, base, data, chunks: _Chunks, settings: StepSettings) -> jax.Array:
    """The sum of the bucket's per-sample losses, chunk by chunk."""

    def chunk(total, inputs):
        index, mask, key_data = inputs
        prediction, target, sigma = denoise_batch(graph, adapters, base, data, index, key_data, settings)
        losses = sample_losses(settings.loss, prediction, target, sigma, settings.sampling, settings.objective)
        return total + jnp.sum(jnp.where(mask, losses, 0.0)), None

    total, _ = jax.lax.scan(chunk, jnp.zeros((), jnp.float32), (chunks.index, chunks.mask, chunks.keys))
    return total


class Validation:
    """The validation loss of an adapter tree over held-out device arrays (`device_arrays` per bucket), at the
    fixed draws of `seed`. Compiled once per bucket on first use; calling it dispatches and returns a device
    scalar without waiting."""

    def __init__(self, graph: nnx.GraphDef, settings: StepSettings, data: list[dict[str, jax.Array]], seed: int):
        self.settings = replace(settings, objective=replace(settings.objective, caption_dropout=0.0))
        self.data = data
        sizes = [bucket["latents"].shape[0] for bucket in data]
        self.size = sum(sizes)
        batches = [min(settings.batch_size, size) for size in sizes]
        firsts = np.cumsum([0, *(-(-size // batch) for size, batch in zip(sizes, batches, strict=True))])
        self.chunks = [
            _chunks(size, batch, seed, int(first)) for size, batch, first in zip(sizes, batches, firsts, strict=False)
        ]
        self.evaluate = jax.jit(
            lambda adapters, base, data, chunks: _bucket_loss_sum(graph, adapters, base, data, chunks, self.settings)
        )

    def __call__(self, adapters: nnx.State, base: nnx.State) -> jax.Array:
        """The mean per-sample loss over every held-out sample (a device scalar)."""
        sums = [
            self.evaluate(adapters, base, data, chunks) for data, chunks in zip(self.data, self.chunks, strict=True)
        ]
        return sum(sums[1:], sums[0]) / self.size
