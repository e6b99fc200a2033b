"""Adapters on row slices of fused weights: diffusers (and PEFT) name the q, k, v (and mlp) rows of a fused
projection separately, and some names order the two halves of a modulation's rows swapped. On import the LoRAs
of a layer named in pieces become one LoRA on the whole weight with the delta ComfyUI would apply; on export a
LoRA is cut into the pieces a style names. Weights are in torch layout [out, in]; slices and swaps act on
output rows. Which names stand for which rows is the family's table (`NameTarget`s); the algebra is here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from jaxlora.adapters.base import AdapterFileError, LayerTensors
from jaxlora.models.family import NameTarget


class SliceShapeError(AdapterFileError):
    """Adapter tensors that do not fit the rows their name stands for; the message names the key."""


def swap_halves(rows: np.ndarray) -> np.ndarray:
    """(a, b) -> (b, a) along the rows: ComfyUI's scale/shift swap for `norm_out.linear`, its own inverse."""
    first, second = np.split(rows, 2, axis=0)
    return np.concatenate([second, first], axis=0)


def _row_range(target: NameTarget, out_features: int) -> tuple[int, int]:
    return target.rows or (0, out_features)


def rows_for_name(target: NameTarget, whole: np.ndarray) -> np.ndarray:
    """The rows of a whole-weight matrix (an up factor, a diff) as the name of `target` sees them."""
    start, stop = _row_range(target, whole.shape[0])
    rows = whole[start:stop]
    return swap_halves(rows) if target.swap_halves else rows


def rows_to_whole(key: str, target: NameTarget, rows: np.ndarray, out_features: int) -> np.ndarray:
    """Inverse of `rows_for_name`: the rows stored under `key` placed into zeros of the whole weight's height."""
    start, stop = _row_range(target, out_features)
    if rows.shape[0] != stop - start or stop > out_features:
        raise SliceShapeError(
            f"{key}: {rows.shape[0]} rows do not fit rows [{start}, {stop}) of {target.path} ({out_features} rows)"
        )
    whole = np.zeros((out_features, *rows.shape[1:]), rows.dtype)
    whole[start:stop] = swap_halves(rows) if target.swap_halves else rows
    return whole


@dataclass(frozen=True)
class LoraPiece:
    """One LoRA read from a file under `key`: up [rows, r], down [r, in], alpha (None: ComfyUI's scale 1)."""

    key: str
    target: NameTarget
    up: np.ndarray
    down: np.ndarray
    alpha: float | None = None


def fuse_lora(pieces: Sequence[LoraPiece], out_features: int) -> tuple[np.ndarray, np.ndarray, float]:
    """LoRAs on row slices of one weight -> one LoRA (up, down, alpha) on the whole weight with the same delta:
    down stacks the pieces' downs, up is block diagonal with each piece's alpha_i / r_i folded in, and
    alpha = total rank (scale 1). Rows no piece covers stay zero; overlapping pieces add, as in ComfyUI."""
    paths = {p.target.path for p in pieces}
    if len(paths) != 1:
        raise ValueError(f"pieces of different layers {sorted(paths)}: {[p.key for p in pieces]}")
    in_features = {p.down.shape[1] for p in pieces if p.down.ndim == 2}
    ups = []
    for p in pieces:
        if p.up.ndim != 2 or p.down.ndim != 2 or p.up.shape[1] != p.down.shape[0] or len(in_features) != 1:
            raise SliceShapeError(
                f"{p.key}: LoRA up {p.up.shape} / down {p.down.shape} are not [rows, r] / [r, in] with one input "
                f"width for all pieces of {p.target.path} (widths {sorted(in_features)})"
            )
        scale = 1.0 if p.alpha is None else p.alpha / p.down.shape[0]
        ups.append(rows_to_whole(p.key, p.target, np.asarray(p.up, np.float32) * np.float32(scale), out_features))
    down = np.concatenate([np.asarray(p.down, np.float32) for p in pieces], axis=0)
    return np.concatenate(ups, axis=1), down, float(down.shape[0])


def split_lora(
    up: np.ndarray, down: np.ndarray, alpha: float | None, names: dict[str, NameTarget]
) -> dict[str, tuple[np.ndarray, np.ndarray, float | None]]:
    """One LoRA on a whole weight -> {name: (up rows, down, alpha)} for `names` (from `export_names`), whose
    pieces together load as the same delta; every row must be covered exactly once."""
    covered = np.zeros(up.shape[0], np.int64)
    for name, target in names.items():
        start, stop = _row_range(target, up.shape[0])
        if stop > up.shape[0]:
            raise SliceShapeError(f"{name}: rows [{start}, {stop}) exceed the {up.shape[0]} rows of up")
        covered[start:stop] += 1
    if not np.all(covered == 1):
        raise SliceShapeError(
            f"{', '.join(names)} cover {np.sum(covered == 1)} of the {up.shape[0]} rows of "
            f"{next(iter(names.values())).path} exactly once: the weight's height does not fit the hidden size"
        )
    return {name: (rows_for_name(target, up), down, alpha) for name, target in names.items()}


