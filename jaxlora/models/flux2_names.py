"""Flux.2 adapter key names. ComfyUI loads Flux.2 adapters through its Flux key map (a Flux.2 model is a Flux in
`comfy/lora.py`): the BFL paths, kohya's `lora_unet_` names and Flux.1's diffusers names, so Flux.1's import
aliases serve as they are. What differs is what jaxlora writes in the `peft` style: the diffusers
`Flux2Transformer2DModel` names among those ComfyUI maps. Flux.2's shared modulations and its
`time_guidance_embed` embedders have diffusers names ComfyUI does not map, so `peft` has none for them.
"""

from __future__ import annotations

from jaxlora.models.flux_names import DiffusersTables

WRITTEN = DiffusersTables(
    double={
        "attn.to_q": ("img_attn.qkv", "q"),
        "attn.to_k": ("img_attn.qkv", "k"),
        "attn.to_v": ("img_attn.qkv", "v"),
        "attn.add_q_proj": ("txt_attn.qkv", "q"),
        "attn.add_k_proj": ("txt_attn.qkv", "k"),
        "attn.add_v_proj": ("txt_attn.qkv", "v"),
        "attn.to_out.0": ("img_attn.proj", None),
        "attn.to_add_out": ("txt_attn.proj", None),
        "ff.linear_in": ("img_mlp.0", None),
        "ff.linear_out": ("img_mlp.2", None),
        "ff_context.linear_in": ("txt_mlp.0", None),
        "ff_context.linear_out": ("txt_mlp.2", None),
    },
    single={"attn.to_qkv_mlp_proj": ("linear1", None), "attn.to_out": ("linear2", None)},
    top={
        "x_embedder": ("img_in", None),
        "context_embedder": ("txt_in", None),
        "norm_out.linear": ("final_layer.adaLN_modulation.1", None),
        "proj_out": ("final_layer.linear", None),
    },
)
