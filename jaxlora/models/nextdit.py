"""NextDiT, the single-stream DiT of Lumina 2 and Z-Image, in the layout ComfyUI holds under `diffusion_model.`.

Module paths are the file's (ComfyUI's `comfy/ldm/lumina/model.py`): `x_embedder`, `t_embedder.mlp.0/2`,
`cap_embedder.0` (RMSNorm) and `.1`, `x_pad_token`/`cap_pad_token` (Z-Image), the blocks `noise_refiner.N`,
`context_refiner.N`, `layers.N` (`attention.qkv/out/q_norm/k_norm`, `feed_forward.w1/w2/w3`,
`attention_norm1/2`, `ffn_norm1/2`, `adaLN_modulation.0` (Z-Image) or `.1` (Lumina 2, after a SiLU)) and
`final_layer` (`linear`, `adaLN_modulation.1`). The fused `qkv` (q heads, then the key/value heads, which Lumina 2
shares between query heads) stays fused. The three block groups are each one `Stack`.

The network takes NHWC latents (16 channels), pads them to even size (circular) and patchifies 2x2 in the order
(row, column, channel) ComfyUI and diffusers use. Caption tokens are embedded and refined alone (context
refiner), image tokens alone with the timestep modulation (noise refiner), then both run jointly, captions
first. Z-Image pads each sequence to a multiple of 32 with learned pad tokens (position ids zero for image
padding), attended to like any token, as ComfyUI does; ComfyUI's network ignores any attention mask. RoPE
positions: caption token i at (i + 1, 0, 0), image tokens at (captions + 1, row, column).

The timestep is sigma (ComfyUI's flow multiplier 1); the network embeds t = 1 - sigma, times `time_scale`, and
returns the negated output, so that it predicts noise minus data like every CONST model.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.models.attention import attention
from jaxlora.models.layers import AffineRMSNorm, Linear, RawParameter, layer_norm, sinusoidal_embedding
from jaxlora.models.rope import apply_rope, rope_tables
from jaxlora.models.stack import Stack

PATCH = 2
FREQ_DIM = 256  # width of the timestep sinusoid
NORM_EPS = 1e-5  # the blocks' and the caption embedder's RMSNorms
FINAL_NORM_EPS = 1e-6  # the final LayerNorm (no affine part)
QK_NORM_EPS = None  # ComfyUI's q_norm/k_norm take torch.nn.RMSNorm's default: the compute dtype's epsilon


@dataclass(frozen=True)
class NextDiTConfig:
    """Everything that shapes the network; inferred from a checkpoint by the family (`nextdit_family`).

    Widths come from the weights (`t_hidden`: the timestep MLP's hidden width; `adaln_dim`: the width of the
    modulation input, which is the timestep embedding); the RoPE axes and theta, `time_scale` and whether the
    block modulation has a SiLU in front (`modulation_silu`) are the variant's fixed rules.
    """

    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    ffn_hidden: int = 10240
    in_channels: int = 16
    cap_feat_dim: int = 2560
    t_hidden: int = 1024
    adaln_dim: int = 256
    axes_dims: tuple[int, ...] = (32, 48, 48)
    rope_theta: float = 256.0
    time_scale: float = 1000.0
    modulation_silu: bool = False
    pad_tokens_multiple: int | None = 32

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"width {self.dim} does not split into {self.n_heads} heads")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.n_heads} query heads do not share {self.n_kv_heads} key/value heads evenly")
        if sum(self.axes_dims) != self.head_dim:
            raise ValueError(f"RoPE axes {self.axes_dims} must add up to the head width {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class Attention(nnx.Module):
    """Fused qkv [q heads | k heads | v heads] without bias, per-head QK-norm, RoPE, grouped-query attention."""

    def __init__(self, config: NextDiTConfig):
        self.heads, self.kv_heads, head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.qkv = Linear(config.dim, (config.n_heads + 2 * config.n_kv_heads) * head_dim, bias=False)
        self.out = Linear(config.n_heads * head_dim, config.dim, bias=False)
        self.q_norm = AffineRMSNorm(head_dim, eps=QK_NORM_EPS)
        self.k_norm = AffineRMSNorm(head_dim, eps=QK_NORM_EPS)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        batch, length, _ = x.shape
        qkv = self.qkv(x).reshape(batch, length, self.heads + 2 * self.kv_heads, -1)
        q, k, v = jnp.split(qkv, [self.heads, self.heads + self.kv_heads], axis=2)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        out = attention(q, k, v)  # key/value heads shared by groups of query heads
        return self.out(out.reshape(batch, length, -1))


class FeedForward(nnx.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, dim: int, hidden: int):
        self.w1 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)
        self.w3 = Linear(dim, hidden, bias=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


class Block(nnx.Module):
    """A sandwich-norm transformer block; with `modulation`, the timestep scales the norms' outputs and gates
    (tanh) both residual branches: (scale_msa, gate_msa, scale_mlp, gate_mlp) from `adaLN_modulation`."""

    def __init__(self, config: NextDiTConfig, modulation: bool):
        dim = config.dim
        self.attention = Attention(config)
        self.feed_forward = FeedForward(dim, config.ffn_hidden)
        for name in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
            setattr(self, name, AffineRMSNorm(dim, eps=NORM_EPS))
        self.silu = config.modulation_silu
        self.modulation_key = "1" if self.silu else "0"  # the index of the Linear in ComfyUI's Sequential
        self.adaLN_modulation = (
            nnx.Dict({self.modulation_key: Linear(config.adaln_dim, 4 * dim)}) if modulation else None
        )

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, adaln: jax.Array | None = None) -> tuple:
        if self.adaLN_modulation is None:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), cos, sin))
            return (x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x))),)
        mod = self.adaLN_modulation[self.modulation_key](jax.nn.silu(adaln) if self.silu else adaln)[:, None, :]
        scale_msa, gate_msa, scale_mlp, gate_mlp = jnp.split(mod, 4, axis=-1)
        attn = self.attention(self.attention_norm1(x) * (1 + scale_msa), cos, sin)
        x = x + jnp.tanh(gate_msa) * self.attention_norm2(attn)
        ff = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp))
        return (x + jnp.tanh(gate_mlp) * self.ffn_norm2(ff),)


class TimestepEmbedder(nnx.Module):
    def __init__(self, hidden: int, out: int):
        self.mlp = nnx.Dict({"0": Linear(FREQ_DIM, hidden), "2": Linear(hidden, out)})

    def __call__(self, t: jax.Array, dtype: jnp.dtype) -> jax.Array:
        return self.mlp["2"](jax.nn.silu(self.mlp["0"](sinusoidal_embedding(t, FREQ_DIM).astype(dtype))))


class FinalLayer(nnx.Module):
    def __init__(self, config: NextDiTConfig):
        self.linear = Linear(config.dim, PATCH * PATCH * config.in_channels)
        self.adaLN_modulation = nnx.Dict({"1": Linear(config.adaln_dim, config.dim)})

    def __call__(self, x: jax.Array, adaln: jax.Array) -> jax.Array:
        scale = self.adaLN_modulation["1"](jax.nn.silu(adaln))[:, None, :]
        return self.linear(layer_norm(x, FINAL_NORM_EPS) * (1 + scale))


def patchify(x: jax.Array) -> jax.Array:
    """NHWC [B, H, W, C] (H, W even) -> tokens [B, H/2 * W/2, 4C] ordered (ph, pw, c)."""
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height // PATCH, PATCH, width // PATCH, PATCH, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, (height // PATCH) * (width // PATCH), -1)


def unpatchify(tokens: jax.Array, height: int, width: int) -> jax.Array:
    """The inverse of `patchify` for a padded size (H, W even)."""
    batch = tokens.shape[0]
    x = tokens.reshape(batch, height // PATCH, width // PATCH, PATCH, PATCH, -1)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height, width, -1)


def padded_length(length: int, multiple: int | None) -> int:
    return length if multiple is None else length + (-length) % multiple


def position_ids(cap_len: int, img_hw: tuple[int, int], multiple: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(caption ids [Lc', 3], image ids [Li', 3]) for padded lengths Lc', Li': caption token i at (i + 1, 0, 0)
    (pad tokens continue the count), image tokens at (Lc' + 1, row, column), image pad tokens at zero."""
    cap_total = padded_length(cap_len, multiple)
    cap = np.zeros((cap_total, 3))
    cap[:, 0] = np.arange(cap_total) + 1
    height, width = img_hw
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    img = np.stack([np.full(height * width, cap_total + 1), rows.reshape(-1), cols.reshape(-1)], axis=-1)
    img = np.concatenate([img, np.zeros((padded_length(height * width, multiple) - height * width, 3))])
    return cap, img


