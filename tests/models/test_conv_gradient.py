"""Conv2d's own input gradient (a matmul and col2im) against autodiff's rule of the same convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.models.layers import _conv, _conv_same_stride


@pytest.mark.parametrize(
    ("shape", "out", "kernel", "padding"),
    [((2, 7, 5, 3), 4, 3, 1), ((1, 6, 6, 8), 5, 3, 0), ((2, 4, 9, 4), 4, 3, 2), ((1, 5, 5, 2), 3, 5, 2)],
)
def test_input_and_kernel_gradients_match_autodiff(shape, out, kernel, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    k = jnp.asarray(rng.standard_normal((kernel, kernel, shape[-1], out)), jnp.float32)

    def loss(conv):
        return lambda x, k: jnp.sum(jnp.sin(conv(x, k)))  # a non-linear loss: dy varies per position

    expected = jax.grad(loss(lambda x, k: _conv(x, k, 1, padding)), (0, 1))(x, k)
    actual = jax.grad(loss(lambda x, k: _conv_same_stride(x, k, padding)), (0, 1))(x, k)
    np.testing.assert_array_equal(_conv_same_stride(x, k, padding), _conv(x, k, 1, padding))
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape
        np.testing.assert_allclose(a, e, rtol=0, atol=1e-5 * float(jnp.abs(e).max()))
