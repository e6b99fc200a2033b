"""Adapters on Flux.2: every exported style loads whole in ComfyUI's load math (its Flux key map, which ComfyUI
uses for Flux.2 too) and patches the weights as trained (fp32: rtol 1e-5, atol 1e-6); the `peft` style writes
diffusers Flux2Transformer2DModel names (q/k/v as row slices of the fused qkv) and refuses the layers those
names cannot reach in ComfyUI; files in the community's styles import back to the same weights."""

from __future__ import annotations

import re

import jax.numpy as jnp
import pytest
from safetensors.numpy import save_file

from jaxlora.adapters.attach import attach_imported
from jaxlora.adapters.formats import AdapterFileError, export_adapter, import_adapter
from jaxlora.models.demo import random_tensors
from jaxlora.models.diffusion import load_model
from jaxlora.models.flux2_family import TINY_FLUX2_DEV
from tests.adapters.conftest import effective_state_dict
from tests.adapters.test_flux_adapters import adapted, assert_same_weights, comfyui_patched

# Layers whose diffusers Flux.2 names ComfyUI does not map: shared modulations and the time/guidance embedders.
NO_PEFT_NAME = re.compile(r"^(double_stream_modulation_(img|txt)|single_stream_modulation|time_in|guidance_in)\.")


@pytest.fixture(scope="module")
def flux2_file(tmp_path_factory):
    tensors = {f"diffusion_model.{k}": v for k, v in random_tensors(TINY_FLUX2_DEV, seed=5).items()}
    path = tmp_path_factory.mktemp("flux2") / "flux2.safetensors"
    save_file(tensors, str(path))
    return path, tensors


@pytest.mark.parametrize("style", ["comfyui", "kohya"])
@pytest.mark.parametrize("algorithm", ["LoRA", "LoHa", "LoKr", "OFT"])
def test_every_layer_exports_in_a_style_comfyui_loads_whole_and_applies_as_trained(flux2_file, algorithm, style):
    model, base = adapted(flux2_file, algorithm)
    tensors = export_adapter(model, style, jnp.float32)
    shared = {
        "comfyui": "diffusion_model.double_stream_modulation_img.lin",
        "kohya": "lora_unet_single_stream_modulation_lin",
    }
    assert any(key.startswith(shared[style] + ".") for key in tensors)
    patched, not_loaded = comfyui_patched(base, tensors)
    assert not_loaded == []
    assert_same_weights(patched, effective_state_dict(model.network))


def test_peft_export_writes_diffusers_flux2_names_that_comfyui_loads_whole(flux2_file):
    model, base = adapted(flux2_file, "LoRA", include=lambda path: not NO_PEFT_NAME.match(path))
    peft = export_adapter(model, "peft", jnp.float32)
    for piece in (
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.1.attn.add_v_proj",
        "transformer_blocks.1.ff.linear_in",
        "transformer_blocks.0.ff_context.linear_out",
        "single_transformer_blocks.1.attn.to_qkv_mlp_proj",
        "single_transformer_blocks.0.attn.to_out",
        "x_embedder",
        "context_embedder",
        "norm_out.linear",
        "proj_out",
    ):
        assert f"transformer.{piece}.lora_B.weight" in peft
    assert not any("proj_mlp" in key or "ff.net" in key for key in peft)  # Flux.1's names, not Flux.2's
    patched, not_loaded = comfyui_patched(base, peft)
    assert not_loaded == []
    assert_same_weights(patched, effective_state_dict(model.network))


def test_peft_refuses_layers_comfyui_cannot_load_under_a_diffusers_name(flux2_file):
    model, _ = adapted(flux2_file, "LoRA")
    with pytest.raises(AdapterFileError, match=r"double_stream_modulation_img\.lin|time_in|guidance_in"):
        export_adapter(model, "peft", jnp.float32)


def community_styles(comfyui: dict, peft: dict) -> dict[str, dict]:
    """The same adapter as the trainers the community uses for Flux.2 write it: ai-toolkit (BFL paths under
    `diffusion_model.`, PEFT's lora_A/lora_B), diffusers PEFT (`transformer.` names), DiffSynth (bare diffusers
    names), OneTrainer (`lora_transformer_`), LyCORIS (`lycoris_`)."""
    renames = {".lora_up.weight": ".lora_B.weight", ".lora_down.weight": ".lora_A.weight"}
    ai_toolkit = {}
    for key, value in comfyui.items():
        suffix = next((s for s in renames if key.endswith(s)), None)
        ai_toolkit[key if suffix is None else key.removesuffix(suffix) + renames[suffix]] = value
    spellings = {
        "diffsynth": lambda base: base,
        "onetrainer": lambda base: "lora_transformer_" + base.replace(".", "_"),
        "lycoris": lambda base: "lycoris_" + base.replace(".", "_"),
    }
    styles = {"ai-toolkit": ai_toolkit, "diffusers": peft}
    for name, spell in spellings.items():
        styles[name] = {}
        for key, value in peft.items():
            base, suffix = re.fullmatch(r"transformer\.(.*?)(\.lora_[AB]\.weight|\.alpha)", key).groups()
            styles[name][spell(base) + suffix] = value
    return styles


@pytest.mark.parametrize("style", ["ai-toolkit", "diffusers", "diffsynth", "onetrainer", "lycoris"])
def test_community_files_import_to_the_trained_weights(flux2_file, style):
    model, base = adapted(flux2_file, "LoRA", include=lambda path: not NO_PEFT_NAME.match(path))
    file = community_styles(export_adapter(model, "comfyui", jnp.float32), export_adapter(model, "peft", jnp.float32))
    tensors = file[style]
    patched, not_loaded = comfyui_patched(base, tensors)
    assert not_loaded == []
    fresh = load_model(flux2_file[0], dtype="fp32")
    attach_imported(fresh.network, import_adapter(fresh, tensors, jnp.float32))
    expected = effective_state_dict(model.network)
    assert_same_weights(effective_state_dict(fresh.network), expected)
    assert_same_weights(patched, expected)
