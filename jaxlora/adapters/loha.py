"""LoHa: W' = W + (alpha / rank) * (w1a @ w1b) * (w2a @ w2b), a Hadamard product of two low-rank products."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.adapters.base import Target, master, rounded


class LoHa(nnx.Module):
    """`hada_w{1,2}_a` [out, r], `hada_w{1,2}_b` [r, d_in] in torch layout; alpha is frozen."""

    def __init__(self, target: Target, w1a, w1b, w2a, w2b, alpha: float, lora_dtype: jnp.dtype):
        self.target = target
        self.w1a, self.w1b, self.w2a, self.w2b = master(w1a), master(w1b), master(w2a), master(w2b)
        self.alpha = float(alpha)
        self.lora_dtype = jnp.dtype(lora_dtype)

    @classmethod
    def create(cls, target: Target, rank: int, rng: np.random.Generator, lora_dtype: jnp.dtype) -> LoHa:
        """ComfyUI's init: torch `normal_(0.1)` and `normal_(0.01)` set the *mean* (std 1); w1b is zero."""
        out, d_in = target.out_features, target.in_features
        return cls(
            target,
            rng.normal(0.1, 1.0, (out, rank)),
            np.zeros((rank, d_in)),
            rng.normal(0.1, 1.0, (out, rank)),
            rng.normal(0.01, 1.0, (rank, d_in)),
            1.0,
            lora_dtype,
        )

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    def patch(self, weight: jax.Array) -> jax.Array:
        w1a, w1b, w2a, w2b = (
            rounded(p, self.lora_dtype, weight.dtype) for p in (self.w1a, self.w1b, self.w2a, self.w2b)
        )
        delta = (self.alpha / self.rank) * (w1a @ w1b) * (w2a @ w2b)
        return weight + self.target.to_flax(delta).astype(weight.dtype)

    def export(self) -> dict[str, np.ndarray]:
        factors = {"hada_w1_a": self.w1a, "hada_w1_b": self.w1b, "hada_w2_a": self.w2a, "hada_w2_b": self.w2b}
        return {
            **{name: np.asarray(p[...]) for name, p in factors.items()},
            "alpha": np.asarray(self.alpha, np.float32),
        }
