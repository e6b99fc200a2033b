"""Flux.1 (dev and schnell) in the Black Forest Labs layout that ComfyUI holds under `diffusion_model.`.

Module paths are the file's: `img_in`, `time_in`, `vector_in`, `guidance_in` (dev), `txt_in`, `double_blocks.N`
(`img_mod.lin`, `img_attn.qkv/norm/proj`, `img_mlp.0/2` and the `txt_` twins), `single_blocks.N` (`linear1`,
`linear2`, `modulation.lin`, `norm`), `final_layer`. The fused `qkv` and `linear1` projections stay fused. The
19 double and 38 single blocks are each one `Stack` (parameters with a leading block axis, run by scan);
`layer_sites` names block i `double_blocks.<i>...` as the file does.

The network takes NHWC latents (16 channels), patchifies them 2x2 ("b (h w) (c ph pw)", as ComfyUI and
diffusers pack), and builds the RoPE positions as ComfyUI does: image token (row, column) ids after padding to
the patch size, text ids zero, text tokens first. The timestep is sigma; the embedding multiplies by 1000.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.models.layers import Linear, RMSNorm, layer_norm, sinusoidal_embedding
from jaxlora.models.rope import apply_rope, rope_tables
from jaxlora.models.stack import Stack

PATCH = 2
TIME_FACTOR = 1000.0
EMBED_DIM = 256  # width of the timestep and guidance sinusoids
NORM_EPS = 1e-6


@dataclass(frozen=True)
class FluxConfig:
    """Everything that shapes the network; inferred from a checkpoint by `checkpoint.infer_flux_config`.

    `in_channels`/`out_channels` are latent channels (before the 2x2 patchify); the head width is the length
    of the QK-norm scale and equals sum(axes_dim).
    """

    hidden_size: int = 3072
    num_heads: int = 24
    mlp_hidden: int = 12288
    depth: int = 19
    depth_single_blocks: int = 38
    in_channels: int = 16
    out_channels: int = 16
    context_dim: int = 4096
    vec_in_dim: int = 768
    guidance_embed: bool = True
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: float = 10000.0

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden size {self.hidden_size} does not split into {self.num_heads} heads")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"RoPE axes {self.axes_dim} must add up to the head width {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def pooled_dim(self) -> int:
        return self.vec_in_dim


FLUX_DEV = FluxConfig()
FLUX_SCHNELL = FluxConfig(guidance_embed=False)


class MLPEmbedder(nnx.Module):
    def __init__(self, in_dim: int, hidden: int):
        self.in_layer = Linear(in_dim, hidden)
        self.out_layer = Linear(hidden, hidden)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out_layer(jax.nn.silu(self.in_layer(x)))


class Modulation(nnx.Module):
    """`count` [B, 1, hidden] vectors from the conditioning vector: (shift, scale, gate) per group of three."""

    def __init__(self, hidden: int, count: int):
        self.lin = Linear(hidden, count * hidden)
        self.count = count

    def __call__(self, vec: jax.Array) -> list[jax.Array]:
        return jnp.split(self.lin(jax.nn.silu(vec))[:, None, :], self.count, axis=-1)


class QKNorm(nnx.Module):
    def __init__(self, head_dim: int):
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)


class SelfAttention(nnx.Module):
    """The fused qkv projection, its QK-norm and the output projection (attention itself runs jointly)."""

    def __init__(self, hidden: int, heads: int):
        self.heads = heads
        self.qkv = Linear(hidden, 3 * hidden)
        self.norm = QKNorm(hidden // heads)
        self.proj = Linear(hidden, hidden)

    def split_heads(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """qkv(x) [B, L, 3*hidden] -> normalised q, k and v [B, L, heads, head_dim] ("B L (K H D)")."""
        qkv = self.qkv(x)
        batch, length, _ = qkv.shape
        q, k, v = jnp.moveaxis(qkv.reshape(batch, length, 3, self.heads, -1), 2, 0)
        return self.norm.query_norm(q), self.norm.key_norm(k), v


def rope_ids(img_hw: tuple[int, int], txt_len: int) -> np.ndarray:
    """The token positions ComfyUI builds for Flux: text ids zero, image ids (0, row, column), text first."""
    height, width = img_hw
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    img_ids = np.stack([np.zeros(height * width), rows.reshape(-1), cols.reshape(-1)], axis=-1)
    return np.concatenate([np.zeros((txt_len, 3)), img_ids])


def attention(q: jax.Array, k: jax.Array, v: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE on q and k, then scaled dot-product attention; [B, L, H, D] -> [B, L, H*D]."""
    out = jax.nn.dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
    return out.reshape(*out.shape[:2], -1)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return (1 + scale) * layer_norm(x, NORM_EPS) + shift


