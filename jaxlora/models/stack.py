"""Repeated blocks stored stacked (a leading block axis on every variable) and run under `jax.lax.scan`, so a
network's compile time does not grow with its depth; and the per-block view of stacked layers that checkpoint
loading and adapter files use.

Block i of a stack at module path `double_blocks` is named `double_blocks.<i>.<path inside the block>`, the
checkpoint's own key: `layer_sites` yields one `LayerSite` per block and layer, so file keys, adapter seeds and
adapter keys are the same as for an unrolled network.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxlora.models.layers import WeightLayer
from jaxlora.models.quantize import dequantize

# Remat policies that keep their saved values in host memory instead of device memory (jax memory kinds).
HOST_OFFLOAD_POLICIES = ("offload_dots_with_no_batch_dims", "offload_block_inputs")
# The name every stacked block gives its input (`jax.ad_checkpoint.checkpoint_name`), for policies that save it.
BLOCK_INPUT = "block_input"


def host_memory_kind() -> str | None:
    """The host memory kind the default backend offers for offloading ("pinned_host"), or None."""
    kinds = {memory.kind for memory in jax.devices()[0].addressable_memories()}
    return "pinned_host" if "pinned_host" in kinds else None


def checkpoint_policy(name: str):
    """The `jax.checkpoint_policies` policy of a remat policy name, or one of two that keep what they save in
    host memory and fetch it back for the backward pass (a backend without a host memory kind refuses them):
    "offload_dots_with_no_batch_dims" keeps the outputs of weight matmuls (the projections) there instead of
    recomputing them; "offload_block_inputs" keeps there each stacked block's input, the one value per block
    that `nothing_saveable` holds on the device for the whole backward pass, and recomputes everything else."""
    if name not in HOST_OFFLOAD_POLICIES:
        return getattr(jax.checkpoint_policies, name)
    host = host_memory_kind()
    if host is None:
        raise ValueError(
            f"remat policy {name} offloads to host memory, which the {jax.default_backend()} backend does not offer "
            "(no 'pinned_host' memory kind): use nothing_saveable"
        )
    if name == "offload_block_inputs":
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=(),
            names_which_can_be_offloaded=(BLOCK_INPUT,),
            offload_src="device",
            offload_dst=host,
        )
    return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", host)


_STREAMED = contextvars.ContextVar("jaxlora_streamed_weights", default=False)


@contextmanager
def streamed_weights(enabled: bool) -> Iterator[None]:
    """While tracing inside this context, stacked blocks fetch their weights to the device whatever memory they
    appear to be in: the trainer's step sets it when `offloading` keeps them in host memory, since the abstract
    inputs of an ahead-of-time compile carry no memory kind for tracing to see."""
    token = _STREAMED.set(enabled)
    try:
        yield
    finally:
        _STREAMED.reset(token)


def on_device(value: jax.Array) -> jax.Array:
    """`value` in device memory: a frozen weight kept in host memory (`loop.prepare_run` with `offloading`) is
    copied to the device where its block runs, so only the running block's weights occupy device memory."""
    if _STREAMED.get() or jax.typeof(value).memory_space == jax.memory.Space.Host:
        return jax.device_put(value, jax.memory.Space.Device)
    return value


def host_streamable(network: nnx.Module) -> Callable[[str, tuple[int, ...]], bool]:
    """Which leaves of `network`'s state (by dotted path and shape) `offloading` keeps in host memory: the weight
    matrices and kernels of stacked blocks, the bulk of a DiT, which `Stack` fetches to the device one block at a
    time. Their vectors (biases, norm scales, quantization scales: a few MB) stay on the device, since XLA:TPU
    cannot fetch one block's row of a packed bf16 [blocks, width] array from host memory."""
    paths = (path for path, node in nnx.iter_graph(network) if isinstance(node, Stack))
    prefixes = tuple(".".join(str(part) for part in (*path, "block")) + "." for path in paths)
    return lambda path, shape: path.startswith(prefixes) and sum(size > 1 for size in shape[1:]) >= 2


def stack_modules(modules: list[nnx.Module]) -> nnx.Module:
    """One module whose variables are those of `modules` stacked on a new leading axis. The modules must have
    the same structure and static attributes (shapes, adapter kinds, alphas); else ValueError."""
    graphdefs, states = zip(*(nnx.split(module) for module in modules), strict=True)
    shapes = [jax.tree.map(jnp.shape, state) for state in states]
    if any(g != graphdefs[0] or s != shapes[0] for g, s in zip(graphdefs[1:], shapes[1:], strict=True)):
        raise ValueError("differ in structure, shapes or static attributes and cannot be stacked")
    return nnx.merge(graphdefs[0], jax.tree.map(lambda *values: jnp.stack(values), *states))


