"""The denoisers' attention: the TPU kernel (splash attention, run here through Pallas' interpreter) against XLA's
attention, and the choice of kernel by backend (compiled for TPU by XLA's TPU compiler, no TPU needed)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies

from jaxlora.models.attention import attention, batch_split_over, splash_attention, xla_attention
from jaxlora.parallel.mesh import batch_sharding, make_mesh

SHAPES = {  # batch, queries, keys, heads, key/value heads, head width
    "padded, grouped query heads": (2, 100, 77, 4, 2, 40),
    "several blocks of 128": (1, 384, 256, 1, 1, 32),
}


def random_inputs(batch, queries, keys, heads, kv_heads, width):
    parts = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(parts[0], (batch, queries, heads, width))
    k = jax.random.normal(parts[1], (batch, keys, kv_heads, width))
    v = jax.random.normal(parts[2], (batch, keys, kv_heads, width))
    cotangent = jax.random.normal(parts[3], (batch, queries, heads, width))
    return (q, k, v), cotangent


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_splash_kernel_matches_xla_attention_and_its_gradients(shape):
    """fp32 inputs: outputs and the three input gradients (for a random cotangent) agree within 2e-5 (the kernel
    sums in blocks with an online softmax, XLA in one pass)."""
    inputs, cotangent = random_inputs(*shape)
    kernel_out, kernel_vjp = jax.vjp(lambda *x: splash_attention(*x, interpret=True), *inputs)
    xla_out, xla_vjp = jax.vjp(xla_attention, *inputs)
    np.testing.assert_allclose(kernel_out, xla_out, atol=2e-5, rtol=2e-5)
    for kernel_grad, xla_grad in zip(kernel_vjp(cotangent), xla_vjp(cotangent), strict=True):
        np.testing.assert_allclose(kernel_grad, xla_grad, atol=2e-5, rtol=2e-5)


def compiled_grad_text(device, dtype=jnp.bfloat16) -> str:
    """The optimised HLO of attention's gradient compiled for `device`, from abstract inputs."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    query = jax.ShapeDtypeStruct((1, 1024, 4, 64), dtype, sharding=sharding)
    keys = jax.ShapeDtypeStruct((1, 200, 4, 64), dtype, sharding=sharding)
    loss = lambda q, k, v: attention(q, k, v).astype(jnp.float32).sum()  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(query, keys, keys).compile().as_text()


def score_shapes(hlo: str) -> set[str]:
    """Float arrays of 1024 queries by 200 keys (or 256, padded): attention scores or probabilities."""
    shapes = re.findall(r"(?:bf16|f32)\[([\d,]+)\]", hlo)
    return {s for s in shapes if "1024" in s.split(",") and {"200", "256"} & set(s.split(","))}


def test_the_kernel_is_chosen_by_the_backend_and_the_tpu_kernel_builds_no_scores(monkeypatch):
    """On a TPU backend "auto" is the splash kernel: compiled for a TPU v5e chip, forward and backward are Mosaic
    kernels and no [queries, keys] score array is built. On the CPU it is XLA's attention, which builds them;
    JAXLORA_ATTENTION forces a choice (how a step is compiled for a TPU from this CPU host)."""
    tpu = topologies.get_topology_desc("v5e:2x2", "tpu").devices[0]
    for_cpu = compiled_grad_text(jax.devices("cpu")[0])
    assert "tpu_custom_call" not in for_cpu and score_shapes(for_cpu)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    for_tpu = compiled_grad_text(tpu)
    assert for_tpu.count("tpu_custom_call") >= 2  # the forward kernel and the fused backward kernel
    assert not score_shapes(for_tpu)
    monkeypatch.setenv("JAXLORA_ATTENTION", "xla")
    assert "tpu_custom_call" not in compiled_grad_text(tpu)
    monkeypatch.setenv("JAXLORA_ATTENTION", "flash")
    with pytest.raises(ValueError, match="JAXLORA_ATTENTION='flash'"):
        compiled_grad_text(tpu)


def test_on_a_mesh_the_kernel_runs_per_device_on_its_own_samples():
    """Under `batch_split_over` the kernel is wrapped in shard_map over the mesh's batch axes (XLA cannot partition
    it): the result equals XLA's attention on the whole batch, within 2e-5, and stays split over the devices."""
    mesh = make_mesh("data=2,fsdp=4")
    sharding = batch_sharding(mesh)
    (q, k, v), _ = random_inputs(8, 100, 77, 2, 1, 32)
    q, k, v = (jax.device_put(x, sharding) for x in (q, k, v))

    def kernel(q, k, v):
        with batch_split_over(sharding):
            return splash_attention(q, k, v, interpret=True)

    traced = jax.jit(kernel).trace(q, k, v)
    assert "shard_map" in str(traced.jaxpr)
    out = traced.lower().compile()(q, k, v)
    np.testing.assert_allclose(out, xla_attention(q, k, v), atol=2e-5, rtol=2e-5)
    assert out.sharding.is_equivalent_to(sharding, out.ndim)
