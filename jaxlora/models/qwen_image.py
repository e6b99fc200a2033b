"""Qwen-Image (and its Edit variants, which share every key and shape) in the layout ComfyUI holds under
`diffusion_model.`: the module names of the original release, which diffusers' `QwenImageTransformer2DModel` keeps
(its single-file loader converts nothing).

A dual-stream MMDiT of 60 blocks and no single-stream blocks, read from ComfyUI's `comfy/ldm/qwen_image/model.py`
and diffusers' `transformer_qwenimage.py`. Module paths: `img_in`, `txt_norm` (RMSNorm over the text features)
and `txt_in`, `time_text_embed.timestep_embedder.linear_1/2`, `transformer_blocks.N` (`img_mod.1`/`txt_mod.1`:
six modulation vectors (shift, scale, gate) x 2 from the timestep embedding; `attn.to_q/to_k/to_v` for the image
and `attn.add_q_proj/add_k_proj/add_v_proj` for the text stream, unfused in the file as in the network,
`attn.norm_q/norm_k/norm_added_q/norm_added_k`, `attn.to_out.0`, `attn.to_add_out`, and tanh-GELU MLPs
`img_mlp.net.0.proj`/`img_mlp.net.2` and the `txt_` twins), `norm_out.linear` (scale, shift) and `proj_out`.
The blocks are Flux's `DoubleStream` with these projections; they are one `Stack` run by scan.

The network takes NHWC latents (16 channels), pads them to even size (circular) and patchifies 2x2 in the
order (c, ph, pw) as Flux does. RoPE over three axes (16, 56, 56) with theta 10000, pairs rotated as BFL's
`EmbedND`: image token (row i, column j) of an h x w token grid at (0, i - h//2, j - w//2), centred as ComfyUI's
`process_img` and diffusers' `scale_rope` place it (the two agree for even h and w; for an odd side diffusers
starts half a token lower, ComfyUI is followed here); text token k at max(h//2, w//2) + k on every axis, text
first. The timestep is sigma (ModelSamplingFlux, multiplier 1), embedded x1000.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx

from jaxlora.models.flux import (
    EMBED_DIM,
    NORM_EPS,
    TIME_FACTOR,
    DoubleStream,
    JointTransformer,
    StreamConfig,
    modulation_vectors,
)
from jaxlora.models.layers import AffineRMSNorm, Linear, layer_norm, sinusoidal_embedding
from jaxlora.models.stack import Stack

AXES_DIM = (16, 56, 56)
THETA = 10000.0
RMS_EPS = 1e-6  # txt_norm and the QK-norms


@dataclass(frozen=True)
class QwenImageConfig(StreamConfig):
    """Everything that shapes the network; `in_channels`/`out_channels` are latent channels (before the 2x2
    patchify). No single-stream blocks (`depth_single_blocks` stays 0)."""

    hidden_size: int = 3072
    num_heads: int = 24
    mlp_hidden: int = 12288
    depth: int = 60
    depth_single_blocks: int = 0
    in_channels: int = 16
    out_channels: int = 16
    context_dim: int = 3584
    axes_dim: tuple[int, ...] = AXES_DIM
    theta: float = THETA

    def __post_init__(self):
        super().__post_init__()
        if self.depth_single_blocks:
            raise ValueError("Qwen-Image has no single-stream blocks")


QWEN_IMAGE = QwenImageConfig()


class JointAttention(nnx.Module):
    """The image stream's `to_q/to_k/to_v/to_out.0` and the text stream's `add_*_proj/to_add_out`, with
    per-head RMS QK-norms (`norm_q/norm_k`, `norm_added_q/norm_added_k`)."""

    STREAMS = {"img": ("to_q", "to_k", "to_v", "norm_q", "norm_k"), "txt": ("add_q_proj", "add_k_proj",
               "add_v_proj", "norm_added_q", "norm_added_k")}  # fmt: skip

    def __init__(self, hidden: int, heads: int):
        self.heads = heads
        for q, k, v, norm_q, norm_k in self.STREAMS.values():
            for name in (q, k, v):
                setattr(self, name, Linear(hidden, hidden))
            for name in (norm_q, norm_k):
                setattr(self, name, AffineRMSNorm(hidden // heads, eps=RMS_EPS))
        self.to_out = nnx.Dict({"0": Linear(hidden, hidden)})
        self.to_add_out = Linear(hidden, hidden)

    def qkv(self, stream: str, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        q, k, v, norm_q, norm_k = (getattr(self, name) for name in self.STREAMS[stream])
        split = lambda t: t.reshape(*t.shape[:2], self.heads, -1)  # noqa: E731
        return norm_q(split(q(x))), norm_k(split(k(x))), split(v(x))

    def out(self, stream: str, x: jax.Array) -> jax.Array:
        return self.to_out["0"](x) if stream == "img" else self.to_add_out(x)


class GeluProjection(nnx.Module):
    def __init__(self, in_features: int, out_features: int):
        self.proj = Linear(in_features, out_features)


class FeedForward(nnx.Module):
    """diffusers' FeedForward layout: `net.0.proj` into the hidden width, `net.2` back (tanh GELU between)."""

    def __init__(self, hidden: int, mlp_hidden: int):
        self.net = nnx.Dict({"0": GeluProjection(hidden, mlp_hidden), "2": Linear(mlp_hidden, hidden)})


