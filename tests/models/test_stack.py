"""Stacked blocks: scan, unrolled loop, and per-block remat compute the same values and gradients as separate
blocks applied in turn; per-block sites name block i as the checkpoint does."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlora.adapters.attach import attach_adapters, weight_layers
from jaxlora.adapters.base import AdapterParam
from jaxlora.models import stack
from jaxlora.models.layers import Linear
from jaxlora.models.stack import Stack, layer_sites, unstack_module
from jaxlora.parallel.mesh import dotted
from jaxlora.parallel.placement import in_host_memory, place_tree
from tests.adapters.conftest import randomize_adapters


class Block(nnx.Module):
    def __init__(self):
        self.inner = nnx.Dict({"0": Linear(8, 16), "2": Linear(16, 8)})

    def __call__(self, x, scale):
        return (x + scale * self.inner["2"](jnp.tanh(self.inner["0"](x))),)


class Net(nnx.Module):
    def __init__(self, count):
        self.blocks = Stack(Block, count)
        self.out = Linear(8, 1)


def random_net(count=3, seed=0):
    net = Net(count)
    rng = np.random.default_rng(seed)
    for _, variable in nnx.to_flat_state(nnx.state(net, nnx.Param)):
        variable.set_value(jnp.asarray(0.3 * rng.standard_normal(variable.shape), jnp.float32))
    attach_adapters(net, "LoRA", rank=2, seed=1, lora_dtype=jnp.float32)
    randomize_adapters(net, scale=0.2)
    return net


def loss(adapters, graph, base, x, remat_policy, scan):
    net = nnx.merge(graph, adapters, base)
    (h,) = net.blocks((x,), 0.5, remat_policy=remat_policy, scan=scan)
    return jnp.sum(net.out(h) ** 2)


def reference_loss(adapters, graph, base, x):
    """The blocks as separate modules, applied in turn."""
    net = nnx.merge(graph, adapters, base)
    h = x
    for i in range(net.blocks.count):
        (h,) = unstack_module(net.blocks.block, i)(h, 0.5)
    return jnp.sum(net.out(h) ** 2)


@pytest.mark.parametrize(
    ("remat_policy", "scan"),
    [
        (None, True),
        ("nothing_saveable", True),
        ("dots_saveable", False),
        ("offload_dots_with_no_batch_dims", True),
        ("offload_block_inputs", True),
    ],
)
def test_scan_unroll_and_remat_match_separate_blocks(remat_policy, scan):
    graph, adapters, base = nnx.split(random_net(), AdapterParam, ...)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 8)), jnp.float32)
    value, grads = jax.value_and_grad(loss)(adapters, graph, base, x, remat_policy, scan)
    expected, expected_grads = jax.value_and_grad(reference_loss)(adapters, graph, base, x)
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))


def test_sites_name_each_block_like_the_checkpoint():
    net = random_net(count=2)
    paths = [site.path for site in layer_sites(net)]
    assert paths == ["blocks.0.inner.0", "blocks.1.inner.0", "blocks.0.inner.2", "blocks.1.inner.2", "out"]
    sites = dict(weight_layers(net))
    assert sites["blocks.1.inner.0"].weight.shape == (8, 16)
    np.testing.assert_array_equal(sites["blocks.1.inner.0"].value("weight"), net.blocks.block.inner["0"].weight[1])


@pytest.mark.parametrize("scan", [True, False])
def test_per_block_inputs_reach_their_own_block(scan):
    """Inputs with a leading block axis (e.g. modulations computed for all blocks at once) are scanned with the
    parameters: block i sees row i, as when each block is called with its own value."""
    net = random_net()
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 8)), jnp.float32)
    scales = jnp.array([0.5, -1.0, 2.0])
    (got,) = net.blocks((x,), per_block=(scales,), scan=scan, remat_policy="nothing_saveable")
    want = x
    for i in range(net.blocks.count):
        (want,) = unstack_module(net.blocks.block, i)(want, scales[i])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    (same_scale,) = net.blocks((x,), 0.5, scan=scan)
    assert not np.allclose(got, same_scale)


def saved_in_host_memory(policy: str, base=None) -> list[str]:
    """The residuals the backward pass reads from host memory under `policy`, as "dtype[shape]" strings (one per
    scan over the stack: the per-block values stacked on a leading block axis)."""
    graph, adapters, own_base = nnx.split(random_net(), AdapterParam, ...)
    x = jnp.ones((4, 8), jnp.float32)
    jaxpr = jax.make_jaxpr(jax.grad(loss), static_argnums=(4, 5))(adapters, graph, base or own_base, x, policy, True)
    return sorted({str(var.aval) for eqn in jaxpr.eqns for var in eqn.outvars if "<host>" in str(var.aval)})


def test_offload_policies_keep_what_they_save_in_host_memory_or_are_refused(monkeypatch):
    """The offloading policies keep their residuals in the "<host>" memory space (XLA:CPU computes the same values
    with them, checked above): the weight matmuls' outputs (the first projection's [4, 16] the backward needs, and
    the patched adapters' [8, 16] and [16, 8] up @ down products) of each of the three blocks, or only each block's
    input ([4, 8]); a backend without host memory refuses them by name before tracing."""
    weight_dots = ["float32<host>[3,16,8]", "float32<host>[3,4,16]", "float32<host>[3,8,16]"]
    assert saved_in_host_memory("offload_dots_with_no_batch_dims") == weight_dots
    assert saved_in_host_memory("offload_block_inputs") == ["float32<host>[3,4,8]"]
    assert saved_in_host_memory("nothing_saveable") == []
    monkeypatch.setattr(stack, "host_memory_kind", lambda: None)
    for policy in stack.HOST_OFFLOAD_POLICIES:
        with pytest.raises(ValueError, match=f"{policy} offloads to host memory, which the cpu"):
            stack.checkpoint_policy(policy)


def test_frozen_weights_in_host_memory_stream_to_the_device_block_by_block():
    """Stacked frozen weight matrices placed in host memory (what `offloading` does) give the same loss and adapter
    gradients; the step copies each block's slice to the device inside the scan, never the whole stack, and the
    weights outside stacks and the stacks' vectors stay where they are."""
    net = random_net()
    graph, adapters, base = nnx.split(net, AdapterParam, ...)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    host_base = place_tree(base, in_host_memory(base, device, stack.host_streamable(net)))
    kinds = {dotted(path): leaf.sharding.memory_kind for path, leaf in jax.tree_util.tree_leaves_with_path(host_base)}
    assert kinds["blocks.block.inner.0.weight"] == "pinned_host" and kinds["out.weight"] == "device"
    assert kinds["blocks.block.inner.0.bias"] == "device"  # vectors stay: a few bytes per block
    x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 8)), jnp.float32)
    for policy in ("nothing_saveable", "offload_block_inputs"):
        value, grads = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 4, 5))(
            adapters, graph, host_base, x, policy, True
        )
        want, want_grads = jax.value_and_grad(reference_loss)(adapters, graph, base, x)
        np.testing.assert_allclose(value, want, rtol=1e-6)
        for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    traced = jax.make_jaxpr(jax.grad(loss), static_argnums=(4, 5))
    jaxpr = str(traced(adapters, graph, host_base, x, "offload_block_inputs", True))
    assert "f32<host>[3,8,16]" in jaxpr and "f32[3,8,16]" not in jaxpr  # the stack is never on the device whole
    assert "devices=(MemorySpace.Device,)" in jaxpr  # each block's slice is