class NextDiT(nnx.Module):
    """Lumina 2 / Z-Image. Call with NHWC latents, sigma-valued timesteps [B] and caption hidden states
    `context` [B, L, cap_feat_dim]; returns the flow prediction NHWC in x's dtype.

    `remat_policy` names a `jax.checkpoint_policies` member applied per block (None: no remat); `scan=False`
    unrolls the block loops.
    """

    def __init__(self, config: NextDiTConfig, *, remat_policy: str | None = None, scan: bool = True):
        self.config = config
        self.remat_policy = remat_policy
        self.scan = scan
        dim = config.dim
        self.x_embedder = Linear(PATCH * PATCH * config.in_channels, dim)
        self.t_embedder = TimestepEmbedder(config.t_hidden, config.adaln_dim)
        self.cap_embedder = nnx.Dict(
            {"0": AffineRMSNorm(config.cap_feat_dim, eps=NORM_EPS), "1": Linear(config.cap_feat_dim, dim)}
        )
        padded = config.pad_tokens_multiple is not None
        self.x_pad_token = RawParameter(1, dim) if padded else None
        self.cap_pad_token = RawParameter(1, dim) if padded else None
        self.noise_refiner = Stack(lambda: Block(config, modulation=True), config.n_refiner_layers)
        self.context_refiner = Stack(lambda: Block(config, modulation=False), config.n_refiner_layers)
        self.layers = Stack(lambda: Block(config, modulation=True), config.n_layers)
        self.final_layer = FinalLayer(config)

    def _pad(self, tokens: jax.Array, pad_token: RawParameter | None) -> jax.Array:
        """Append learned pad tokens up to the next multiple of `pad_tokens_multiple` (none without one)."""
        if pad_token is None:
            return tokens
        batch, length, dim = tokens.shape
        extra = padded_length(length, self.config.pad_tokens_multiple) - length
        pad = jnp.broadcast_to(pad_token(tokens.dtype)[None], (batch, extra, dim))
        return jnp.concatenate([tokens, pad], axis=1)

    def __call__(self, x: jax.Array, timesteps: jax.Array, context: jax.Array) -> jax.Array:
        config = self.config
        dtype = x.dtype
        batch, height, width, _ = x.shape
        padded = jnp.pad(x, ((0, 0), (0, -height % PATCH), (0, -width % PATCH), (0, 0)), mode="wrap")
        grid = (padded.shape[1] // PATCH, padded.shape[2] // PATCH)
        adaln = self.t_embedder(config.time_scale * (1.0 - timesteps), dtype)
        cap = self._pad(self.cap_embedder["1"](self.cap_embedder["0"](context.astype(dtype))), self.cap_pad_token)
        img = self._pad(self.x_embedder(patchify(padded)), self.x_pad_token)

        cap_ids, img_ids = position_ids(context.shape[1], grid, config.pad_tokens_multiple)
        tables = [
            tuple(jnp.asarray(t) for t in rope_tables(ids, config.axes_dims, config.rope_theta))
            for ids in (cap_ids, img_ids, np.concatenate([cap_ids, img_ids]))
        ]
        run = {"remat_policy": self.remat_policy, "scan": self.scan}
        (cap,) = self.context_refiner((cap,), *tables[0], **run)
        (img,) = self.noise_refiner((img,), *tables[1], adaln, **run)
        (joint,) = self.layers((jnp.concatenate([cap, img], axis=1),), *tables[2], adaln, **run)
        out = self.final_layer(joint[:, cap.shape[1] : cap.shape[1] + grid[0] * grid[1]], adaln)
        return -unpatchify(out, padded.shape[1], padded.shape[2])[:, :height, :width]
