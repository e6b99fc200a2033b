"""Adapters on Wan: every exported style (`comfyui`, `kohya` = musubi-tuner's names) is consumed whole by ComfyUI's
load math for WAN21/WAN22 and patches the weights as trained (fp32: rtol 1e-5, atol 1e-6), the 3-D patch
embedding included; `peft` is refused (ComfyUI maps no diffusers names for Wan); and the files the community
trains import: ai-toolkit (`diffusion_model.` with PEFT suffixes), Wan-Fun (`lora_unet__`, which ComfyUI's
`lora_convert` also loads), diffusers/PEFT `transformer.` names (renamed by diffusers' own single-file converter
here) and DiffSynth-Studio's bare paths."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxlora.adapters.attach import attach_adapters, attach_imported
from jaxlora.adapters.formats import AdapterFileError, export_adapter, import_adapter
from jaxlora.models.demo import random_tensors
from jaxlora.models.diffusion import load_model
from jaxlora.models.wan_family import TINY_WAN21, TINY_WAN22_TI2V
from tests.adapters import comfy_loader
from tests.adapters.conftest import effective_state_dict, randomize_adapters

CONFIGS = {"wan2.1": TINY_WAN21, "wan2.2-ti2v": TINY_WAN22_TI2V}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    paths = {}
    for name, config in CONFIGS.items():
        tensors = {f"diffusion_model.{k}": v for k, v in random_tensors(config, seed=5).items()}
        path = tmp_path_factory.mktemp(name) / "model.safetensors"
        save_file(tensors, str(path))
        paths[name] = (path, tensors)
    return paths


def adapted(files, name, algorithm, seed=0):
    path, base = files[name]
    model = load_model(path, dtype="fp32")
    attach_adapters(model.network, algorithm, rank=4, seed=seed, lora_dtype=jnp.float32)
    randomize_adapters(model.network, seed=seed)
    return model, base


def comfyui_patched(base, tensors):
    return comfy_loader.apply_file(base, comfy_loader.convert_lora(tensors), comfy_loader.wan_key_map(base))


def assert_same_weights(patched, expected):
    assert patched.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(patched[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)


def imported(files, name, tensors):
    fresh = load_model(files[name][0], dtype="fp32")
    attach_imported(fresh.network, import_adapter(fresh, tensors, jnp.float32))
    return effective_state_dict(fresh.network)


CASES = [
    ("wan2.1", "LoRA", "comfyui"),
    ("wan2.2-ti2v", "LoRA", "kohya"),
    *(pytest.param("wan2.1", a, "comfyui", marks=pytest.mark.slow) for a in ("LoHa", "LoKr", "OFT")),
    *(pytest.param("wan2.2-ti2v", a, "kohya", marks=pytest.mark.slow) for a in ("LoHa", "LoKr", "OFT")),
]


@pytest.mark.parametrize(("name", "algorithm", "style"), CASES)
def test_every_exported_style_loads_whole_in_comfyui_and_patches_as_trained(files, name, algorithm, style):
    model, base = adapted(files, name, algorithm)
    tensors = export_adapter(model, style, jnp.float32)
    assert not any("modulation" in key for key in tensors)  # the learned modulation tables are not trained
    patch = "diffusion_model.patch_embedding" if style == "comfyui" else "lora_unet_patch_embedding"
    assert any(key.startswith(patch + ".") for key in tensors)
    assert any(key.endswith("norm3.diff") for key in tensors)
    patched, not_loaded = comfyui_patched(base, tensors)
    assert not_loaded == []
    expected = effective_state_dict(model.network)
    assert_same_weights(patched, expected)
    assert_same_weights(imported(files, name, tensors), expected)


def test_peft_export_is_refused_because_comfyui_maps_no_diffusers_names(files):
    model, _ = adapted(files, "wan2.1", "LoRA")
    with pytest.raises(AdapterFileError, match=r"no 'peft' name ComfyUI loads.*blocks\.0"):
        export_adapter(model, "peft", jnp.float32)


def peft_suffixes(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A comfyui-style LoRA file with PEFT suffixes and alpha folded into lora_B (PEFT files carry no alpha):
    {base name: {suffix: tensor}} flattened back with `lora_A`/`lora_B`."""
    out = {}
    for key, value in tensors.items():
        if key.endswith(".alpha"):
            continue
        if key.endswith(".lora_up.weight"):
            base = key[: -len(".lora_up.weight")]
            rank = value.shape[1]
            out[base + ".lora_B.weight"] = value * (tensors[base + ".alpha"] / rank)
        elif key.endswith(".lora_down.weight"):
            out[key[: -len(".lora_down.weight")] + ".lora_A.weight"] = value
        else:
            out[key] = value
    return out


