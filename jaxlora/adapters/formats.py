"""Adapter files and the attached adapters: key suffixes as data, and the generic export and import over the
model family's name tables (`ModelFamily.adapter_names`).

Export styles (`family.STYLES`):
- `comfyui` (default): `diffusion_model.<checkpoint path>.<suffix>`, exactly what ComfyUI's trainer writes.
- `kohya`: kohya's `lora_<...>` names for A1111/Forge and ComfyUI, per family; conv LoRA factors 4-D.
- `peft`: diffusers names with `lora_A`/`lora_B`, LoRA only, scale folded into lora_B; where the family's
  diffusers names are row slices of a fused weight, the LoRA is cut into them (`row_slices.split_export`).

Import accepts every base name the family's table lists (all that ComfyUI's loader resolves) with every suffix
ComfyUI reads; row-slice pieces are fused into one LoRA per weight first (`row_slices.layer_tensors`), and
each layer's tensors are read by its algorithm's `from_tensors`. Anything else is reported by name.

Everything here works on per-layer views from `attach.weight_layers` (checkpoint path, site, adapter), so a
network whose blocks are stacked for scan exports and imports per-block keys like an unrolled one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxlora.adapters.attach import adapted_layers, weight_layers
from jaxlora.adapters.base import AdapterFileError, Diff, LayerAdapter, LayerTensors, Target, describe_names
from jaxlora.adapters.loha import LoHa
from jaxlora.adapters.lokr import LoKr
from jaxlora.adapters.lora import LoRA
from jaxlora.adapters.oft import OFT
from jaxlora.adapters.row_slices import SliceShapeError, layer_tensors, split_export
from jaxlora.models.diffusion import DiffusionModel
from jaxlora.models.family import STYLES

# File suffix (with its joiner) -> canonical tensor name, for every form ComfyUI's loader accepts.
SUFFIXES = {
    ".lora_up.weight": "up",
    ".lora_down.weight": "down",
    ".lora_mid.weight": "mid",
    "_lora.up.weight": "up",
    "_lora.down.weight": "down",
    ".lora_B.weight": "up",
    ".lora_A.weight": "down",
    ".lora.up.weight": "up",
    ".lora.down.weight": "down",
    ".lora_B": "up",
    ".lora_A": "down",
    ".lora_linear_layer.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_B.default.weight": "up",
    ".lora_A.default.weight": "down",
    **{f".{name}": name for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")},
    **{f".{name}": name for name in ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b")},
    ".lokr_t2": "lokr_t2",
    ".oft_blocks": "oft_blocks",
    ".rescale": "rescale",
    ".alpha": "alpha",
    ".dora_scale": "dora_scale",
    ".diff": "diff",
    ".diff_b": "diff_b",
    ".w_norm": "diff",
    ".b_norm": "diff_b",
    ".reshape_weight": "reshape_weight",
    ".set_weight": "set_weight",
}
_SUFFIXES_LONGEST_FIRST = sorted(SUFFIXES, key=len, reverse=True)
UNSUPPORTED = {
    "rescale": "OFT rescale is ignored by ComfyUI's loader and not supported",
    "reshape_weight": "reshape_weight patches are not supported",
    "set_weight": "set_weight patches are not supported",
}
# The canonical tensor name that tells which algorithm a layer's tensors are.
WEIGHT_KINDS = {
    "up": LoRA,
    "down": LoRA,
    "hada_w1_a": LoHa,
    "oft_blocks": OFT,
    **dict.fromkeys(("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_a"), LoKr),
}


def _host_dtype(dtype: jnp.dtype):
    return ml_dtypes.bfloat16 if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(dtype)


def _style_tensors(weight, target: Target, style: str) -> dict[str, np.ndarray]:
    """A weight adapter's tensors under the style's suffixes and shapes."""
    tensors = weight.export()
    if isinstance(weight, LoRA) and len(target.torch_shape) > 2 and style != "comfyui":
        # kohya/LyCORIS LoCon and PEFT convs: down [r, in, kh, kw], up [out, r, 1, 1]
        rank = tensors["lora_down.weight"].shape[0]
        tensors["lora_down.weight"] = tensors["lora_down.weight"].reshape(rank, *target.torch_shape[1:])
        tensors["lora_up.weight"] = tensors["lora_up.weight"].reshape(
            target.out_features, rank, *(1,) * (len(target.torch_shape) - 2)
        )
    if style == "peft" and isinstance(weight, LoRA):
        return {
            "lora_A.weight": tensors["lora_down.weight"],
            "lora_B.weight": tensors["lora_up.weight"] * np.float32(weight.scale),
        }
    return tensors


def export_adapter(model: DiffusionModel, style: str = "comfyui", lora_dtype=jnp.bfloat16) -> dict[str, np.ndarray]:
    """The adapters attached to `model.network` as file tensors: torch layout, the style's key names, stored in
    `lora_dtype`."""
    if style not in STYLES:
        raise ValueError(f"unknown adapter style {style!r}; use one of {STYLES}")
    table = model.adapter_names.exports[style]
    tensors, unmappable = {}, []
    for path, layer, adapter in adapted_layers(model.network):
        peft_unfit = style == "peft" and (
            not isinstance(adapter.weight, LoRA | Diff | None) or adapter.dora_scale is not None
        )
        if peft_unfit or path not in table:
            unmappable.append(path)
            continue
        parts = {}
        if adapter.weight is not None:
            parts.update(_style_tensors(adapter.weight, Target.of(layer), style))
        if adapter.dora_scale is not None:
            parts["dora_scale"] = adapter.dora_scale[...]
        if adapter.bias is not None:
            parts["diff_b"] = adapter.bias.export()["diff"]
        try:
            named = split_export(path, table[path], {k: np.asarray(v, np.float32) for k, v in parts.items()})
        except SliceShapeError:
            raise
        except ValueError:  # a non-LoRA adapter on a weight the style names in row slices
            unmappable.append(path)
            continue
        tensors.update({key: value.astype(_host_dtype(lora_dtype)) for key, value in named.items()})
    if unmappable:
        raise AdapterFileError(
            f"{len(unmappable)} adapted layers have no '{style}' name ComfyUI loads (layers the style does not "
            f"name, algorithms other than LoRA in 'peft', or other than LoRA on fused weights named in row "
            f"slices): {describe_names(unmappable)}; use style 'comfyui' or 'kohya'"
        )
    return tensors


def group_keys(keys: Iterable[str], base_names: Iterable[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """File keys grouped by base name as {base: {canonical name: file key}} (the longest known suffix decides),
    plus the keys whose base is not in `base_names`."""
    base_names = set(base_names)
    groups: dict[str, dict[str, str]] = defaultdict(dict)
    unmatched = []
    for key in keys:
        for suffix in _SUFFIXES_LONGEST_FIRST:
            base = key[: -len(suffix)]
            if key.endswith(suffix) and base in base_names:
                groups[base][SUFFIXES[suffix]] = key
                break
        else:
            unmatched.append(key)
    return dict(groups), unmatched


def _dora_scale(f: LayerTensors, weight, target: Target) -> np.ndarray:
    """The file's DoRA magnitude in torch layout: [out, 1, ...] per output channel or [1, in, ...] per input."""
    dora_scale = f.get("dora_scale")
    if not isinstance(weight, LoRA | LoHa | LoKr):
        raise f.fail("dora_scale needs a LoRA, LoHa or LoKr adapter beside it")
    out_axis = (target.out_features,) + (1,) * (len(target.torch_shape) - 1)
    in_axis = (1, target.torch_shape[1]) + (1,) * (len(target.torch_shape) - 2)
    if dora_scale.shape[0] == target.out_features and dora_scale.size == target.out_features:
        return dora_scale.reshape(out_axis)
    if dora_scale.size == target.torch_shape[1]:
        return dora_scale.reshape(in_axis)
    raise f.fail(f"dora_scale of shape {dora_scale.shape} fits neither {out_axis} nor {in_axis}")


