"""Chroma (Chroma1-HD, Chroma1-Base and the v-numbered checkpoints) in the layout ComfyUI holds under
`diffusion_model.`: Flux.1-schnell's double and single blocks without their own modulation linears, and one
`distilled_guidance_layer` (an MLP "approximator") that computes every block's modulation at once.

Module paths are the file's: `img_in`, `txt_in`, `distilled_guidance_layer` (`in_proj`, `layers.N.in_layer/
out_layer`, `norms.N`, `out_proj`), `double_blocks.N` and `single_blocks.N` (Flux's, minus `img_mod`, `txt_mod`
and `modulation`), `final_layer.linear`. There is no `time_in`, `vector_in` or `guidance_in`, and no pooled
input: the context is T5-XXL alone.

The approximator maps, for each of 344 modulation indices, [timestep sinusoid (16), guidance sinusoid (16),
index sinusoid (32)] (all x1000, as ComfyUI's `timestep_embedding`) to one hidden-wide vector; the rows are read
as ComfyUI's `get_modulations` slices them: 3 per single block, then 6 per double block for the image stream,
6 per double block for the text stream, and the last two rows (shift, scale) for the final layer. ComfyUI fixes
the index count at 344 (= 3 x 38 + 12 x 19 + 2, the full model) whatever the depth; so does this file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.models.flux import (
    PATCH,
    TIME_FACTOR,
    DoubleStream,
    FinalProjection,
    JointTransformer,
    MLPEmbedder,
    SingleStream,
    StreamConfig,
)
from jaxlora.models.layers import Linear, RMSNorm, sinusoidal_embedding
from jaxlora.models.stack import Stack

MOD_INDEX_LENGTH = 344  # ComfyUI's fixed number of approximator rows
CONDITION_DIM = 16  # width of the timestep and of the guidance sinusoid; the index sinusoid is twice that


@dataclass(frozen=True)
class ChromaConfig(StreamConfig):
    """Everything that shapes the network; inferred from a checkpoint's shapes by the family record. The
    streams' widths as Flux's; `approximator_*` are the distilled guidance layer's width and depth."""

    approximator_hidden: int = 5120
    approximator_layers: int = 5

    def __post_init__(self):
        super().__post_init__()
        if self.modulation_rows > MOD_INDEX_LENGTH:
            raise ValueError(
                f"{self.depth} double and {self.depth_single_blocks} single blocks need {self.modulation_rows} "
                f"modulation rows; Chroma's approximator has {MOD_INDEX_LENGTH}"
            )

    @property
    def modulation_rows(self) -> int:
        return 3 * self.depth_single_blocks + 12 * self.depth + 2


CHROMA = ChromaConfig()


class Approximator(nnx.Module):
    """`distilled_guidance_layer`: in_proj, `layers` residual MLPs each after its RMSNorm, out_proj; applied to
    every modulation row independently ([..., 64] -> [..., hidden])."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int):
        self.in_proj = Linear(in_dim, hidden)
        self.layers = nnx.Dict({str(i): MLPEmbedder(hidden, hidden) for i in range(layers)})
        self.norms = nnx.Dict({str(i): RMSNorm(hidden) for i in range(layers)})
        self.out_proj = Linear(hidden, out_dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.in_proj(x)
        for i in range(len(self.layers)):
            x = x + self.layers[str(i)](self.norms[str(i)](x))
        return self.out_proj(x)


def index_table(dim: int = 2 * CONDITION_DIM, max_period: float = 10000.0) -> np.ndarray:
    """The modulation-index sinusoids [344, dim] (cos half first) as torch computes them in float32 for ComfyUI
    and diffusers alike: float32 exponents and products, exp and cos/sin of those float32 values taken exactly.
    A static constant: XLA's float32 exp is an ulp off in places, which at arguments up to 343,000 would move
    the table by up to 1e-3."""
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    args = (np.arange(MOD_INDEX_LENGTH, dtype=np.float32) * np.float32(TIME_FACTOR))[:, None] * freqs
    args = args.astype(np.float64)
    return np.concatenate([np.cos(args), np.sin(args)], axis=-1).astype(np.float32)


def approximator_input(timesteps: jax.Array, guidance: jax.Array, dtype) -> jax.Array:
    """[B, 344, 64]: per row, the timestep and guidance sinusoids (the same on every row) and the row's index
    sinusoid."""
    condition = jnp.concatenate(
        [sinusoidal_embedding(TIME_FACTOR * v, CONDITION_DIM) for v in (timesteps, guidance)], axis=-1
    )
    index = jnp.asarray(index_table())
    batch = timesteps.shape[0]
    rows = jnp.broadcast_to(condition[:, None, :], (batch, MOD_INDEX_LENGTH, condition.shape[-1]))
    index = jnp.broadcast_to(index[None], (batch, *index.shape))
    return jnp.concatenate([rows, index], axis=-1).astype(dtype)


def per_block(mods: jax.Array, start: int, blocks: int, count: int) -> list[jax.Array]:
    """Rows [start, start + blocks * count) of mods [B, rows, hidden] as `count` arrays [blocks, B, 1, hidden]:
    vector j of every block, with the block axis first for the scan."""
    groups = mods[:, start : start + blocks * count].reshape(mods.shape[0], blocks, count, 1, mods.shape[-1])
    return [jnp.moveaxis(groups[:, :, j], 1, 0) for j in range(count)]


class Chroma(JointTransformer):
    """Chroma. Call with NHWC latents, sigma-valued timesteps [B], T5 context [B, L, 4096] and optionally
    `guidance` [B] (ComfyUI passes 0); returns the flow prediction NHWC in x's dtype.

    `remat_policy` names a `jax.checkpoint_policies` member applied per double/single block (None: no remat);
    `scan=False` unrolls the block loops.
    """

    def __init__(self, config: ChromaConfig, *, remat_policy: str | None = None, scan: bool = True):
        self.config = config
        self.remat_policy = remat_policy
        self.scan = scan
        hidden = config.hidden_size
        self.img_in = Linear(config.in_channels * PATCH * PATCH, hidden)
        self.txt_in = Linear(config.context_dim, hidden)
        self.distilled_guidance_layer = Approximator(
            4 * CONDITION_DIM, config.approximator_hidden, hidden, config.approximator_layers
        )
        self.double_blocks = Stack(lambda: DoubleStream(config), config.depth)
        self.single_blocks = Stack(lambda: SingleStream(config), config.depth_single_blocks)
        self.final_layer = FinalProjection(hidden, PATCH * PATCH * config.out_channels)

    def __call__(
        self, x: jax.Array, timesteps: jax.Array, context: jax.Array, guidance: jax.Array | None = None
    ) -> jax.Array:
        dtype = x.dtype
        guidance = jnp.zeros_like(timesteps) if guidance is None else guidance
        mods = self.distilled_guidance_layer(approximator_input(timesteps, guidance, dtype))
        single, double = self.config.depth_single_blocks, self.config.depth
        img_start = 3 * single
        txt_start = img_start + 6 * double
        return self.joint_forward(
            x,
            self.txt_in(context.astype(dtype)),
            double_mods=(per_block(mods, img_start, double, 6), per_block(mods, txt_start, double, 6)),
            single_mods=tuple(per_block(mods, 0, single, 3)),
            final_mods=(mods[:, -2:-1], mods[:, -1:]),
        )
