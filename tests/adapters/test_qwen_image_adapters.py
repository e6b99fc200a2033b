"""Adapters on Qwen-Image: every exported style (comfyui, kohya, peft) loads whole in ComfyUI's load math (its
QwenImage key map) and patches the weights as trained (fp32: rtol 1e-5, atol 1e-6); files in the styles the
community trains import back to the same weights: ai-toolkit (`diffusion_model.` with lora_A/lora_B), musubi-tuner
(kohya's `lora_unet_` names), diffusers PEFT (`transformer.`), DiffSynth (bare names with PEFT's `.default`
adapter), SimpleTuner LyCORIS (`lycoris_`)."""

from __future__ import annotations

import re

import jax.numpy as jnp
import pytest
from safetensors.numpy import save_file

from jaxlora.adapters.attach import attach_imported
from jaxlora.adapters.formats import export_adapter, import_adapter
from jaxlora.models.demo import random_tensors
from jaxlora.models.diffusion import load_model
from jaxlora.models.qwen_image_family import TINY_QWEN_IMAGE
from tests.adapters import comfy_loader
from tests.adapters.conftest import effective_state_dict
from tests.adapters.test_flux_adapters import adapted, assert_same_weights


@pytest.fixture(scope="module")
def qwen_file(tmp_path_factory):
    tensors = {f"diffusion_model.{k}": v for k, v in random_tensors(TINY_QWEN_IMAGE, seed=5).items()}
    path = tmp_path_factory.mktemp("qwen") / "qwen.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def comfyui_patched(base, tensors):
    return comfy_loader.apply_file(base, tensors, comfy_loader.qwen_image_key_map(base))


@pytest.fixture(scope="module")
def lora(qwen_file):
    """(model with random LoRAs on every layer, base tensors, its export in each style)."""
    model, base = adapted(qwen_file, "LoRA")
    return model, base, {style: export_adapter(model, style, jnp.float32) for style in ("comfyui", "kohya", "peft")}


EXPORTED_BLOCK = {
    "comfyui": "diffusion_model.transformer_blocks.1.attn.add_v_proj",
    "kohya": "lora_unet_transformer_blocks_1_img_mlp_net_0_proj",
    "peft": "transformer.transformer_blocks.0.attn.to_out.0",
}


@pytest.mark.parametrize("style", ["comfyui", "kohya", "peft"])
def test_every_layer_exports_a_lora_comfyui_loads_whole_and_applies_as_trained(lora, style):
    model, base, exported = lora
    tensors = exported[style]
    assert any(key.startswith(EXPORTED_BLOCK[style] + ".") for key in tensors)
    patched, not_loaded = comfyui_patched(base, tensors)
    assert not_loaded == []
    assert_same_weights(patched, effective_state_dict(model.network))


# The peft style writes LoRA only (its refusal of the others is the generic code's, tested there); these run the
# same generic export over the same names as LoRA, so they are in the `slow` set.
@pytest.mark.slow
@pytest.mark.parametrize("style", ["comfyui", "kohya"])
@pytest.mark.parametrize("algorithm", ["LoHa", "LoKr", "OFT"])
def test_every_layer_exports_in_a_style_comfyui_loads_whole_and_applies_as_trained(qwen_file, algorithm, style):
    model, base = adapted(qwen_file, algorithm)
    tensors = export_adapter(model, style, jnp.float32)
    assert any(key.startswith(EXPORTED_BLOCK[style] + ".") for key in tensors)
    patched, not_loaded = comfyui_patched(base, tensors)
    assert not_loaded == []
    assert_same_weights(patched, effective_state_dict(model.network))


SUFFIX = r"(.*?)(\.lora_[AB]\.weight|\.lora_(?:up|down)\.weight|\.alpha|\.diff|\.diff_b)"


def community_styles(comfyui: dict, kohya: dict, peft: dict) -> dict[str, dict]:
    """The same LoRA as each trainer writes it for Qwen-Image."""
    renames = {".lora_up.weight": ".lora_B.weight", ".lora_down.weight": ".lora_A.weight"}

    def respell(tensors, base_of, suffixes):
        out = {}
        for key, value in tensors.items():
            base, suffix = re.fullmatch(SUFFIX, key).groups()
            out[base_of(base) + suffixes.get(suffix, suffix)] = value
        return out

    strip = lambda base: base.removeprefix("transformer.")  # noqa: E731
    return {
        "ai-toolkit": respell(comfyui, lambda b: b, renames),
        "musubi-tuner": kohya,
        "diffusers": peft,
        "diffsynth": respell(
            peft, strip, {".lora_A.weight": ".lora_A.default.weight", ".lora_B.weight": ".lora_B.default.weight"}
        ),
        "lycoris": respell(peft, lambda b: "lycoris_" + strip(b).replace(".", "_"), {}),
    }


@pytest.mark.parametrize("style", ["ai-toolkit", "musubi-tuner", "diffusers", "diffsynth", "lycoris"])
def test_community_files_import_to_the_trained_weights(qwen_file, lora, style):
    model, base, exported = lora
    tensors = community_styles(exported["comfyui"], exported["kohya"], exported["peft"])[style]
    patched, not_loaded = comfyui_patched(base, tensors)
    assert not_loaded == []
    fresh = load_model(qwen_file[0], dtype="fp32")
    attach_imported(fresh.network, import_adapter(fresh, tensors, jnp.float32))
    expected = effective_state_dict(model.network)
    assert_same_weights(effective_state_dict(fresh.network), expected)
    assert_same_weights(patched, expected)
