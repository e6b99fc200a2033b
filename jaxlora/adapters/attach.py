"""Attaching adapters to a network's layers, and walking the attached ones.

ComfyUI's trainer adapts every layer with weights (spec section 3): weights of two or more dimensions get the
chosen algorithm, one-dimensional weights (norm scales) a full `diff`, biases a `diff_b`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.adapters.base import Diff, LayerAdapter, Target, layer_rng
from jaxlora.adapters.loha import LoHa
from jaxlora.adapters.lokr import LoKr
from jaxlora.adapters.lora import LoRA
from jaxlora.adapters.oft import OFT
from jaxlora.models.layers import WeightLayer

ALGORITHMS = {"LoRA": LoRA, "LoHa": LoHa, "LoKr": LoKr, "OFT": OFT}
# Algorithms with an activation form y = x W + h(x) (the others patch the weight).
BYPASS_ALGORITHMS = {"LoRA"}


def weight_layers(network: nnx.Module) -> Iterator[tuple[str, WeightLayer]]:
    """(module path, layer) for every layer with weights, in module order."""
    for path, node in nnx.iter_graph(network):
        if isinstance(node, WeightLayer):
            yield ".".join(str(part) for part in path), node


def adapted_layers(network: nnx.Module) -> Iterator[tuple[str, WeightLayer, LayerAdapter]]:
    for path, layer in weight_layers(network):
        if layer.adapter is not None:
            yield path, layer, layer.adapter


def check_algorithm(algorithm: str, bypass: bool = False) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; use one of {list(ALGORITHMS)}")
    if bypass and algorithm not in BYPASS_ALGORITHMS:
        raise ValueError(f"bypass mode is available for {sorted(BYPASS_ALGORITHMS)}, not {algorithm}")


def new_layer_adapter(
    path: str, layer: WeightLayer, algorithm: str, rank: int, seed: int, lora_dtype, bypass: bool
) -> LayerAdapter:
    """Fresh adapters for one layer, initialised from (seed, path) only."""
    rng = layer_rng(seed, path)
    if layer.weight.ndim >= 2:
        weight = ALGORITHMS[algorithm].create(Target.of(layer), rank, rng, lora_dtype)
    else:
        weight = Diff(np.zeros(layer.weight.shape), lora_dtype)
    bias = None if layer.bias is None else Diff(np.zeros(layer.bias.shape), lora_dtype)
    return LayerAdapter(weight, bias, bypass and layer.weight.ndim >= 2)


def attach_adapters(
    network: nnx.Module,
    algorithm: str = "LoRA",
    rank: int = 8,
    seed: int = 0,
    lora_dtype: str | jnp.dtype = jnp.bfloat16,
    bypass: bool = False,
    include: Callable[[str], bool] | None = None,
) -> int:
    """Attach fresh adapters to every layer (or those whose module path `include` accepts); returns the count.

    Layers that already carry an adapter (e.g. one imported from a file) keep it.
    """
    check_algorithm(algorithm, bypass)
    if not 1 <= rank:
        raise ValueError(f"rank must be at least 1, got {rank}")
    lora_dtype = jnp.dtype(lora_dtype)
    count = 0
    for path, layer in weight_layers(network):
        if layer.adapter is None and (include is None or include(path)):
            layer.adapter = new_layer_adapter(path, layer, algorithm, rank, seed, lora_dtype, bypass)
            count += 1
    return count


def detach_adapters(network: nnx.Module) -> None:
    for _, layer in weight_layers(network):
        layer.adapter = None
