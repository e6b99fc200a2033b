"""ComfyUI's LoRA loading, re-implemented in numpy from the spec (sections 4 and 8.2-8.3, load side), as the
oracle for exported files: which keys it consumes, and how it patches the model's weights.

Independent of jaxlora's key tables: the model's keys come from its torch-layout state dict, and the
diffusers names from diffusers' own single-file converter.
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


def load_lora(lora: dict[str, np.ndarray], key_map: dict[str, str]):
    """`load_lora`: (patches {model key: [(kind, tensors)]}, consumed keys)."""
    patches, loaded = {}, set()

    def take(key):
        loaded.add(key)
        return np.asarray(lora[key], np.float32)

    for x, model_key in key_map.items():
        alpha = take(f"{x}.alpha").item() if f"{x}.alpha" in lora else None
        dora = take(f"{x}.dora_scale") if f"{x}.dora_scale" in lora else None
        for up_suffix, down_suffix in LORA_FORMS:
            if x + up_suffix in lora:
                mid = take(f"{x}.lora_mid.weight") if f"{x}.lora_mid.weight" in lora else None
                patches.setdefault(model_key, []).append(
                    ("lora", (take(x + up_suffix), take(x + down_suffix), alpha, mid, dora))
                )
        if f"{x}.hada_w1_a" in lora:
            t1 = take(f"{x}.hada_t1") if f"{x}.hada_t1" in lora else None
            t2 = take(f"{x}.hada_t2") if f"{x}.hada_t2" in lora else None
            factors = [take(f"{x}.hada_w{i}_{p}") for i in (1, 2) for p in ("a", "b")]
            patches.setdefault(model_key, []).append(("loha", (*factors, alpha, t1, t2, dora)))
        lokr_names = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        if any(f"{x}.{n}" in lora for n in lokr_names):
            factors = {n: take(f"{x}.{n}") for n in lokr_names if f"{x}.{n}" in lora}
            patches.setdefault(model_key, []).append(("lokr", (factors, alpha, dora)))
        if f"{x}.oft_blocks" in lora:
            rescale = take(f"{x}.rescale") if f"{x}.rescale" in lora else None  # loaded, ignored by the math
            patches.setdefault(model_key, []).append(("oft", (take(f"{x}.oft_blocks"), alpha, rescale, dora)))
        for suffix, target in ((".w_norm", None), (".b_norm", "bias"), (".diff", None), (".diff_b", "bias")):
            if x + suffix in lora:
                key = model_key if target is None else model_key[: -len(".weight")] + ".bias"
                patches.setdefault(key, []).append(("diff", take(x + suffix)))
    return patches, loaded


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


def _add(weight, diff, scale, dora, strength):
    if dora is None:
        return weight + strength * scale * diff
    return weight_decompose(dora, weight, diff, scale, strength)


def calculate_weight(weight: np.ndarray, patches, strength: float = 1.0) -> np.ndarray:
    """Apply a key's patches in order, in float32 (ComfyUI's intermediate dtype)."""
    weight = weight.astype(np.float32).copy()
    for kind, data in patches:
        if kind == "diff":
            assert data.shape == weight.shape, f"diff shape {data.shape} vs {weight.shape}"
            weight += strength * data
        elif kind == "lora":
            up, down, alpha, mid, dora = data
            scale = alpha / down.shape[0] if alpha is not None else 1.0
            if mid is not None:
                final = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
                down = (_flat(down).T @ _flat(np.swapaxes(mid, 0, 1))).reshape(final).swapaxes(0, 1)
            weight = _add(weight, (_flat(up) @ _flat(down)).reshape(weight.shape), scale, dora, strength)
        elif kind == "loha":
            w1a, w1b, w2a, w2b, alpha, t1, t2, dora = data
            scale = alpha / w1b.shape[0] if alpha is not None else 1.0
            if t1 is not None:
                m1 = np.einsum("ijkl,jr,ip->prkl", t1, w1b, w1a)
                m2 = np.einsum("ijkl,jr,ip->prkl", t2, w2b, w2a)
            else:
                m1, m2 = w1a @ w1b, w2a @ w2b
            weight = _add(weight, (m1 * m2).reshape(weight.shape), scale, dora, strength)
        elif kind == "lokr":
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
            weight = _add(weight, np.kron(w1, w2).reshape(weight.shape), scale, dora, strength)
        elif kind == "oft":
            blocks, alpha, _rescale, dora = data
            block_num, block_size = blocks.shape[:2]
            rotation = _cayley(blocks, alpha)
            m = strength * rotation - strength * np.eye(block_size)
            w = weight.reshape(block_num, block_size, -1)
            delta = np.einsum("knm,kn...->km...", m, w).reshape(weight.shape)
            weight += strength * delta
        else:
            raise AssertionError(kind)
    return weight


def apply_file(state_dict: dict[str, np.ndarray], lora: dict[str, np.ndarray], key_map: dict[str, str]):
    """(patched state dict, keys of the file ComfyUI would report as "lora key not loaded")."""
    patches, loaded = load_lora(lora, key_map)
    patched = {k: calculate_weight(v, patches[k]) if k in patches else v for k, v in state_dict.items()}
    return patched, sorted(set(lora) - loaded)
