"""Adapter key styles, as data: which file keys name which layer, and how tensors are shaped in each style.

Export styles:
- `comfyui` (default): `diffusion_model.<ldm path>.<suffix>`, exactly what ComfyUI's trainer writes.
- `kohya`: `lora_unet_<path with "_">` for A1111/Forge and ComfyUI; SD1.x/SD2.x use diffusers module names
  (as sd-scripts does), SDXL its ldm names; conv LoRA factors are 4-D.
- `peft`: `unet.<diffusers path>.lora_A/lora_B.weight`, LoRA only, scale folded into lora_B. ComfyUI does not
  map modern diffusers names of SD/SDXL attention projections (to_q/k/v/out), so those layers cannot be
  written in this style and are reported. Flux writes `transformer.<diffusers path>`, splitting fused BFL
  weights (qkv, linear1) into diffusers' row pieces (`flux_files.flux_export_tensors`).

Import accepts every base name and suffix ComfyUI's loader resolves for the UNet (spec 8.2, 8.3), plus the
modern diffusers names of attention layers; for Flux every name ComfyUI maps (spec 8.4), row-slice pieces fused
into one LoRA per BFL weight first (`flux_files.fuse_flux_groups`); anything else is reported by name.

Everything here works on per-layer views from `attach.weight_layers` (checkpoint path, site, adapter), so a
network whose blocks are stacked for scan exports and imports per-block keys like an unrolled one.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxlora.adapters.attach import adapted_layers, set_adapters, sites_by_layer, weight_layers
from jaxlora.adapters.base import Diff, LayerAdapter, Target
from jaxlora.adapters.flux_files import flux_export_tensors, fuse_flux_groups
from jaxlora.adapters.loha import LoHa
from jaxlora.adapters.lokr import LoKr
from jaxlora.adapters.lora import LoRA
from jaxlora.adapters.oft import OFT
from jaxlora.models.diffusers_names import unet_to_diffusers
from jaxlora.models.flux import Flux
from jaxlora.models.flux_names import FluxAdapterShapeError, import_aliases
from jaxlora.models.unet import UNet

STYLES = ("comfyui", "kohya", "peft")
# Families whose kohya files use diffusers module names (sd-scripts' SD1/SD2 UNet); SDXL's use ldm names.
KOHYA_DIFFUSERS_NAMES = {"sd1", "sd2"}

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


class AdapterFileError(ValueError):
    """An adapter file that does not fit the model; the message names the keys at fault."""


def _describe(items: Iterable[str], limit: int = 8) -> str:
    items = sorted(items)
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def diffusers_names(network: nnx.Module) -> dict[str, str]:
    """Checkpoint path -> diffusers module name, for UNet layers that have one. Flux's diffusers names may stand
    for row slices of one weight, so they live in `flux_names` tables instead (none here)."""
    if not isinstance(network, UNet):
        return {}
    return unet_to_diffusers(network.config, [path for path, _ in weight_layers(network)])


def processor_name(diffusers_name: str) -> str:
    """Old diffusers attention-processor spelling: `attn1.to_q` -> `attn1.processor.to_q`,
    `attn1.to_out.0` -> `attn1.processor.to_out`."""
    return re.sub(r"\.to_out\.0$", ".to_out", diffusers_name.replace(".to_", ".processor.to_"))


def import_base_names(network: nnx.Module) -> dict[str, str]:
    """Every base name an adapter file may use for a layer -> the layer's checkpoint module path."""
    names = {}
    diffusers = diffusers_names(network)
    for path, _ in weight_layers(network):
        names[f"diffusion_model.{path}"] = path
        names["lora_unet_" + path.replace(".", "_")] = path
        if path not in diffusers:
            continue
        q = diffusers[path]
        for alias in (
            "lora_unet_" + q.replace(".", "_"),
            "lycoris_" + q.replace(".", "_"),
            q,
            f"unet.{q}",
            processor_name(q),
            f"unet.{processor_name(q)}",
        ):
            names[alias] = path
    return names


def export_base_name(path: str, style: str, family: str, diffusers: Mapping[str, str]) -> str:
    if style == "comfyui":
        return f"diffusion_model.{path}"
    if style == "kohya":
        name = diffusers[path] if family in KOHYA_DIFFUSERS_NAMES else path
        return "lora_unet_" + name.replace(".", "_")
    return f"unet.{diffusers[path]}"


