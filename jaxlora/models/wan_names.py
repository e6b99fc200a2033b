"""Wan adapter key names, as tables.

ComfyUI maps no diffusers names for Wan (`comfy/lora.py` has no Wan key map): it loads the file's own module
paths (`diffusion_model.blocks.0.self_attn.q`, what ai-toolkit writes), kohya/musubi-tuner names
(`lora_unet_blocks_0_self_attn_q`) and Wan-Fun's double-underscore variant (`lora_unet__blocks_...`, which
`comfy/lora_convert.py` fixes up). So jaxlora writes `comfyui` and `kohya` only; a `peft` export is refused by
name. On import it also reads what the community trains outside ComfyUI: diffusers/PEFT names of
`WanTransformer3DModel` (`transformer.blocks.0.attn1.to_q`, as diffusers' single-file converter renames the
module paths: note that diffusers' `norm2` is the file's `norm3`) and DiffSynth-Studio's bare module paths.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from jaxlora.models.family import NameTarget, kohya_transformer_name, transformer_export_names

# Block-local ComfyUI path -> diffusers name (diffusers' `convert_wan_transformer_to_diffusers`, read in reverse).
BLOCK_RENAMES = {
    **{
        f"{ours}.{proj}": f"{theirs}.{name}"
        for ours, theirs in (("self_attn", "attn1"), ("cross_attn", "attn2"))
        for proj, name in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))
    },
    **{f"{ours}.{norm}": f"{theirs}.{norm}" for ours, theirs in (("self_attn", "attn1"), ("cross_attn", "attn2"))
       for norm in ("norm_q", "norm_k")},
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}  # fmt: skip
TOP_LEVEL = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}
_BLOCK_PATH = re.compile(r"^(blocks\.\d+)\.(.+)$")


def diffusers_name(path: str) -> str | None:
    """The `WanTransformer3DModel` name of the layer at ComfyUI path `path` (None where it has none)."""
    match = _BLOCK_PATH.match(path)
    if match is None:
        return TOP_LEVEL.get(path)
    block, local = match.groups()
    return f"{block}.{BLOCK_RENAMES[local]}" if local in BLOCK_RENAMES else None


def import_aliases(paths: Iterable[str]) -> dict[str, NameTarget]:
    """Every base name an adapter file may give a layer: ComfyUI's (`diffusion_model.<path>`, kohya/musubi
    `lora_unet_<path>`, Wan-Fun `lora_unet__<path>`), DiffSynth's bare path, and the diffusers name under
    `transformer.` or bare."""
    aliases: dict[str, NameTarget] = {}
    for path in paths:
        target = NameTarget(path)
        kohya = kohya_transformer_name(path)
        names = [f"diffusion_model.{path}", kohya, "lora_unet__" + kohya[len("lora_unet_") :], path]
        if (diffusers := diffusers_name(path)) is not None:
            names += [f"transformer.{diffusers}", diffusers]
        aliases.update(dict.fromkeys(names, target))
    return aliases


def export_names(path: str, style: str) -> dict[str, NameTarget]:
    """The base names under which an adapter of layer `path` is written: `comfyui` and `kohya` one each, `peft`
    none (ComfyUI loads no diffusers names for Wan)."""
    return transformer_export_names(path, style, {})
