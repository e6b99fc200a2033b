"""Flux adapter files (the Flux name tables with jaxlora/adapters/row_slices.py): written in each style and read
back, through ComfyUI's load math (tests/adapters/comfy_loader.py). Numpy only; patched weights agree in fp32 to
rtol 1e-5, atol 1e-6."""

import numpy as np
import pytest

from jaxlora.adapters.formats import group_keys
from jaxlora.adapters.row_slices import layer_tensors, split_export
from jaxlora.models.family import STYLES
from jaxlora.models.flux_names import export_names, import_aliases
from tests.adapters import comfy_loader
from tests.models.flux_layer_shapes import (
    H,
    assert_same_weights,
    expected_weights,
    flux_layers,
    random_loras,
    state_dict,
)

# canonical tensor name -> the suffix ComfyUI's own files use
COMFYUI_SUFFIXES = {"up": "lora_up.weight", "down": "lora_down.weight", "alpha": "alpha", "diff_b": "diff_b"}


def style_parts(up, down, alpha, style):
    """One layer's LoRA tensors as `formats` builds them: PEFT carries no alpha, its scale is folded into lora_B."""
    if style == "peft":
        return {"lora_A.weight": down, "lora_B.weight": up * np.float32(alpha / down.shape[0])}
    return {"lora_up.weight": up, "lora_down.weight": down, "alpha": np.float32(alpha)}


def exported(layers, style, seed=2):
    loras = random_loras(layers)
    rng = np.random.default_rng(seed)
    bias_diffs = {path: 0.1 * rng.standard_normal(shape[0]).astype(np.float32) for path, shape in layers.items()}
    tensors = {}
    for path, (up, down, alpha) in loras.items():
        parts = style_parts(up, down, alpha, style) | {"diff_b": bias_diffs[path]}
        tensors.update(split_export(path, export_names(path, H, style), parts))
    return tensors, expected_weights(state_dict(layers), loras, bias_diffs)


def imported(layers, tensors):
    """Read a file as the importer does, and write each layer's tensors back under ComfyUI's own names."""
    aliases = import_aliases(layers, H)
    groups, unmatched = group_keys(tensors, aliases)
    assert unmatched == []
    per_layer = layer_tensors(groups, tensors, aliases, {path: shape[0] for path, shape in layers.items()})
    return {
        f"diffusion_model.{path}.{COMFYUI_SUFFIXES[name]}": value
        for path, f in per_layer.items()
        for name, value in f.tensors.items()
    }


def comfyui(layers, tensors):
    sd = state_dict(layers)
    return comfy_loader.apply_file(sd, tensors, comfy_loader.flux_key_map(sd))


@pytest.mark.parametrize("style", STYLES)
def test_export_in_each_style_patches_the_trained_weights_in_comfyui(style):
    layers = flux_layers()
    tensors, expected = exported(layers, style)
    if style == "peft":
        assert "transformer.single_transformer_blocks.1.proj_mlp.lora_B.weight" in tensors
        assert "diffusion_model.single_blocks.1.linear1.diff_b" in tensors
    patched, not_loaded = comfyui(layers, tensors)
    assert not_loaded == []
    assert_same_weights(patched, expected)


@pytest.mark.parametrize("style", STYLES)
def test_reading_an_export_back_gives_a_file_with_the_same_weights(style):
    layers = flux_layers()
    tensors, expected = exported(layers, style)
    canonical = imported(layers, tensors)
    assert all(key.startswith("diffusion_model.") for key in canonical)
    patched, not_loaded = comfyui(layers, canonical)
    assert not_loaded == []
    assert_same_weights(patched, expected)


def test_mixed_spellings_and_partial_slices_read_as_comfyui_applies_them():
    """A whole-weight LoRA beside slice pieces of the same weight, pieces of two ranks in four spellings, some
    slices absent, and the swapped final modulation."""
    layers = flux_layers()
    rng = np.random.default_rng(5)
    aliases = import_aliases(layers, H)
    tensors = {}
    for i, name in enumerate(
        [
            "diffusion_model.double_blocks.0.img_attn.qkv",
            "transformer.transformer_blocks.0.attn.to_v",
            "lycoris_transformer_blocks_1_attn_add_q_proj",
            "single_transformer_blocks.1.proj_mlp",
            "lora_transformer_single_transformer_blocks_1_attn_to_k",
            "lora_transformer_norm_out_linear",
            "lora_unet_single_blocks_0_linear2",
        ]
    ):
        target = aliases[name]
        rows = layers[target.path][0] if target.rows is None else target.rows[1] - target.rows[0]
        rank = 2 + i % 2
        tensors[f"{name}.lora_up.weight"] = rng.standard_normal((rows, rank)).astype(np.float32)
        tensors[f"{name}.lora_down.weight"] = rng.standard_normal((rank, layers[target.path][1])).astype(np.float32)
        tensors[f"{name}.alpha"] = np.float32(1.0 + i)
    patched_original, not_loaded = comfyui(layers, tensors)
    assert not_loaded == []
    patched, not_loaded = comfyui(layers, imported(layers, tensors))
    assert not_loaded == []
    assert_same_weights(patched, patched_original)


def test_a_bias_diff_under_a_slice_name_is_refused_with_its_key():
    layers = flux_layers()
    tensors, _ = exported(layers, "peft")
    tensors["transformer.transformer_blocks.0.attn.to_q.diff_b"] = np.zeros(H, np.float32)
    with pytest.raises(ValueError, match=r"^transformer\.transformer_blocks\.0\.attn\.to_q\.diff_b: .* no bias diff"):
        imported(layers, tensors)


def test_two_spellings_of_one_slice_are_refused():
    layers = flux_layers()
    tensors, _ = exported(layers, "peft")
    for factor in ("lora_A.weight", "lora_B.weight"):
        tensors[f"lycoris_transformer_blocks_0_attn_to_k.{factor}"] = tensors[
            f"transformer.transformer_blocks.0.attn.to_k.{factor}"
        ]
    with pytest.raises(ValueError, match=r"name the same rows of double_blocks\.0\.img_attn\.qkv") as error:
        imported(layers, tensors)
    assert {"lycoris_transformer_blocks_0_attn_to_k", "transformer.transformer_blocks.0.attn.to_k"} <= set(
        str(error.value).split(" ")
    )


def test_a_non_lora_adapter_cannot_be_cut_into_slices():
    with pytest.raises(ValueError, match=r"double_blocks\.0\.img_attn\.qkv: only a LoRA can be written"):
        path = "double_blocks.0.img_attn.qkv"
        split_export(path, export_names(path, H, "peft"), {"hada_w1_a": np.zeros((3 * H, 2))})
