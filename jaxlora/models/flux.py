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

from jaxlora.models.attention import attention as scaled_dot_product
from jaxlora.models.layers import Linear, RMSNorm, layer_norm, sinusoidal_embedding
from jaxlora.models.rope import apply_rope, rope_tables
from jaxlora.models.stack import Stack

PATCH = 2
TIME_FACTOR = 1000.0
EMBED_DIM = 256  # width of the timestep and guidance sinusoids
NORM_EPS = 1e-6


@dataclass(frozen=True)
class StreamConfig:
    """What shapes the streams of any Flux-line network (Flux's and its derivatives' configs extend it).

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


@dataclass(frozen=True)
class FluxConfig(StreamConfig):
    """Everything that shapes the network; inferred from a checkpoint by `flux_family.infer_flux_config`."""

    vec_in_dim: int = 768
    guidance_embed: bool = True

    @property
    def pooled_dim(self) -> int:
        return self.vec_in_dim


FLUX_DEV = FluxConfig()
FLUX_SCHNELL = FluxConfig(guidance_embed=False)


class MLPEmbedder(nnx.Module):
    def __init__(self, in_dim: int, hidden: int, *, bias: bool = True):
        self.in_layer = Linear(in_dim, hidden, bias=bias)
        self.out_layer = Linear(hidden, hidden, bias=bias)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out_layer(jax.nn.silu(self.in_layer(x)))


class Modulation(nnx.Module):
    """`count` [B, 1, hidden] vectors from the conditioning vector: (shift, scale, gate) per group of three."""

    def __init__(self, hidden: int, count: int, *, bias: bool = True):
        self.lin = Linear(hidden, count * hidden, bias=bias)
        self.count = count

    def __call__(self, vec: jax.Array) -> list[jax.Array]:
        return modulation_vectors(self.lin, vec, self.count)


def modulation_vectors(linear: Linear, vec: jax.Array, count: int) -> list[jax.Array]:
    """`count` [B, 1, hidden] vectors linear(silu(vec)) split evenly: the adaLN modulation of the Flux line."""
    return jnp.split(linear(jax.nn.silu(vec))[:, None, :], count, axis=-1)


class QKNorm(nnx.Module):
    def __init__(self, head_dim: int):
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)


class SelfAttention(nnx.Module):
    """The fused qkv projection, its QK-norm and the output projection (attention itself runs jointly)."""

    def __init__(self, hidden: int, heads: int, *, bias: bool = True):
        self.heads = heads
        self.qkv = Linear(hidden, 3 * hidden, bias=bias)
        self.norm = QKNorm(hidden // heads)
        self.proj = Linear(hidden, hidden, bias=bias)

    def split_heads(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """qkv(x) [B, L, 3*hidden] -> normalised q, k and v [B, L, heads, head_dim] ("B L (K H D)")."""
        qkv = self.qkv(x)
        batch, length, _ = qkv.shape
        q, k, v = jnp.moveaxis(qkv.reshape(batch, length, 3, self.heads, -1), 2, 0)
        return self.norm.query_norm(q), self.norm.key_norm(k), v


def rope_ids(img_hw: tuple[int, int], txt_len: int, axes: int = 3, text_axis: int | None = None) -> np.ndarray:
    """The token positions ComfyUI builds for the Flux line, one id per RoPE axis, text first: image ids
    (0, row, column, 0...), text ids zero except the text position on `text_axis` (Flux.2: axis 3)."""
    height, width = img_hw
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    img_ids = np.zeros((height * width, axes))
    img_ids[:, 1], img_ids[:, 2] = rows.reshape(-1), cols.reshape(-1)
    txt_ids = np.zeros((txt_len, axes))
    if text_axis is not None:
        txt_ids[:, text_axis] = np.arange(txt_len)
    return np.concatenate([txt_ids, img_ids])


def attention(q: jax.Array, k: jax.Array, v: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE on q and k, then scaled dot-product attention; [B, L, H, D] -> [B, L, H*D]."""
    out = scaled_dot_product(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
    return out.reshape(*out.shape[:2], -1)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return (1 + scale) * layer_norm(x, NORM_EPS) + shift


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def embed_time(
    time_in: MLPEmbedder, guidance_in: MLPEmbedder | None, timesteps, guidance, dtype, model: str
) -> jax.Array:
    """The conditioning vector's time part: the sigma-valued timestep embedded (x1000) and, for a guidance-
    distilled model, the guidance embedded the same way; `guidance` must be given exactly when it has one."""
    if (guidance is None) != (guidance_in is None):
        need = "needs a" if guidance_in is not None else "takes no"
        raise ValueError(f"this {model} model {need} `guidance` value")
    vec = time_in(sinusoidal_embedding(TIME_FACTOR * timesteps, EMBED_DIM).astype(dtype))
    if guidance_in is not None:
        vec = vec + guidance_in(sinusoidal_embedding(TIME_FACTOR * guidance, EMBED_DIM).astype(dtype))
    return vec


class DoubleStream(nnx.Module):
    """Image and text streams with their own weights, attending jointly (text tokens first), modulated by
    vectors given from outside: six [B, 1, hidden] per stream, (shift, scale, gate) for attention, then MLP.

    `activation` is the MLP's nonlinearity and `mlp_in_factor` the MLP input features per hidden feature (a
    gated activation such as SwiGLU takes 2); subclasses change them (Flux.2). The projections are reached
    through `project_qkv`, `project_out` and `feed_forward` (per stream, "img" or "txt"), which a network with
    another module layout overrides (Qwen-Image's separate q/k/v)."""

    activation = staticmethod(gelu_tanh)
    mlp_in_factor = 1

    def __init__(self, config: StreamConfig, *, bias: bool = True):
        hidden, heads, mlp = config.hidden_size, config.num_heads, config.mlp_hidden
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_attn", SelfAttention(hidden, heads, bias=bias))
            layers = {"0": Linear(hidden, self.mlp_in_factor * mlp, bias=bias), "2": Linear(mlp, hidden, bias=bias)}
            setattr(self, f"{stream}_mlp", nnx.Dict(layers))

    def __call__(self, img, txt, img_mod, txt_mod, cos, sin) -> tuple[jax.Array, jax.Array]:
        img_q, img_k, img_v = self.project_qkv("img", modulate(img, *img_mod[:2]))
        txt_q, txt_k, txt_v = self.project_qkv("txt", modulate(txt, *txt_mod[:2]))
        joint = [jnp.concatenate(pair, axis=1) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v))]
        out = attention(*joint, cos, sin)
        txt_out, img_out = out[:, : txt.shape[1]], out[:, txt.shape[1] :]
        return self._finish("img", img, img_out, img_mod), self._finish("txt", txt, txt_out, txt_mod)

    def _finish(self, stream: str, x, attn_out, mod) -> jax.Array:
        _, _, gate1, shift2, scale2, gate2 = mod
        x = x + gate1 * self.project_out(stream, attn_out)
        return x + gate2 * self.feed_forward(stream, modulate(x, shift2, scale2))

    def project_qkv(self, stream: str, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The stream's normalised q, k and v [B, L, heads, head_dim] (the fused `<stream>_attn.qkv`)."""
        return getattr(self, f"{stream}_attn").split_heads(x)

    def project_out(self, stream: str, x: jax.Array) -> jax.Array:
        return getattr(self, f"{stream}_attn").proj(x)

    def feed_forward(self, stream: str, x: jax.Array) -> jax.Array:
        mlp = getattr(self, f"{stream}_mlp")
        return mlp["2"](self.activation(mlp["0"](x)))


class DoubleStreamBlock(DoubleStream):
    """Flux's double block: each stream computes its six modulation vectors from the conditioning vector."""

    def __init__(self, config: FluxConfig):
        super().__init__(config)
        self.img_mod = Modulation(config.hidden_size, 6)
        self.txt_mod = Modulation(config.hidden_size, 6)

    def __call__(self, img, txt, vec, cos, sin) -> tuple[jax.Array, jax.Array]:
        return super().__call__(img, txt, self.img_mod(vec), self.txt_mod(vec), cos, sin)


class SingleStream(nnx.Module):
    """One stream over the joint tokens: `linear1` yields qkv and the MLP input, `linear2` takes both; modulated
    by (shift, scale, gate) [B, 1, hidden] given from outside. `activation` and `mlp_in_factor` as for
    `DoubleStream`."""

    activation = staticmethod(gelu_tanh)
    mlp_in_factor = 1

    def __init__(self, config: StreamConfig, *, bias: bool = True):
        hidden, mlp = config.hidden_size, config.mlp_hidden
        self.heads = config.num_heads
        self.linear1 = Linear(hidden, 3 * hidden + self.mlp_in_factor * mlp, bias=bias)
        self.linear2 = Linear(hidden + mlp, hidden, bias=bias)
        self.norm = QKNorm(config.head_dim)

    def __call__(self, x, shift, scale, gate, cos, sin) -> tuple[jax.Array]:
        fused = self.linear1(modulate(x, shift, scale))
        hidden = x.shape[-1]
        qkv, mlp = fused[..., : 3 * hidden], fused[..., 3 * hidden :]
        q, k, v = jnp.moveaxis(qkv.reshape(*qkv.shape[:2], 3, self.heads, -1), 2, 0)
        out = attention(self.norm.query_norm(q), self.norm.key_norm(k), v, cos, sin)
        out = self.linear2(jnp.concatenate([out, self.activation(mlp)], axis=-1))
        return (x + gate * out,)


class SingleStreamBlock(SingleStream):
    """Flux's single block: its modulation computed from the conditioning vector."""

    def __init__(self, config: FluxConfig):
        super().__init__(config)
        self.modulation = Modulation(config.hidden_size, 3)

    def __call__(self, x, vec, cos, sin) -> tuple[jax.Array]:
        return super().__call__(x, *self.modulation(vec), cos, sin)


class FinalProjection(nnx.Module):
    """The output projection after a (shift, scale) modulation given from outside."""

    def __init__(self, hidden: int, out_features: int, *, bias: bool = True):
        self.linear = Linear(hidden, out_features, bias=bias)

    def __call__(self, x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
        return self.linear(modulate(x, shift, scale))


class LastLayer(FinalProjection):
    """The final projection after a (shift, scale) modulation computed from the conditioning vector."""

    def __init__(self, hidden: int, out_features: int, *, bias: bool = True):
        super().__init__(hidden, out_features, bias=bias)
        self.adaLN_modulation = nnx.Dict({"1": Linear(hidden, 2 * hidden, bias=bias)})

    def __call__(self, x: jax.Array, vec: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.adaLN_modulation["1"](jax.nn.silu(vec))[:, None, :], 2, axis=-1)
        return super().__call__(x, shift, scale)


def patchify(x: jax.Array, patch: int = PATCH) -> jax.Array:
    """NHWC [B, H, W, C] (H, W multiples of `patch`) -> tokens [B, H/p * W/p, C*p*p] ordered (c, ph, pw)."""
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height // patch, patch, width // patch, patch, channels)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(batch, (height // patch) * (width // patch), -1)


def unpatchify(tokens: jax.Array, height: int, width: int, patch: int = PATCH) -> jax.Array:
    """The inverse of `patchify` for a padded size (H, W multiples of `patch`)."""
    batch = tokens.shape[0]
    x = tokens.reshape(batch, height // patch, width // patch, -1, patch, patch)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(batch, height, width, -1)


class JointTransformer(nnx.Module):
    """What Flux-line networks share around their blocks: pad and patchify the latents, `img_in`, RoPE tables,
    the double stack, the single stack over [text, image], `final_layer`, unpatchify and crop.

    Subclasses set `config` (with `axes_dim`, `theta`), `remat_policy`, `scan`, `img_in`, `double_blocks`,
    `single_blocks` and `final_layer`, and say how blocks are modulated: `double_inputs`/`single_inputs` that
    every block of the stack takes (Flux's conditioning vector, Flux.2's shared modulations),
    `double_mods`/`single_mods` per-block inputs with a leading block axis (Chroma's), and `final_mods` for the
    final layer. `patch` is the side of the square of latent pixels one token takes and `text_axis` the RoPE
    axis that carries the text position (None: text ids zero); see `rope_ids`, which `position_ids` applies
    unless a subclass places its tokens otherwise (Qwen-Image). `single_blocks` None: double blocks only.
    """

    patch = PATCH
    text_axis: int | None = None

    def joint_forward(
        self,
        x: jax.Array,
        txt: jax.Array,
        *,
        double_inputs=(),
        single_inputs=(),
        double_mods=(),
        single_mods=(),
        final_mods=(),
    ) -> jax.Array:
        batch, height, width, _ = x.shape
        patch = self.patch
        padded = jnp.pad(x, ((0, 0), (0, -height % patch), (0, -width % patch), (0, 0)), mode="wrap")
        img = self.img_in(patchify(padded, patch))
        grid = (padded.shape[1] // patch, padded.shape[2] // patch)
        ids = self.position_ids(grid, txt.shape[1])
        cos, sin = (jnp.asarray(t) for t in rope_tables(ids, self.config.axes_dim, self.config.theta))
        run = {"remat_policy": self.remat_policy, "scan": self.scan}
        img, txt = self.double_blocks((img, txt), *double_inputs, cos, sin, per_block=double_mods, **run)
        if self.single_blocks is not None:
            joint = jnp.concatenate([txt, img], axis=1)
            (joint,) = self.single_blocks((joint,), *single_inputs, cos, sin, per_block=single_mods, **run)
            img = joint[:, txt.shape[1] :]
        out = self.final_layer(img, *final_mods)
        return unpatchify(out, padded.shape[1], padded.shape[2], patch)[:, :height, :width]

    def position_ids(self, grid: tuple[int, int], txt_len: int) -> np.ndarray:
        """RoPE positions of the text tokens then the image tokens of a `grid` of (rows, columns) tokens."""
        return rope_ids(grid, txt_len, len(self.config.axes_dim), self.text_axis)


class Flux(JointTransformer):
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
        dtype = x.dtype
        vec = embed_time(self.time_in, self.guidance_in, timesteps, guidance, dtype, "Flux (dev: yes, schnell: no)")
        vec = vec + self.vector_in(y.astype(dtype))
        txt = self.txt_in(context.astype(dtype))
        return self.joint_forward(x, txt, double_inputs=(vec,), single_inputs=(vec,), final_mods=(vec,))
