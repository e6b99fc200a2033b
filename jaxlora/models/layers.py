"""Building blocks shared by the networks: weight layers that can carry an adapter, norms and attention.

Activations are channels-last (NHWC images, [B, T, C] tokens). Weights are stored in Flax layout (linear
[in, out], conv HWIO) so the forward needs no transposes; `torch_shape`, `from_torch` and `to_torch`
convert at the file boundary only.

Every layer with weights derives from `WeightLayer`, the single place where an adapter attached to a layer
patches its weight or bias (ComfyUI semantics: the stored weight is cast to the compute dtype first, then the
adapter applies).
"""

from __future__ import annotations

import functools
import math
from typing import ClassVar, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.models.attention import attention
from jaxlora.models.narrow_backward import quantized_matmul
from jaxlora.models.quantize import WeightScale, dequantize


class WeightPatch(Protocol):
    """What an adapter offers a layer: functions of the weight and bias in the compute dtype, and the
    activation ("bypass") form `y + h(x)` for adapters that do not patch the weight."""

    def patch_weight(self, weight: jax.Array) -> jax.Array: ...

    @property
    def patches_weight(self) -> bool: ...

    def patch_bias(self, bias: jax.Array) -> jax.Array: ...

    def add_bypass(self, x: jax.Array, y: jax.Array, layer: WeightLayer) -> jax.Array: ...