def unstack_module(module: nnx.Module, index: int) -> nnx.Module:
    """Block `index` of a stacked module, as an ordinary module (a slice; the stack is not modified)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(lambda value: value[index], state))


def _stacked_placeholder(value, count: int):
    return jax.ShapeDtypeStruct((count, *value.shape), value.dtype)


class Stack(nnx.Module):
    """`count` blocks of one kind: `block` holds every block's variables stacked on axis 0.

    Called with a carry (the activations a block updates) and shared inputs; each block runs as
    `block(*carry, *per_block[i], *shared) -> carry`, rematerialised per block under `remat_policy` (a
    `jax.checkpoint_policies` name, None for no remat). `per_block` holds inputs that differ between blocks,
    each with a leading block axis (e.g. modulations computed for every block at once), scanned alongside the
    parameters. `scan=False` unrolls the loop (same math; for measuring what the scan saves in compile time).
    """

    def __init__(self, make_block: Callable[[], nnx.Module], count: int):
        graphdef, state = nnx.split(make_block())
        self.block = nnx.merge(graphdef, jax.tree.map(lambda value: _stacked_placeholder(value, count), state))
        self.count = count

    def __call__(
        self,
        carry: tuple,
        *shared,
        per_block: tuple = (),
        remat_policy: str | None = None,
        scan: bool = True,
    ) -> tuple:
        graphdef, state = nnx.split(self.block)

        def run_block(block_xs, carry, shared):
            block_state, block_inputs = block_xs
            carry = jax.tree.map(lambda value: checkpoint_name(value, BLOCK_INPUT), carry)
            block = nnx.merge(graphdef, jax.tree.map(on_device, block_state))
            return block(*carry, *block_inputs, *shared)

        if remat_policy is not None:
            policy = checkpoint_policy(remat_policy)
            run_block = jax.checkpoint(run_block, policy=policy, prevent_cse=not scan)
        xs = (state, tuple(per_block))
        if scan:
            carry, _ = jax.lax.scan(lambda c, block_xs: (run_block(block_xs, c, shared), None), carry, xs)
            return carry
        for index in range(self.count):
            carry = run_block(jax.tree.map(lambda value, i=index: value[i], xs), carry, shared)
        return carry


@dataclass(frozen=True)
class LayerSite:
    """One layer as the checkpoint names it: a plain layer (`index` None) or block `index` of a stacked one.

    Reads like the layer itself for shape questions (`weight`, `bias`, `torch_shape`, `permutation`): for a
    stacked layer `weight` and `bias` are the per-block shapes (`jax.ShapeDtypeStruct`), never device slices;
    `value(name)` slices out the block's array.
    """

    path: str
    layer: WeightLayer
    index: int | None = None

    def _per_block(self, name: str):
        param = getattr(self.layer, name)
        if param is None or self.index is None:
            return param
        return jax.ShapeDtypeStruct(param.shape[1:], param.dtype)

    @property
    def weight(self):
        return self._per_block("weight")

    @property
    def bias(self):
        return self._per_block("bias")

    @property
    def adapter(self):
        """The block's adapter (a slice of the stacked one), or None."""
        adapter = self.layer.adapter
        if adapter is None or self.index is None:
            return adapter
        return unstack_module(adapter, self.index)

    def value(self, name: str) -> jax.Array:
        array = getattr(self.layer, name)[...]
        return array if self.index is None else array[self.index]

    def weight_as(self, dtype) -> jax.Array:
        """The block's weight in `dtype`, patched by its adapter (what the forward computes with)."""
        if self.index is None:
            return self.layer.weight_as(dtype)
        scale = None if self.layer.weight_scale is None else self.value("weight_scale")
        adapter, weight = self.adapter, dequantize(self.value("weight"), scale, dtype)
        return weight if adapter is None else adapter.patch_weight(weight)

    def bias_as(self, dtype) -> jax.Array | None:
        if self.index is None or self.layer.bias is None:
            return self.layer.bias_as(dtype)
        adapter, bias = self.adapter, self.value("bias").astype(dtype)
        return bias if adapter is None else adapter.patch_bias(bias)

    def permutation(self, name: str) -> tuple[int, ...]:
        return self.layer.permutation(name)

    def torch_shape(self, name: str, flax_shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """The block's torch-layout shape of parameter `name` (`flax_shape` defaults to the block's own)."""
        return self.layer.torch_shape(name, getattr(self, name).shape if flax_shape is None else flax_shape)

    def from_torch(self, name: str, array):
        return self.layer.from_torch(name, array)

    def to_torch(self, name: str, array):
        return self.layer.to_torch(name, array)


def layer_sites(network: nnx.Module) -> Iterator[LayerSite]:
    """Every layer with weights, one site per block for stacked layers, as (checkpoint path, layer, block)."""
    nodes = list(nnx.iter_graph(network))
    stacks = {path: node.count for path, node in nodes if isinstance(node, Stack)}
    for path, node in nodes:
        if not isinstance(node, WeightLayer):
            continue
        names = [str(part) for part in path]
        stack = next((p for p in stacks if path[: len(p) + 1] == (*p, "block")), None)
        if stack is None:
            yield LayerSite(".".join(names), node)
            continue
        outer, inner = ".".join(names[: len(stack)]), ".".join(names[len(stack) + 1 :])
        for index in range(stacks[stack]):
            yield LayerSite(f"{outer}.{index}.{inner}", node, index)
