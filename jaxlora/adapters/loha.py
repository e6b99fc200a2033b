"""LoHa: W' = W + (alpha / rank) * (w1a @ w1b) * (w2a @ w2b), a Hadamard product of two low-rank products."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.adapters.base import LayerTensors, Target, delta_bypass, fold_tucker, master, rounded
from jaxlora.models.layers import WeightLayer


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

    @classmethod
    def from_tensors(cls, f: LayerTensors, target: Target, lora_dtype: jnp.dtype) -> LoHa:
        """A LoHa from a file, Tucker factors (`hada_t1`, `hada_t2`, w_a stored as [r, out]) folded to flat."""
        w1a, w1b, w2a, w2b = (f.get(n) for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        if any(w is None for w in (w1a, w1b, w2a, w2b)):
            raise f.fail("LoHa needs hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b")
        rank = w1b.shape[0]
        alpha = f.alpha(rank)
        if f.get("hada_t1") is not None:
            w1a, w2a = w1a.T, w2a.T
            w1b, w2b = fold_tucker(f.get("hada_t1"), w1b), fold_tucker(f.get("hada_t2"), w2b)
        w1b, w2b = w1b.reshape(w1b.shape[0], -1), w2b.reshape(w2b.shape[0], -1)
        if w1a.shape[0] != target.out_features or w1b.shape[1] != target.in_features or w2b.shape != w1b.shape:
            raise f.fail(f"LoHa factors {w1a.shape}, {w1b.shape} do not fit the weight {target.torch_shape}")
        return cls(target, w1a, w1b, w2a, w2b, alpha * w1b.shape[0] / rank, lora_dtype)

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    def patch(self, weight: jax.Array) -> jax.Array:
        w1a, w1b, w2a, w2b = (
            rounded(p, self.lora_dtype, weight.dtype) for p in (self.w1a, self.w1b, self.w2a, self.w2b)
        )
        delta = (self.alpha / self.rank) * (w1a @ w1b) * (w2a @ w2b)
        return weight + self.target.to_flax(delta).astype(weight.dtype)

    def bypass(self, x: jax.Array, y: jax.Array, layer: WeightLayer) -> jax.Array:
        """y + op(x, dW): the Hadamard product has no cheaper activation form (ComfyUI's bypass forms it too)."""
        return delta_bypass(self, x, y, layer)

    def export(self) -> dict[str, np.ndarray]:
        factors = {"hada_w1_a": self.w1a, "hada_w1_b": self.w1b, "hada_w2_a": self.w2a, "hada_w2_b": self.w2b}
        return {
            **{name: np.asarray(p[...]) for name, p in factors.items()},
            "alpha": np.asarray(self.alpha, np.float32),
        }
