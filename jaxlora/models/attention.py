"""Scaled dot-product attention of the denoisers, computed by the best kernel of the chip the step runs on.

- TPU: Pallas splash attention (JAX's flash-style TPU kernel): the [queries, keys] scores are computed block by block
  in on-chip memory and never written to HBM, forward or backward, which is what lets SD1.5's 16k-token attention
  at 1024 px or Flux's 4.6k joint tokens fit a 16 GiB chip. It is chosen by `lax.platform_dependent`, i.e. when the
  step is lowered for a TPU, so a step compiled for a TPU from a CPU host (ahead of time) gets it as well.
- GPU: cuDNN's fused attention (`jax.nn.dot_product_attention(implementation="cudnn")`) when the process runs on a
  GPU and the inputs qualify (fp16/bf16, head width a multiple of 8 up to 128). It is chosen while tracing: cuDNN's
  path cannot even be traced on a machine without cuDNN.
- Anything else (CPU, other shapes): XLA's attention (`jax.nn.dot_product_attention`), the reference the kernels are
  tested against.

`JAXLORA_ATTENTION=xla` forces XLA's attention everywhere (read when the step is traced), to compare the kernels or to
step around one.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

IMPLEMENTATIONS = ("auto", "xla")
SPLASH_BLOCKS = (512, 256, 128)  # block sizes tried, largest first; sequences are padded to a multiple of 128
CUDNN_DTYPES = (jnp.float16, jnp.bfloat16)


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v for q [B, L, H, D] and k, v [B, S, Hkv, D], Hkv dividing H (grouped queries)."""
    choice = os.environ.get("JAXLORA_ATTENTION", "auto")
    if choice not in IMPLEMENTATIONS:
        raise ValueError(f"JAXLORA_ATTENTION={choice!r}: use one of {list(IMPLEMENTATIONS)}")
    if choice == "xla":
        return xla_attention(q, k, v)
    if jax.default_backend() == "gpu" and cudnn_supports(q, k):
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    return lax.platform_dependent(q, k, v, tpu=splash_attention, default=xla_attention)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def cudnn_supports(q: jax.Array, k: jax.Array) -> bool:
    head_width = q.shape[-1]
    return q.dtype in CUDNN_DTYPES and k.dtype == q.dtype and head_width % 8 == 0 and head_width <= 128


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, interpret: bool = False) -> jax.Array:
    """The splash kernel over a batch. Query and key sequences are padded to a multiple of 128 (the kernel's
    smallest block); padded keys are kept out of every softmax by a segment id of their own, padded queries are
    dropped from the output. `interpret=True` runs the kernel's own code through JAX on any backend (tests)."""
    batch, length, heads, width = q.shape
    keys, kv_heads = k.shape[1], k.shape[2]
    if kv_heads != heads:  # grouped queries: each key/value head serves heads // kv_heads query heads
        k, v = (jnp.repeat(x, heads // kv_heads, axis=2) for x in (k, v))
    padded_length, padded_keys = (128 * math.ceil(n / 128) for n in (length, keys))
    block_q, block_kv = (next(b for b in SPLASH_BLOCKS if n % b == 0) for n in (padded_length, padded_keys))
    kernel = splash.make_splash_mha(
        splash_mask.MultiHeadMask([splash_mask.FullMask((padded_length, padded_keys))] * heads),
        head_shards=1,
        q_seq_shards=1,
        block_sizes=splash.BlockSizes(
            block_q=block_q,
            block_kv=block_kv,
            block_q_dkv=block_q,
            block_kv_dkv=block_kv,
            use_fused_bwd_kernel=True,
        ),
        interpret=interpret,
    )

    def heads_first(x: jax.Array, padded: int) -> jax.Array:  # [B, S, H, D] -> [B, H, S_padded, D]
        return jnp.pad(x, ((0, 0), (0, padded - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    scaled = q * jnp.asarray(1 / math.sqrt(width), q.dtype)
    inputs = (heads_first(scaled, padded_length), heads_first(k, padded_keys), heads_first(v, padded_keys))
    if padded_keys == keys:
        out = jax.vmap(kernel)(*inputs)
    else:
        segments = splash.SegmentIds(
            q=jnp.zeros(padded_length, jnp.int32), kv=(jnp.arange(padded_keys) >= keys).astype(jnp.int32)
        )
        out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(*inputs, segments)
    return out.transpose(0, 2, 1, 3)[:, :length].astype(q.dtype)
