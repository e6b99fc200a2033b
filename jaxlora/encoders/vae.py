"""The KL autoencoder (VAE) of latent diffusion, in the ldm layout ComfyUI loads: encoder for datasets, decoder for
sample images.

One network serves the 4-channel VAEs (with `quant_conv` and `post_quant_conv`) and the 16-channel ones
(no quant convs); the config is read from the weights' shapes. Module paths mirror the file's
(`encoder.down.1.block.0.conv1` is `<prefix>encoder.down.1.block.0.conv1.weight`), so the generic loader of
`models.checkpoint` fills it. Images are NHWC in [0, 1] as ComfyUI's IMAGE type; latents are the raw VAE output
(the dataset layout: the diffusion model's latent format scales them, not the VAE).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora.models.family import UnknownLayoutError, key_indices
from jaxlora.models.layers import Conv2d, GroupNorm

GROUPS = 32
NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)  # the ldm posterior clamps log-variance to this range


@dataclass(frozen=True)
class VAEConfig:
    """What shapes the autoencoder: base width, per-level multipliers, ResBlocks per encoder level (the decoder
    has one more), latent channels and whether the 1x1 quant convs sit between encoder, latent and decoder."""

    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    latent_channels: int = 4
    quant_conv: bool = True
    image_channels: int = 3

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side."""
        return 2 ** (len(self.channel_mult) - 1)

    def widths(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mult)


SD_VAE = VAEConfig()  # the 4-channel ldm VAE
FLUX_VAE = VAEConfig(latent_channels=16, quant_conv=False)  # the 16-channel `ae.safetensors`


def infer_vae_config(shapes: Mapping[str, tuple[int, ...]]) -> VAEConfig:
    """The config of an ldm VAE from its un-prefixed torch shapes; an error naming the key when a shape is not
    an ldm VAE's."""
    try:
        base = shapes["encoder.conv_in.weight"][0]
        image_channels = shapes["encoder.conv_in.weight"][1]
        levels = max(key_indices(shapes, r"encoder\.down\.(\d+)\.")) + 1
        mult = tuple(shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] // base for i in range(levels))
        blocks = max(key_indices(shapes, r"encoder\.down\.0\.block\.(\d+)\.")) + 1
        latent = shapes["decoder.conv_in.weight"][1]
    except (KeyError, ValueError) as error:
        raise UnknownLayoutError(f"not an ldm VAE: missing key {error}") from error
    if shapes["encoder.conv_out.weight"][0] != 2 * latent:
        raise UnknownLayoutError(
            f"encoder.conv_out.weight {shapes['encoder.conv_out.weight']} should give mean and log-variance of "
            f"{latent} latent channels (decoder.conv_in.weight {shapes['decoder.conv_in.weight']})"
        )
    return VAEConfig(base, mult, blocks, latent, "quant_conv.weight" in shapes, image_channels)


class ResnetBlock(nnx.Module):
    """GroupNorm-SiLU-conv twice with a residual; a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, channels: int, out_channels: int):
        self.norm1 = GroupNorm(GROUPS, channels, eps=NORM_EPS)
        self.conv1 = Conv2d(channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(GROUPS, out_channels, eps=NORM_EPS)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = Conv2d(channels, out_channels, 1) if channels != out_channels else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over all pixels, projections as 1x1 convs (the mid block's)."""

    def __init__(self, channels: int):
        self.norm = GroupNorm(GROUPS, channels, eps=NORM_EPS)
        self.q, self.k, self.v, self.proj_out = (Conv2d(channels, channels, 1) for _ in range(4))

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        h = self.norm(x)
        tokens = lambda conv: conv(h).reshape(batch, height * width, 1, channels)  # noqa: E731
        out = jax.nn.dot_product_attention(tokens(self.q), tokens(self.k), tokens(self.v))
        return x + self.proj_out(out.reshape(batch, height, width, channels))


class MidBlock(nnx.Module):
    def __init__(self, channels: int):
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.block_2(self.attn_1(self.block_1(x)))


class Downsample(nnx.Module):
    """Stride-2 3x3 conv after zero padding on the bottom and right only (the ldm convention)."""

    def __init__(self, channels: int):
        self.conv = Conv2d(channels, channels, 3, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Level(nnx.Module):
    """One resolution level: ResnetBlocks through `widths`, then the resampler to the next level, stored under
    the file's name for it (`downsample` in the encoder, `upsample` in the decoder; none on the last level)."""

    def __init__(self, widths: list[int], resampler: type[Downsample] | type[Upsample] | None):
        self.block = nnx.List([ResnetBlock(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)])
        self.resampler_name = None if resampler is None else resampler.__name__.lower()
        if resampler is not None:
            setattr(self, self.resampler_name, resampler(widths[-1]))

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.block:
            x = block(x)
        return x if self.resampler_name is None else getattr(self, self.resampler_name)(x)


class Encoder(nnx.Module):
    """Pixels in [-1, 1] -> mean and log-variance of the latent (2 x latent channels)."""

    def __init__(self, config: VAEConfig):
        widths = config.widths()
        self.conv_in = Conv2d(config.image_channels, config.base_channels, 3, padding=1)
        levels, width = [], config.base_channels
        for i, out in enumerate(widths):
            last = i == len(widths) - 1
            levels.append(Level([width] + [out] * config.num_res_blocks, None if last else Downsample))
            width = out
        self.down = nnx.List(levels)
        self.mid = MidBlock(width)
        self.norm_out = GroupNorm(GROUPS, width, eps=NORM_EPS)
        self.conv_out = Conv2d(width, 2 * config.latent_channels, 3, padding=1)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(jax.nn.silu(self.norm_out(self.mid(h))))


class Decoder(nnx.Module):
    """Latent -> pixels in about [-1, 1]. `up[i]` is level i; they run from the deepest level up."""

    def __init__(self, config: VAEConfig):
        widths = config.widths()
        width = widths[-1]
        self.conv_in = Conv2d(config.latent_channels, width, 3, padding=1)
        self.mid = MidBlock(width)
        levels = []
        for i in reversed(range(len(widths))):
            levels.insert(0, Level([width] + [widths[i]] * (config.num_res_blocks + 1), Upsample if i else None))
            width = widths[i]
        self.up = nnx.List(levels)
        self.norm_out = GroupNorm(GROUPS, width, eps=NORM_EPS)
        self.conv_out = Conv2d(width, config.image_channels, 3, padding=1)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


class AutoencoderKL(nnx.Module):
    """The whole VAE. `moments` and `decode` work on raw latents, as ComfyUI's VAE node does."""

    def __init__(self, config: VAEConfig):
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        channels = config.latent_channels
        self.quant_conv = Conv2d(2 * channels, 2 * channels, 1) if config.quant_conv else None
        self.post_quant_conv = Conv2d(channels, channels, 1) if config.quant_conv else None

    def moments(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(mean, log-variance) of the latent posterior for NHWC images in [0, 1]."""
        h = self.encoder(images * 2.0 - 1.0)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, latents: jax.Array) -> jax.Array:
        """NHWC images in [0, 1] from raw latents."""
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return jnp.clip((self.decoder(latents) + 1.0) / 2.0, 0.0, 1.0)


def encode(vae: AutoencoderKL, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Raw latents of NHWC images in [0, 1]: the posterior mean, as ComfyUI's VAE Encode gives (its regulariser
    takes the mode), or a draw from the posterior when a PRNG `key` is given."""
    mean, logvar = vae.moments(images)
    if key is None:
        return mean
    noise = jax.random.normal(key, mean.shape, jnp.float32).astype(mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * noise