class DoubleStreamBlock(nnx.Module):
    """Image and text streams with their own weights, attending jointly (text tokens first)."""

    def __init__(self, config: FluxConfig):
        hidden, heads, mlp = config.hidden_size, config.num_heads, config.mlp_hidden
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", Modulation(hidden, 6))
            setattr(self, f"{stream}_attn", SelfAttention(hidden, heads))
            setattr(self, f"{stream}_mlp", nnx.Dict({"0": Linear(hidden, mlp), "2": Linear(mlp, hidden)}))

    def __call__(self, img, txt, vec, cos, sin) -> tuple[jax.Array, jax.Array]:
        img_mod, txt_mod = self.img_mod(vec), self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.split_heads(modulate(img, *img_mod[:2]))
        txt_q, txt_k, txt_v = self.txt_attn.split_heads(modulate(txt, *txt_mod[:2]))
        joint = [jnp.concatenate(pair, axis=1) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v))]
        out = attention(*joint, cos, sin)
        txt_out, img_out = out[:, : txt.shape[1]], out[:, txt.shape[1] :]
        img = self._finish(img, img_out, img_mod, self.img_attn, self.img_mlp)
        txt = self._finish(txt, txt_out, txt_mod, self.txt_attn, self.txt_mlp)
        return img, txt

    @staticmethod
    def _finish(x, attn_out, mod, attn: SelfAttention, mlp: nnx.Dict) -> jax.Array:
        _, _, gate1, shift2, scale2, gate2 = mod
        x = x + gate1 * attn.proj(attn_out)
        hidden = jax.nn.gelu(mlp["0"](modulate(x, shift2, scale2)), approximate=True)
        return x + gate2 * mlp["2"](hidden)


class SingleStreamBlock(nnx.Module):
    """One stream over the joint tokens: `linear1` yields qkv and the MLP input, `linear2` takes both."""

    def __init__(self, config: FluxConfig):
        hidden, mlp = config.hidden_size, config.mlp_hidden
        self.heads = config.num_heads
        self.linear1 = Linear(hidden, 3 * hidden + mlp)
        self.linear2 = Linear(hidden + mlp, hidden)
        self.norm = QKNorm(config.head_dim)
        self.modulation = Modulation(hidden, 3)

    def __call__(self, x, vec, cos, sin) -> tuple[jax.Array]:
        shift, scale, gate = self.modulation(vec)
        fused = self.linear1(modulate(x, shift, scale))
        hidden = x.shape[-1]
        qkv, mlp = fused[..., : 3 * hidden], fused[..., 3 * hidden :]
        q, k, v = jnp.moveaxis(qkv.reshape(*qkv.shape[:2], 3, self.heads, -1), 2, 0)
        out = attention(self.norm.query_norm(q), self.norm.key_norm(k), v, cos, sin)
        out = self.linear2(jnp.concatenate([out, jax.nn.gelu(mlp, approximate=True)], axis=-1))
        return (x + gate * out,)


class LastLayer(nnx.Module):
    def __init__(self, hidden: int, out_features: int):
        self.linear = Linear(hidden, out_features)
        self.adaLN_modulation = nnx.Dict({"1": Linear(hidden, 2 * hidden)})

    def __call__(self, x: jax.Array, vec: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.adaLN_modulation["1"](jax.nn.silu(vec))[:, None, :], 2, axis=-1)
        return self.linear(modulate(x, shift, scale))