# Canonical tensor names (formats.SUFFIXES values) a row-slice piece may carry; (up, down) suffixes written.
_PIECE_NAMES = {"up", "down", "alpha"}
_LORA_PAIRS = (("lora_up.weight", "lora_down.weight"), ("lora_B.weight", "lora_A.weight"))


def _merged(path: str, bases: Sequence[str], groups, tensors) -> LayerTensors:
    """Whole-weight names of one layer: their tensors together, each canonical name from one key only."""
    keys: dict[str, str] = {}
    for base in bases:
        for name, key in groups[base].items():
            if name in keys:
                raise AdapterFileError(f"{key} and {keys[name]} both patch {path}")
            keys[name] = key
    return LayerTensors(path, {name: tensors[key] for name, key in keys.items()}, keys)


def _fused(path: str, bases: Sequence[str], groups, tensors, aliases, out_features: int) -> LayerTensors:
    """A layer named in row-slice pieces (or the swapped halves): one LoRA on the whole weight with the delta
    ComfyUI would apply, plus a bias diff given under a whole-weight name."""
    targets = defaultdict(list)
    for base in bases:
        targets[aliases[base]].append(base)
    duplicated = [names for names in targets.values() if len(names) > 1]
    if duplicated:
        raise AdapterFileError(f"{' and '.join(duplicated[0])} name the same rows of {path}; keep one")
    pieces, out, keys = [], {}, {}
    for base in bases:
        names, target = groups[base], aliases[base]
        misplaced = set(names) - _PIECE_NAMES - ({"diff_b"} if target.whole else set())
        if misplaced:
            raise AdapterFileError(
                f"{', '.join(names[n] for n in sorted(misplaced))}: a layer named in parts ({path}) reads only "
                f"LoRA up/down/alpha under each name, as ComfyUI applies no bias diff there; write bias diffs "
                f"under its whole-weight name"
            )
        if "diff_b" in names:
            out["diff_b"], keys["diff_b"] = tensors[names["diff_b"]], names["diff_b"]
        if not set(names) & _PIECE_NAMES:
            continue
        if "up" not in names or "down" not in names:
            raise AdapterFileError(f"{', '.join(sorted(names.values()))}: a LoRA needs both an up and a down factor")
        up, down = (np.asarray(tensors[names[n]], np.float32) for n in ("up", "down"))
        alpha = float(np.asarray(tensors[names["alpha"]], np.float32)) if "alpha" in names else None
        pieces.append(LoraPiece(base, target, up, down, alpha))
    if pieces:
        up, down, alpha = fuse_lora(pieces, out_features)
        out.update({"up": up, "down": down, "alpha": np.float32(alpha)})
        fused = ", ".join(p.key for p in pieces)
        keys.update(dict.fromkeys(("up", "down", "alpha"), fused))
    return LayerTensors(path, out, keys)


def layer_tensors(
    groups: Mapping[str, Mapping[str, str]],
    tensors: Mapping[str, np.ndarray],
    aliases: Mapping[str, NameTarget],
    out_features: Mapping[str, int],
) -> dict[str, LayerTensors]:
    """A file's tensors grouped by base name ({base: {canonical name: key}}, from `formats.group_keys`) ->
    each layer's tensors. Whole-weight names of a layer are read together; the LoRAs of a layer named by
    row-slice pieces (or with swapped halves) become one fused LoRA (`fuse_lora`)."""
    by_path: dict[str, list[str]] = defaultdict(list)
    for base in groups:
        by_path[aliases[base].path].append(base)
    return {
        path: _merged(path, bases, groups, tensors)
        if all(aliases[base].whole for base in bases)
        else _fused(path, bases, groups, tensors, aliases, out_features[path])
        for path, bases in by_path.items()
    }


def split_export(path: str, names: Mapping[str, NameTarget], parts: Mapping[str, np.ndarray]) -> dict:
    """One layer's file tensors {suffix: tensor} under `names` (the style's base names of layer `path`, from the
    family's table). One whole name takes every tensor; under row-slice names only a LoRA fits: its up factor is
    cut into each name's rows, down and alpha repeat, and a bias diff goes under a whole name (the checkpoint
    path where the style has none: ComfyUI applies no bias diff under a slice name)."""
    tensors = {}
    whole = [name for name, target in names.items() if target.whole]
    if "diff_b" in parts:
        tensors[f"{whole[0] if whole else f'diffusion_model.{path}'}.diff_b"] = parts["diff_b"]
    rest = {suffix: value for suffix, value in parts.items() if suffix != "diff_b"}
    if len(names) == 1 and whole:
        return tensors | {f"{whole[0]}.{suffix}": value for suffix, value in rest.items()}
    pair = next(((up, down) for up, down in _LORA_PAIRS if up in rest and down in rest), None)
    if pair is None or set(rest) - {*pair, "alpha"}:
        raise ValueError(f"{path}: only a LoRA can be written under {', '.join(names)}, not {sorted(rest)}")
    up_suffix, down_suffix = pair
    for name, (up, down, alpha) in split_lora(rest[up_suffix], rest[down_suffix], rest.get("alpha"), names).items():
        tensors.update({f"{name}.{up_suffix}": up, f"{name}.{down_suffix}": down})
        if alpha is not None:
            tensors[f"{name}.alpha"] = alpha
    return tensors
