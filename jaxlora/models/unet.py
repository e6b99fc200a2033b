"""The ldm UNet that ComfyUI holds under `diffusion_model.`: SD1.x, SD2.x and SDXL from one config.

Module paths mirror the checkpoint's one to one (`input_blocks.1.1.transformer_blocks.0.attn1.to_q` here is
`diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q` in the file), so a parameter's file key is
its path with the prefix in front and adapter export is a transpose. Index positions that hold no
parameters in torch (SiLU, Dropout) are simply absent from the `nnx.Dict` containers. A SpatialTransformer's
`transformer_blocks` are one `Stack` (run by scan, so SDXL's ten-deep transformers compile as one block each);
`layer_sites` names block i `...transformer_blocks.<i>...` as the file does.

Input and output latents are NHWC. The network sees the timestep as given (ComfyUI passes the nearest integer
index as a float); sigmas, input scaling and the parameterisation live in `sampling.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora.models.layers import (
    Conv2d,
    GroupNorm,
    LayerNorm,
    Linear,
    multi_head_attention,
    sinusoidal_embedding,
)
from jaxlora.models.stack import Stack, checkpoint_policy

GROUPS = 32


@dataclass(frozen=True)
class UNetConfig:
    """Everything that shapes the network; inferred from a checkpoint by `checkpoint.infer_unet_config`.

    Transformer depths are given per block, as in ComfyUI: `transformer_depth` has one entry per input
    ResBlock (level by level), `transformer_depth_output` one per output block; 0 means no SpatialTransformer.
    Heads: SD1.x fixes the head count (`num_heads`), SD2.x and SDXL fix the head width (`num_head_channels`).
    """

    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: tuple[int, ...]
    transformer_depth: tuple[int, ...]
    transformer_depth_middle: int
    transformer_depth_output: tuple[int, ...]
    context_dim: int
    num_heads: int | None = None
    num_head_channels: int | None = None
    use_linear_in_transformer: bool = False
    adm_in_channels: int | None = None

    def __post_init__(self):
        levels = len(self.channel_mult)
        if len(self.num_res_blocks) != levels:
            raise ValueError(f"num_res_blocks {self.num_res_blocks} needs one entry per level ({levels})")
        if len(self.transformer_depth) != sum(self.num_res_blocks):
            raise ValueError(f"transformer_depth needs {sum(self.num_res_blocks)} entries (one per input ResBlock)")
        if len(self.transformer_depth_output) != sum(n + 1 for n in self.num_res_blocks):
            raise ValueError("transformer_depth_output needs one entry per output block")
        if (self.num_heads is None) == (self.num_head_channels is None):
            raise ValueError("set exactly one of num_heads (SD1.x) and num_head_channels (SD2.x, SDXL)")

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    @property
    def pooled_dim(self) -> int | None:
        """SDXL's pooled CLIP-G width: `y` minus the six 256-d size embeddings; None without `y`."""
        return None if self.adm_in_channels is None else self.adm_in_channels - 6 * 256

    def heads(self, channels: int) -> int:
        return self.num_heads if self.num_heads is not None else channels // self.num_head_channels


SD15 = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=320,
    channel_mult=(1, 2, 4, 4),
    num_res_blocks=(2, 2, 2, 2),
    transformer_depth=(1, 1, 1, 1, 1, 1, 0, 0),
    transformer_depth_middle=1,
    transformer_depth_output=(0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1),
    context_dim=768,
    num_heads=8,
)
SD21 = replace(SD15, context_dim=1024, num_heads=None, num_head_channels=64, use_linear_in_transformer=True)
SDXL = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=320,
    channel_mult=(1, 2, 4),
    num_res_blocks=(2, 2, 2),
    transformer_depth=(0, 0, 2, 2, 10, 10),
    transformer_depth_middle=10,
    transformer_depth_output=(10, 10, 10, 2, 2, 2, 0, 0, 0),
    context_dim=2048,
    num_head_channels=64,
    use_linear_in_transformer=True,
    adm_in_channels=2816,
)