class QwenImageBlock(DoubleStream):
    """Flux's double block on Qwen-Image's module layout: each stream's six modulation vectors from the
    timestep embedding (`img_mod.1`, `txt_mod.1` after a SiLU), the shared joint attention, tanh-GELU MLPs."""

    def __init__(self, config: QwenImageConfig):
        hidden = config.hidden_size
        self.img_mod = nnx.Dict({"1": Linear(hidden, 6 * hidden)})
        self.txt_mod = nnx.Dict({"1": Linear(hidden, 6 * hidden)})
        self.attn = JointAttention(hidden, config.num_heads)
        self.img_mlp = FeedForward(hidden, config.mlp_hidden)
        self.txt_mlp = FeedForward(hidden, config.mlp_hidden)

    def __call__(self, img, txt, vec, cos, sin) -> tuple[jax.Array, jax.Array]:
        img_mod = modulation_vectors(self.img_mod["1"], vec, 6)
        txt_mod = modulation_vectors(self.txt_mod["1"], vec, 6)
        return super().__call__(img, txt, img_mod, txt_mod, cos, sin)

    def project_qkv(self, stream, x):
        return self.attn.qkv(stream, x)

    def project_out(self, stream, x):
        return self.attn.out(stream, x)

    def feed_forward(self, stream, x):
        mlp = getattr(self, f"{stream}_mlp").net
        return mlp["2"](self.activation(mlp["0"].proj(x)))


class TimestepEmbedding(nnx.Module):
    def __init__(self, hidden: int):
        self.linear_1 = Linear(EMBED_DIM, hidden)
        self.linear_2 = Linear(hidden, hidden)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class NormOut(nnx.Module):
    """The final adaLN: `linear` gives (scale, shift) [diffusers' order] from silu(vec)."""

    def __init__(self, hidden: int):
        self.linear = Linear(hidden, 2 * hidden)

    def __call__(self, x: jax.Array, vec: jax.Array) -> jax.Array:
        scale, shift = modulation_vectors(self.linear, vec, 2)
        return (1 + scale) * layer_norm(x, NORM_EPS) + shift


def qwen_position_ids(grid: tuple[int, int], txt_len: int) -> np.ndarray:
    """[txt_len + h*w, 3] RoPE positions, text first: text token k at max(h//2, w//2) + k on every axis, image
    token (i, j) at (0, i - h//2, j - w//2) (ComfyUI's `process_img` with index 0 and no offset)."""
    height, width = grid
    rows, cols = np.meshgrid(np.arange(height) - height // 2, np.arange(width) - width // 2, indexing="ij")
    img_ids = np.stack([np.zeros(height * width), rows.reshape(-1), cols.reshape(-1)], axis=-1)
    start = max(height // 2, width // 2)
    txt_ids = np.repeat(np.arange(start, start + txt_len)[:, None], 3, axis=1)
    return np.concatenate([txt_ids, img_ids]).astype(np.float64)


class QwenImage(JointTransformer):
    """Qwen-Image. Call with NHWC latents [B, H, W, 16], sigma-valued timesteps [B] and the Qwen2.5-VL hidden
    states `context` [B, L, 3584]; returns the flow prediction NHWC in x's dtype.

    `remat_policy` and `scan` as for Flux."""

    def __init__(self, config: QwenImageConfig, *, remat_policy: str | None = None, scan: bool = True):
        self.config = config
        self.remat_policy = remat_policy
        self.scan = scan
        hidden = config.hidden_size
        self.img_in = Linear(4 * config.in_channels, hidden)
        self.txt_norm = AffineRMSNorm(config.context_dim, eps=RMS_EPS)
        self.txt_in = Linear(config.context_dim, hidden)
        self.time_text_embed = nnx.Dict({"timestep_embedder": TimestepEmbedding(hidden)})
        self.transformer_blocks = Stack(lambda: QwenImageBlock(config), config.depth)
        self.norm_out = NormOut(hidden)
        self.proj_out = Linear(hidden, 4 * config.out_channels)

    # What `JointTransformer` runs: the one block stack, no single-stream stack.
    single_blocks = None

    @property
    def double_blocks(self) -> Stack:
        return self.transformer_blocks

    def position_ids(self, grid, txt_len):
        return qwen_position_ids(grid, txt_len)

    def final_layer(self, img: jax.Array, vec: jax.Array) -> jax.Array:
        return self.proj_out(self.norm_out(img, vec))

    def __call__(self, x: jax.Array, timesteps: jax.Array, context: jax.Array) -> jax.Array:
        dtype = x.dtype
        embed = sinusoidal_embedding(TIME_FACTOR * timesteps, EMBED_DIM).astype(dtype)
        vec = self.time_text_embed["timestep_embedder"](embed)
        txt = self.txt_in(self.txt_norm(context.astype(dtype)))
        return self.joint_forward(x, txt, double_inputs=(vec,), final_mods=(vec,))
