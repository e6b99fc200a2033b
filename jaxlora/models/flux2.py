"""Flux.2 (dev, klein 4B and 9B) in the Black Forest Labs layout that ComfyUI holds under `diffusion_model.`.

The Flux.1 block structure (`flux.py`) with four changes, read from ComfyUI's `comfy/ldm/flux` (image model
"flux2") and diffusers' `Flux2Transformer2DModel`:
- shared modulation: `double_stream_modulation_img`, `double_stream_modulation_txt` and
  `single_stream_modulation` compute every block's shift/scale/gate once from the conditioning vector; the
  blocks have no modulation layers of their own;
- SwiGLU MLPs: `img_mlp.0` / `txt_mlp.0` give 2 x mlp features, silu(first half) * second half; the single
  blocks' fused `linear1` gives qkv and that 2 x mlp input, `linear2` takes attention output and mlp;
- no biases anywhere and no pooled-text input (`vector_in`); `guidance_in` only in dev;
- latents of 128 channels at 1/16 of the image size (the Flux.2 VAE's 32 channels, patchified 2x2 inside the
  VAE), taken one token per latent pixel (patch size 1); RoPE over four axes of 32 with theta 2000: image ids
  (0, row, column, 0), text ids (0, 0, 0, position).

The network takes NHWC latents, sigma-valued timesteps (embedded x1000) and the text context [B, L, width]
(dev: Mistral-Small-3.1, 3 layers x 5120; klein: Qwen3-4B 3 x 2560 or Qwen3-8B 3 x 4096).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxlora.models.flux import (
    EMBED_DIM,
    DoubleStream,
    JointTransformer,
    LastLayer,
    MLPEmbedder,
    Modulation,
    SingleStream,
    StreamConfig,
    embed_time,
)
from jaxlora.models.layers import Linear
from jaxlora.models.stack import Stack

AXES_DIM = (32, 32, 32, 32)
THETA = 2000.0
TEXT_AXIS = 3  # the RoPE axis that carries the text token's position


@dataclass(frozen=True)
class Flux2Config(StreamConfig):
    """Everything that shapes the network; `in_channels`/`out_channels` are latent channels (one token each)."""

    hidden_size: int = 6144
    num_heads: int = 48
    mlp_hidden: int = 18432
    depth: int = 8
    depth_single_blocks: int = 48
    in_channels: int = 128
    out_channels: int = 128
    context_dim: int = 15360
    axes_dim: tuple[int, ...] = AXES_DIM
    theta: float = THETA
    guidance_embed: bool = True


FLUX2_DEV = Flux2Config()
FLUX2_KLEIN_4B = Flux2Config(
    hidden_size=3072, num_heads=24, mlp_hidden=9216, depth=5, depth_single_blocks=20, context_dim=7680,
    guidance_embed=False,
)  # fmt: skip
FLUX2_KLEIN_9B = Flux2Config(
    hidden_size=4096, num_heads=32, mlp_hidden=12288, depth=8, depth_single_blocks=24, context_dim=12288,
    guidance_embed=False,
)  # fmt: skip


def swiglu(x: jax.Array) -> jax.Array:
    """silu(first half) * second half of the last axis (ComfyUI's SiLUActivation, diffusers' Flux2SwiGLU)."""
    gate, value = jnp.split(x, 2, axis=-1)
    return jax.nn.silu(gate) * value


class Flux2DoubleStream(DoubleStream):
    """The shared double block with SwiGLU MLPs (built without biases)."""

    activation = staticmethod(swiglu)
    mlp_in_factor = 2


class Flux2SingleStream(SingleStream):
    """The shared single block with a SwiGLU MLP (built without biases)."""

    activation = staticmethod(swiglu)
    mlp_in_factor = 2


class Flux2(JointTransformer):
    """Flux.2. Call with NHWC latents [B, H, W, 128], sigma-valued timesteps [B], the text context
    [B, L, context_dim] and, for dev, `guidance` [B]; returns the flow prediction NHWC in x's dtype.

    `remat_policy` and `scan` as for Flux.1."""

    patch = 1
    text_axis = TEXT_AXIS

    def __init__(self, config: Flux2Config, *, remat_policy: str | None = None, scan: bool = True):
        self.config = config
        self.remat_policy = remat_policy
        self.scan = scan
        hidden = config.hidden_size
        self.img_in = Linear(config.in_channels, hidden, bias=False)
        self.time_in = MLPEmbedder(EMBED_DIM, hidden, bias=False)
        self.guidance_in = MLPEmbedder(EMBED_DIM, hidden, bias=False) if config.guidance_embed else None
        self.txt_in = Linear(config.context_dim, hidden, bias=False)
        self.double_stream_modulation_img = Modulation(hidden, 6, bias=False)
        self.double_stream_modulation_txt = Modulation(hidden, 6, bias=False)
        self.single_stream_modulation = Modulation(hidden, 3, bias=False)
        self.double_blocks = Stack(lambda: Flux2DoubleStream(config, bias=False), config.depth)
        self.single_blocks = Stack(lambda: Flux2SingleStream(config, bias=False), config.depth_single_blocks)
        self.final_layer = LastLayer(hidden, config.out_channels, bias=False)

    def __call__(
        self, x: jax.Array, timesteps: jax.Array, context: jax.Array, guidance: jax.Array | None = None
    ) -> jax.Array:
        dtype = x.dtype
        vec = embed_time(self.time_in, self.guidance_in, timesteps, guidance, dtype, "Flux.2 (dev: yes, klein: no)")
        return self.joint_forward(
            x,
            self.txt_in(context.astype(dtype)),
            double_inputs=(self.double_stream_modulation_img(vec), self.double_stream_modulation_txt(vec)),
            single_inputs=tuple(self.single_stream_modulation(vec)),
            final_mods=(vec,),
        )
