"""Attaching adapters to a network's layers, and walking the attached ones.

ComfyUI's trainer adapts every layer with weights (spec section 3): weights of two or more dimensions get the
chosen algorithm, one-dimensional weights (norm scales) a full `diff`, biases a `diff_b`.

Layers are walked as `LayerSite`s, one per checkpoint path: a stacked layer (blocks run by scan) is one site per
block, and its adapter is the blocks' adapters stacked, each initialised from (seed, the block's path) as if
the network were unrolled. Key tables (`formats`) see only per-block paths, targets and adapters. Adapters
imported from a file are attached here too (`attach_imported`), stacked per layer like fresh ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.adapters.base import AdapterFileError, Diff, LayerAdapter, Target, describe_names, layer_rng
from jaxlora.adapters.loha import LoHa
from jaxlora.adapters.lokr import LoKr
from jaxlora.adapters.lora import LoRA
from jaxlora.adapters.oft import OFT
from jaxlora.models.stack import LayerSite, layer_sites, stack_modules

# Every algorithm patches the weight and has an activation ("bypass") form.
ALGORITHMS = {"LoRA": LoRA, "LoHa": LoHa, "LoKr": LoKr, "OFT": OFT}


def weight_layers(network: nnx.Module) -> Iterator[tuple[str, LayerSite]]:
    """(checkpoint module path, site) for every layer an adapter can patch, in module order; a site reads like
    the layer (`Target.of(site)`, `site.bias`), per block for stacked layers."""
    for site in layer_sites(network):
        if site.layer.adaptable:
            yield site.path, site


def adapted_layers(network: nnx.Module) -> Iterator[tuple[str, LayerSite, LayerAdapter]]:
    """(path, site, the block's adapter) for every adapted layer."""
    for path, site in weight_layers(network):
        if site.layer.adapter is not None:
            yield path, site, site.adapter


def set_adapters(sites: list[LayerSite], adapters: list[LayerAdapter]) -> None:
    """Attach one adapter per site of one layer: as it is to a plain layer, stacked in block order to a
    stacked one (every block needs one; they must agree in structure, see `stack_modules`)."""
    layer = sites[0].layer
    if sites[0].index is None:
        layer.adapter = adapters[0]
        return
    try:
        layer.adapter = stack_modules(adapters)
    except ValueError as error:
        raise ValueError(f"{sites[0].path} ... {sites[-1].path}: the blocks' adapters {error}") from error


def sites_by_layer(network: nnx.Module) -> list[list[tuple[str, LayerSite]]]:
    """The adaptable sites grouped by layer (one group per plain layer, one per stacked layer), in order."""
    groups: dict[int, list[tuple[str, LayerSite]]] = {}
    for path, site in weight_layers(network):
        groups.setdefault(id(site.layer), []).append((path, site))
    return list(groups.values())


def check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; use one of {list(ALGORITHMS)}")


def new_layer_adapter(
    path: str, layer: LayerSite, algorithm: str, rank: int, seed: int, lora_dtype, bypass: bool
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

    Layers that already carry an adapter (e.g. one imported from a file) keep it. The count is of per-block
    layers; the blocks of a stacked layer are adapted all or none, so `include` must agree on them.
    """
    check_algorithm(algorithm)
    if not 1 <= rank:
        raise ValueError(f"rank must be at least 1, got {rank}")
    lora_dtype = jnp.dtype(lora_dtype)
    count = 0
    for group in sites_by_layer(network):
        chosen = [include is None or include(path) for path, _ in group]
        if group[0][1].layer.adapter is not None or not any(chosen):
            continue
        if not all(chosen):
            raise ValueError(f"`include` selects some blocks of {group[0][0]} ... {group[-1][0]}: all or none")
        adapters = [new_layer_adapter(path, site, algorithm, rank, seed, lora_dtype, bypass) for path, site in group]
        set_adapters([site for _, site in group], adapters)
        count += len(group)
    return count


def detach_adapters(network: nnx.Module) -> None:
    for _, site in weight_layers(network):
        site.layer.adapter = None


def _with_alpha(adapter: LayerAdapter, alpha: float) -> LayerAdapter:
    """The same LoRA delta expressed with another alpha (up rescaled), so blocks can share one static alpha."""
    lora = adapter.weight
    up = np.asarray(lora.up[...]) * (lora.alpha / alpha)
    weight = LoRA(lora.target, up, np.asarray(lora.down[...]), alpha, lora.lora_dtype)
    dora = None if adapter.dora_scale is None else np.asarray(adapter.dora_scale[...])
    return LayerAdapter(weight, adapter.bias, adapter.bypass, dora)


def _zero_adapter(adapter: LayerAdapter) -> LayerAdapter:
    """An adapter of the same structure that changes nothing: every tensor zero (R = I for OFT)."""
    graphdef, state = nnx.split(adapter)
    return nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, state))


def _stack_blocks(paths: list[str], adapters: Mapping[str, LayerAdapter]) -> list[LayerAdapter]:
    """One adapter per block of a stacked layer: LoRA alphas made common, blocks the file lacks as no-ops."""
    present = [adapters[path] for path in paths if path in adapters]
    first = present[0]
    if isinstance(first.weight, LoRA):
        alpha = first.weight.alpha
        adapters = {
            path: _with_alpha(a, alpha) if isinstance(a.weight, LoRA) and a.weight.alpha != alpha else a
            for path, a in adapters.items()
        }
    missing = [path for path in paths if path not in adapters]
    if missing and first.dora_scale is not None:
        raise AdapterFileError(f"DoRA adapters must cover every block; the file lacks {describe_names(missing)}")
    filler = _zero_adapter(first) if missing else None
    return [adapters.get(path, filler) for path in paths]


def attach_imported(network: nnx.Module, adapters: Mapping[str, LayerAdapter]) -> None:
    """Attach per-path adapters; a stacked layer gets its blocks' adapters stacked (blocks absent from the file
    get a no-op adapter of the same kind, which stays zero in training for LoRA, LoHa and LoKr)."""
    for group in sites_by_layer(network):
        paths = [path for path, _ in group]
        if not any(path in adapters for path in paths):
            continue
        blocks = _stack_blocks(paths, adapters) if group[0][1].index is not None else [adapters[paths[0]]]
        try:
            set_adapters([site for _, site in group], blocks)
        except ValueError as error:
            raise AdapterFileError(f"{error} (different ranks, algorithms or factor shapes)") from error
