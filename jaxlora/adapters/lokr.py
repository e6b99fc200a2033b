"""LoKr: W' = W + kron(w1, w2), with `factorization(dim, rank)` choosing the Kronecker factor shapes."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.adapters.base import LayerTensors, Target, delta_bypass, factorization, master, rounded
from jaxlora.models.layers import WeightLayer


class LoKr(nnx.Module):
    """`lokr_w1` [out_l, in_m] and `lokr_w2` [out_k, in_n, k...] (torch layout; the kernel stays on w2, as
    ComfyUI's trainer creates them since Dec 2025). A conv file from an older ComfyUI, whose 2-D `lokr_w2`
    [out_k, in*k.../in_m] spans the flattened kernel, patches through the same kron-then-reshape.

    Directly stored factors carry no alpha scaling, on the train side and on ComfyUI's load side alike.
    """

    def __init__(self, target: Target, w1, w2, lora_dtype: jnp.dtype):
        self.target = target
        self.w1 = master(w1)
        self.w2 = master(w2)
        self.lora_dtype = jnp.dtype(lora_dtype)

    @classmethod
    def create(cls, target: Target, rank: int, rng: np.random.Generator, lora_dtype: jnp.dtype) -> LoKr:
        """w1 zeros; w2 kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in_n * k..."""
        out_l, out_k = factorization(target.out_features, rank)
        in_m, in_n = factorization(target.torch_shape[1], rank)
        kernel = target.torch_shape[2:]
        bound = 1.0 / math.sqrt(in_n * math.prod(kernel))
        w2 = rng.uniform(-bound, bound, (out_k, in_n, *kernel))
        if len(kernel) > 2:
            # ComfyUI's loader gives w1 kernel axes only for a 4-D w2, so a 3-D conv's w2 is written flattened
            # [out_k, in_n * k...]: the same kron-then-reshape (the kernel axes are the innermost), loaded right.
            w2 = w2.reshape(out_k, -1)
        return cls(target, np.zeros((out_l, in_m)), w2, lora_dtype)

    @classmethod
    def from_tensors(cls, f: LayerTensors, target: Target, lora_dtype: jnp.dtype) -> LoKr:
        """Rebuilt factors and ComfyUI's load-side scale (alpha / rank of the last rebuilt factor) are folded into
        full w1, w2, which load exactly as the original file does."""
        w1, w2 = f.get("lokr_w1"), f.get("lokr_w2")
        rank = None
        if w1 is None:
            w1a, w1b = f.get("lokr_w1_a"), f.get("lokr_w1_b")
            if w1a is None or w1b is None:
                raise f.fail("LoKr needs lokr_w1 or lokr_w1_a and lokr_w1_b")
            w1, rank = w1a @ w1b, w1b.shape[0]
        if w2 is None:
            w2a, w2b, t2 = f.get("lokr_w2_a"), f.get("lokr_w2_b"), f.get("lokr_t2")
            if w2a is None or w2b is None:
                raise f.fail("LoKr needs lokr_w2 or lokr_w2_a and lokr_w2_b")
            if t2 is None:
                w2 = w2a @ w2b.reshape(w2b.shape[0], -1)
            else:  # Tucker: t2 [r, r, k, k], w2a [r, out_k], w2b [r, in_n]
                w2 = np.einsum("ijkl,jr,ip->prkl", t2, w2b, w2a)
            rank = w2b.shape[0]
        alpha = f.get("alpha")
        if alpha is not None and rank is not None:
            w2 = w2 * (float(alpha) / rank)
        if w1.size * w2.size != np.prod(target.torch_shape):
            raise f.fail(f"kron(lokr_w1 {w1.shape}, lokr_w2 {w2.shape}) does not fit the weight {target.torch_shape}")
        return cls(target, w1, w2, lora_dtype)

    def patch(self, weight: jax.Array) -> jax.Array:
        w1, w2 = (
            rounded(self.w1, self.lora_dtype, weight.dtype),
            rounded(self.w2, self.lora_dtype, weight.dtype),
        )
        w1 = w1.reshape(w1.shape + (1,) * (w2.ndim - 2))
        return weight + self.target.to_flax(jnp.kron(w1, w2)).astype(weight.dtype)

    def bypass(self, x: jax.Array, y: jax.Array, layer: WeightLayer) -> jax.Array:
        """y + x kron(w1, w2)^T without forming the Kronecker product for a linear layer: with x's input split as
        [in_m, in_n] and the output as [out_l, out_k], h[a, b] = sum_ij w1[a, i] w2[b, j] x[i, j]. A conv (whose
        kernel sits on w2) runs the delta through its own op."""
        if len(self.target.torch_shape) != 2:
            return delta_bypass(self, x, y, layer)
        w1, w2 = rounded(self.w1, self.lora_dtype, x.dtype), rounded(self.w2, self.lora_dtype, x.dtype)
        split = x.reshape(*x.shape[:-1], w1.shape[1], w2.shape[1])
        hidden = jnp.einsum("...ij,ai,bj->...ab", split, w1, w2)
        return y + hidden.reshape(*x.shape[:-1], -1)

    def export(self) -> dict[str, np.ndarray]:
        return {
            "lokr_w1": np.asarray(self.w1[...]),
            "lokr_w2": np.asarray(self.w2[...]),
            "alpha": np.asarray(1.0, np.float32),
        }
