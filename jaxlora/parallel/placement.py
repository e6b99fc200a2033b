"""Putting arrays onto their shards and bringing them back, the same way on one process or many.

On several processes (multi-host) a global array is assembled from the shards each process holds: the host
value is sliced per shard with `jax.make_array_from_callback`, so a device only ever receives its own slice,
and every process must pass the same host value (weights read from the same file, seeded adapters).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Sharding

from jaxlora.parallel.mesh import dotted


def from_host(host: np.ndarray, sharding: Sharding) -> jax.Array:
    """A global array of `host` laid out by `sharding`; each device is sent only its own slice."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place(value, sharding: Sharding) -> jax.Array | jax.ShapeDtypeStruct:
    """`value` (a host or device array) moved onto `sharding`; an abstract value gets it as its layout."""
    if isinstance(value, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)
    if isinstance(value, jax.Array) and value.sharding == sharding:
        return value
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(value)
        return jax.random.wrap_key_data(from_host(np.asarray(jax.random.key_data(value)), sharding), impl=impl)
    return from_host(np.asarray(value), sharding)


def place_tree(tree, shardings):
    """Every leaf of `tree` onto the matching sharding (one sharding for all leaves, or a tree of them)."""
    if isinstance(shardings, Sharding):
        return jax.tree.map(lambda leaf: place(leaf, shardings), tree)
    return jax.tree.map(place, tree, shardings)


def in_host_memory(tree, shardings, chosen: Callable[[str, tuple[int, ...]], bool]):
    """The shardings of `tree`'s leaves (one sharding for all, or a tree of them), those `chosen` by dotted path
    and shape moved to host memory ("pinned_host"): the same devices and layout, so a jitted step can fetch such a
    leaf to the device where it needs it (`jax.device_put` to device memory) instead of holding it there."""

    def one(path, leaf, sharding):
        return sharding.with_memory_kind("pinned_host") if chosen(dotted(path), leaf.shape) else sharding

    if isinstance(shardings, Sharding):
        return jax.tree_util.tree_map_with_path(lambda path, leaf: one(path, leaf, shardings), tree)
    return jax.tree_util.tree_map_with_path(one, tree, shardings)


def _fetch(leaf: jax.Array) -> np.ndarray:
    if leaf.is_fully_addressable:
        return np.asarray(leaf)
    if leaf.sharding.is_fully_replicated:  # every process holds a whole copy
        return np.asarray(leaf.addressable_data(0))
    return multihost_utils.process_allgather(leaf, tiled=True)  # a collective: every process calls it


def to_host(tree):
    """The tree as numpy arrays, each leaf fetched once (from the local copy of a replicated array)."""
    return jax.tree.map(_fetch, tree)


def is_writer() -> bool:
    """Only process 0 writes files (checkpoint bookkeeping aside, which orbax coordinates itself)."""
    return jax.process_index() == 0