class ResBlock(nnx.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added in between (use_scale_shift_norm off)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        self.in_layers = nnx.Dict({"0": GroupNorm(GROUPS, channels), "2": Conv2d(channels, out_channels, 3, padding=1)})
        self.emb_layers = nnx.Dict({"1": Linear(emb_channels, out_channels)})
        self.out_layers = nnx.Dict(
            {"0": GroupNorm(GROUPS, out_channels), "3": Conv2d(out_channels, out_channels, 3, padding=1)}
        )
        self.skip_connection = Conv2d(channels, out_channels, 1) if channels != out_channels else None

    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        h = self.in_layers["2"](jax.nn.silu(self.in_layers["0"](x)))
        h = h + self.emb_layers["1"](jax.nn.silu(emb))[:, None, None, :]
        h = self.out_layers["3"](jax.nn.silu(self.out_layers["0"](h)))
        skip = x if self.skip_connection is None else self.skip_connection(x)
        return skip + h


class CrossAttention(nnx.Module):
    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int):
        inner = heads * dim_head
        self.heads = heads
        self.to_q = Linear(query_dim, inner, bias=False)
        self.to_k = Linear(context_dim, inner, bias=False)
        self.to_v = Linear(context_dim, inner, bias=False)
        self.to_out = nnx.List([Linear(inner, query_dim)])

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        out = multi_head_attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out[0](out)


class GEGLU(nnx.Module):
    def __init__(self, dim: int, inner: int):
        self.proj = Linear(dim, inner * 2)

    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(self.proj(x), 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    def __init__(self, dim: int):
        self.net = nnx.Dict({"0": GEGLU(dim, dim * 4), "2": Linear(dim * 4, dim)})

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net["2"](self.net["0"](x))


class BasicTransformerBlock(nnx.Module):
    """Pre-norm self-attention, cross-attention to the text context, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        self.attn1 = CrossAttention(dim, dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = LayerNorm(dim)
        self.norm2 = LayerNorm(dim)
        self.norm3 = LayerNorm(dim)

    def __call__(self, x: jax.Array, context: jax.Array) -> tuple[jax.Array]:
        """The updated tokens, as the one-element carry of the `Stack` that runs the blocks."""
        h = self.norm1(x)
        x = x + self.attn1(h, h)
        x = x + self.attn2(self.norm2(x), context)
        return (x + self.ff(self.norm3(x)),)


class SpatialTransformer(nnx.Module):
    """Image tokens through `depth` transformer blocks (a `Stack`: every block of one SpatialTransformer has the
    same shapes); projections are 1x1 convs (SD1.x) or linears."""

    def __init__(self, channels: int, depth: int, config: UNetConfig):
        heads = config.heads(channels)
        inner = channels  # ldm keeps the width: inner = heads * dim_head = channels
        self.use_linear = config.use_linear_in_transformer
        project = (lambda i, o: Linear(i, o)) if self.use_linear else (lambda i, o: Conv2d(i, o, 1))
        self.norm = GroupNorm(GROUPS, channels, eps=1e-6)
        self.proj_in = project(channels, inner)
        self.transformer_blocks = Stack(
            lambda: BasicTransformerBlock(inner, heads, inner // heads, config.context_dim), depth
        )
        self.proj_out = project(inner, channels)

    def __call__(
        self, x: jax.Array, context: jax.Array, *, remat_policy: str | None = None, scan: bool = True
    ) -> jax.Array:
        """`remat_policy` rematerialises each transformer block (None: no remat); `scan=False` unrolls them."""
        batch, height, width, _ = x.shape
        h = self.proj_in(self.norm(x))  # a 1x1 conv and a linear act alike on NHWC
        h = h.reshape(batch, height * width, h.shape[-1])
        (h,) = self.transformer_blocks((h,), context, remat_policy=remat_policy, scan=scan)
        return x + self.proj_out(h.reshape(batch, height, width, h.shape[-1]))


class Downsample(nnx.Module):
    def __init__(self, channels: int):
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.op(x)


def nearest_resize(x: jax.Array, height: int, width: int) -> jax.Array:
    """torch's `interpolate(mode="nearest")` on NHWC: source index floor(dst * in / out)."""
    rows = (jnp.arange(height) * x.shape[1]) // height
    cols = (jnp.arange(width) * x.shape[2]) // width
    return x[:, rows][:, :, cols]


class Upsample(nnx.Module):
    """Nearest 2x (or to the skip connection's size, for odd latent sizes) then a 3x3 conv."""

    def __init__(self, channels: int):
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: jax.Array, size: tuple[int, int]) -> jax.Array:
        if size == (2 * x.shape[1], 2 * x.shape[2]):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:
            x = nearest_resize(x, *size)
        return self.conv(x)


