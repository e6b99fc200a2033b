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
from collections.abc import Iterable

from jaxlora.models.family import NameTarget, kohya_transformer_name, transformer_export_names

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


def _rows(piece: str | None, hidden_size: int) -> tuple[int, int] | None:
    return None if piece is None else tuple(hidden_size * i for i in PIECES[piece])


def diffusers_names(path: str, hidden_size: int, include_import_only: bool = False) -> dict[str, NameTarget]:
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
        prefix + name: NameTarget(path, _rows(piece, hidden_size), prefix + name in SWAPPED)
        for t in tables
        for name, (bfl, piece) in t.items()
        if bfl == local
    }


def import_aliases(paths: Iterable[str], hidden_size: int) -> dict[str, NameTarget]:
    """Every base name ComfyUI's loader accepts for the model's layers (spec 8.4) -> what it patches.

    `paths` are the model's BFL layer paths; only their layers get aliases (a schnell model has no
    `guidance_in`)."""
    aliases: dict[str, NameTarget] = {}
    for path in paths:
        whole = NameTarget(path)
        named = {f"diffusion_model.{path}": whole, kohya_transformer_name(path): whole}
        if _BLOCK_PATH.match(path) and path.endswith(".linear1"):
            named[f"diffusion_model.{path}_qkv"] = NameTarget(path, _rows("qkv", hidden_size))
        for name, target in diffusers_names(path, hidden_size, include_import_only=True).items():
            flat = name.replace(".", "_")
            for alias in (f"transformer.{name}", f"lycoris_{flat}", f"lora_transformer_{flat}", name):
                named[alias] = target
        aliases.update(named)
    return aliases


def export_names(path: str, hidden_size: int, style: str) -> dict[str, NameTarget]:
    """The base names under which an adapter of the BFL layer `path` is written in `style`, each with the rows it
    covers: one name for `comfyui` and `kohya`; for `peft`, `transformer.<diffusers name>` per row slice (none for
    a layer diffusers does not have)."""
    return transformer_export_names(path, style, diffusers_names(path, hidden_size) if style == "peft" else {})
