"""ComfyUI's LoRA loading, re-implemented in numpy from the spec (sections 4 and 8.2-8.4, load side) and ComfyUI's
source (`comfy/lora.py` load_lora and calculate_weight, `comfy/utils.py` flux_to_diffusers and
z_image_to_diffusers, ModelPatcher add_patches), as the oracle for exported files: which keys it consumes, and how
it patches the model's weights.

Independent of jaxlora's key tables: the model's keys come from its torch-layout state dict, the UNet's
diffusers names from diffusers' own single-file converter, and Flux's and NextDiT's diffusers names from
transcriptions of ComfyUI's `flux_to_diffusers` and `z_image_to_diffusers` below; QwenImage's extra names from
its branch of `model_lora_keys_unet`.
"""

from __future__ import annotations

import numpy as np
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

LORA_FORMS = [
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_B", ".lora_A"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
]


def diffusers_weight_names(state_dict: dict[str, np.ndarray], diffusers_config: dict) -> dict[str, str]:
    """diffusers weight key -> ldm model key, recovered by tagging every tensor with its index."""
    keys = sorted(state_dict)
    tagged = {"model." + k: np.full((1,) * state_dict[k].ndim, i, np.float32) for i, k in enumerate(keys)}
    converted = convert_ldm_unet_checkpoint(
        {k: _torch(v) for k, v in tagged.items()}, {**diffusers_config, "_class_name": "UNet2DConditionModel"}
    )
    return {name: keys[int(value.flatten()[0])] for name, value in converted.items()}


def _torch(array):
    import torch

    return torch.from_numpy(array)


def model_key_map(state_dict: dict[str, np.ndarray], diffusers_names: dict[str, str]) -> dict[str, str]:
    """`model_lora_keys_unet`: LoRA base name -> model key (spec 8.3)."""
    key_map = {}
    for k in state_dict:
        if k.endswith(".weight"):
            key_map["lora_unet_" + k[len("diffusion_model.") : -len(".weight")].replace(".", "_")] = k
            key_map[k[: -len(".weight")]] = k
        else:
            key_map[k] = k
    for name, ldm_key in diffusers_names.items():
        if not name.endswith(".weight"):
            continue
        base = name[: -len(".weight")]
        key_map["lora_unet_" + base.replace(".", "_")] = ldm_key
        key_map["lycoris_" + base.replace(".", "_")] = ldm_key
        for prefix in ("", "unet."):
            processor = prefix + base.replace(".to_", ".processor.to_")
            if processor.endswith(".to_out.0"):
                processor = processor[:-2]
            key_map[processor] = ldm_key
    return key_map


def _swap_scale_shift(weight):
    shift, scale = np.split(weight, 2, axis=0)
    return np.concatenate([scale, shift], axis=0)


