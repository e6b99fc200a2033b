"""Flux.2 adapter key names. ComfyUI loads Flux.2 adapters through its Flux key map (a Flux.2 model is a Flux in
`comfy/lora.py`): the BFL paths, kohya's `lora_unet_` names and Flux.1's diffusers names, so Flux.1's import
aliases serve as they are. What differs is what jaxlora writes in the `peft` style: the diffusers
`Flux2Transformer2DModel` names among those ComfyUI maps. Flux.2's shared modulations and its
`time_guidance_embed` embedders have diffusers names ComfyUI does not map, so `peft` has none for them.
"""

from __future__ import annotations

from jaxlora.models.flux_names import (
    DOUBLE_BLOCK,
    DOUBLE_BLOCK_IMPORT_ONLY,
    SINGLE_BLOCK_IMPORT_ONLY,
    TOP_LEVEL,
    DiffusersTables,
)

# Flux.1's diffusers tables, Flux.2's part: the attention names (q/k/v as row slices of the fused qkv), the
# `linear_in/linear_out` feed-forward names, the fused single-block `to_qkv_mlp_proj`/`to_out`, and the
# top-level layers Flux.2 has (x_embedder, context_embedder, norm_out.linear, proj_out).
WRITTEN = DiffusersTables(
    double={**{n: t for n, t in DOUBLE_BLOCK.items() if n.startswith("attn.")}, **DOUBLE_BLOCK_IMPORT_ONLY},
    single=SINGLE_BLOCK_IMPORT_ONLY,
    top={n: TOP_LEVEL[n] for n in ("x_embedder", "context_embedder", "norm_out.linear", "proj_out")},
)
