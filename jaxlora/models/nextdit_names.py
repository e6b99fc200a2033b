"""NextDiT adapter key names, as tables: ComfyUI's module paths (its layout under `diffusion_model.`) and the
"diffusers" names ComfyUI maps for the family (`comfy/utils.py` z_image_to_diffusers, applied by `comfy/lora.py`
to every Lumina2-class model): the module names of Z-Image's original release, which diffusers'
`ZImageTransformer2DModel` keeps, so diffusers/PEFT (`transformer.`), ai-toolkit (`diffusion_model.`) and bare
files of Z-Image LoRAs use them.

Those names split the fused `attention.qkv` into `attention.to_q/to_k/to_v`, row slices of one model width each:
right only when key/value heads are as many as query heads (Z-Image), so the slices are listed only then. The
block modulation is named `adaLN_modulation.0` (Z-Image's, without SiLU) only. Weights are in torch layout
[out, in]; slices act on output rows.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from jaxlora.models.family import NameTarget, kohya_transformer_name, transformer_export_names

# ComfyUI path inside a block -> the diffusers name, where they differ; `attention.qkv` splits into QKV_PIECES.
BLOCK_RENAMES = {
    "attention.out": "attention.to_out.0",
    "attention.q_norm": "attention.norm_q",
    "attention.k_norm": "attention.norm_k",
}
BLOCK_SAME = (
    "attention_norm1",
    "attention_norm2",
    "ffn_norm1",
    "ffn_norm2",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
    "adaLN_modulation.0",
)
QKV_PIECES = ("attention.to_q", "attention.to_k", "attention.to_v")
TOP_LEVEL = {
    "x_embedder": "all_x_embedder.2-1",
    "final_layer.linear": "all_final_layer.2-1.linear",
    "final_layer.adaLN_modulation.1": "all_final_layer.2-1.adaLN_modulation.1",
    "cap_embedder.0": "cap_embedder.0",
    "cap_embedder.1": "cap_embedder.1",
    "t_embedder.mlp.0": "t_embedder.mlp.0",
    "t_embedder.mlp.2": "t_embedder.mlp.2",
}
_BLOCK_PATH = re.compile(r"^((?:layers|noise_refiner|context_refiner)\.\d+)\.(.+)$")


def diffusers_names(path: str, dim: int, split_qkv: bool) -> dict[str, NameTarget]:
    """The diffusers names that stand for (row slices of) the layer `path`, in row order; `split_qkv`: whether the
    fused qkv is three slices of `dim` rows (query heads as many as key/value heads)."""
    match = _BLOCK_PATH.match(path)
    if match is None:
        return {TOP_LEVEL[path]: NameTarget(path)} if path in TOP_LEVEL else {}
    block, local = match.groups()
    if local == "attention.qkv":
        if not split_qkv:
            return {}
        return {f"{block}.{name}": NameTarget(path, (i * dim, (i + 1) * dim)) for i, name in enumerate(QKV_PIECES)}
    if local in BLOCK_RENAMES:
        return {f"{block}.{BLOCK_RENAMES[local]}": NameTarget(path)}
    return {path: NameTarget(path)} if local in BLOCK_SAME else {}


def import_aliases(paths: Iterable[str], dim: int, split_qkv: bool) -> dict[str, NameTarget]:
    """Every base name ComfyUI's loader accepts for the model's layers -> what it patches: its own paths, kohya
    names, and each diffusers name as `diffusion_model.`, `transformer.`, `lycoris_` (flattened) and bare. Also
    musubi-tuner's sd-scripts names of the diffusers modules (`lora_unet_layers_0_attention_to_q`), which ComfyUI
    reads only after musubi's conversion script."""
    aliases: dict[str, NameTarget] = {}
    for path in paths:
        whole = NameTarget(path)
        aliases[f"diffusion_model.{path}"] = whole
        aliases[kohya_transformer_name(path)] = whole
        for name, target in diffusers_names(path, dim, split_qkv).items():
            flat = name.replace(".", "_")
            for alias in (
                f"diffusion_model.{name}",
                f"transformer.{name}",
                f"lycoris_{flat}",
                f"lora_unet_{flat}",
                name,
            ):
                aliases[alias] = target
    return aliases


def export_names(path: str, dim: int, split_qkv: bool, style: str) -> dict[str, NameTarget]:
    """The base names under which an adapter of layer `path` is written in `style`: one name for `comfyui` and
    `kohya`; for `peft`, `transformer.<diffusers name>` per row slice (none for a layer the table cannot name)."""
    return transformer_export_names(path, style, diffusers_names(path, dim, split_qkv) if style == "peft" else {})
