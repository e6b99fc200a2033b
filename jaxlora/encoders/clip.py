"""CLIP text encoders (CLIP-L, OpenCLIP ViT-H and ViT-bigG) in Flax NNX, in the transformers layout that bare
`clip_l.safetensors` / `clip_g.safetensors` files and ldm checkpoints' `cond_stage_model.transformer.` store
(`text_model.encoder.layers.3.self_attn.q_proj`); towers stored in the OpenCLIP layout are read through
`encoders.open_clip`.

The layers run as one `stack.Stack` under `jax.lax.scan`; the carry keeps the hidden state of the layer ComfyUI
takes (`layer`: the last, or an earlier one counted from the end as in clip skip), so one compiled encoder serves
every selection.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora.models.family import UnknownLayoutError, key_indices
from jaxlora.models.layers import Embedding, LayerNorm, Linear
from jaxlora.models.stack import Stack

HEAD_WIDTH = 64  # every CLIP text tower ComfyUI loads has 64-wide heads: heads = width / 64
QUICK_GELU_WIDTHS = (768,)  # OpenAI's CLIP-L uses quick-GELU; the OpenCLIP towers (1024, 1280) exact GELU
LAYER_NORM_EPS = 1e-5


@dataclass(frozen=True)
class CLIPTextConfig:
    """What shapes a CLIP text tower; `projection` is the pooled output's projection width (None: no
    `text_projection`)."""

    width: int
    depth: int
    mlp_width: int
    vocab_size: int = 49408
    positions: int = 77
    projection: int | None = None

    @property
    def heads(self) -> int:
        return self.width // HEAD_WIDTH

    @property
    def quick_gelu(self) -> bool:
        return self.width in QUICK_GELU_WIDTHS


CLIP_L = CLIPTextConfig(width=768, depth=12, mlp_width=3072)
OPEN_CLIP_H = CLIPTextConfig(width=1024, depth=24, mlp_width=4096)
OPEN_CLIP_BIG_G = CLIPTextConfig(width=1280, depth=32, mlp_width=5120, projection=1280)


def infer_clip_config(shapes: Mapping[str, tuple[int, ...]]) -> CLIPTextConfig:
    """The config from un-prefixed transformers-layout shapes; an error naming the missing key otherwise."""
    try:
        vocab, width = shapes["text_model.embeddings.token_embedding.weight"]
        positions = shapes["text_model.embeddings.position_embedding.weight"][0]
        mlp_width = shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0]
        depth = max(key_indices(shapes, r"text_model\.encoder\.layers\.(\d+)\.")) + 1
    except (KeyError, ValueError) as error:
        raise UnknownLayoutError(f"not a CLIP text encoder: missing key {error}") from error
    projection = shapes["text_projection.weight"][0] if "text_projection.weight" in shapes else None
    return CLIPTextConfig(width, depth, mlp_width, vocab, positions, projection)


class SelfAttention(nnx.Module):
    def __init__(self, width: int, heads: int):
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Linear(width, width) for _ in range(4))
        self.heads = heads

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, width = x.shape
        split = lambda t: t.reshape(batch, tokens, self.heads, width // self.heads)  # noqa: E731
        out = jax.nn.dot_product_attention(
            split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), is_causal=True
        )
        return self.out_proj(out.reshape(batch, tokens, width))


class MLP(nnx.Module):
    def __init__(self, width: int, mlp_width: int, quick_gelu: bool):
        self.fc1 = Linear(width, mlp_width)
        self.fc2 = Linear(mlp_width, width)
        self.quick_gelu = quick_gelu

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.fc1(x)
        h = h * jax.nn.sigmoid(1.702 * h) if self.quick_gelu else jax.nn.gelu(h, approximate=False)
        return self.fc2(h)


class EncoderLayer(nnx.Module):
    """Pre-norm causal self-attention and MLP. As a stacked block its carry is (hidden, kept, index): `kept`
    becomes this layer's output when `index` is the `target` layer."""

    def __init__(self, config: CLIPTextConfig):
        self.layer_norm1 = LayerNorm(config.width, eps=LAYER_NORM_EPS)
        self.self_attn = SelfAttention(config.width, config.heads)
        self.layer_norm2 = LayerNorm(config.width, eps=LAYER_NORM_EPS)
        self.mlp = MLP(config.width, config.mlp_width, config.quick_gelu)

    def __call__(self, x: jax.Array, kept: jax.Array, index: jax.Array, target: jax.Array) -> tuple:
        x = x + self.self_attn(self.layer_norm1(x))
        x = x + self.mlp(self.layer_norm2(x))
        return x, jnp.where(index == target, x, kept), index + 1


class Embeddings(nnx.Module):
    def __init__(self, config: CLIPTextConfig):
        self.token_embedding = Embedding(config.vocab_size, config.width)
        self.position_embedding = Embedding(config.positions, config.width)

    def __call__(self, tokens: jax.Array, dtype: jnp.dtype) -> jax.Array:
        positions = jnp.arange(tokens.shape[1])
        return self.token_embedding.lookup(tokens, dtype) + self.position_embedding.lookup(positions, dtype)


class Encoder(nnx.Module):
    def __init__(self, config: CLIPTextConfig):
        self.layers = Stack(lambda: EncoderLayer(config), config.depth)


class TextModel(nnx.Module):
    def __init__(self, config: CLIPTextConfig):
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.final_layer_norm = LayerNorm(config.width, eps=LAYER_NORM_EPS)


@dataclass(frozen=True)
class TextEncoding:
    """What ComfyUI takes from a CLIP tower: the hidden states of the selected layer (final-layer-normed or not,
    as the family asks), and the pooled output (the normed last layer at the first end-of-text token, projected
    when the tower has a projection)."""

    hidden: jax.Array
    pooled: jax.Array


class CLIPTextModel(nnx.Module):
    def __init__(self, config: CLIPTextConfig):
        self.config = config
        self.text_model = TextModel(config)
        self.text_projection = Linear(config.width, config.projection, bias=False) if config.projection else None

    def __call__(
        self,
        tokens: jax.Array,
        end_token: int,
        layer: int = -1,
        normed_hidden: bool = True,
        dtype: jnp.dtype = jnp.float32,
        projected: bool = True,
    ) -> TextEncoding:
        """Encode [B, T] token ids. `layer` counts from the end (-1 the last layer, -2 the one before: ComfyUI's
        "penultimate" and clip skip 2); `normed_hidden` passes that layer through the final layer norm;
        `projected` passes the pooled output through the projection, when the tower has one."""
        if not -self.config.depth <= layer <= -1:
            raise ValueError(f"layer {layer} is not one of the {self.config.depth} layers counted from the end")
        x = self.text_model.embeddings(tokens, dtype)
        target = jnp.asarray(self.config.depth + layer, jnp.int32)
        last, kept, _ = self.text_model.encoder.layers((x, x, jnp.zeros((), jnp.int32)), target)
        final = self.text_model.final_layer_norm(last)
        hidden = self.text_model.final_layer_norm(kept) if normed_hidden else kept
        first_end = jnp.argmax(tokens == end_token, axis=1)
        pooled = final[jnp.arange(tokens.shape[0]), first_end]
        if projected and self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return TextEncoding(hidden, pooled)