def layer_adapter(f: LayerTensors, layer, lora_dtype) -> LayerAdapter:
    """One layer's adapter from its file tensors: the algorithm's `from_tensors`, a DoRA magnitude, a whole
    `diff`, a bias `diff_b`; refused, naming the keys, where they do not fit the layer."""
    unsupported = [UNSUPPORTED[name] for name in f.tensors if name in UNSUPPORTED]
    if unsupported:
        raise f.fail("; ".join(unsupported))
    kinds = {WEIGHT_KINDS[name] for name in f.tensors if name in WEIGHT_KINDS}
    if len(kinds) > 1 or (kinds and "diff" in f.tensors):
        raise f.fail("more than one patch kind for one weight (ComfyUI would keep only the last)")
    target = Target.of(layer)
    weight = kinds.pop().from_tensors(f, target, lora_dtype) if kinds else None
    dora_scale = None
    if "dora_scale" in f.tensors:
        dora_scale = _dora_scale(f, weight, target)
    elif "diff" in f.tensors:
        weight = Diff.from_tensors(f, target, lora_dtype)
    bias = None
    if "diff_b" in f.tensors:
        diff_b = f.get("diff_b")
        if layer.bias is None or diff_b.shape != tuple(layer.bias.shape):
            raise f.fail(f"diff_b of shape {diff_b.shape} does not fit the bias")
        bias = Diff(diff_b, lora_dtype)
    if weight is None and bias is None:
        raise f.fail("only alpha/dora keys, no adapter tensors")
    return LayerAdapter(weight, bias, dora_scale=dora_scale)


def import_adapter(
    model: DiffusionModel, tensors: Mapping[str, np.ndarray], lora_dtype=jnp.bfloat16
) -> dict[str, LayerAdapter]:
    """Layer adapters {checkpoint path: LayerAdapter} for `model.network` (abstract or loaded) from file tensors
    in any accepted style, or an error naming every key that matches no layer."""
    aliases = model.adapter_names.aliases
    groups, unmatched = group_keys(tensors.keys(), aliases)
    if unmatched:
        raise AdapterFileError(f"{len(unmatched)} keys match no layer of this model: {describe_names(unmatched)}")
    layers = dict(weight_layers(model.network))
    out_features = {path: Target.of(layer).out_features for path, layer in layers.items()}
    per_layer = layer_tensors(groups, tensors, aliases, out_features)
    return {path: layer_adapter(f, layers[path], lora_dtype) for path, f in per_layer.items()}
