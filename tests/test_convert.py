"""`convert/convert_lora.py`: style conversion that ComfyUI loads to the same weights, and clear refusals."""

import runpy
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

import jaxlora
from jaxlora.adapters.formats import export_adapter
from jaxlora.adapters.metadata import AdapterInfo
from tests.adapters import comfy_loader
from tests.adapters.conftest import randomize_adapters
from tests.models.tiny_unets import FAMILIES

convert = runpy.run_path(str(Path(__file__).parents[1] / "convert" / "convert_lora.py"))["main"]


def comfyui_weights(base, tensors):
    names = comfy_loader.diffusers_weight_names(base, FAMILIES["sd1"].diffusers_config)
    patched, not_loaded = comfy_loader.apply_file(base, tensors, comfy_loader.model_key_map(base, names))
    assert not_loaded == []
    return patched


def test_kohya_file_converts_to_comfyui_keys_that_load_to_the_same_weights(tiny_model, tiny_checkpoint, tmp_path):
    model, base = tiny_model("sd1")
    jaxlora.attach_adapters(model.network, "LoRA", rank=4, seed=0)
    randomize_adapters(model.network)
    info = AdapterInfo("sd1", "eps", "LoRA", 4, 1.0, "fp16", steps=40)
    source = jaxlora.save_lora(model, tmp_path / "kohya.safetensors", "kohya", "fp16", info)
    target = tmp_path / "comfy.safetensors"
    assert convert([str(source), str(target), "--model", str(tiny_checkpoint("sd1")), "--style", "comfyui"]) == 0
    converted = load_file(str(target))
    assert all(key.startswith("diffusion_model.") for key in converted)
    assert all(v.dtype == np.float16 for v in converted.values())  # the input's dtype is kept
    original, again = comfyui_weights(base, load_file(str(source))), comfyui_weights(base, converted)
    for key in original:
        np.testing.assert_array_equal(original[key], again[key], err_msg=key)
    reloaded, _ = tiny_model("sd1")
    assert jaxlora.load_lora(reloaded, target).metadata["steps"] == "40"


def test_keys_that_fit_no_layer_are_reported_and_nothing_is_written(tiny_model, tiny_checkpoint, tmp_path, capsys):
    model, _ = tiny_model("sd1")
    jaxlora.attach_adapters(model.network, "LoRA", rank=2, seed=0)
    tensors = export_adapter(model, "comfyui", jnp.float32)
    tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = np.zeros((4, 2), np.float32)
    source = tmp_path / "mixed.safetensors"
    save_file(tensors, str(source))
    target = tmp_path / "out.safetensors"
    assert convert([str(source), str(target), "--model", str(tiny_checkpoint("sd1")), "--style", "kohya"]) == 1
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight" in capsys.readouterr().err
    assert not target.exists()


def test_layers_peft_cannot_name_are_refused_by_name(tiny_model, tiny_checkpoint, tmp_path, capsys):
    """PEFT files hold LoRA only: a LoHa is refused with its layers named, and nothing is written."""
    model, _ = tiny_model("sd1")
    jaxlora.attach_adapters(model.network, "LoHa", rank=2, seed=0)
    source = jaxlora.save_lora(model, tmp_path / "a.safetensors")
    target = tmp_path / "peft.safetensors"
    assert convert([str(source), str(target), "--model", str(tiny_checkpoint("sd1")), "--style", "peft"]) == 1
    assert "input_blocks.0.0" in capsys.readouterr().err
    assert not target.exists()
