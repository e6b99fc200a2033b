"""The device mesh and the rules that say how each array is laid out on it.

A mesh has two named axes: `data` and `fsdp`. The batch is split over both (every device computes different
samples, as in FSDP/ZeRO-3); the frozen base weights are split over `fsdp` by `FSDP_RULES`, a table from
parameter path and shape to the dimension that is split, so XLA all-gathers each weight where it is used and no
device holds the whole model. Adapters, optimizer state and the dataset are replicated: they are small.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp")
BATCH_AXES = AXES  # the batch dimension is split over every device

# (regex searched in the dotted parameter path, the dimensions the fsdp axis may split in order of preference).
# The first matching row decides. Dimensions count from the end, so a leading axis (a conv kernel's spatial
# axes, a scanned model's stacked block axis) is never split. Vectors (norm scales) are replicated, and so is a
# weight with no listed dimension divisible by the fsdp size.
FSDP_RULES: tuple[tuple[str, tuple[int, ...]], ...] = (
    (r"(^|\.)bias$", ()),  # biases, stacked or not: small
    (r"", (-1, -2)),  # every weight: output features (linear [in, out], conv HWIO), else input features
)


class MeshError(ValueError):
    """A mesh that cannot be built or does not fit the run; the message names the --mesh flag."""


def parse_mesh(spec: str) -> dict[str, int]:
    """`"data=2,fsdp=4"` -> {"data": 2, "fsdp": 4}; axes left out have size 1; one size may be -1 (the rest)."""
    sizes = dict.fromkeys(AXES, 1)
    given = set()
    for part in spec.replace(" ", "").split(","):
        name, _, value = part.partition("=")
        if name not in AXES or not re.fullmatch(r"-?\d+", value):
            raise MeshError(f"--mesh {spec!r}: expected comma-separated axis=size with axes {list(AXES)}, got {part!r}")
        if name in given:
            raise MeshError(f"--mesh {spec!r}: axis {name!r} is given twice")
        size = int(value)
        if size == 0 or size < -1:
            raise MeshError(f"--mesh {spec!r}: axis {name!r} must have a positive size or -1 (the rest)")
        given.add(name)
        sizes[name] = size
    if list(sizes.values()).count(-1) > 1:
        raise MeshError(f"--mesh {spec!r}: only one axis may be -1")
    return sizes


def resolve_sizes(spec: str, device_count: int) -> dict[str, int]:
    """The axis sizes for `device_count` devices: -1 takes what the others leave; the product must be exact."""
    sizes = parse_mesh(spec)
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if -1 in sizes.values():
        if device_count % fixed:
            raise MeshError(f"--mesh {spec!r}: {device_count} devices do not split into groups of {fixed}")
        sizes = {name: device_count // fixed if size == -1 else size for name, size in sizes.items()}
    if math.prod(sizes.values()) != device_count:
        raise MeshError(
            f"--mesh {spec!r} asks for {math.prod(sizes.values())} devices, but {device_count} are available "
            f"({jax.devices()[0].platform}); use -1 for one axis to take the rest"
        )
    return sizes


def make_mesh(spec: str, devices=None) -> Mesh:
    """The mesh over all devices of all processes (or `devices`), axes `data` x `fsdp`, in JAX's device order
    (which keeps `fsdp` neighbours on the fastest interconnect)."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = resolve_sizes(spec, len(devices))
    shape = tuple(sizes[name] for name in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def check_batch(spec: str, batch_size: int, bucket_sizes: list[int], device_count: int) -> None:
    """Refuse, before loading or compiling, a batch that does not split evenly over the devices sharing it."""
    sizes = resolve_sizes(spec, device_count)
    devices = math.prod(sizes[name] for name in BATCH_AXES)
    for count in bucket_sizes:
        batch = min(batch_size, count)
        if batch % devices:
            detail = f"batch_size {batch_size}" if batch == batch_size else f"a bucket of {count} samples"
            raise MeshError(
                f"{detail} gives batches of {batch}, which do not split over the {devices} devices of --mesh "
                f"{spec!r} (the batch is split over data x fsdp): use a --batch-size that is a multiple of {devices}"
            )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays whose first dimension is the batch: that dimension split over every device."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def fsdp_spec(path: str, shape: tuple[int, ...], fsdp: int, rules=FSDP_RULES) -> PartitionSpec:
    """The partition of one frozen weight: the first rule matching `path` lists the dimensions that may be split
    over `fsdp` devices; the first of them that exists and divides evenly is split."""
    dims = next(dims for pattern, dims in rules if re.search(pattern, path))
    spec = [None] * len(shape)
    if fsdp > 1 and len(shape) >= 2:
        for dim in dims:
            if -len(shape) <= dim < 0 and shape[dim] % fsdp == 0:
                spec[dim] = "fsdp"
                break
    return PartitionSpec(*spec)


def dotted(path) -> str:
    """A pytree key path as the dotted parameter name used in checkpoint files (`input_blocks.1.0.weight`)."""
    name = jax.tree_util.keystr(path, simple=True, separator=".")
    return name.removesuffix(".value")  # an nnx.Variable's own leaf


def fsdp_sharding(mesh: Mesh, path: str, shape: tuple[int, ...]) -> NamedSharding:
    return NamedSharding(mesh, fsdp_spec(path, shape, mesh.shape["fsdp"]))


def base_shardings(mesh: Mesh, base):
    """The sharding of every leaf of the frozen base state, by `FSDP_RULES`."""
    return jax.tree_util.tree_map_with_path(lambda path, leaf: fsdp_sharding(mesh, dotted(path), leaf.shape), base)


@dataclass(frozen=True)
class MeshLayout:
    """Where the train step's arrays live: the frozen base by `FSDP_RULES`, the rest (adapters, optimizer state,
    dataset, keys, losses) replicated; the batch inside the step split over every device."""

    mesh: Mesh
    base: Any  # a tree of NamedSharding shaped like the base state

    @classmethod
    def of(cls, mesh: Mesh, base) -> MeshLayout:
        return cls(mesh, base_shardings(mesh, base))

    @property
    def replicated(self) -> NamedSharding:
        return replicated(self.mesh)

    @property
    def batch(self) -> NamedSharding:
        return batch_sharding(self.mesh)


def per_device_bytes(tree) -> Mapping[str, int]:
    """Bytes each device holds of the tree's arrays, keyed by device: what sharding saves, measured."""
    held: dict[str, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[str(shard.device)] = held.get(str(shard.device), 0) + shard.data.nbytes
    return held
