"""Flux adapter key names, as tables: BFL module paths (ComfyUI's layout under `diffusion_model.`) and the kohya and
diffusers/PEFT names of the same layers.

Diffusers splits two kinds of fused BFL weights, so one of its names may stand for a row slice of a BFL weight:
`*_attn.qkv` [3H, H] holds q, k, v and `single_blocks.N.linear1` [7H, H] holds q, k, v, mlp (H = hidden size,
mlp ratio 4). Diffusers also orders the final modulation `norm_out.linear` as (scale, shift) where BFL's
`final_layer.adaLN_modulation.1` has (shift, scale); ComfyUI swaps the two halves of any delta loaded under that
name. Weights are in torch layout [out, in]; slices and swaps act on output rows.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

STYLES = ("comfyui", "kohya", "peft")

# Row slices of fused weights in units of the hidden size: [start, stop).
PIECES = {"q": (0, 1), "k": (1, 2), "v": (2, 3), "mlp": (3, 7), "qkv": (0, 3)}

# diffusers module name -> (BFL module name, piece or None); block tables are relative to the block.
DOUBLE_BLOCK = {
    "attn.to_q": ("img_attn.qkv", "q"),
    "attn.to_k": ("img_attn.qkv", "k"),
    "attn.to_v": ("img_attn.qkv", "v"),
    "attn.add_q_proj": ("txt_attn.qkv", "q"),
    "attn.add_k_proj": ("txt_attn.qkv", "k"),
    "attn.add_v_proj": ("txt_attn.qkv", "v"),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "norm1.linear": ("img_mod.lin", None),
    "norm1_context.linear": ("txt_mod.lin", None),
    "ff.net.0.proj": ("img_mlp.0", None),
    "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None),
    "ff_context.net.2": ("txt_mlp.2", None),
}
SINGLE_BLOCK = {
    "attn.to_q": ("linear1", "q"),
    "attn.to_k": ("linear1", "k"),
    "attn.to_v": ("linear1", "v"),
    "proj_mlp": ("linear1", "mlp"),
    "norm.linear": ("modulation.lin", None),
    "proj_out": ("linear2", None),
}
TOP_LEVEL = {
    "x_embedder": ("img_in", None),
    "context_embedder": ("txt_in", None),
    "time_text_embed.timestep_embedder.linear_1": ("time_in.in_layer", None),
    "time_text_embed.timestep_embedder.linear_2": ("time_in.out_layer", None),
    "time_text_embed.text_embedder.linear_1": ("vector_in.in_layer", None),
    "time_text_embed.text_embedder.linear_2": ("vector_in.out_layer", None),
    "time_text_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", None),
    "time_text_embed.guidance_embedder.linear_2": ("guidance_in.out_layer", None),
    "norm_out.linear": ("final_layer.adaLN_modulation.1", None),
    "proj_out": ("final_layer.linear", None),
}
SWAPPED = {"norm_out.linear"}
# Further names ComfyUI's loader maps (LyCORIS LoKr feed-forward names; Flux.2 names of the fused single-block
# layers); read on import, never written.
DOUBLE_BLOCK_IMPORT_ONLY = {
    "ff.linear_in": ("img_mlp.0", None),
    "ff.linear_out": ("img_mlp.2", None),
    "ff_context.linear_in": ("txt_mlp.0", None),
    "ff_context.linear_out": ("txt_mlp.2", None),
}
SINGLE_BLOCK_IMPORT_ONLY = {"attn.to_qkv_mlp_proj": ("linear1", None), "attn.to_out": ("linear2", None)}

_BLOCKS = {
    "double_blocks": ("transformer_blocks", DOUBLE_BLOCK, DOUBLE_BLOCK_IMPORT_ONLY),
    "single_blocks": ("single_transformer_blocks", SINGLE_BLOCK, SINGLE_BLOCK_IMPORT_ONLY),
}
_BLOCK_PATH = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")


class FluxAdapterShapeError(ValueError):
    """Adapter tensors that do not fit the rows their name stands for; the message names the key."""


@dataclass(frozen=True)
class FluxTarget:
    """What a file's base name patches: the BFL module path, the output rows [start, stop) of its weight (None:
    all rows), and whether the name orders the two halves of the rows swapped (diffusers' final modulation)."""

    path: str
    rows: tuple[int, int] | None = None
    swap_halves: bool = False


def _rows(piece: str | None, hidden_size: int) -> tuple[int, int] | None:
    return None if piece is None else tuple(hidden_size * i for i in PIECES[piece])


def diffusers_names(path: str, hidden_size: int, include_import_only: bool = False) -> dict[str, FluxTarget]:
    """The diffusers module names that stand for (slices of) the BFL layer `path`, in row order; with
    `include_import_only`, also the names ComfyUI reads but jaxlora never writes."""
    match = _BLOCK_PATH.match(path)
    if match:
        block, index, local = match.groups()
        prefix, table, extra = _BLOCKS[block]
        prefix = f"{prefix}.{index}."
    else:
        prefix, table, extra, local = "", TOP_LEVEL, {}, path
    tables = (table, extra) if include_import_only else (table,)
    return {
        prefix + name: FluxTarget(path, _rows(piece, hidden_size), prefix + name in SWAPPED)
        for t in tables
        for name, (bfl, piece) in t.items()
        if bfl == local
    }


def kohya_name(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def import_aliases(paths: Iterable[str], hidden_size: int) -> dict[str, FluxTarget]:
    """Every base name ComfyUI's loader accepts for the model's layers (spec 8.4) -> what it patches.

    `paths` are the model's BFL layer paths; only their layers get aliases (a schnell model has no
    `guidance_in`)."""
    aliases: dict[str, FluxTarget] = {}
    for path in paths:
        whole = FluxTarget(path)
        named = {f"diffusion_model.{path}": whole, kohya_name(path): whole}
        if _BLOCK_PATH.match(path) and path.endswith(".linear1"):
            named[f"diffusion_model.{path}_qkv"] = FluxTarget(path, _rows("qkv", hidden_size))
        for name, target in diffusers_names(path, hidden_size, include_import_only=True).items():
            flat = name.replace(".", "_")
            for alias in (f"transformer.{name}", f"lycoris_{flat}", f"lora_transformer_{flat}", name):
                named[alias] = target
        aliases.update(named)
    return aliases


def export_names(path: str, hidden_size: int, style: str) -> dict[str, FluxTarget]:
    """The base names under which an adapter of the BFL layer `path` is written in `style`, each with the rows it
    covers: one name for `comfyui` and `kohya`; for `peft`, `transformer.<diffusers name>` per row slice."""
    if style == "comfyui":
        return {f"diffusion_model.{path}": FluxTarget(path)}
    if style == "kohya":
        return {kohya_name(path): FluxTarget(path)}
    if style != "peft":
        raise ValueError(f"unknown adapter style {style!r}; use one of {STYLES}")
    names = diffusers_names(path, hidden_size)
    if not names:
        raise ValueError(f"Flux layer {path} has no diffusers name")
    return {f"transformer.{name}": target for name, target in names.items()}


def bias_export_name(path: str, hidden_size: int, style: str) -> str:
    """The base name for a bias diff (`diff_b`) of `path` in `style`. ComfyUI never applies a bias diff under a
    name that stands for a row slice or the swapped modulation, so those go under the BFL name."""
    names = export_names(path, hidden_size, style)
    whole = [name for name, target in names.items() if target == FluxTarget(path)]
    return whole[0] if whole else f"diffusion_model.{path}"


def swap_halves(rows: np.ndarray) -> np.ndarray:
    """(a, b) -> (b, a) along the rows: ComfyUI's scale/shift swap for `norm_out.linear`, its own inverse."""
    first, second = np.split(rows, 2, axis=0)
    return np.concatenate([second, first], axis=0)


def _row_range(target: FluxTarget, out_features: int) -> tuple[int, int]:
    return target.rows or (0, out_features)


def rows_for_name(target: FluxTarget, whole: np.ndarray) -> np.ndarray:
    """The rows of a whole-weight matrix (an up factor, a diff) as the name of `target` sees them."""
    start, stop = _row_range(target, whole.shape[0])
    rows = whole[start:stop]
    return swap_halves(rows) if target.swap_halves else rows


def rows_to_whole(key: str, target: FluxTarget, rows: np.ndarray, out_features: int) -> np.ndarray:
    """Inverse of `rows_for_name`: the rows stored under `key` placed into zeros of the whole weight's height."""
    start, stop = _row_range(target, out_features)
    if rows.shape[0] != stop - start or stop > out_features:
        raise FluxAdapterShapeError(
            f"{key}: {rows.shape[0]} rows do not fit rows [{start}, {stop}) of {target.path} ({out_features} rows)"
        )
    whole = np.zeros((out_features, *rows.shape[1:]), rows.dtype)
    whole[start:stop] = swap_halves(rows) if target.swap_halves else rows
    return whole


@dataclass(frozen=True)
class LoraPiece:
    """One LoRA read from a file under `key`: up [rows, r], down [r, in], alpha (None: ComfyUI's scale 1)."""

    key: str
    target: FluxTarget
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
            raise FluxAdapterShapeError(
                f"{p.key}: LoRA up {p.up.shape} / down {p.down.shape} are not [rows, r] / [r, in] with one input "
                f"width for all pieces of {p.target.path} (widths {sorted(in_features)})"
            )
        scale = 1.0 if p.alpha is None else p.alpha / p.down.shape[0]
        ups.append(rows_to_whole(p.key, p.target, np.asarray(p.up, np.float32) * np.float32(scale), out_features))
    down = np.concatenate([np.asarray(p.down, np.float32) for p in pieces], axis=0)
    return np.concatenate(ups, axis=1), down, float(down.shape[0])


def split_lora(
    up: np.ndarray, down: np.ndarray, alpha: float | None, names: dict[str, FluxTarget]
) -> dict[str, tuple[np.ndarray, np.ndarray, float | None]]:
    """One LoRA on a whole weight -> {name: (up rows, down, alpha)} for `names` (from `export_names`), whose
    pieces together load as the same delta; every row must be covered exactly once."""
    covered = np.zeros(up.shape[0], np.int64)
    for name, target in names.items():
        start, stop = _row_range(target, up.shape[0])
        if stop > up.shape[0]:
            raise FluxAdapterShapeError(f"{name}: rows [{start}, {stop}) exceed the {up.shape[0]} rows of up")
        covered[start:stop] += 1
    if not np.all(covered == 1):
        raise FluxAdapterShapeError(
            f"{', '.join(names)} cover {np.sum(covered == 1)} of the {up.shape[0]} rows of "
            f"{next(iter(names.values())).path} exactly once: the weight's height does not fit the hidden size"
        )
    return {name: (rows_for_name(target, up), down, alpha) for name, target in names.items()}
