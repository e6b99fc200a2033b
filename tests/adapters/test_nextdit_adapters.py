"""Adapters on NextDiT (Z-Image, Lumina 2): every exported style is consumed whole by ComfyUI's load math for the
family and patches the weights as trained (fp32: rtol 1e-5, atol 1e-6); the diffusers/PEFT export cuts the fused
qkv into to_q/to_k/to_v; and Z-Image LoRAs in the names the community trains (diffusers/PEFT `transformer.`,
ai-toolkit `diffusion_model.`, LyCORIS, bare; musubi-tuner's `lora_unet_` spelling of them) import fused back
into the stacked layout."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxlora.adapters.attach import attach_adapters, attach_imported
from jaxlora.adapters.formats import AdapterFileError, export_adapter, import_adapter
from jaxlora.models.demo import random_tensors
from jaxlora.models.diffusion import load_model
from jaxlora.models.nextdit_family import TINY_LUMINA2, TINY_Z_IMAGE
from tests.adapters import comfy_loader
from tests.adapters.conftest import effective_state_dict, randomize_adapters

CONFIGS = {"z-image": TINY_Z_IMAGE, "lumina2": TINY_LUMINA2}


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
    return comfy_loader.apply_file(base, tensors, comfy_loader.lumina2_key_map(base))


def assert_same_weights(patched, expected):
    assert patched.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(patched[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)


CASES = [
    ("z-image", "LoRA", "comfyui"),
    ("z-image", "LoRA", "kohya"),
    ("z-image", "LoRA", "peft"),
    ("lumina2", "LoRA", "comfyui"),
    ("lumina2", "LoRA", "kohya"),
    # The other algorithms' math and stacking are covered in CI by the UNet and Flux export tests.
    *(pytest.param("z-image", a, "comfyui", marks=pytest.mark.slow) for a in ("LoHa", "LoKr", "OFT")),
    *(pytest.param("lumina2", a, "kohya", marks=pytest.mark.slow) for a in ("LoHa", "LoKr", "OFT")),
]


@pytest.mark.parametrize(("name", "algorithm", "style"), CASES)
def test_every_exported_style_loads_whole_in_comfyui_and_patches_as_trained(files, name, algorithm, style):
    model, base = adapted(files, name, algorithm)
    tensors = export_adapter(model, style, jnp.float32)
    assert not any("pad_token" in key for key in tensors)  # raw parameters are not trained
    assert any(".diff" in key and ("q_norm" in key or "norm_q" in key) for key in tensors)  # norm scales are
    patched, not_loaded = comfyui_patched(base, tensors)
    assert not_loaded == []
    assert_same_weights(patched, effective_state_dict(model.network))


def test_peft_export_writes_z_image_names_with_qkv_cut_in_three(files):
    model, _ = adapted(files, "z-image", "LoRA")
    peft = export_adapter(model, "peft", jnp.float32)
    for name in (
        "layers.1.attention.to_q",
        "layers.1.attention.to_v",
        "context_refiner.0.attention.to_k",
        "noise_refiner.0.attention.to_out.0",
        "all_x_embedder.2-1",
        "all_final_layer.2-1.adaLN_modulation.1",
    ):
        assert f"transformer.{name}.lora_B.weight" in peft
    dim = TINY_Z_IMAGE.dim
    assert peft["transformer.layers.0.attention.to_k.lora_B.weight"].shape == (dim, 4)


def test_lumina2_peft_export_is_refused_naming_the_fused_qkv(files):
    """ComfyUI's map cuts qkv into three slices of the model width: wrong for Lumina 2's 8 shared kv heads."""
    model, _ = adapted(files, "lumina2", "LoRA")
    with pytest.raises(AdapterFileError, match=r"attention\.qkv"):
        export_adapter(model, "peft", jnp.float32)


def community_spellings(peft: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The diffusers/PEFT file as other Z-Image trainers write it: ai-toolkit's `diffusion_model.<diffusers name>`
    for layer 0, LyCORIS-flattened for layer 1, bare names for the refiners; top-level layers stay PEFT's."""
    renamed = {}
    for key, value in peft.items():
        base = key.removeprefix("transformer.")
        if base.startswith("layers.0."):
            key = "diffusion_model." + base
        elif base.startswith("layers.1."):
            name, suffix = base.split(".lora_") if ".lora_" in base else base.rsplit(".", 1)
            key = "lycoris_" + name.replace(".", "_") + (f".lora_{suffix}" if ".lora_" in base else f".{suffix}")
        elif "refiner." in base:
            key = base
        renamed[key] = value
    return renamed


def musubi_spelling(peft: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """musubi-tuner's own Z-Image format: sd-scripts names of the diffusers modules, kohya suffixes."""
    suffixes = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight", ".diff_b": ".diff_b"}
    suffixes[".diff"] = ".diff"
    renamed = {}
    for key, value in peft.items():
        base, suffix = next((key[: -len(s)], new) for s, new in suffixes.items() if key.endswith(s))
        renamed["lora_unet_" + base.removeprefix("transformer.").replace(".", "_") + suffix] = value
    return renamed


def test_musubi_tuner_z_image_loras_import_with_qkv_pieces_fused(files):
    model, _ = adapted(files, "z-image", "LoRA")
    musubi = musubi_spelling(export_adapter(model, "peft", jnp.float32))
    assert "lora_unet_layers_0_attention_to_k.lora_down.weight" in musubi
    assert "lora_unet_layers_0_attention_to_out_0.lora_up.weight" in musubi
    fresh = load_model(files["z-image"][0], dtype="fp32")
    attach_imported(fresh.network, import_adapter(fresh, musubi, jnp.float32))
    assert_same_weights(effective_state_dict(fresh.network), effective_state_dict(model.network))


def test_community_z_image_loras_import_with_qkv_pieces_fused(files):
    model, base = adapted(files, "z-image", "LoRA")
    peft = export_adapter(model, "peft", jnp.float32)
    renamed = community_spellings(peft)
    assert "diffusion_model.layers.0.attention.to_q.lora_A.weight" in renamed
    assert "lycoris_layers_1_attention_to_v.lora_B.weight" in renamed
    patched, not_loaded = comfyui_patched(base, renamed)
    assert not_loaded == []
    fresh = load_model(files["z-image"][0], dtype="fp32")
    attach_imported(fresh.network, import_adapter(fresh, renamed, jnp.float32))
    assert_same_weights(effective_state_dict(fresh.network), effective_state_dict(model.network))
    assert_same_weights(patched, effective_state_dict(model.network))


def test_exported_file_restacks_on_import(files):
    model, _ = adapted(files, "lumina2", "LoKr")
    tensors = export_adapter(model, "comfyui", jnp.float32)
    fresh = load_model(files["lumina2"][0], dtype="fp32")
    attach_imported(fresh.network, import_adapter(fresh, tensors, jnp.float32))
    assert_same_weights(effective_state_dict(fresh.network), effective_state_dict(model.network))
