"""`quantized_matmul` (the node's quantized_backward) on one layer: the forward is the dequantized product, the
input gradient is the narrow-operand product within its rounding of the exact one, in the input's dtype, and the
frozen weight gets none."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.models.narrow_backward import quantize_rows, quantized_matmul
from jaxlora.models.quantize import FP8, dequantize, quantize_weight

# Relative L2 error of dx against the exact product with the same quantized weight, on random normal data
# (measured: int8 0.55%, fp8 2.5%, fp8_channel 2.8%); bounds about twice that.
TOLERANCE = {"int8": 0.012, "fp8": 0.05, "fp8_channel": 0.06}


def case(mode):
    rng = np.random.default_rng(0)
    weight, scale = quantize_weight(rng.normal(size=(32, 48)).astype(np.float32), mode, out_axis=1)
    x = jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32)
    return x, jnp.asarray(weight), jnp.asarray(scale)


@pytest.mark.parametrize("mode", list(TOLERANCE))
def test_input_gradient_is_the_exact_one_within_the_rounding_of_the_gradient(mode):
    x, weight, scale = case(mode)
    narrow = lambda x, w, s: jnp.sum(jnp.sin(quantized_matmul(x, w, s)))  # noqa: E731
    exact = lambda x, w, s: jnp.sum(jnp.sin(jnp.matmul(x, dequantize(w, s, x.dtype))))  # noqa: E731
    assert narrow(x, weight, scale) == exact(x, weight, scale)
    dx, dscale = jax.grad(narrow, argnums=(0, 2))(x, weight, scale)
    reference = jax.grad(exact)(x, weight, scale)
    error = float(jnp.linalg.norm(dx - reference) / jnp.linalg.norm(reference))
    assert 0 < error <= TOLERANCE[mode], error
    assert not np.any(np.asarray(dscale))  # the frozen scale (and weight) get no gradient
    assert jax.grad(narrow)(x.astype(jnp.bfloat16), weight, scale).dtype == jnp.bfloat16


def test_rows_are_scaled_by_their_own_largest_value_and_zero_rows_stay_zero():
    values = jnp.asarray([[0.0, 0.0, 0.0], [1.0, -254.0, 3.0], [1e-6, 2.2e-6, -4e-6]], jnp.float32)
    narrow, scale = quantize_rows(values, np.dtype(np.int8))
    np.testing.assert_array_equal(np.asarray(narrow[:2]), [[0, 0, 0], [0, -127, 2]])  # 1/2 and 3/2 round to even
    np.testing.assert_array_equal(np.asarray(narrow[2]), [32, 70, -127])  # 31.75 and 69.85 round to 32 and 70
    np.testing.assert_allclose(np.asarray(scale[:, 0]), [1.0, 2.0, 4e-6 / 127], rtol=1e-6)
    e4m3, e4m3_scale = quantize_rows(values, FP8)
    assert e4m3.dtype == FP8 and float(jnp.max(jnp.abs(e4m3[1].astype(jnp.float32)))) == 448.0
    np.testing.assert_allclose(np.asarray(e4m3_scale[1, 0]), 254.0 / 448.0, rtol=1e-6)
