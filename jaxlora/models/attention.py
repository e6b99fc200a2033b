"""Scaled dot-product attention of the denoisers, computed by the best kernel of the chip the step runs on.

- TPU: Pallas splash attention (JAX's flash-style TPU kernel): the [queries, keys] scores are computed block by block
  in on-chip memory and never written to HBM, forward or backward, which is what keeps the attention of 1024 px
  images (4k to 16k tokens) small on a 16 GiB chip.
- GPU: cuDNN's fused attention (`jax.nn.dot_product_attention(implementation="cudnn")`) when the inputs qualify
  (fp16/bf16, head width a multiple of 8 up to 128).
- Anything else (CPU, other shapes): XLA's attention (`jax.nn.dot_product_attention`), the reference the kernels are
  tested against.

The choice is made while the step is traced, from the process's default backend ("auto"), or forced by
`JAXLORA_ATTENTION=xla|splash|cudnn`: "splash" is how a step is compiled for a TPU from a CPU host (ahead of time,
benchmarks/tpu_aot.py), "xla" compares the kernels or steps around one. (Choosing at lowering instead, through
`lax.platform_dependent`, would work for splash but not for cuDNN, whose path cannot be traced without cuDNN, and
would put both branches into every traced step.)
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import NamedSharding, PartitionSpec

IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")
SPLASH_BLOCKS = (512, 256, 128)  # block sizes tried, largest first; sequences are padded to a multiple of 128
CUDNN_DTYPES = (jnp.float16, jnp.bfloat16)
_BATCH_SHARDING: contextvars.ContextVar[NamedSharding | None] = contextvars.ContextVar("batch_sharding", default=None)


@contextlib.contextmanager
def batch_split_over(sharding: NamedSharding | None) -> Iterator[None]:
    """While the network is traced on a mesh: the batch of every attention call is split by `sharding`. XLA cannot
    partition a Pallas kernel, and would gather the whole batch onto every device around it; with the sharding
    known, the kernel runs under `shard_map`, each device on its own samples."""
    token = _BATCH_SHARDING.set(sharding)
    try:
        yield
    finally:
        _BATCH_SHARDING.reset(token)


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v for q [B, L, H, D] and k, v [B, S, Hkv, D], Hkv dividing H (grouped queries)."""
    implementation = chosen_implementation(q, k)
    if implementation == "splash":
        return splash_attention(q, k, v)
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    return xla_attention(q, k, v)


def chosen_implementation(q: jax.Array, k: jax.Array) -> str:
    choice = os.environ.get("JAXLORA_ATTENTION", "auto")
    if choice not in IMPLEMENTATIONS:
        raise ValueError(f"JAXLORA_ATTENTION={choice!r}: use one of {list(IMPLEMENTATIONS)}")
    if choice != "auto":
        return choice
    backend = jax.default_backend()
    if backend == "tpu":
        return "splash"
    return "cudnn" if backend == "gpu" and cudnn_supports(q, k) else "xla"


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def cudnn_supports(q: jax.Array, k: jax.Array) -> bool:
    head_width = q.shape[-1]
    return q.dtype in CUDNN_DTYPES and k.dtype == q.dtype and head_width % 8 == 0 and head_width <= 128


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, interpret: bool = False) -> jax.Array:
    """The splash kernel over a batch, per device under `batch_split_over`."""
    sharding = _BATCH_SHARDING.get()
    if sharding is None:
        return _splash_batch(q, k, v, interpret)
    split = PartitionSpec(sharding.spec[0])
    per_device = lambda q, k, v: _splash_batch(q, k, v, interpret)  # noqa: E731
    return jax.shard_map(per_device, mesh=sharding.mesh, in_specs=split, out_specs=split, check_vma=False)(q, k, v)


def _splash_batch(q: jax.Array, k: jax.Array, v: jax.Array, interpret: bool) -> jax.Array:
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