def flux_to_diffusers(hidden_size: int, depth: int, depth_single: int, prefix: str = "diffusion_model."):
    """`comfy/utils.py` flux_to_diffusers: diffusers key -> model key, or (model key, (dim, start, length)) for a
    row slice, or (model key, None, function) for the swapped final modulation."""
    h = hidden_size
    key_map = {}
    for i in range(depth):
        d, b = f"transformer_blocks.{i}.", f"{prefix}double_blocks.{i}."
        for end in ("weight", "bias"):
            for names, fused in (
                (("to_q", "to_k", "to_v"), "img"),
                (("add_q_proj", "add_k_proj", "add_v_proj"), "txt"),
            ):
                for j, name in enumerate(names):
                    key_map[f"{d}attn.{name}.{end}"] = (f"{b}{fused}_attn.qkv.{end}", (0, j * h, h))
        block = {
            "attn.to_out.0": "img_attn.proj",
            "norm1.linear": "img_mod.lin",
            "norm1_context.linear": "txt_mod.lin",
            "attn.to_add_out": "txt_attn.proj",
            "ff.net.0.proj": "img_mlp.0",
            "ff.net.2": "img_mlp.2",
            "ff_context.net.0.proj": "txt_mlp.0",
            "ff_context.net.2": "txt_mlp.2",
            "ff.linear_in": "img_mlp.0",
            "ff.linear_out": "img_mlp.2",
            "ff_context.linear_in": "txt_mlp.0",
            "ff_context.linear_out": "txt_mlp.2",
        }
        for src, dst in block.items():
            for end in ("weight", "bias"):
                key_map[f"{d}{src}.{end}"] = f"{b}{dst}.{end}"
        for src, dst in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm")):
            key_map[f"{d}attn.{src}.weight"] = f"{b}{dst}.weight"
        for src, dst in (("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
            key_map[f"{d}attn.{src}.weight"] = f"{b}{dst}.weight"
    for i in range(depth_single):
        d, b = f"single_transformer_blocks.{i}.", f"{prefix}single_blocks.{i}."
        for end in ("weight", "bias"):
            for j, name in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
                key_map[f"{d}{name}.{end}"] = (f"{b}linear1.{end}", (0, j * h, h))
            key_map[f"{d}proj_mlp.{end}"] = (f"{b}linear1.{end}", (0, 3 * h, 4 * h))
            for src, dst in (("norm.linear", "modulation.lin"), ("proj_out", "linear2")):
                key_map[f"{d}{src}.{end}"] = f"{b}{dst}.{end}"
        key_map[f"{d}attn.norm_q.weight"] = f"{b}norm.query_norm.weight"
        key_map[f"{d}attn.norm_k.weight"] = f"{b}norm.key_norm.weight"
        key_map[f"{d}attn.to_qkv_mlp_proj.weight"] = f"{b}linear1.weight"
        key_map[f"{d}attn.to_out.weight"] = f"{b}linear2.weight"
    basic = {
        "proj_out": "final_layer.linear",
        "x_embedder": "img_in",
        "context_embedder": "txt_in",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "controlnet_x_embedder": "pos_embed_input",
    }
    for end in ("weight", "bias"):
        for src, dst in basic.items():
            key_map[f"{src}.{end}"] = f"{prefix}{dst}.{end}"
        key_map[f"norm_out.linear.{end}"] = (f"{prefix}final_layer.adaLN_modulation.1.{end}", None, _swap_scale_shift)
    return key_map


def add_weight_aliases(key_map: dict, diffusers: dict, spellings: tuple[str, ...]) -> None:
    """For each `.weight` key of a diffusers map, its base name in every spelling (`{}` the dotted base name,
    `{flat}` with underscores) -> the map's target."""
    for k, to in diffusers.items():
        if k.endswith(".weight"):
            base = k[: -len(".weight")]
            for spelling in spellings:
                key_map[spelling.format(base, flat=base.replace(".", "_"))] = to


def flux_key_map(state_dict: dict[str, np.ndarray]):
    """`model_lora_keys_unet` for a Flux model (spec 8.4): the generic names, the diffusers names in four
    spellings, and `linear1_qkv`. Hidden size and depths are read from the state dict, as ComfyUI detects them.

    Also Flux.2's: ComfyUI's `model_base.Flux2` is a `model_base.Flux`, so `comfy/lora.py` maps it through the same
    `flux_to_diffusers` (Flux.1's diffusers names; none for Flux.2's shared modulations or its
    `time_guidance_embed`; `proj_mlp` fixed at 4 x hidden rows)."""
    key_map = model_key_map(state_dict, {})
    blocks = {
        kind: {int(k.split(".")[2]) for k in state_dict if k.startswith(f"diffusion_model.{kind}.")}
        for kind in ("double_blocks", "single_blocks")
    }
    hidden_size = state_dict["diffusion_model.img_in.weight"].shape[0]
    diffusers = flux_to_diffusers(hidden_size, len(blocks["double_blocks"]), len(blocks["single_blocks"]))
    add_weight_aliases(key_map, diffusers, ("transformer.{}", "lycoris_{flat}", "lora_transformer_{flat}", "{}"))
    for k in state_dict:
        if k.endswith(".weight") and ".linear1." in k:
            key_map[k.replace(".linear1.weight", ".linear1_qkv")] = (k, (0, 0, hidden_size * 3))
    return key_map


def z_image_to_diffusers(dim: int, n_layers: int, n_refiners: int = 2, prefix: str = "diffusion_model."):
    """`comfy/utils.py` z_image_to_diffusers: Z-Image original/diffusers key -> model key, or (model key,
    (dim, start, length)) for a row slice of the fused qkv. ComfyUI's unet config has no refiner depth, so the
    function's default of 2 applies whatever the model has."""
    key_map = {}

    def block(src, dst):
        for end in ("weight", "bias"):
            for j, name in enumerate(("to_q", "to_k", "to_v")):
                key_map[f"{src}.attention.{name}.{end}"] = (f"{dst}.attention.qkv.{end}", (0, j * dim, dim))
        renamed = {
            "attention.norm_q.weight": "attention.q_norm.weight",
            "attention.norm_k.weight": "attention.k_norm.weight",
            "attention.to_out.0.weight": "attention.out.weight",
            "attention.to_out.0.bias": "attention.out.bias",
        }
        same = ["attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2"]
        same += ["feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
        renamed |= {f"{name}.weight": f"{name}.weight" for name in same}
        renamed |= {f"adaLN_modulation.0.{end}": f"adaLN_modulation.0.{end}" for end in ("weight", "bias")}
        for k, v in renamed.items():
            key_map[f"{src}.{k}"] = f"{dst}.{v}"

    for i in range(n_layers):
        block(f"layers.{i}", f"{prefix}layers.{i}")
    for i in range(n_refiners):
        block(f"context_refiner.{i}", f"{prefix}context_refiner.{i}")
        block(f"noise_refiner.{i}", f"{prefix}noise_refiner.{i}")
    basic = {
        "final_layer.linear": "all_final_layer.2-1.linear",
        "final_layer.adaLN_modulation.1": "all_final_layer.2-1.adaLN_modulation.1",
        "x_embedder": "all_x_embedder.2-1",
        "cap_embedder.1": "cap_embedder.1",
        "t_embedder.mlp.0": "t_embedder.mlp.0",
        "t_embedder.mlp.2": "t_embedder.mlp.2",
    }
    for model_name, name in basic.items():
        for end in ("weight", "bias"):
            key_map[f"{name}.{end}"] = f"{prefix}{model_name}.{end}"
    key_map["cap_embedder.0.weight"] = f"{prefix}cap_embedder.0.weight"
    for token in ("x_pad_token", "cap_pad_token"):
        key_map[token] = f"{prefix}{token}"
    return key_map


def lumina2_key_map(state_dict: dict[str, np.ndarray]):
    """`model_lora_keys_unet` for a Lumina2-class model (Lumina 2, Z-Image): the generic names, and each
    z_image_to_diffusers weight name as `diffusion_model.`, `transformer.`, `lycoris_` and bare. The width is the
    caption embedder's output and the depth the `layers.N` count, as ComfyUI detects them."""
    key_map = model_key_map(state_dict, {})
    dim = state_dict["diffusion_model.cap_embedder.1.weight"].shape[0]
    n_layers = len({k.split(".")[2] for k in state_dict if k.startswith("diffusion_model.layers.")})
    diffusers = z_image_to_diffusers(dim, n_layers)
    add_weight_aliases(key_map, diffusers, ("diffusion_model.{}", "transformer.{}", "lycoris_{flat}", "{}"))
    return key_map


def load_lora(lora: dict[str, np.ndarray], key_map: dict):
    """`load_lora`: (patches {target: (kind, tensors)}, consumed keys). A target is a model key or a tuple
    (model key, slice[, function]); a later patch for the same target replaces the earlier one."""
    patches, loaded = {}, set()

    def take(key):
        loaded.add(key)
        return np.asarray(lora[key], np.float32)

    for x, target in key_map.items():
        alpha = take(f"{x}.alpha").item() if f"{x}.alpha" in lora else None
        dora = take(f"{x}.dora_scale") if f"{x}.dora_scale" in lora else None
        for up_suffix, down_suffix in LORA_FORMS:
            if x + up_suffix in lora:
                mid = take(f"{x}.lora_mid.weight") if f"{x}.lora_mid.weight" in lora else None
                patches[target] = ("lora", (take(x + up_suffix), take(x + down_suffix), alpha, mid, dora))
        if f"{x}.hada_w1_a" in lora:
            t1 = take(f"{x}.hada_t1") if f"{x}.hada_t1" in lora else None
            t2 = take(f"{x}.hada_t2") if f"{x}.hada_t2" in lora else None
            factors = [take(f"{x}.hada_w{i}_{p}") for i in (1, 2) for p in ("a", "b")]
            patches[target] = ("loha", (*factors, alpha, t1, t2, dora))
        lokr_names = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        if any(f"{x}.{n}" in lora for n in lokr_names):
            factors = {n: take(f"{x}.{n}") for n in lokr_names if f"{x}.{n}" in lora}
            patches[target] = ("lokr", (factors, alpha, dora))
        if f"{x}.oft_blocks" in lora:
            rescale = take(f"{x}.rescale") if f"{x}.rescale" in lora else None  # loaded, ignored by the math
            patches[target] = ("oft", (take(f"{x}.oft_blocks"), alpha, rescale, dora))
        for suffix, is_bias in ((".w_norm", False), (".b_norm", True), (".diff", False), (".diff_b", True)):
            if x + suffix in lora:
                # ComfyUI formats `target[:-len(".weight")]`: for a tuple target that is "().bias", no model key.
                key = f"{target[: -len('.weight')]}.bias" if is_bias else target
                patches[key] = ("diff", take(x + suffix))
    return patches, loaded


def add_patches(patches: dict, state_dict: dict[str, np.ndarray]) -> dict[str, list]:
    """`ModelPatcher.add_patches`: {model key: [(kind, tensors, offset, function)]}; unknown keys are dropped."""
    per_key = {}
    for target, (kind, data) in patches.items():
        if isinstance(target, str):
            key, offset, function = target, None, None
        else:
            key, offset, function = target[0], target[1], target[2] if len(target) > 2 else None
        if key in state_dict:
            per_key.setdefault(key, []).append((kind, data, offset, function))
    return per_key


def _flat(x):
    return x.reshape(x.shape[0], -1)


def _cayley(blocks, constraint):
    q = blocks - np.swapaxes(blocks, 1, 2)
    if constraint is not None and constraint > 0:
        norm = np.linalg.norm(q) + 1e-8
        if norm > constraint:
            q = q * constraint / norm
    eye = np.eye(q.shape[-1])
    return np.stack([(eye + qk) @ np.linalg.inv(eye - qk) for qk in q])


def weight_decompose(dora_scale, weight, diff, scale, strength):
    """Spec 4.7: per-output norm of the original weight (quirk) or per-input norm of the patched weight."""
    patched = weight + scale * diff
    if dora_scale.shape[0] == weight.shape[0]:
        norm = np.linalg.norm(weight.reshape(weight.shape[0], -1), axis=1).reshape(-1, *[1] * (weight.ndim - 1))
    else:
        columns = np.swapaxes(patched, 0, 1).reshape(patched.shape[1], -1)
        norm = np.linalg.norm(columns, axis=1).reshape(1, -1, *[1] * (weight.ndim - 2))
    patched = patched * (dora_scale / (norm + np.finfo(np.float32).eps))
    return patched if strength == 1.0 else weight + strength * (patched - weight)


def _add(weight, diff, scale, dora, strength, function):
    if dora is None:
        return weight + function(strength * scale * diff)
    return weight_decompose(dora, weight, function(diff), scale, strength)


def _patch(weight: np.ndarray, kind: str, data, function, strength: float) -> np.ndarray:
    """One patch on `weight` (the whole weight, or the narrowed rows of a slice target)."""
    if kind == "diff":
        assert data.shape == weight.shape, f"diff shape {data.shape} vs {weight.shape}"
        return weight + function(strength * data)
    if kind == "lora":
        up, down, alpha, mid, dora = data
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        if mid is not None:
            final = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
            down = (_flat(down).T @ _flat(np.swapaxes(mid, 0, 1))).reshape(final).swapaxes(0, 1)
        return _add(weight, (_flat(up) @ _flat(down)).reshape(weight.shape), scale, dora, strength, function)
    if kind == "loha":
        w1a, w1b, w2a, w2b, alpha, t1, t2, dora = data
        scale = alpha / w1b.shape[0] if alpha is not None else 1.0
        if t1 is not None:
            m1 = np.einsum("ijkl,jr,ip->prkl", t1, w1b, w1a)
            m2 = np.einsum("ijkl,jr,ip->prkl", t2, w2b, w2a)
        else:
            m1, m2 = w1a @ w1b, w2a @ w2b
        return _add(weight, (m1 * m2).reshape(weight.shape), scale, dora, strength, function)
    if kind == "lokr":
        factors, alpha, dora = data
        dim = None
        w1 = factors.get("lokr_w1")
        if w1 is None:
            w1, dim = factors["lokr_w1_a"] @ factors["lokr_w1_b"], factors["lokr_w1_b"].shape[0]
        w2 = factors.get("lokr_w2")
        if w2 is None:
            dim = factors["lokr_w2_b"].shape[0]
            if "lokr_t2" in factors:
                w2 = np.einsum("ijkl,jr,ip->prkl", factors["lokr_t2"], factors["lokr_w2_b"], factors["lokr_w2_a"])
            else:
                w2 = factors["lokr_w2_a"] @ factors["lokr_w2_b"]
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        return _add(weight, np.kron(w1, w2).reshape(weight.shape), scale, dora, strength, function)
    if kind == "oft":
        blocks, alpha, _rescale, dora = data
        block_num, block_size = blocks.shape[:2]
        rotation = _cayley(blocks, alpha)
        m = strength * rotation - strength * np.eye(block_size)
        w = weight.reshape(block_num, block_size, -1)
        delta = np.einsum("knm,kn...->km...", m, w).reshape(weight.shape)
        return weight + function(strength * delta)
    raise AssertionError(kind)


def calculate_weight(weight: np.ndarray, patches, strength: float = 1.0) -> np.ndarray:
    """Apply a key's patches (kind, tensors, offset, function) in order, in float32 (ComfyUI's intermediate dtype).
    An offset (dim, start, length) narrows the weight to those rows, so the patch must have exactly their shape."""
    weight = weight.astype(np.float32).copy()
    for kind, data, offset, function in patches:
        index = ...
        if offset is not None:
            dim, start, length = offset
            index = (slice(None),) * dim + (slice(start, start + length),)
        weight[index] = _patch(weight[index], kind, data, function or (lambda a: a), strength)
    return weight


def apply_file(state_dict: dict[str, np.ndarray], lora: dict[str, np.ndarray], key_map: dict[str, str]):
    """(patched state dict, keys of the file ComfyUI would report as "lora key not loaded")."""
    patches, loaded = load_lora(lora, key_map)
    per_key = add_patches(patches, state_dict)
    patched = {k: calculate_weight(v, per_key[k]) if k in per_key else v for k, v in state_dict.items()}
    return patched, sorted(set(lora) - loaded)


def chroma_key_map(state_dict: dict[str, np.ndarray]):
    """`model_lora_keys_unet` for Chroma: ComfyUI's `model_base.Chroma` subclasses its `Flux`, so the Flux branch
    runs unchanged (`flux_to_diffusers` over the hidden size and depths that model detection reads from the file);
    the approximator (`distilled_guidance_layer`) has only the generic `diffusion_model.`/`lora_unet_` names."""
    return flux_key_map(state_dict)


def qwen_image_key_map(state_dict: dict[str, np.ndarray]):
    """`model_lora_keys_unet` for `model_base.QwenImage`: the generic names, and for every `diffusion_model.<k>.weight`
    its bare base name `<k>`, `transformer.<k>` and `lycoris_<k with _>` (`unet_to_diffusers` gives nothing for a
    model without `num_res_blocks`)."""
    key_map = model_key_map(state_dict, {})
    for k in state_dict:
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            base = k[len("diffusion_model.") : -len(".weight")]
            key_map[base] = k
            key_map[f"transformer.{base}"] = k
            key_map["lycoris_" + base.replace(".", "_")] = k
    return key_map


def wan_key_map(state_dict: dict[str, np.ndarray]):
    """`model_lora_keys_unet` for ComfyUI's WAN21/WAN22 models: `comfy/lora.py` has no Wan branch and
    `comfy.utils.unet_to_diffusers` maps nothing for a DiT config, so only the generic names remain."""
    return model_key_map(state_dict, {})


def convert_lora(lora: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`comfy/lora_convert.py` `convert_lora`, the Wan part: a Wan-Fun file (recognised by its
    `lora_unet__blocks_0_cross_attn_k.lora_down.weight`) has `lora_unet__` prefixes replaced by `lora_unet_`."""
    if "lora_unet__blocks_0_cross_attn_k.lora_down.weight" not in lora:
        return lora
    return {("lora_unet_" + k[len("lora_unet__") :] if k.startswith("lora_unet__") else k): v for k, v in lora.items()}