class UNet(nnx.Module):
    """The ldm UNet. Call with NHWC latents, timesteps [B], context [B, T, context_dim], y [B, adm] for SDXL.

    `remat_policy` names a `jax.checkpoint_policies` member ("nothing_saveable", "dots_saveable", ...) to
    rematerialise every ResBlock and every transformer block in the backward pass (per block, so SDXL's
    ten-deep transformers never hold ten blocks' activations at once); None disables remat. `scan=False` unrolls
    the transformer blocks (same math; for measuring what the scan saves in compile time).
    """

    def __init__(self, config: UNetConfig, *, remat_policy: str | None = None, scan: bool = True):
        self.config = config
        self.remat_policy = remat_policy
        self.scan = scan
        mc, emb = config.model_channels, config.time_embed_dim
        self.time_embed = nnx.Dict({"0": Linear(mc, emb), "2": Linear(emb, emb)})
        label_emb = None
        if config.adm_in_channels is not None:
            mlp = nnx.Dict({"0": Linear(config.adm_in_channels, emb), "2": Linear(emb, emb)})
            label_emb = nnx.Dict({"0": mlp})
        self.label_emb = label_emb

        depths = iter(config.transformer_depth)
        blocks = [nnx.List([Conv2d(config.in_channels, mc, 3, padding=1)])]
        skip_channels, ch = [mc], mc
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks[level]):
                blocks.append(self._stage(ResBlock(ch, emb, mult * mc), next(depths)))
                ch = mult * mc
                skip_channels.append(ch)
            if level != len(config.channel_mult) - 1:
                blocks.append(nnx.List([Downsample(ch)]))
                skip_channels.append(ch)
        self.input_blocks = nnx.List(blocks)

        self.middle_block = nnx.List(
            [
                ResBlock(ch, emb, ch),
                SpatialTransformer(ch, config.transformer_depth_middle, config),
                ResBlock(ch, emb, ch),
            ]
        )

        depths = iter(config.transformer_depth_output)
        blocks = []
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks[level] + 1):
                block = self._stage(ResBlock(ch + skip_channels.pop(), emb, mult * mc), next(depths))
                ch = mult * mc
                if level and i == config.num_res_blocks[level]:
                    block.append(Upsample(ch))
                blocks.append(block)
        self.output_blocks = nnx.List(blocks)

        self.out = nnx.Dict({"0": GroupNorm(GROUPS, ch), "2": Conv2d(mc, config.out_channels, 3, padding=1)})

    def _stage(self, resblock: ResBlock, depth: int) -> nnx.List:
        channels = resblock.out_layers["3"].weight.shape[-1]
        layers = [resblock]
        if depth:
            layers.append(SpatialTransformer(channels, depth, self.config))
        return nnx.List(layers)

    def _checkpointed(self, module: nnx.Module, *args: jax.Array) -> jax.Array:
        if self.remat_policy is None:
            return module(*args)
        policy = checkpoint_policy(self.remat_policy)
        return nnx.remat(lambda m, *a: m(*a), policy=policy, graph_updates=False)(module, *args)

    def _run(self, block: nnx.List, h: jax.Array, emb: jax.Array, context: jax.Array, size) -> jax.Array:
        for layer in block:
            if isinstance(layer, ResBlock):
                h = self._checkpointed(layer, h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context, remat_policy=self.remat_policy, scan=self.scan)
            elif isinstance(layer, Upsample):
                h = layer(h, size)
            else:
                h = layer(h)
        return h

    def __call__(self, x: jax.Array, timesteps: jax.Array, context: jax.Array, y: jax.Array | None = None) -> jax.Array:
        """Predict eps or v (depending on the checkpoint) for NHWC `x`; output NHWC in x's dtype."""
        if (y is None) != (self.label_emb is None):
            need = "needs a" if self.label_emb is not None else "takes no"
            raise ValueError(f"this UNet {need} `y` vector (adm_in_channels={self.config.adm_in_channels})")
        dtype = x.dtype
        t_emb = sinusoidal_embedding(timesteps, self.config.model_channels).astype(dtype)
        emb = self.time_embed["2"](jax.nn.silu(self.time_embed["0"](t_emb)))
        if self.label_emb is not None:
            mlp = self.label_emb["0"]
            emb = emb + mlp["2"](jax.nn.silu(mlp["0"](y.astype(dtype))))
        context = context.astype(dtype)

        skips = []
        h = x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context, None)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context, None)
        for block in self.output_blocks:
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            size = skips[-1].shape[1:3] if skips else None
            h = self._run(block, h, emb, context, size)
        return self.out["2"](jax.nn.silu(self.out["0"](h)))
