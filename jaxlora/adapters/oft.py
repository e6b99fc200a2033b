"""OFT: rotate the output channels of W blockwise, W'_k = R_k^T W_k, with R the Cayley transform of a
skew-symmetric matrix under a joint Frobenius-norm constraint."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.adapters.base import LayerTensors, Target, factorization, master
from jaxlora.models.layers import WeightLayer


def cayley_rotations(blocks: jax.Array, constraint: float) -> jax.Array:
    """R = (I + Q)(I - Q)^-1 per block with Q = B - B^T, Q scaled down to norm `constraint` (all blocks jointly)
    when it exceeds it; float32."""
    q = blocks - jnp.swapaxes(blocks, -1, -2)
    if constraint != 0:
        # ||Q|| + 1e-8 with torch's gradient at Q = 0 (zero, where a plain sqrt would give NaN at init)
        squared = jnp.sum(jnp.square(q))
        norm = jnp.where(squared > 0, jnp.sqrt(jnp.where(squared > 0, squared, 1.0)), 0.0) + 1e-8
        q = q * jnp.where(norm > constraint, constraint / norm, 1.0)
    eye = jnp.eye(q.shape[-1], dtype=q.dtype)
    # (I + Q)(I - Q)^-1 = ((I - Q)^-T (I + Q)^T)^T; solve instead of forming the inverse.
    return jnp.swapaxes(jnp.linalg.solve(jnp.swapaxes(eye - q, -1, -2), jnp.swapaxes(eye + q, -1, -2)), -1, -2)


class OFT(nnx.Module):
    """`oft_blocks` [block_num, b, b] in the file's layout; `alpha` is the norm constraint (frozen)."""

    def __init__(self, target: Target, blocks, alpha: float, lora_dtype: jnp.dtype):
        self.target = target
        self.blocks = master(blocks)
        self.alpha = float(alpha)
        self.lora_dtype = jnp.dtype(lora_dtype)

    @classmethod
    def create(cls, target: Target, rank: int, rng: np.random.Generator, lora_dtype: jnp.dtype) -> OFT:
        """Zero blocks (R = I): `rank` is the target block size, as in ComfyUI."""
        block_size, block_num = factorization(target.out_features, rank)
        return cls(target, np.zeros((block_num, block_size, block_size)), 1.0, lora_dtype)

    @classmethod
    def from_tensors(cls, f: LayerTensors, target: Target, lora_dtype: jnp.dtype) -> OFT:
        """Diagonal OFT blocks [n, b, b] from a file (BOFT's 4-D butterfly blocks are not trainable here)."""
        blocks = f.get("oft_blocks")
        if blocks.ndim != 3:
            raise f.fail(f"oft_blocks of shape {blocks.shape} (BOFT) are not supported for training")
        if blocks.shape[0] * blocks.shape[1] != target.out_features or blocks.shape[1] != blocks.shape[2]:
            raise f.fail(f"oft_blocks {blocks.shape} do not fit {target.out_features} output channels")
        alpha = f.get("alpha")
        return cls(target, blocks, 0.0 if alpha is None else max(float(alpha), 0.0), lora_dtype)

    def patch(self, weight: jax.Array) -> jax.Array:
        """Output channels are the last axis of the Flax layout: W'[..., k, m] = sum_n W[..., k, n] R_k[n, m]."""
        rotations = cayley_rotations(self.blocks[...].astype(self.lora_dtype).astype(jnp.float32), self.alpha)
        block_num, block_size = rotations.shape[:2]
        blocks = weight.astype(jnp.float32).reshape(*weight.shape[:-1], block_num, block_size)
        rotated = jnp.einsum("...kn,knm->...km", blocks, rotations)
        return rotated.reshape(weight.shape).astype(weight.dtype)

    def bypass(self, x: jax.Array, y: jax.Array, layer: WeightLayer) -> jax.Array:
        """The rotation applied to the output: x (W R) = (x W) R, blockwise over the output channels (the last
        axis of activations and of the Flax weight alike), before the bias is added."""
        rotations = cayley_rotations(self.blocks[...].astype(self.lora_dtype).astype(jnp.float32), self.alpha)
        blocks = y.astype(jnp.float32).reshape(*y.shape[:-1], *rotations.shape[:2])
        return jnp.einsum("...kn,knm->...km", blocks, rotations).reshape(y.shape).astype(y.dtype)

    def export(self) -> dict[str, np.ndarray]:
        return {"oft_blocks": np.asarray(self.blocks[...]), "alpha": np.asarray(self.alpha, np.float32)}
