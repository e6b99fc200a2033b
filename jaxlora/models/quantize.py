"""A quantized frozen base: weight-only int8 or fp8 (e4m3) storage of the weights adapters patch, quantized tensor by
tensor while the checkpoint is read and dequantized per layer inside the compiled step.

Modes (`QUANTIZATIONS`):
- "int8": symmetric int8 with one float32 scale per output channel (amax / 127), the usual weight-only int8.
- "fp8": float8_e4m3fn with one float32 scale for the whole tensor (amax / 448, e4m3's largest finite value).
- "fp8_channel": float8_e4m3fn with one scale per output channel.
A tensor the file already stores as float8_e4m3fn (the `*_fp8_e4m3fn` checkpoints users download) is kept as stored
under either fp8 mode, with scale 1: never widened, never re-rounded. One stored as float8 with its own scale
(ComfyUI's `*_fp8_scaled` checkpoints, `jaxlora.models.scaled_fp8`) is kept likewise, with the file's scale.

Only the 2-D and larger weights of adaptable layers (linear and conv kernels, the bulk of every model) are
quantized; norms, biases, embeddings and raw parameters stay in the load dtype. A quantized layer holds its
integer or fp8 `weight` and a `weight_scale` (`WeightScale`, float32, broadcastable to the weight: size 1 on every
axis but the output channel's, or on all axes). `WeightLayer.weight_as` multiplies them out in float32 and casts to
the compute dtype just before the adapter patches the weight, so inside a scanned stack only the running block's
weights are ever wide, and autodiff sees integer or fp8 weights as constants: gradients reach only the adapters.

Why not qwix (0.1.8) or aqtp: both quantize the operand of an intercepted `dot_general`/`conv` at the call, and
recognise a weight by the module parameter the op reads. Here the operand is `W + dW`, the frozen weight already
patched by an adapter (LoRA, LoHa, LoKr, OFT all patch before the matmul), so those libraries would quantize the
patched sum every step (quantization-aware training of the adapter) instead of storing a frozen quantized base;
their post-training path (`qwix.quantize_params`) takes a full-precision parameter tree, which is the whole-model
wide copy this module exists to avoid; and they know Flax's own Linear/Einsum/Conv, not these layers' stacked
(scanned) weights. What remains is a per-channel amax, a rounding and a multiply, written here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

QUANTIZATIONS = ("none", "int8", "fp8", "fp8_channel")
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)


class WeightScale(nnx.Variable):
    """The float32 scale of a quantized weight. Its own variable type, so casting the frozen base to a training
    dtype (which would round scales to bf16) can leave it alone."""


def check_quantization(mode: str) -> None:
    if mode not in QUANTIZATIONS:
        raise ValueError(f"unknown base quantization {mode!r}; use one of {list(QUANTIZATIONS)}")


def stored_dtype(mode: str) -> np.dtype:
    """The dtype a quantized weight is stored in."""
    return np.dtype(np.int8) if mode == "int8" else FP8


def scale_shape(shape: tuple[int, ...], mode: str, out_axis: int) -> tuple[int, ...]:
    """The shape of a weight's scale: the output channels for per-channel modes, else all ones."""
    keep = out_axis % len(shape) if mode in ("int8", "fp8_channel") else None
    return tuple(size if axis == keep else 1 for axis, size in enumerate(shape))


def widen(weight: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """The float32 weight a stored weight and its scale stand for, on the host."""
    return weight.astype(np.float32) if scale is None else weight.astype(np.float32) * scale


def quantize_weight(
    weight: np.ndarray, mode: str, out_axis: int, file_scale: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(quantized weight, float32 scale) of one weight on the host; `out_axis` is the output-channel axis of its
    layout. `file_scale` is the per-tensor scale a file stores beside a float8 weight (ComfyUI's scaled fp8). Under an
    fp8 mode a float8 weight with a scale, or an e4m3 one without (scale 1), is returned unchanged with that scale,
    shaped as the mode's scales; under int8 it is multiplied out and re-quantized."""
    check_quantization(mode)
    if mode == "none":
        raise ValueError("quantize_weight needs a quantization mode, not 'none'")
    keep = out_axis % weight.ndim if mode in ("int8", "fp8_channel") else None
    axes = tuple(axis for axis in range(weight.ndim) if axis != keep)
    if mode != "int8" and (weight.dtype == FP8 or file_scale is not None):
        kept = np.ones([1] * weight.ndim, np.float32) if file_scale is None else file_scale
        return weight, np.broadcast_to(kept, scale_shape(weight.shape, mode, out_axis)).astype(np.float32)
    return symmetric_quantize(widen(weight, file_scale), axes, stored_dtype(mode), np)


def symmetric_quantize(wide, axes: tuple[int, ...], dtype: np.dtype, xp=np):
    """(`wide` in `dtype`, float32 scale) with one symmetric scale per slice reduced over `axes`: amax over the
    largest finite value of `dtype` (1 for an all-zero slice), rounded for int8. `xp` is numpy for weights on the
    host, jax.numpy for values inside a traced step."""
    integer = np.issubdtype(dtype, np.integer)
    largest = float(np.iinfo(dtype).max if integer else ml_dtypes.finfo(dtype).max)
    amax = xp.max(xp.abs(wide), axis=axes, keepdims=True)
    scale = xp.where(amax > 0, amax / largest, 1.0).astype(np.float32)
    scaled = xp.clip(wide / scale, -largest, largest)
    return (xp.round(scaled) if integer else scaled).astype(dtype), scale


def dequantize(weight: jax.Array, scale: jax.Array | None, dtype: jnp.dtype) -> jax.Array:
    """The weight in `dtype`: stored value times scale, multiplied in float32 (a bf16 scale would shift whole
    output channels by up to 2^-9)."""
    if scale is None:
        return weight.astype(dtype)
    return (weight.astype(jnp.float32) * scale).astype(dtype)


def is_quantized(dtype) -> bool:
    """Whether a stored weight dtype is a quantized one (int8, fp8): never cast to a training dtype."""
    return jnp.dtype(dtype) in (jnp.dtype(jnp.int8), jnp.dtype(FP8), jnp.dtype(ml_dtypes.float8_e5m2))
