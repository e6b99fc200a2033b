"""Rotary position embeddings over several position axes (BFL's `EmbedND`, used by ComfyUI's DiTs): each axis
rotates its own slice of a head's width by that axis' position, consecutive pairs (x0, x1) per frequency.

The tables are static numpy (positions are known from shapes at trace time), computed in float64 and rounded to
float32 as ComfyUI's `rope` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def rope_tables(ids: np.ndarray, axes_dim: Sequence[int], theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [L, sum(axes_dim)/2] for positions `ids` [L, len(axes_dim)]."""
    ids = np.asarray(ids, np.float64)
    angles = []
    for axis, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        angles.append(ids[:, axis, None] * omega)
    angles = np.concatenate(angles, axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate consecutive pairs (x0, x1) of every head by the position's angles; x [B, L, H, D], in float32."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = jnp.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)
