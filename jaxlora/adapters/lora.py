"""LoRA: W' = W + (alpha / rank) * up @ down, with ComfyUI's initialisation (up random, down zero)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.adapters.base import LayerTensors, Target, master, rounded
from jaxlora.models.layers import WeightLayer


class LoRA(nnx.Module):
    """`up` [out, r] and `down` [r, d_in] in torch layout (conv kernels folded into d_in); alpha is frozen."""

    def __init__(self, target: Target, up, down, alpha: float, lora_dtype: jnp.dtype):
        self.target = target
        self.up = master(up)
        self.down = master(down)
        self.alpha = float(alpha)
        self.lora_dtype = jnp.dtype(lora_dtype)

    @classmethod
    def create(cls, target: Target, rank: int, rng: np.random.Generator, lora_dtype: jnp.dtype) -> LoRA:
        """torch's kaiming_uniform(a=sqrt(5)) on up (fan_in = rank): U(-1/sqrt(r), 1/sqrt(r)); down zeros."""
        bound = 1.0 / math.sqrt(rank)
        up = rng.uniform(-bound, bound, (target.out_features, rank))
        return cls(target, up, np.zeros((rank, target.in_features)), 1.0, lora_dtype)

    @classmethod
    def from_tensors(cls, f: LayerTensors, target: Target, lora_dtype: jnp.dtype) -> LoRA:
        """A LoRA from a file in any of its spellings: conv factors flat or 4-D, a Tucker `mid` folded into down,
        the file's alpha kept as the scale ComfyUI loads with."""
        up, down, mid = f.get("up"), f.get("down"), f.get("mid")
        if up is None or down is None:
            raise f.fail("a LoRA needs both an up and a down factor")
        rank = down.shape[0]
        alpha = f.alpha(rank)
        if mid is not None:
            down = np.einsum("pjkl,ji->pikl", mid, down.reshape(rank, -1))
        up, down = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
        if up.shape[0] != target.out_features or down.shape[1] != target.in_features or up.shape[1] != down.shape[0]:
            raise f.fail(f"LoRA factors up {up.shape} / down {down.shape} do not fit the weight {target.torch_shape}")
        return cls(target, up, down, alpha * down.shape[0] / rank, lora_dtype)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def patch(self, weight: jax.Array) -> jax.Array:
        up, down = (
            rounded(self.up, self.lora_dtype, weight.dtype),
            rounded(self.down, self.lora_dtype, weight.dtype),
        )
        return weight + self.target.to_flax(self.scale * (up @ down)).astype(weight.dtype)

    def bypass(self, x: jax.Array, y: jax.Array, layer: WeightLayer) -> jax.Array:
        """y + scale * up(down(x)): down runs as the layer's own op (a conv keeps its stride and padding), up as
        a per-position matmul, so the full-size delta is never formed."""
        down = rounded(self.down, self.lora_dtype, x.dtype).reshape((self.rank, *self.target.torch_shape[1:]))
        hidden = layer.apply_kernel(x, jnp.transpose(down, self.target.torch_to_flax))
        return y + self.scale * (hidden @ rounded(self.up, self.lora_dtype, x.dtype).T)

    def export(self) -> dict[str, np.ndarray]:
        return {
            "lora_up.weight": np.asarray(self.up[...]),
            "lora_down.weight": np.asarray(self.down[...]),
            "alpha": np.asarray(self.alpha, np.float32),
        }
