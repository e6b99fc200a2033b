"""Safetensors checkpoints -> Flax networks: family detection, config inference, bounded-memory loading.

Accepted files: a full checkpoint (`model.diffusion_model.*` beside VAE and text-encoder weights, which are
ignored), a bare diffusion model (`diffusion_model.*`), or a diffusion model with no prefix, of any family in
`registry.FAMILIES`; its weights wide, float8, or float8 with ComfyUI's per-tensor scales (`scaled_fp8`). The
config is inferred from key names and shapes alone, by the family. The header is checked completely (missing,
unexpected, mis-shaped keys, scales) before any tensor is read; tensors are then read one at a time
from the memory-mapped file, converted to Flax layout, cast and placed on the device. The host holds at most one
tensor beyond the model, or for a layer of stacked blocks that layer's per-block tensors until they are stacked and
transferred. On a device mesh each tensor goes straight to its shards (split by `jaxlora.parallel.mesh.FSDP_RULES`),
so no device ever holds the whole model.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from jaxlora.models.family import CheckpointError, ModelFamily, Variant
from jaxlora.models.layers import WeightLayer
from jaxlora.models.quantize import (
    WeightScale,
    check_quantization,
    quantize_weight,
    scale_shape,
    stored_dtype,
    widen,
)
from jaxlora.models.registry import describe_keys, find_family
from jaxlora.models.scaled_fp8 import find_scales
from jaxlora.models.stack import LayerSite, layer_sites
from jaxlora.parallel.mesh import fsdp_sharding
from jaxlora.parallel.placement import from_host


class KeyMismatchError(CheckpointError):
    pass


class ShapeMismatchError(CheckpointError):
    pass


@dataclass(frozen=True)
class CheckpointIndex:
    """A checkpoint's header: tensor shapes in torch layout and safetensors dtype names ("BF16", "F8_E4M3"), by
    file key, and the `__metadata__` strings."""

    path: Path
    shapes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, str]
    metadata: Mapping[str, str]


def read_index(path: str | Path) -> CheckpointIndex:
    """Read only the header of a .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"permission denied: {path}")
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise CheckpointError(f"{path}: pickled checkpoints are not loaded (they can run code); use .safetensors")
    try:
        with safe_open(path, framework="numpy") as f:
            slices = {key: f.get_slice(key) for key in f.keys()}
            shapes = {key: tuple(s.get_shape()) for key, s in slices.items()}
            dtypes = {key: s.get_dtype() for key, s in slices.items()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable .safetensors file: {error}") from error
    return CheckpointIndex(path, shapes, dtypes, metadata)


# safetensors' numpy reader has no fp8 dtypes (it looks them up on numpy); such tensors are read from the mapped file.
FP8_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


class TensorFile:
    """An open .safetensors file read tensor by tensor (`get_tensor`), fp8-stored ones included (the
    `*_fp8_e4m3fn` files users download): those come as ml_dtypes arrays, to be cast by the caller."""

    def __init__(self, path: Path):
        self._file = safe_open(path, framework="numpy")
        with open(path, "rb") as raw:
            (length,) = struct.unpack("<Q", raw.read(8))
            self._header = json.loads(raw.read(length))
        self._data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + length)

    def get_tensor(self, key: str) -> np.ndarray:
        entry = self._header[key]
        if entry["dtype"] not in FP8_DTYPES:
            return self._file.get_tensor(key)
        start, stop = entry["data_offsets"]
        return np.asarray(self._data[start:stop]).view(FP8_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        del self._data
        self._file.__exit__(*exc)


def torch_parameters(network: nnx.Module) -> Iterator[tuple[str, LayerSite, str]]:
    """(file key without prefix, layer site, "weight"|"bias") for every parameter, in module order; a stacked
    layer gives one entry per block. The site reads like the layer (`getattr(site, name).shape`,
    `site.torch_shape(name)`); `site.value(name)` is the block's array."""
    for site in layer_sites(network):
        for name in ("weight", "bias"):
            if getattr(site.layer, name) is not None:
                key = site.layer.weight_key if name == "weight" else name
                yield (f"{site.path}.{key}" if key else site.path), site, name


def check_keys(network: nnx.Module, shapes: Mapping[str, tuple[int, ...]], prefix: str) -> None:
    """Raise naming every missing, unexpected or mis-shaped key, comparing in torch layout."""
    expected = {prefix + key: site.torch_shape(name) for key, site, name in torch_parameters(network)}
    present = {key for key in shapes if key.startswith(prefix)}
    kind = type(network).__name__
    missing = expected.keys() - present
    if missing:
        raise KeyMismatchError(f"checkpoint lacks {len(missing)} {kind} keys: {describe_keys(missing)}")
    unexpected = present - expected.keys()
    if unexpected:
        raise KeyMismatchError(f"checkpoint has {len(unexpected)} unexpected {kind} keys: {describe_keys(unexpected)}")
    wrong = [f"{key}: file {shapes[key]}, model {shape}" for key, shape in expected.items() if shapes[key] != shape]
    if wrong:
        raise ShapeMismatchError(f"{len(wrong)} {kind} tensors have the wrong shape: " + "; ".join(wrong[:8]))


def _host_dtype(dtype: jnp.dtype):
    return ml_dtypes.bfloat16 if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(dtype)


def _cast(array: np.ndarray, dtype: jnp.dtype | None) -> np.ndarray:
    """`dtype` None keeps the file's own dtype (the node's training_dtype "none"), fp8 included."""
    return array if dtype is None else array.astype(_host_dtype(dtype))


def _place(host: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """On the default device, or each device of `sharding` sent only its slice."""
    return jax.device_put(host) if sharding is None else from_host(host, sharding)


class _TensorMapping(dict):
    """In-memory tensors read like an open safetensors file."""

    def get_tensor(self, key: str) -> np.ndarray:
        return self[key]


def set_parameters(
    network: nnx.Module, tensors: Mapping[str, np.ndarray], dtype: jnp.dtype | None, prefix: str = ""
) -> None:
    """Fill `network` from in-memory torch-layout tensors keyed `prefix` + file key, through the checkpoint
    reader (so a stacked layer gets its blocks' tensors stacked): random or patched weights in tests and
    benchmarks."""
    read_parameters(network, _TensorMapping(tensors), prefix, dtype, mesh=None)


def quantizes(site: LayerSite, name: str, quantization: str) -> bool:
    """Whether parameter `name` of a layer (a block's, for stacked layers) is stored quantized: the 2-D and
    larger weights adapters patch."""
    return quantization != "none" and name == "weight" and site.layer.adaptable and len(site.weight.shape) >= 2


def stored_quantization(network: nnx.Module) -> str:
    """The quantization mode that describes adapted weights kept as the file stored them (`dtype` None): "fp8" when
    any is a float8 (a scaled-fp8 file's, per tensor with its scale, exactly as the fp8 mode stores them), else
    "none"."""
    float8 = (
        site.layer.adaptable
        and jnp.dtype(site.weight.dtype).itemsize == 1
        and jnp.issubdtype(site.weight.dtype, jnp.floating)
        for site in layer_sites(network)
    )
    return "fp8" if any(float8) else "none"


def _converted(site: LayerSite, name: str, torch_array: np.ndarray, dtype, quantization: str, scale=None):
    """One tensor in the layer's Flax layout: (array in `dtype`, None), or (quantized array, scale). `scale` is the
    file's own scale of a float8 weight (a scaled-fp8 checkpoint): the weight keeps it when stored quantized or as
    stored (`dtype` None), and is multiplied by it when cast to a wide `dtype`, never used unscaled."""
    array = site.from_torch(name, torch_array)
    out_axis = site.permutation("weight").index(0)
    if quantizes(site, name, quantization):
        return quantize_weight(array, quantization, out_axis, scale)
    if scale is None:
        return _cast(array, dtype), None
    if dtype is None:
        return quantize_weight(array, "fp8", out_axis, scale)
    return _cast(widen(array, scale), dtype), None


def read_parameters(
    network: nnx.Module,
    f,
    prefix: str,
    dtype: jnp.dtype | None,
    mesh: jax.sharding.Mesh | None,
    quantization: str = "none",
    file_scales: Mapping[str, str] | None = None,
) -> None:
    """Fill the network from an open safetensors file, onto the `mesh`'s shards when one is given. A stacked
    layer's per-block tensors are converted one at a time and stacked on the host, then placed in one transfer.
    With a `quantization` (`jaxlora.models.quantize`) each adapted weight is quantized as it is read, so the
    host holds at most one wide tensor (or one stacked layer's) and the device none. `file_scales` maps the file key of
    each float8 weight stored with a scale to its scale's key (`scaled_fp8.find_scales`)."""

    def sharding(key: str, shape: tuple[int, ...]) -> jax.sharding.Sharding | None:
        return None if mesh is None else fsdp_sharding(mesh, key, shape)

    def store(layer: WeightLayer, key: str, name: str, array: np.ndarray, scale: np.ndarray | None) -> None:
        getattr(layer, name).set_value(_place(array, sharding(key, array.shape)))
        if scale is not None:
            layer.weight_scale = WeightScale(_place(scale, sharding(key, scale.shape)))

    pending: dict[tuple[int, str], list[tuple[np.ndarray, np.ndarray | None]]] = {}
    for key, site, name in torch_parameters(network):
        scale_key = (file_scales or {}).get(prefix + key)
        torch_array = f.get_tensor(prefix + key)
        scale = (
            None if scale_key is None else f.get_tensor(scale_key).astype(np.float32).reshape([1] * torch_array.ndim)
        )
        converted = _converted(site, name, torch_array, dtype, quantization, scale)
        if site.index is None:
            store(site.layer, key, name, *converted)
            continue
        blocks = pending.setdefault((id(site.layer), name), [])
        blocks.append(converted)
        if len(blocks) == getattr(site.layer, name).shape[0]:
            arrays, scales = zip(*blocks, strict=True)
            if len({array.dtype for array in arrays}) > 1:
                raise CheckpointError(f"{key}: the blocks of this layer are stored in different dtypes")
            store(site.layer, key, name, np.stack(arrays), None if scales[0] is None else np.stack(scales))
            del pending[(id(site.layer), name)]


def quantize_abstract(network: nnx.Module, quantization: str) -> None:
    """Give a network of abstract weights (`jax.ShapeDtypeStruct`s) the storage `read_parameters` gives a loaded
    one under `quantization`: AOT compiles measure a quantized base without reading a checkpoint."""
    for _, site, name in torch_parameters(network):
        if site.index not in (None, 0) or not quantizes(site, name, quantization):
            continue
        lead = () if site.index is None else site.layer.weight.shape[:1]
        block = tuple(site.weight.shape)
        scale = scale_shape(block, quantization, site.permutation("weight").index(0))
        site.layer.weight.set_value(jax.ShapeDtypeStruct(lead + block, stored_dtype(quantization)))
        site.layer.weight_scale = WeightScale(jax.ShapeDtypeStruct(lead + scale, jnp.float32))


@dataclass(frozen=True)
class LoadedNetwork:
    """A network built from a checkpoint, with the family and variant it was recognised as and the key prefix
    of its tensors in the file."""

    network: nnx.Module
    family: ModelFamily
    variant: Variant
    prefix: str


def load_network(
    index: CheckpointIndex,
    dtype: jnp.dtype | None,
    weights: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    quantization: str = "none",
) -> LoadedNetwork:
    """Find the family, infer its config, build the network abstractly, check every key, then stream the tensors
    in (unless `weights` is False: the structure alone is what adapter-file conversion needs), onto their shards
    when a `mesh` is given, quantized as read when a `quantization` is given. `dtype` None keeps each tensor's
    stored dtype (a scaled-fp8 file's weights with their scales). A scaled-fp8 file's scales are checked first and
    their keys (and its marker, input scales and comfy_quant tensors) are not model keys."""
    check_quantization(quantization)
    file_scales = find_scales(index)
    shapes = {k: s for k, s in index.shapes.items() if k not in file_scales.auxiliary}
    family, prefix = find_family(shapes)
    ignored = {prefix + key for key in family.ignored_keys}
    shapes = {k: s for k, s in shapes.items() if k not in ignored}
    unprefixed = {k[len(prefix) :]: s for k, s in shapes.items() if k.startswith(prefix)}
    config, variant = family.infer_config(unprefixed)
    network = family.build(config)
    check_keys(network, shapes, prefix)
    if weights:
        with TensorFile(index.path) as f:
            read_parameters(network, f, prefix, dtype, mesh, quantization, file_scales.scales)
    return LoadedNetwork(network, family, variant, prefix)
