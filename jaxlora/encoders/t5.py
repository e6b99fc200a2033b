"""The T5 v1.1 encoder (T5-XXL) in Flax NNX, in the layout of the `t5xxl_*.safetensors` files
ComfyUI loads from `models/text_encoders/` (`encoder.block.3.layer.0.SelfAttention.q`, `shared`).

Block 0 alone holds the relative-position bias table that every block adds to its attention scores, so the
blocks are not alike and run as a Python loop (an encoder runs once per dataset, outside the training step).
T5 specifics: RMS layer norms without bias, attention scores not scaled by 1/sqrt(d), a gated tanh-GELU MLP.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora.models.family import UnknownLayoutError, key_indices
from jaxlora.models.layers import Embedding, Linear, RMSNorm

POSITION_BUCKETS = 32
MAX_DISTANCE = 128
NORM_EPS = 1e-6


@dataclass(frozen=True)
class T5Config:
    width: int
    depth: int
    heads: int
    head_width: int
    mlp_width: int
    vocab_size: int = 32128


T5_XXL = T5Config(width=4096, depth=24, heads=64, head_width=64, mlp_width=10240)


def infer_t5_config(shapes: Mapping[str, tuple[int, ...]]) -> T5Config:
    """The config from un-prefixed shapes (heads from the bias table's width)."""
    try:
        vocab, width = shapes["shared.weight"]
        heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"][1]
        inner = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
        mlp_width = shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0]
        depth = max(key_indices(shapes, r"encoder\.block\.(\d+)\.")) + 1
    except (KeyError, ValueError) as error:
        raise UnknownLayoutError(f"not a T5 v1.1 encoder: missing key {error}") from error
    return T5Config(width, depth, heads, inner // heads, mlp_width, vocab)


class T5Norm(RMSNorm):
    """T5's layer norm: RMS scaling with a `weight` (the file's name), no bias."""

    weight_key = "weight"

    def __init__(self, dim: int):
        super().__init__(dim, eps=NORM_EPS)


def position_buckets(length: int) -> jax.Array:
    """[length, length] bucket of each (query, key) offset: exact below 8, log-spaced up to 128, the sign apart."""
    offset = jnp.arange(length)[None, :] - jnp.arange(length)[:, None]
    half = POSITION_BUCKETS // 2
    exact = half // 2
    distance = jnp.abs(offset)
    scaled = exact + (
        jnp.log(jnp.maximum(distance, 1) / exact) / math.log(MAX_DISTANCE / exact) * (half - exact)
    ).astype(jnp.int32)
    far = jnp.minimum(scaled, half - 1)
    return (offset > 0) * half + jnp.where(distance < exact, distance, far)


class SelfAttention(nnx.Module):
    def __init__(self, config: T5Config, has_position_bias: bool):
        inner = config.heads * config.head_width
        self.q, self.k, self.v = (Linear(config.width, inner, bias=False) for _ in range(3))
        self.o = Linear(inner, config.width, bias=False)
        self.relative_attention_bias = Embedding(POSITION_BUCKETS, config.heads) if has_position_bias else None
        self.heads = config.heads

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        batch, tokens, _ = x.shape
        split = lambda t: t.reshape(batch, tokens, self.heads, -1)  # noqa: E731
        out = jax.nn.dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), bias=bias, scale=1.0)
        return self.o(out.reshape(batch, tokens, -1))


class AttentionLayer(nnx.Module):
    def __init__(self, config: T5Config, has_position_bias: bool):
        self.SelfAttention = SelfAttention(config, has_position_bias)
        self.layer_norm = T5Norm(config.width)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class GatedMLP(nnx.Module):
    def __init__(self, config: T5Config):
        self.wi_0 = Linear(config.width, config.mlp_width, bias=False)
        self.wi_1 = Linear(config.width, config.mlp_width, bias=False)
        self.wo = Linear(config.mlp_width, config.width, bias=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x))


class MLPLayer(nnx.Module):
    def __init__(self, config: T5Config):
        self.DenseReluDense = GatedMLP(config)
        self.layer_norm = T5Norm(config.width)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.DenseReluDense(self.layer_norm(x))


class Block(nnx.Module):
    def __init__(self, config: T5Config, has_position_bias: bool):
        self.layer = nnx.List([AttentionLayer(config, has_position_bias), MLPLayer(config)])

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nnx.Module):
    def __init__(self, config: T5Config):
        self.block = nnx.List([Block(config, has_position_bias=i == 0) for i in range(config.depth)])
        self.final_layer_norm = T5Norm(config.width)


class T5Encoder(nnx.Module):
    """Token ids [B, T] -> the final-normed hidden states [B, T, width], ComfyUI's T5 conditioning."""

    def __init__(self, config: T5Config):
        self.config = config
        self.shared = Embedding(config.vocab_size, config.width)
        self.encoder = T5Stack(config)

    def __call__(self, tokens: jax.Array, dtype: jnp.dtype = jnp.float32) -> jax.Array:
        x = self.shared.lookup(tokens, dtype)
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        bias = jnp.transpose(table.lookup(position_buckets(tokens.shape[1]), jnp.float32), (2, 0, 1))[None]
        for block in self.encoder.block:
            x = block(x, bias.astype(dtype))
        return self.encoder.final_layer_norm(x)
