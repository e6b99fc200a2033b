"""Exported adapter files, read by ComfyUI's load math (tests/adapters/comfy_loader.py): every key is consumed,
and the weights it patches equal the weights jaxlora trained with (fp32: rtol 1e-5, atol 1e-6), so the
denoiser output is the same (max error <= 1e-4 of the output scale)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.adapters.attach import attach_adapters, detach_adapters
from jaxlora.adapters.formats import AdapterFileError, export_adapter
from jaxlora.models.checkpoint import set_parameters
from tests.adapters import comfy_loader
from tests.adapters.conftest import effective_state_dict, randomize_adapters
from tests.models.tiny_unets import FAMILIES


def comfyui_patched(model, base, tensors, family):
    names = comfy_loader.diffusers_weight_names(base, FAMILIES[family].diffusers_config)
    key_map = comfy_loader.model_key_map(base, names)
    return comfy_loader.apply_file(base, tensors, key_map)


def assert_same_weights(patched, expected):
    assert patched.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(patched[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)


def adapted(tiny_model, family, algorithm, include=None):
    model, base = tiny_model(family)
    attach_adapters(model.network, algorithm, rank=4, seed=0, lora_dtype=jnp.float32, include=include)
    randomize_adapters(model.network)
    return model, base


@pytest.mark.parametrize("style", ["comfyui", "kohya"])
@pytest.mark.parametrize("algorithm", ["LoRA", "LoHa", "LoKr", "OFT"])
def test_every_key_loads_and_patches_the_trained_weights(tiny_model, algorithm, style):
    model, base = adapted(tiny_model, "sd1", algorithm)
    tensors = export_adapter(model, style, jnp.float32)
    patched, not_loaded = comfyui_patched(model, base, tensors, "sd1")
    assert not_loaded == []
    assert_same_weights(patched, effective_state_dict(model.network))


def test_kohya_sdxl_uses_ldm_names_and_loads(tiny_model):
    model, base = adapted(tiny_model, "sdxl", "LoRA")
    tensors = export_adapter(model, "kohya", jnp.float32)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    patched, not_loaded = comfyui_patched(model, base, tensors, "sdxl")
    assert not_loaded == []
    assert_same_weights(patched, effective_state_dict(model.network))


def test_kohya_sd1_uses_diffusers_names_with_4d_conv_factors(tiny_model):
    model, _ = adapted(tiny_model, "sd1", "LoRA")
    tensors = export_adapter(model, "kohya", jnp.float32)
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (4, 32, 3, 3)
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (32, 4, 1, 1)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha" in tensors


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_peft_style_names_every_layer_and_loads(tiny_model, family):
    """Attention projections go under the attention-processor spelling, the one diffusers spelling of them that
    ComfyUI maps (`unet.<...>.attn1.processor.to_q`, `...processor.to_out`); every other layer under its diffusers
    name."""
    model, base = adapted(tiny_model, family, "LoRA")
    tensors = export_adapter(model, "peft", jnp.float32)
    assert "unet.down_blocks.0.resnets.0.conv1.lora_A.weight" in tensors
    attention = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"
    assert f"{attention}.to_q.lora_B.weight" in tensors and f"{attention}.to_out.lora_A.weight" in tensors
    assert not any(key.endswith(".alpha") for key in tensors)
    patched, not_loaded = comfyui_patched(model, base, tensors, family)
    assert not_loaded == []
    assert_same_weights(patched, effective_state_dict(model.network))


def test_peft_style_refuses_other_algorithms_by_layer(tiny_model):
    model, _ = adapted(tiny_model, "sd1", "LoHa")
    with pytest.raises(AdapterFileError, match=r"no 'peft' name .*input_blocks\.1\.0\.in_layers\.2"):
        export_adapter(model, "peft", jnp.float32)


@pytest.mark.parametrize("algorithm", ["LoRA", "OFT"])
def test_comfyui_patched_model_gives_the_adapted_output(tiny_model, algorithm):
    model, base = adapted(tiny_model, "sd1", algorithm)
    tensors = export_adapter(model, "comfyui", jnp.float32)
    patched, _ = comfyui_patched(model, base, tensors, "sd1")
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 8, 8, 4)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((1, 6, 768)), jnp.float32)
    t = jnp.array([400.0])
    adapted_out = np.asarray(model.network(x, t, context))
    detach_adapters(model.network)
    set_parameters(model.network, patched, jnp.float32, "diffusion_model.")
    comfy_out = np.asarray(model.network(x, t, context))
    assert np.abs(adapted_out - comfy_out).max() <= 1e-4 * np.abs(comfy_out).max()


@pytest.mark.parametrize("algorithm", ["LoRA", "LoKr"])
def test_bf16_file_loads_to_the_weights_trained_with_bf16_adapters(tiny_model, algorithm):
    """lora_dtype bf16: the adapter computes with its bf16-rounded tensors, exactly what the file stores, and the
    frozen norm scales and biases are not rounded (ComfyUI's trainer rounds them, its loader does not)."""
    model, base = tiny_model("sd1")
    attach_adapters(model.network, algorithm, rank=4, seed=0, lora_dtype=jnp.bfloat16)
    randomize_adapters(model.network)
    tensors = export_adapter(model, "comfyui", jnp.bfloat16)
    patched, not_loaded = comfyui_patched(model, base, tensors, "sd1")
    assert not_loaded == []
    assert_same_weights(patched, effective_state_dict(model.network))
