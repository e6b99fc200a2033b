"""Wan 2.1 / 2.2 (text to video), the video DiT ComfyUI loads through `comfy/ldm/wan/model.py`, in the layout it
holds under `diffusion_model.`.

Module paths are the file's: `patch_embedding` (a 3-D conv, kernel = stride = 1x2x2), `text_embedding.0/2` (the
umT5 hidden states through Linear, tanh-GELU, Linear), `time_embedding.0/2`, `time_projection.1`, the blocks
`blocks.N` (`self_attn.q/k/v/o/norm_q/norm_k`, `cross_attn.<same>`, `norm3` (the affine LayerNorm before the
cross-attention), `ffn.0/2`, `modulation` [1, 6, dim]) and `head` (`head.head`, `head.modulation` [1, 2, dim]).
The blocks are one `Stack`.

The network takes channels-last video latents [B, T, H, W, C] (an image is one frame), pads H and W to even size
(circular, as ComfyUI's `pad_to_patch_size`), and embeds each 1x2x2 patch as one token, in (frame, row, column)
order. The timestep is ComfyUI's flow timestep, 1000 sigma. It embeds to `e` [B, dim] and, projected, to six
per-block modulations added to each block's learned `modulation`: shift, scale, gate of the self-attention and of
the feed-forward. The q/k RMSNorms span all heads (before the head split); self-attention rotates q and k by a
3-D RoPE over (frame, row, column) with axes (d - 4 (d // 6), 2 (d // 6), 2 (d // 6)) of the head width d;
cross-attention to the text has no positions. The output is the flow velocity in the input's layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.models.attention import attention
from jaxlora.models.layers import (
    AffineRMSNorm,
    LayerNorm,
    Linear,
    PatchConv3d,
    RawParameter,
    layer_norm,
    sinusoidal_embedding,
)
from jaxlora.models.rope import apply_rope, rope_tables
from jaxlora.models.stack import Stack

PATCH = (1, 2, 2)  # (frames, rows, columns) per token
FREQ_DIM = 256  # width of the timestep sinusoid
EPS = 1e-6  # every norm of the network
ROPE_THETA = 10000.0


@dataclass(frozen=True)
class WanConfig:
    """Everything that shapes the network; inferred from a checkpoint by the family (`wan_family`).

    Widths come from the weights; the head width (128 in every release) is ComfyUI's fixed rule
    (`num_heads = dim // 128`), and it fixes the RoPE axes.
    """

    dim: int = 1536
    ffn_dim: int = 8960
    num_layers: int = 30
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    head_dim: int = 128

    def __post_init__(self):
        if self.dim % self.head_dim:
            raise ValueError(f"width {self.dim} does not split into heads of {self.head_dim}")

    @property
    def num_heads(self) -> int:
        return self.dim // self.head_dim

    @property
    def axes_dim(self) -> tuple[int, int, int]:
        """RoPE widths of the (frame, row, column) axes: ComfyUI's and diffusers' split of the head width."""
        spatial = 2 * (self.head_dim // 6)
        return (self.head_dim - 2 * spatial, spatial, spatial)


class ModulationTable(RawParameter):
    """A learned [1, n, dim] table the file stores at the module path itself (`blocks.N.modulation`); ComfyUI's
    trainer does not adapt it (it is a bare parameter, not a layer)."""

    torch_to_flax = (0, 1, 2)


class Attention(nnx.Module):
    """q, k, v, o with biases; RMSNorm over the whole q and k width (all heads at once)."""

    def __init__(self, config: WanConfig):
        dim = config.dim
        self.heads = config.num_heads
        self.q, self.k, self.v, self.o = (Linear(dim, dim) for _ in range(4))
        self.norm_q = AffineRMSNorm(dim, eps=EPS)
        self.norm_k = AffineRMSNorm(dim, eps=EPS)

    def __call__(self, x: jax.Array, context: jax.Array, rope: tuple[jax.Array, jax.Array] | None) -> jax.Array:
        split = lambda t: t.reshape(*t.shape[:2], self.heads, -1)  # noqa: E731
        q, k, v = split(self.norm_q(self.q(x))), split(self.norm_k(self.k(context))), split(self.v(context))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention(q, k, v)
        return self.o(out.reshape(x.shape))


class Block(nnx.Module):
    """Modulated self-attention (gated), cross-attention to the text after an affine LayerNorm (`norm3`),
    modulated feed-forward (gated); `norm1`/`norm2` have no affine part."""

    def __init__(self, config: WanConfig):
        self.self_attn = Attention(config)
        self.cross_attn = Attention(config)
        self.norm3 = LayerNorm(config.dim, eps=EPS)
        self.ffn = nnx.Dict({"0": Linear(config.dim, config.ffn_dim), "2": Linear(config.ffn_dim, config.dim)})
        self.modulation = ModulationTable(1, 6, config.dim)

    def __call__(self, x, e0, context, cos, sin) -> tuple:
        shift, scale, gate, c_shift, c_scale, c_gate = jnp.split(self.modulation(x.dtype) + e0, 6, axis=1)
        h = layer_norm(x, EPS) * (1 + scale) + shift
        x = x + gate * self.self_attn(h, h, (cos, sin))
        x = x + self.cross_attn(self.norm3(x), context, None)
        y = self.ffn["0"](layer_norm(x, EPS) * (1 + c_scale) + c_shift)
        return (x + c_gate * self.ffn["2"](jax.nn.gelu(y, approximate=True)),)


class Head(nnx.Module):
    def __init__(self, config: WanConfig):
        self.head = Linear(config.dim, int(np.prod(PATCH)) * config.out_channels)
        self.modulation = ModulationTable(1, 2, config.dim)

    def __call__(self, x: jax.Array, e: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.modulation(x.dtype) + e[:, None, :], 2, axis=1)
        return self.head(layer_norm(x, EPS) * (1 + scale) + shift)


def token_positions(grid: tuple[int, int, int]) -> np.ndarray:
    """(frame, row, column) of every token [T' H' W', 3], in token order."""
    return np.stack(np.meshgrid(*(np.arange(n) for n in grid), indexing="ij"), axis=-1).reshape(-1, 3)


def unpatchify(tokens: jax.Array, grid: tuple[int, int, int], channels: int) -> jax.Array:
    """Tokens [B, T' H' W', pt ph pw C] (patch offsets then channel) -> latents [B, T, H, W, C]."""
    batch = tokens.shape[0]
    x = tokens.reshape(batch, *grid, *PATCH, channels)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(batch, *(n * p for n, p in zip(grid, PATCH, strict=True)), channels)


class Wan(nnx.Module):
    """Wan 2.x text-to-video. Call with latents [B, T, H, W, C], flow timesteps [B] (1000 sigma) and umT5
    hidden states `context` [B, L, text_dim]; returns the flow prediction [B, T, H, W, C] in x's dtype.

    `remat_policy` names a `jax.checkpoint_policies` member applied per block (None: no remat); `scan=False`
    unrolls the block loop.
    """

    def __init__(self, config: WanConfig, *, remat_policy: str | None = None, scan: bool = True):
        self.config = config
        self.remat_policy = remat_policy
        self.scan = scan
        dim = config.dim
        self.patch_embedding = PatchConv3d(config.in_channels, dim, PATCH)
        self.text_embedding = nnx.Dict({"0": Linear(config.text_dim, dim), "2": Linear(dim, dim)})
        self.time_embedding = nnx.Dict({"0": Linear(FREQ_DIM, dim), "2": Linear(dim, dim)})
        self.time_projection = nnx.Dict({"1": Linear(dim, 6 * dim)})
        self.blocks = Stack(lambda: Block(config), config.num_layers)
        self.head = Head(config)

    def __call__(self, x: jax.Array, timesteps: jax.Array, context: jax.Array) -> jax.Array:
        config, dtype = self.config, x.dtype
        batch, frames, height, width, _ = x.shape
        pads = [(0, -size % patch) for size, patch in zip((frames, height, width), PATCH, strict=True)]
        tokens = self.patch_embedding(jnp.pad(x, ((0, 0), *pads, (0, 0)), mode="wrap"))
        grid = tokens.shape[1:4]
        tokens = tokens.reshape(batch, -1, config.dim)

        e = self.time_embedding["0"](sinusoidal_embedding(timesteps, FREQ_DIM).astype(dtype))
        e = self.time_embedding["2"](jax.nn.silu(e))
        e0 = self.time_projection["1"](jax.nn.silu(e)).reshape(batch, 6, config.dim)
        text = self.text_embedding["0"](context.astype(dtype))
        text = self.text_embedding["2"](jax.nn.gelu(text, approximate=True))

        cos, sin = (jnp.asarray(t) for t in rope_tables(token_positions(grid), config.axes_dim, ROPE_THETA))
        (tokens,) = self.blocks((tokens,), e0, text, cos, sin, remat_policy=self.remat_policy, scan=self.scan)
        out = unpatchify(self.head(tokens, e), grid, config.out_channels)
        return out[:, :frames, :height, :width].astype(dtype)