def diffusers_renames(paths) -> dict[str, str]:
    """ComfyUI path -> WanTransformer3DModel name, by diffusers' own single-file converter."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    converted = convert_wan_transformer_to_diffusers({f"{path}.weight": path for path in paths})
    return {path: name[: -len(".weight")] for name, path in converted.items()}


def test_diffusers_import_names_are_those_of_diffusers_converter(files):
    model, _ = adapted(files, "wan2.1", "LoRA")
    paths = list(model.adapter_names.exports["comfyui"])
    names = diffusers_renames(paths)
    assert names["blocks.0.norm3"] == "blocks.0.norm2"  # diffusers swaps the names of norm2 and norm3
    for path in paths:
        assert model.adapter_names.aliases[f"transformer.{names[path]}"].path == path


def renamed(tensors: dict[str, np.ndarray], rename) -> dict[str, np.ndarray]:
    out = {}
    for key, value in tensors.items():
        base, suffix = key.split(".lora_") if ".lora_" in key else key.rsplit(".", 1)
        suffix = f".lora_{suffix}" if ".lora_" in key else f".{suffix}"
        out[rename(base.removeprefix("diffusion_model.")) + suffix] = value
    return out


def test_community_wan_loras_import_and_the_comfyui_loadable_ones_load(files):
    model, base = adapted(files, "wan2.1", "LoRA")
    expected = effective_state_dict(model.network)
    comfy = export_adapter(model, "comfyui", jnp.float32)

    ai_toolkit = peft_suffixes(comfy)
    assert "diffusion_model.blocks.1.cross_attn.k.lora_A.weight" in ai_toolkit
    kohya = export_adapter(model, "kohya", jnp.float32)
    wan_fun = {k.replace("lora_unet_", "lora_unet__", 1): v for k, v in kohya.items()}
    assert "lora_unet__blocks_0_cross_attn_k.lora_down.weight" in wan_fun
    for tensors in (ai_toolkit, wan_fun):
        patched, not_loaded = comfyui_patched(base, tensors)
        assert not_loaded == []
        assert_same_weights(patched, expected)
        assert_same_weights(imported(files, "wan2.1", tensors), expected)

    # Files ComfyUI does not load as they are (diffusers/PEFT, DiffSynth): LoRA pairs only (what those trainers
    # write); jaxlora imports them onto the same layers, and every other weight stays the base's.
    peft = peft_suffixes({k: v for k, v in comfy.items() if ".lora_" in k or k.endswith(".alpha")})
    paths = {k.split(".lora_")[0].removeprefix("diffusion_model.") for k in peft}
    names = diffusers_renames(paths)
    diffusers_file = renamed(peft, lambda path: "transformer." + names[path])
    assert "transformer.blocks.0.attn1.to_out.0.lora_B.weight" in diffusers_file
    assert "transformer.condition_embedder.time_proj.lora_A.weight" in diffusers_file
    # DiffSynth-Studio: the bare module paths, with PEFT's adapter name `default` in the suffix.
    diffsynth = {k.replace(".weight", ".default.weight"): v for k, v in renamed(peft, lambda path: path).items()}
    assert "blocks.1.ffn.2.lora_A.default.weight" in diffsynth
    adapted_weights = {f"diffusion_model.{path}.weight" for path in paths}
    for tensors in (diffusers_file, diffsynth):
        got = imported(files, "wan2.1", tensors)
        for key in expected:
            want = expected[key] if key in adapted_weights else base[key]
            np.testing.assert_allclose(got[key], want, rtol=1e-5, atol=1e-6, err_msg=key)
