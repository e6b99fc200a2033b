"""The node's `quantized_backward`: the input gradient of a product with a frozen quantized weight computed on the
narrow operands, as int8 x int8 or e4m3 x e4m3 matrix products with wide accumulation.

A linear layer whose weight no adapter patches (LoRA's activation form, ComfyUI's bypass) computes
y = x @ (Wq * s) + h(x). The frozen weight needs no gradient, so the backward pass of that product is only
dx = dy @ (Wq * s)^T. Here dy is scaled by the weight's per-output-channel scale s (the contracted axis, so it
cannot be applied after the product), quantized per row (int8 for an int8 weight, e4m3 for an fp8 one; scale
amax / largest value) and multiplied by the stored Wq directly: chips with narrow-type matrix units (TPU v5e/v6e
int8, H100-class fp8) run that product at twice the bf16 rate, and the wide copy of W is never formed in the
backward pass. No input is kept for it either (ComfyUI keeps an fp8 copy of x for the weight gradient, which a
frozen base does not have). The forward is unchanged: dequantize, multiply in the compute dtype.

ComfyUI quantizes dy per tensor to e5m2 (more range, one mantissa bit fewer); a per-row scale already bounds each
row's range, so e4m3's extra bit halves the rounding error instead.

Why not qwix (0.1.8, `QtRule(bwd_qtype=...)`) or aqtp: both quantize both operands of an intercepted
`dot_general` from their wide values at every call, recomputing the weight's scale from a dequantized copy each
step, where here the weight is already stored narrow with its scale (see `jaxlora.models.quantize` for why the
base is not theirs either); and they intercept Flax's own Linear/Einsum, not these layers' scanned stacks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.models.quantize import FP8, dequantize, symmetric_quantize


def quantize_rows(values: jax.Array, dtype: np.dtype) -> tuple[jax.Array, jax.Array]:
    """(values in `dtype`, float32 scale per row) with one symmetric scale per row of the last axis; `dtype` is
    int8 or e4m3."""
    return symmetric_quantize(values.astype(jnp.float32), (-1,), np.dtype(dtype), jnp)


def gradient_dtype(weight_dtype) -> np.dtype:
    """The narrow type of the output gradient for a weight stored in `weight_dtype`: int8 for int8, e4m3 for
    either fp8 format (the matrix units pair e4m3 with e4m3 or e5m2)."""
    return np.dtype(np.int8) if jnp.dtype(weight_dtype) == jnp.int8 else FP8


@jax.custom_vjp
def quantized_matmul(x: jax.Array, weight: jax.Array, scale: jax.Array | None) -> jax.Array:
    """x [..., in] @ (weight * scale) [in, out] in x's dtype; `weight` int8 or fp8, `scale` float32 of shape
    [1, out] or [1, 1] (None: 1). Its backward gives x the narrow-operand gradient above, and no gradient to the
    frozen weight or scale."""
    return jnp.matmul(x, dequantize(weight, scale, x.dtype))


def _forward(x, weight, scale):
    return quantized_matmul(x, weight, scale), (weight, scale)


def _backward(residuals, dy):
    weight, scale = residuals
    folded = dy.astype(jnp.float32) if scale is None else dy.astype(jnp.float32) * scale
    narrow, row_scale = quantize_rows(folded, gradient_dtype(weight.dtype))
    accumulate = jnp.int32 if narrow.dtype == jnp.int8 else jnp.float32
    contract = (((narrow.ndim - 1,), (1,)), ((), ()))
    product = jax.lax.dot_general(narrow, weight, contract, preferred_element_type=accumulate)
    return (product.astype(jnp.float32) * row_scale).astype(dy.dtype), None, None


quantized_matmul.defvjp(_forward, _backward)
