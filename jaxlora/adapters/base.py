"""What every adapter shares: the trainable variable type, the layer it adapts, and the per-layer container.

Adapter tensors are kept in torch layout and shapes (the file's), in float32: they are the master copy the
optimizer updates. At use they are rounded to `lora_dtype` (the storage dtype ComfyUI trains in) and computed
in the layer's compute dtype, and the resulting delta is permuted to the layer's Flax layout.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.models.layers import WeightLayer


class AdapterFileError(ValueError):
    """An adapter file that does not fit the model; the message names the keys at fault."""


def describe_names(items, limit: int = 8) -> str:
    """The first `limit` names in order and the count, for messages about files of thousands of keys."""
    items = sorted(items)
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


@dataclass(frozen=True)
class LayerTensors:
    """One layer's tensors read from an adapter file, by canonical name (`up`, `down`, `alpha`, `hada_w1_a`,
    `lokr_w1`, `oft_blocks`, `diff`, `diff_b`, ...), with the file keys they came from for messages."""

    path: str
    tensors: Mapping[str, np.ndarray]
    keys: Mapping[str, str]

    def get(self, name: str) -> np.ndarray | None:
        value = self.tensors.get(name)
        return None if value is None else np.asarray(value, np.float32)

    def alpha(self, rank: int) -> float:
        """The file's alpha, or the rank where it has none (ComfyUI then applies scale 1)."""
        alpha = self.get("alpha")
        return rank if alpha is None else float(alpha)

    def fail(self, message: str) -> AdapterFileError:
        return AdapterFileError(f"{self.path} ({describe_names(self.keys.values(), 3)}): {message}")


class AdapterParam(nnx.Variable):
    """A trainable adapter tensor. Distinct from `nnx.Param`, so `nnx.split(model, AdapterParam, ...)` separates
    the adapter tree (differentiated, updated) from the frozen base."""


@dataclass(frozen=True)
class Target:
    """The weight an adapter patches: its torch shape and the permutation to the stored Flax layout."""

    torch_shape: tuple[int, ...]
    torch_to_flax: tuple[int, ...]

    @classmethod
    def of(cls, layer: WeightLayer) -> Target:
        return cls(layer.torch_shape("weight", layer.weight.shape), layer.permutation("weight"))

    @property
    def out_features(self) -> int:
        return self.torch_shape[0]

    @property
    def in_features(self) -> int:
        """Input width with the kernel folded in (`d_in` of the spec): what a flattened factor spans."""
        return math.prod(self.torch_shape[1:])

    def to_flax(self, delta: jax.Array) -> jax.Array:
        """A delta in torch layout (any shape with the weight's size) -> the stored Flax layout."""
        return jnp.transpose(delta.reshape(self.torch_shape), self.torch_to_flax)

    @property
    def flax_shape(self) -> tuple[int, ...]:
        return tuple(self.torch_shape[axis] for axis in self.torch_to_flax)


def delta_bypass(adapter, x: jax.Array, y: jax.Array, layer: WeightLayer) -> jax.Array:
    """The activation form of an additive adapter without a cheaper factored one: y + op(x, dW), the layer's own
    op (a conv keeps its stride and padding) with the delta as kernel; dW = patch(0), formed per layer, in the
    compute dtype."""
    delta = adapter.patch(jnp.zeros(adapter.target.flax_shape, x.dtype))
    return y + layer.apply_kernel(x, delta)


def master(value) -> AdapterParam:
    return AdapterParam(jnp.asarray(value, jnp.float32))


def rounded(param: AdapterParam, lora_dtype: jnp.dtype, dtype: jnp.dtype) -> jax.Array:
    """The master value as stored in `lora_dtype`, then in the compute dtype (torch autocast semantics)."""
    return param[...].astype(lora_dtype).astype(dtype)