def _host_dtype(dtype: jnp.dtype):
    return ml_dtypes.bfloat16 if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(dtype)


def _is_attention_projection(diffusers_name: str) -> bool:
    return re.search(r"\.attn\d\.to_(q|k|v|out\.0)$", diffusers_name) is not None


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


class _NoFileName(ValueError):
    """A layer whose adapter has no name in the requested style."""


def _layer_namer(network: nnx.Module, style: str, family: str) -> Callable[[str, dict], dict[str, np.ndarray]]:
    """(path, {suffix: tensor}) -> {file key: tensor} for the network's naming scheme; raises `_NoFileName` for a
    layer the style cannot name, so all such layers are reported together."""
    if isinstance(network, Flux):
        hidden_size = network.config.hidden_size  # = img_in's out features: diffusers' row-slice unit

        def flux_names(path: str, parts: dict) -> dict[str, np.ndarray]:
            try:
                return flux_export_tensors(path, hidden_size, style, parts)
            except FluxAdapterShapeError:
                raise
            except ValueError as error:  # no diffusers name, or a non-LoRA on row-slice names
                raise _NoFileName(str(error)) from error

        return flux_names
    diffusers = diffusers_names(network)

    def unet_names(path: str, parts: dict) -> dict[str, np.ndarray]:
        if style == "peft" and (path not in diffusers or _is_attention_projection(diffusers[path])):
            raise _NoFileName(path)
        base = export_base_name(path, style, family, diffusers)
        return {f"{base}.{suffix}": value for suffix, value in parts.items()}

    return unet_names


def export_adapter(
    network: nnx.Module, family: str, style: str = "comfyui", lora_dtype=jnp.bfloat16
) -> dict[str, np.ndarray]:
    """The attached adapters as file tensors: torch layout, the style's key names, stored in `lora_dtype`."""
    if style not in STYLES:
        raise ValueError(f"unknown adapter style {style!r}; use one of {STYLES}")
    names = _layer_namer(network, style, family)
    tensors, unmappable = {}, []
    for path, layer, adapter in adapted_layers(network):
        if style == "peft" and (not isinstance(adapter.weight, LoRA | Diff | None) or adapter.dora_scale is not None):
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
            named = names(path, {suffix: np.asarray(value, np.float32) for suffix, value in parts.items()})
        except _NoFileName:
            unmappable.append(path)
            continue
        tensors.update({key: value.astype(_host_dtype(lora_dtype)) for key, value in named.items()})
    if unmappable:
        raise AdapterFileError(
            f"{len(unmappable)} adapted layers have no '{style}' name ComfyUI loads (attention projections, "
            f"non-LoRA algorithms, or non-LoRA on Flux's fused weights): {_describe(unmappable)}; use style "
            f"'comfyui' or 'kohya'"
        )
    return tensors