class WeightLayer(nnx.Module):
    """A layer with a `weight` (and optional `bias`) parameter and a slot for an adapter.

    `torch_to_flax` is the axis permutation from the torch weight layout to the stored one.
    """

    torch_to_flax: ClassVar[tuple[int, ...]] = (0,)
    # The file's name of the weight parameter, and whether ComfyUI's trainer adapts the layer (its QK-norm
    # scales are raw parameters, not trained).
    weight_key: ClassVar[str] = "weight"
    adaptable: ClassVar[bool] = True
    weight: nnx.Param
    bias: nnx.Param | None
    adapter: WeightPatch | None
    # set by quantized loading (`jaxlora.models.quantize`): the stored weight is int8/fp8 times this scale
    weight_scale: WeightScale | None = None

    def weight_as(self, dtype: jnp.dtype) -> jax.Array:
        """The weight in the compute dtype (dequantized when stored quantized), patched by the adapter when one is
        attached."""
        scale = None if self.weight_scale is None else self.weight_scale[...]
        weight = dequantize(self.weight[...], scale, dtype)
        return weight if self.adapter is None else self.adapter.patch_weight(weight)

    def bias_as(self, dtype: jnp.dtype) -> jax.Array | None:
        if self.bias is None:
            return None
        bias = self.bias[...].astype(dtype)
        return bias if self.adapter is None else self.adapter.patch_bias(bias)

    @classmethod
    def permutation(cls, name: str) -> tuple[int, ...]:
        """Axis permutation torch -> Flax for parameter `name` ("weight" or "bias")."""
        return cls.torch_to_flax if name == "weight" else (0,)

    @classmethod
    def torch_shape(cls, name: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
        inverse = np.argsort(cls.permutation(name))
        return tuple(flax_shape[i] for i in inverse)

    @classmethod
    def from_torch(cls, name: str, array: np.ndarray) -> np.ndarray:
        return np.transpose(array, cls.permutation(name))

    @classmethod
    def to_torch(cls, name: str, array: np.ndarray) -> np.ndarray:
        return np.transpose(array, np.argsort(cls.permutation(name)))


def _placeholder(*shape: int) -> nnx.Param:
    """An abstract float32 parameter: networks are built empty and filled from a checkpoint."""
    return nnx.Param(jax.ShapeDtypeStruct(shape, jnp.float32))


class Linear(WeightLayer):
    """y = x W + b over the last axis; weight [in, out] (torch stores [out, in])."""

    torch_to_flax = (1, 0)
    # set on layers with a quantized weight by the node's quantized_backward (`jaxlora.models.narrow_backward`):
    # the product with the stored weight, when no adapter patches it, gets the narrow-operand backward pass
    narrow_backward: bool = False

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True):
        self.weight = _placeholder(in_features, out_features)
        self.bias = _placeholder(out_features) if bias else None
        self.adapter = nnx.data(None)

    def apply_kernel(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        return jnp.matmul(x, kernel)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.narrow_backward and (self.adapter is None or not self.adapter.patches_weight):
            y = quantized_matmul(x, self.weight[...], None if self.weight_scale is None else self.weight_scale[...])
        else:
            y = self.apply_kernel(x, self.weight_as(x.dtype))
        if self.adapter is not None:
            y = self.adapter.add_bypass(x, y, self)
        bias = self.bias_as(x.dtype)
        return y if bias is None else y + bias


class Conv2d(WeightLayer):
    """2-D convolution on NHWC input; weight HWIO (torch stores OIHW)."""

    torch_to_flax = (2, 3, 1, 0)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
    ):
        self.weight = _placeholder(kernel_size, kernel_size, in_channels, out_channels)
        self.bias = _placeholder(out_channels)
        self.adapter = nnx.data(None)
        self.stride = stride
        self.padding = padding

    def apply_kernel(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """The convolution with this layer's stride and padding for any HWIO kernel."""
        if self.stride == 1 and kernel.shape[0] > 1:
            return _conv_same_stride(x, kernel, self.padding)
        return _conv(x, kernel, self.stride, self.padding)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.apply_kernel(x, self.weight_as(x.dtype))
        if self.adapter is not None:
            y = self.adapter.add_bypass(x, y, self)
        return y + self.bias_as(x.dtype)


def _conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_same_stride(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
    """A stride-1 convolution whose input gradient avoids XLA:CPU's slow path.

    Autodiff's input gradient is a convolution with the spatially reversed kernel: on XLA:CPU the reversal is a
    strided copy of the whole weight every step and the reversed convolution runs on Eigen, not on the fast
    library that runs the forward (together 40% of a LoRA step, see BENCHMARKS.md). Here the input gradient is
    dy @ K^T as one matmul into kernel-tap columns, summed back onto the padded input (col2im): same math, no
    reversed copy. The kernel gradient keeps autodiff's rule.
    """
    return _conv(x, kernel, 1, padding)


def _conv_same_stride_forward(x, kernel, padding):
    return _conv(x, kernel, 1, padding), (x, kernel)


def _conv_same_stride_backward(padding, residuals, dy):
    x, kernel = residuals
    size, _, channels, _ = kernel.shape
    height, width = x.shape[1:3]
    columns = jnp.einsum("bhwo,kio->bhwki", dy, kernel.reshape(size * size, channels, -1))
    padded = sum(
        jnp.pad(columns[..., i * size + j, :], ((0, 0), (i, size - 1 - i), (j, size - 1 - j), (0, 0)))
        for i in range(size)
        for j in range(size)
    )
    dx = padded[:, padding : padding + height, padding : padding + width, :]
    _, kernel_vjp = jax.vjp(lambda k: _conv(x, k, 1, padding), kernel)
    return dx.astype(x.dtype), kernel_vjp(dy)[0]


_conv_same_stride.defvjp(_conv_same_stride_forward, _conv_same_stride_backward)


def _normalize(x: jax.Array, axes: tuple[int, ...], eps: float) -> jax.Array:
    """Zero-mean unit-variance over `axes`, with statistics in float32 whatever the compute dtype."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axes, keepdims=True)
    var = jnp.square(x32 - mean).mean(axes, keepdims=True)
    return (x32 - mean) * jax.lax.rsqrt(var + eps)


class GroupNorm(WeightLayer):
    """torch.nn.GroupNorm over channels-last input ([B, ..., C]) with an affine scale and shift."""

    def __init__(self, num_groups: int, channels: int, *, eps: float = 1e-5):
        if channels % num_groups:
            raise ValueError(f"GroupNorm: {channels} channels do not split into {num_groups} groups")
        self.weight = _placeholder(channels)
        self.bias = _placeholder(channels)
        self.adapter = nnx.data(None)
        self.num_groups = num_groups
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        grouped = x.reshape(*x.shape[:-1], self.num_groups, x.shape[-1] // self.num_groups)
        axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)
        y = _normalize(grouped, axes, self.eps).reshape(x.shape).astype(x.dtype)
        return y * self.weight_as(x.dtype) + self.bias_as(x.dtype)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis without an affine part (statistics in float32), in x's dtype."""
    return _normalize(x, (x.ndim - 1,), eps).astype(x.dtype)


class LayerNorm(WeightLayer):
    """torch.nn.LayerNorm over the last axis with an affine scale and shift."""

    def __init__(self, dim: int, *, eps: float = 1e-5):
        self.weight = _placeholder(dim)
        self.bias = _placeholder(dim)
        self.adapter = nnx.data(None)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.eps) * self.weight_as(x.dtype) + self.bias_as(x.dtype)


class RMSNorm(WeightLayer):
    """RMS normalisation over the last axis with a learned `scale` (QK-norms; file key `<path>.scale`).
    Statistics in float32; not adapted, as in ComfyUI's trainer."""

    weight_key = "scale"
    adaptable = False

    def __init__(self, dim: int, *, eps: float | None = 1e-6):
        self.weight = _placeholder(dim)
        self.bias = None
        self.adapter = nnx.data(None)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # eps None: the machine epsilon of the compute dtype, as torch.nn.RMSNorm's default.
        eps = float(jnp.finfo(x.dtype).eps) if self.eps is None else self.eps
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
        return y.astype(x.dtype) * self.weight_as(x.dtype)


class AffineRMSNorm(RMSNorm):
    """torch.nn.RMSNorm with its affine `weight` (ComfyUI's `ops.RMSNorm`): file key `<path>.weight`, and trained
    by ComfyUI's trainer like any norm scale (a full `diff`)."""

    weight_key = "weight"
    adaptable = True


class RawParameter(WeightLayer):
    """A bare tensor the file stores at the module path itself (learned pad tokens): no `.weight` suffix, no
    layout change, and not adapted (ComfyUI's trainer adapts layers, not raw parameters)."""

    torch_to_flax = (0, 1)
    weight_key = ""
    adaptable = False

    def __init__(self, *shape: int):
        self.weight = _placeholder(*shape)
        self.bias = None
        self.adapter = nnx.data(None)

    def __call__(self, dtype: jnp.dtype) -> jax.Array:
        return self.weight_as(dtype)


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
    """Scaled dot-product attention of [B, T, heads*d] queries over [B, S, heads*d] keys/values."""
    batch, q_len, width = q.shape
    split = lambda t: t.reshape(batch, t.shape[1], heads, width // heads)  # noqa: E731
    out = attention(split(q), split(k), split(v))
    return out.reshape(batch, q_len, width)


def sinusoidal_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """[cos(t f_j), sin(t f_j)] with f_j = max_period^(-j/(dim/2)), cos half first, in float32.

    Timestep and size embeddings (ComfyUI `timestep_embedding`,
    diffusers `Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)`).
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class Embedding(WeightLayer):
    """A lookup table [rows, width] (token or position embeddings), stored as torch stores it; not adapted."""

    torch_to_flax = (0, 1)
    adaptable = False

    def __init__(self, rows: int, width: int):
        self.weight = _placeholder(rows, width)
        self.bias = None
        self.adapter = nnx.data(None)

    def lookup(self, ids: jax.Array, dtype: jnp.dtype) -> jax.Array:
        return jnp.take(self.weight_as(dtype), ids, axis=0)


class PatchConv3d(WeightLayer):
    """A 3-D convolution whose stride equals its kernel (a video patch embedding) on channels-last input
    [B, T, H, W, C] (sizes multiples of the kernel); weight DHWIO (torch stores OIDHW)."""

    torch_to_flax = (2, 3, 4, 1, 0)

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int]):
        self.weight = _placeholder(*kernel, in_channels, out_channels)
        self.bias = _placeholder(out_channels)
        self.adapter = nnx.data(None)
        self.kernel = tuple(kernel)

    def apply_kernel(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(
            x, kernel, self.kernel, "VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.apply_kernel(x, self.weight_as(x.dtype))
        if self.adapter is not None:
            y = self.adapter.add_bypass(x, y, self)
        return y + self.bias_as(x.dtype)