def layer_rng(seed: int, path: str) -> np.random.Generator:
    """A generator that depends only on the user's seed and the layer's path: same inputs, same adapter."""
    return np.random.default_rng([seed, zlib.crc32(path.encode())])


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """ComfyUI/LyCORIS `factorization`: (m, n) with m <= n and m * n = dim, m close to `factor`."""
    if 0 < factor and dim % factor == 0 and dim >= factor * factor:
        return tuple(sorted((factor, dim // factor)))
    if factor < 0:
        factor = dim
    m, n = 1, dim
    candidate = m + 1
    while m < n:
        while dim % candidate:
            candidate += 1
        if candidate > factor:
            break
        m, n = candidate, dim // candidate
        candidate += 1
    return (m, n) if m <= n else (n, m)


def fold_tucker(core: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Tucker core [R, r, k, k] with factor [r, in] -> an equivalent flat factor [R, in * k * k]."""
    return np.einsum("ijkl,jr->irkl", core, factor.reshape(factor.shape[0], -1)).reshape(core.shape[0], -1)


class Diff(nnx.Module):
    """A full additive difference in torch layout: `diff` for one-dimensional weights (norm scales), biases
    (`diff_b`) and, when imported from a LyCORIS "full" file, whole weights (`torch_to_flax` then permutes).

    The diff is rounded to `lora_dtype` (as stored) and added in the compute dtype. ComfyUI's trainer instead
    rounds the frozen tensor itself to `lora_dtype` before adding, which its loader does not: with bf16 that
    moves norm scales by up to 2^-8 between training and loading. Adding without that rounding keeps the
    trained model and the loaded file identical.
    """

    def __init__(self, value, lora_dtype: jnp.dtype, torch_to_flax: tuple[int, ...] | None = None):
        self.diff = master(value)
        self.lora_dtype = jnp.dtype(lora_dtype)
        self.torch_to_flax = torch_to_flax

    def patch(self, tensor: jax.Array) -> jax.Array:
        diff = rounded(self.diff, self.lora_dtype, tensor.dtype)
        if self.torch_to_flax is not None:
            diff = jnp.transpose(diff, self.torch_to_flax)
        return tensor + diff

    def export(self) -> dict[str, np.ndarray]:
        return {"diff": np.asarray(self.diff[...])}

    @classmethod
    def from_tensors(cls, f: LayerTensors, target: Target, lora_dtype) -> Diff:
        """A whole-weight `diff` (LyCORIS "full") from a file."""
        diff = f.get("diff")
        if diff.shape != target.torch_shape:
            raise f.fail(f"diff of shape {diff.shape} does not fit the weight {target.torch_shape}")
        return cls(diff, lora_dtype, target.torch_to_flax if diff.ndim > 1 else None)


def weight_decompose(
    weight: jax.Array, patched: jax.Array, magnitude: jax.Array, torch_to_flax: tuple[int, ...]
) -> jax.Array:
    """DoRA as ComfyUI loads it (spec 4.7): W' = (W + dW) * m / ||.||, in float32.

    `magnitude` is in torch layout: [out, 1, ...] normalises per output channel, using the norm of the
    *original* weight (ComfyUI's quirk, reproduced so files load as trained); [1, in, ...] per input channel
    of the patched weight.
    """
    weight32, patched32 = weight.astype(jnp.float32), patched.astype(jnp.float32)
    per_output = magnitude.shape[0] == weight.shape[torch_to_flax.index(0)]  # ComfyUI's test
    source, kept = (weight32, torch_to_flax.index(0)) if per_output else (patched32, torch_to_flax.index(1))
    axes = tuple(axis for axis in range(weight.ndim) if axis != kept)
    norm = jnp.sqrt(jnp.sum(jnp.square(source), axis=axes, keepdims=True)) + jnp.finfo(jnp.float32).eps
    scale = jnp.transpose(magnitude.astype(jnp.float32), torch_to_flax) / norm
    return (patched32 * scale).astype(weight.dtype)


class LayerAdapter(nnx.Module):
    """Everything attached to one layer: a weight adapter (or a `Diff` for 1-D weights), a bias `Diff`, and
    optionally a DoRA magnitude (`dora_scale`, torch layout) kept from an imported file.

    With `bypass` the weight adapter runs on activations instead of patching W: `y = g(x W, x)` (ComfyUI's
    bypass mode, the node's `bypass_mode`): `x W + h(x)` for the additive algorithms, the rotated output for OFT.
    """

    def __init__(
        self,
        weight: nnx.Module | None,
        bias: Diff | None,
        bypass: bool = False,
        dora_scale: np.ndarray | None = None,
    ):
        self.weight = weight
        self.bias = bias
        self.bypass = bypass
        self.dora_scale = None if dora_scale is None else master(dora_scale)

    @property
    def patches_weight(self) -> bool:
        """Whether `patch_weight` changes the weight (else the layer's product with its stored weight stands
        alone, e.g. for the narrow backward pass of `jaxlora.models.narrow_backward`)."""
        return self.weight is not None and not self.bypass

    def patch_weight(self, weight: jax.Array) -> jax.Array:
        if not self.patches_weight:
            return weight
        patched = self.weight.patch(weight)
        if self.dora_scale is None:
            return patched
        return weight_decompose(weight, patched, self.dora_scale[...], self.weight.target.torch_to_flax)

    def patch_bias(self, bias: jax.Array) -> jax.Array:
        return bias if self.bias is None else self.bias.patch(bias)

    def add_bypass(self, x: jax.Array, y: jax.Array, layer: WeightLayer) -> jax.Array:
        return self.weight.bypass(x, y, layer) if self.bypass else y