def patchify(x: jax.Array) -> jax.Array:
    """NHWC [B, H, W, C] (H, W even) -> tokens [B, H/2 * W/2, C*4] ordered (c, ph, pw)."""
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height // PATCH, PATCH, width // PATCH, PATCH, channels)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(batch, (height // PATCH) * (width // PATCH), -1)


def unpatchify(tokens: jax.Array, height: int, width: int) -> jax.Array:
    """The inverse of `patchify` for a padded size (H, W even)."""
    batch = tokens.shape[0]
    x = tokens.reshape(batch, height // PATCH, width // PATCH, -1, PATCH, PATCH)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(batch, height, width, -1)


class Flux(nnx.Module):
    """Flux.1. Call with NHWC latents, sigma-valued timesteps [B], T5 context [B, L, 4096], pooled CLIP `y`
    [B, 768] and, for dev, `guidance` [B]; returns the flow prediction NHWC in x's dtype.

    `remat_policy` names a `jax.checkpoint_policies` member applied per double/single block (None: no remat);
    `scan=False` unrolls the block loops (compile-time comparison only).
    """

    def __init__(self, config: FluxConfig, *, remat_policy: str | None = None, scan: bool = True):
        self.config = config
        self.remat_policy = remat_policy
        self.scan = scan
        hidden = config.hidden_size
        self.img_in = Linear(config.in_channels * PATCH * PATCH, hidden)
        self.time_in = MLPEmbedder(EMBED_DIM, hidden)
        self.vector_in = MLPEmbedder(config.vec_in_dim, hidden)
        self.guidance_in = MLPEmbedder(EMBED_DIM, hidden) if config.guidance_embed else None
        self.txt_in = Linear(config.context_dim, hidden)
        self.double_blocks = Stack(lambda: DoubleStreamBlock(config), config.depth)
        self.single_blocks = Stack(lambda: SingleStreamBlock(config), config.depth_single_blocks)
        self.final_layer = LastLayer(hidden, PATCH * PATCH * config.out_channels)

    def __call__(
        self,
        x: jax.Array,
        timesteps: jax.Array,
        context: jax.Array,
        y: jax.Array,
        guidance: jax.Array | None = None,
    ) -> jax.Array:
        if (guidance is None) != (self.guidance_in is None):
            need = "needs a" if self.guidance_in is not None else "takes no"
            raise ValueError(f"this Flux model {need} `guidance` value (guidance embedding: dev yes, schnell no)")
        dtype = x.dtype
        batch, height, width, _ = x.shape
        padded = jnp.pad(x, ((0, 0), (0, -height % PATCH), (0, -width % PATCH), (0, 0)), mode="wrap")
        img = self.img_in(patchify(padded))
        vec = self.time_in(sinusoidal_embedding(TIME_FACTOR * timesteps, EMBED_DIM).astype(dtype))
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(sinusoidal_embedding(TIME_FACTOR * guidance, EMBED_DIM).astype(dtype))
        vec = vec + self.vector_in(y.astype(dtype))
        txt = self.txt_in(context.astype(dtype))
        ids = rope_ids((padded.shape[1] // PATCH, padded.shape[2] // PATCH), txt.shape[1])
        cos, sin = (jnp.asarray(t) for t in rope_tables(ids, self.config.axes_dim, self.config.theta))
        run = {"remat_policy": self.remat_policy, "scan": self.scan}
        img, txt = self.double_blocks((img, txt), vec, cos, sin, **run)
        (joint,) = self.single_blocks((jnp.concatenate([txt, img], axis=1),), vec, cos, sin, **run)
        out = self.final_layer(joint[:, txt.shape[1] :], vec)
        return unpatchify(out, padded.shape[1], padded.shape[2])[:, :height, :width]
