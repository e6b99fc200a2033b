"""Flux adapter files: diffusers row-slice pieces fused into one LoRA per BFL weight on import, and split again for
the `peft` style on export. The names and slices come from `jaxlora.models.flux_names`; the key parsing
(`formats.group_keys`) and the per-layer tensors (`formats` export) stay in `formats`, which calls these."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import numpy as np

from jaxlora.models.flux_names import (
    FluxTarget,
    LoraPiece,
    bias_export_name,
    export_names,
    fuse_lora,
    split_lora,
)

# Canonical tensor names (formats.SUFFIXES values) a row-slice piece may carry; (up, down) suffixes written.
_PIECE_NAMES = {"up", "down", "alpha"}
_LORA_PAIRS = (("lora_up.weight", "lora_down.weight"), ("lora_B.weight", "lora_A.weight"))


def fuse_flux_groups(
    groups: Mapping[str, Mapping[str, str]],
    tensors: Mapping[str, np.ndarray],
    aliases: Mapping[str, FluxTarget],
    out_features: Mapping[str, int],
) -> dict[str, np.ndarray]:
    """A Flux file's tensors grouped by base name ({base: {canonical name: key}}, from `formats.group_keys` over
    `flux_names.import_aliases`) -> the same adapter under `diffusion_model.<BFL path>` names.

    A layer named once by a whole-weight name keeps its tensors; the LoRAs of a layer named by row-slice pieces
    (or the swapped final modulation) become one fused LoRA with the delta ComfyUI would apply."""
    by_path: dict[str, list[str]] = defaultdict(list)
    for base in groups:
        by_path[aliases[base].path].append(base)
    canonical = {}
    for path, bases in by_path.items():
        targets = defaultdict(list)
        for base in bases:
            targets[aliases[base]].append(base)
        duplicated = [names for names in targets.values() if len(names) > 1]
        if duplicated:
            raise ValueError(f"{' and '.join(duplicated[0])} name the same rows of {path}; keep one")
        prefix = f"diffusion_model.{path}"
        if len(bases) == 1 and aliases[bases[0]] == FluxTarget(path):
            base = bases[0]
            canonical.update({prefix + key[len(base) :]: tensors[key] for key in groups[base].values()})
            continue
        pieces = []
        for base in bases:
            keys, target = groups[base], aliases[base]
            misplaced = set(keys) - _PIECE_NAMES - ({"diff_b"} if target == FluxTarget(path) else set())
            if misplaced:
                raise ValueError(
                    f"{', '.join(keys[n] for n in sorted(misplaced))}: a layer named in parts ({path}) reads only "
                    f"LoRA up/down/alpha under each name, as ComfyUI applies no bias diff there; write bias diffs "
                    f"under {prefix}"
                )
            if "diff_b" in keys:
                canonical[f"{prefix}.diff_b"] = tensors[keys["diff_b"]]
            if not set(keys) & _PIECE_NAMES:
                continue
            if "up" not in keys or "down" not in keys:
                raise ValueError(f"{', '.join(sorted(keys.values()))}: a LoRA needs both an up and a down factor")
            up, down = (np.asarray(tensors[keys[n]], np.float32) for n in ("up", "down"))
            alpha = float(np.asarray(tensors[keys["alpha"]], np.float32)) if "alpha" in keys else None
            pieces.append(LoraPiece(base, target, up, down, alpha))
        up, down, alpha = fuse_lora(pieces, out_features[path])
        canonical.update({f"{prefix}.lora_up.weight": up, f"{prefix}.lora_down.weight": down})
        canonical[f"{prefix}.alpha"] = np.float32(alpha)
    return canonical


def flux_export_tensors(path: str, hidden_size: int, style: str, parts: Mapping[str, np.ndarray]) -> dict:
    """One layer's file tensors {suffix: tensor} (as `formats` builds them for `style`) under the style's Flux
    names. Under row-slice names (`peft`) only a LoRA fits: its up factor is cut into each name's rows, down and
    alpha repeat. Bias diffs go under `bias_export_name`."""
    names = export_names(path, hidden_size, style)
    tensors = {}
    if "diff_b" in parts:
        tensors[f"{bias_export_name(path, hidden_size, style)}.diff_b"] = parts["diff_b"]
    rest = {suffix: value for suffix, value in parts.items() if suffix != "diff_b"}
    if list(names.values()) == [FluxTarget(path)]:
        (name,) = names
        return tensors | {f"{name}.{suffix}": value for suffix, value in rest.items()}
    pair = next(((up, down) for up, down in _LORA_PAIRS if up in rest and down in rest), None)
    if pair is None or set(rest) - {*pair, "alpha"}:
        raise ValueError(f"{path}: only a LoRA can be written under {', '.join(names)}, not {sorted(rest)}")
    up_suffix, down_suffix = pair
    for name, (up, down, alpha) in split_lora(rest[up_suffix], rest[down_suffix], rest.get("alpha"), names).items():
        tensors.update({f"{name}.{up_suffix}": up, f"{name}.{down_suffix}": down})
        if alpha is not None:
            tensors[f"{name}.alpha"] = alpha
    return tensors