def group_keys(keys: Iterable[str], base_names: Mapping[str, str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """File keys grouped by layer path as {path: {canonical name: file key}}, plus the keys that match no layer."""
    groups: dict[str, dict[str, str]] = defaultdict(dict)
    bases: dict[str, set[str]] = defaultdict(set)
    unmatched = []
    for key in keys:
        for suffix in _SUFFIXES_LONGEST_FIRST:
            base = key[: -len(suffix)]
            if key.endswith(suffix) and base in base_names:
                path = base_names[base]
                name = SUFFIXES[suffix]
                if name in groups[path]:
                    raise AdapterFileError(f"{key} and {groups[path][name]} both patch {path}")
                groups[path][name] = key
                bases[path].add(base)
                break
        else:
            unmatched.append(key)
    return dict(groups), unmatched


@dataclass(frozen=True)
class _Factors:
    """One layer's tensors from a file, with the key names for error messages."""

    path: str
    tensors: Mapping[str, np.ndarray]
    keys: Mapping[str, str]

    def get(self, name: str):
        value = self.tensors.get(name)
        return None if value is None else np.asarray(value, np.float32)

    def fail(self, message: str) -> AdapterFileError:
        return AdapterFileError(f"{self.path} ({_describe(self.keys.values(), 3)}): {message}")


def _fold_tucker(core: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Tucker core [R, r, k, k] with factor [r, in] -> an equivalent flat factor [R, in * k * k]."""
    return np.einsum("ijkl,jr->irkl", core, factor.reshape(factor.shape[0], -1)).reshape(core.shape[0], -1)


def _lora(f: _Factors, target: Target, lora_dtype) -> LoRA:
    up, down, mid = f.get("up"), f.get("down"), f.get("mid")
    if up is None or down is None:
        raise f.fail("a LoRA needs both an up and a down factor")
    rank = down.shape[0]
    alpha = f.get("alpha")
    alpha = rank if alpha is None else float(alpha)  # no alpha key: ComfyUI applies scale 1
    if mid is not None:
        down = np.einsum("pjkl,ji->pikl", mid, down.reshape(rank, -1))
    up, down = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
    if up.shape[0] != target.out_features or down.shape[1] != target.in_features or up.shape[1] != down.shape[0]:
        raise f.fail(f"LoRA factors up {up.shape} / down {down.shape} do not fit the weight {target.torch_shape}")
    return LoRA(target, up, down, alpha * down.shape[0] / rank, lora_dtype)


def _loha(f: _Factors, target: Target, lora_dtype) -> LoHa:
    w1a, w1b, w2a, w2b = (f.get(n) for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    if any(w is None for w in (w1a, w1b, w2a, w2b)):
        raise f.fail("LoHa needs hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b")
    rank = w1b.shape[0]
    alpha = f.get("alpha")
    alpha = rank if alpha is None else float(alpha)
    if f.get("hada_t1") is not None:  # Tucker LoHa stores w_a as [r, out]
        w1a, w2a = w1a.T, w2a.T
        w1b, w2b = _fold_tucker(f.get("hada_t1"), w1b), _fold_tucker(f.get("hada_t2"), w2b)
    w1b, w2b = w1b.reshape(w1b.shape[0], -1), w2b.reshape(w2b.shape[0], -1)
    if w1a.shape[0] != target.out_features or w1b.shape[1] != target.in_features or w2b.shape != w1b.shape:
        raise f.fail(f"LoHa factors {w1a.shape}, {w1b.shape} do not fit the weight {target.torch_shape}")
    return LoHa(target, w1a, w1b, w2a, w2b, alpha * w1b.shape[0] / rank, lora_dtype)


def _lokr(f: _Factors, target: Target, lora_dtype) -> LoKr:
    """Rebuilt factors and ComfyUI's load-side scale (alpha / rank of the last rebuilt factor) are folded into
    full w1, w2, which load exactly as the original file does."""
    w1, w2 = f.get("lokr_w1"), f.get("lokr_w2")
    rank = None
    if w1 is None:
        w1a, w1b = f.get("lokr_w1_a"), f.get("lokr_w1_b")
        if w1a is None or w1b is None:
            raise f.fail("LoKr needs lokr_w1 or lokr_w1_a and lokr_w1_b")
        w1, rank = w1a @ w1b, w1b.shape[0]
    if w2 is None:
        w2a, w2b, t2 = f.get("lokr_w2_a"), f.get("lokr_w2_b"), f.get("lokr_t2")
        if w2a is None or w2b is None:
            raise f.fail("LoKr needs lokr_w2 or lokr_w2_a and lokr_w2_b")
        if t2 is None:
            w2 = w2a @ w2b.reshape(w2b.shape[0], -1)
        else:  # Tucker: t2 [r, r, k, k], w2a [r, out_k], w2b [r, in_n]
            w2 = np.einsum("ijkl,jr,ip->prkl", t2, w2b, w2a)
        rank = w2b.shape[0]
    alpha = f.get("alpha")
    if alpha is not None and rank is not None:
        w2 = w2 * (float(alpha) / rank)
    if w1.size * w2.size != np.prod(target.torch_shape):
        raise f.fail(f"kron(lokr_w1 {w1.shape}, lokr_w2 {w2.shape}) does not fit the weight {target.torch_shape}")
    return LoKr(target, w1, w2, lora_dtype)


def _oft(f: _Factors, target: Target, lora_dtype) -> OFT:
    blocks = f.get("oft_blocks")
    if blocks.ndim != 3:
        raise f.fail(f"oft_blocks of shape {blocks.shape} (BOFT) are not supported for training")
    if blocks.shape[0] * blocks.shape[1] != target.out_features or blocks.shape[1] != blocks.shape[2]:
        raise f.fail(f"oft_blocks {blocks.shape} do not fit {target.out_features} output channels")
    alpha = f.get("alpha")
    return OFT(target, blocks, 0.0 if alpha is None else max(float(alpha), 0.0), lora_dtype)


_WEIGHT_BUILDERS = {"up": _lora, "down": _lora, "hada_w1_a": _loha, "oft_blocks": _oft}
_WEIGHT_BUILDERS.update({n: _lokr for n in ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_a")})


def _layer_adapter(f: _Factors, layer, lora_dtype) -> LayerAdapter:
    unsupported = [UNSUPPORTED[name] for name in f.tensors if name in UNSUPPORTED]
    if unsupported:
        raise f.fail("; ".join(unsupported))
    builders = {_WEIGHT_BUILDERS[name] for name in f.tensors if name in _WEIGHT_BUILDERS}
    if len(builders) > 1 or (builders and "diff" in f.tensors):
        raise f.fail("more than one patch kind for one weight (ComfyUI would keep only the last)")
    target = Target.of(layer)
    weight = None
    if builders:
        weight = builders.pop()(f, target, lora_dtype)
    dora_scale = f.get("dora_scale")
    if dora_scale is not None:
        if not isinstance(weight, LoRA | LoHa | LoKr):
            raise f.fail("dora_scale needs a LoRA, LoHa or LoKr adapter beside it")
        out_axis = (target.out_features,) + (1,) * (len(target.torch_shape) - 1)
        in_axis = (1, target.torch_shape[1]) + (1,) * (len(target.torch_shape) - 2)
        if dora_scale.shape[0] == target.out_features and dora_scale.size == target.out_features:
            dora_scale = dora_scale.reshape(out_axis)
        elif dora_scale.size == target.torch_shape[1]:
            dora_scale = dora_scale.reshape(in_axis)
        else:
            raise f.fail(f"dora_scale of shape {dora_scale.shape} fits neither {out_axis} nor {in_axis}")
    elif "diff" in f.tensors:
        diff = f.get("diff")
        if diff.shape != target.torch_shape:
            raise f.fail(f"diff of shape {diff.shape} does not fit the weight {target.torch_shape}")
        weight = Diff(diff, lora_dtype, target.torch_to_flax if diff.ndim > 1 else None)
    bias = None
    if "diff_b" in f.tensors:
        diff_b = f.get("diff_b")
        if layer.bias is None or diff_b.shape != tuple(layer.bias.shape):
            raise f.fail(f"diff_b of shape {diff_b.shape} does not fit the bias")
        bias = Diff(diff_b, lora_dtype)
    if weight is None and bias is None:
        raise f.fail("only alpha/dora keys, no adapter tensors")
    return LayerAdapter(weight, bias, dora_scale=dora_scale)


def _flux_canonical(network: Flux, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A Flux file under any name ComfyUI maps -> the same adapter under `diffusion_model.<BFL path>` names, so
    diffusers row-slice pieces (q/k/v/proj_mlp) become one LoRA on the fused weight before the usual import."""
    layers = dict(weight_layers(network))
    aliases = import_aliases(layers, network.config.hidden_size)
    groups, unmatched = group_keys(tensors.keys(), {alias: alias for alias in aliases})
    if unmatched:
        raise AdapterFileError(f"{len(unmatched)} keys match no layer of this model: {_describe(unmatched)}")
    out_features = {path: Target.of(layer).out_features for path, layer in layers.items()}
    try:
        return fuse_flux_groups(groups, tensors, aliases, out_features)
    except ValueError as error:
        raise AdapterFileError(str(error)) from error


def import_adapter(
    network: nnx.Module, tensors: Mapping[str, np.ndarray], lora_dtype=jnp.bfloat16
) -> dict[str, LayerAdapter]:
    """Layer adapters {checkpoint path: LayerAdapter} from file tensors in any accepted style, or an error naming every
    key that matches no layer."""
    if isinstance(network, Flux):
        tensors = _flux_canonical(network, tensors)
    groups, unmatched = group_keys(tensors.keys(), import_base_names(network))
    if unmatched:
        raise AdapterFileError(f"{len(unmatched)} keys match no layer of this model: {_describe(unmatched)}")
    layers = dict(weight_layers(network))
    return {
        path: _layer_adapter(_Factors(path, {n: tensors[k] for n, k in keys.items()}, keys), layers[path], lora_dtype)
        for path, keys in groups.items()
    }


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
        raise AdapterFileError(f"DoRA adapters must cover every block; the file lacks {_describe(missing)}")
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
