"""Importing adapter files in every key style ComfyUI's loader accepts: applied through jaxlora, each gives the
weights ComfyUI's load math gives (fp32, rtol 1e-5, atol 1e-6); keys that fit no layer are reported by name."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.adapters.attach import attach_adapters, attach_imported
from jaxlora.adapters.formats import AdapterFileError, export_adapter, import_adapter
from tests.adapters import comfy_loader
from tests.adapters.conftest import effective_state_dict, randomize_adapters
from tests.models.tiny_unets import FAMILIES

LINEAR = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"  # [32, 768]
CONV = "input_blocks.1.0.in_layers.2"  # [32, 32, 3, 3]
CONV_1X1 = "input_blocks.1.1.proj_in"  # [32, 32, 1, 1]
NORM = "input_blocks.1.0.in_layers.0"  # [32]
DIFFUSERS = {
    LINEAR: "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    CONV: "down_blocks.0.resnets.0.conv1",
    CONV_1X1: "down_blocks.0.attentions.0.proj_in",
    NORM: "down_blocks.0.resnets.0.norm1",
}


def rand(rng, *shape):
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)


def lora_file(rng, names: dict[str, str], up: str, down: str, alpha: bool = True) -> dict[str, np.ndarray]:
    """LoRA factors for the linear and the 3x3 conv, under the given base names and suffixes."""
    tensors = {}
    for path, shape in ((LINEAR, (32, 768)), (CONV, (32, 32, 3, 3))):
        base = names[path]
        tensors[base + up] = rand(rng, shape[0], 4)
        tensors[base + down] = rand(rng, 4, *shape[1:])
        if alpha:
            tensors[base + ".alpha"] = np.asarray(2.0, np.float32)
    return tensors


def underscored(prefix, names):
    return {path: prefix + name.replace(".", "_") for path, name in names.items()}


def processor(name):
    return name.replace(".to_", ".processor.to_")


GENERIC = {p: f"diffusion_model.{p}" for p in DIFFUSERS}
UNET_PROCESSOR = {p: f"unet.{processor(n)}" for p, n in DIFFUSERS.items()}
LORA = (".lora_up.weight", ".lora_down.weight")
# style -> (base names, up suffix, down suffix, with alpha)
STYLE_TABLE = {
    "comfyui": (GENERIC, *LORA, True),
    "kohya-ldm": (underscored("lora_unet_", {p: p for p in DIFFUSERS}), *LORA, True),
    "kohya-diffusers": (underscored("lora_unet_", DIFFUSERS), *LORA, True),
    "lycoris": (underscored("lycoris_", DIFFUSERS), *LORA, True),
    "peft": (UNET_PROCESSOR, ".lora_B.weight", ".lora_A.weight", False),
    "diffusers": (UNET_PROCESSOR, ".lora.up.weight", ".lora.down.weight", True),
    "attn-procs": ({p: processor(n) for p, n in DIFFUSERS.items()}, "_lora.up.weight", "_lora.down.weight", True),
    "lora_linear_layer": (UNET_PROCESSOR, ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", True),
    "peft-default": (GENERIC, ".lora_B.default.weight", ".lora_A.default.weight", True),
    "mochi": (GENERIC, ".lora_B", ".lora_A", True),
}


def lycoris_extras(rng) -> dict[str, np.ndarray]:
    """Tucker LoRA on a conv, Tucker LoHa, decomposed LoKr, full diffs, norm diffs (LyCORIS suffixes)."""
    g = lambda path: f"diffusion_model.{path}"  # noqa: E731
    return {
        g(CONV) + ".lora_up.weight": rand(rng, 32, 4, 1, 1),
        g(CONV) + ".lora_mid.weight": rand(rng, 4, 4, 3, 3),
        g(CONV) + ".lora_down.weight": rand(rng, 4, 32, 1, 1),
        g(CONV) + ".alpha": np.asarray(8.0, np.float32),
        **{g(CONV_1X1) + f".hada_w{i}_a": rand(rng, 2, 32) for i in (1, 2)},  # Tucker form: [r, out]
        **{g(CONV_1X1) + f".hada_w{i}_b": rand(rng, 2, 32) for i in (1, 2)},
        **{g(CONV_1X1) + f".hada_t{i}": rand(rng, 2, 2, 1, 1) for i in (1, 2)},
        g(CONV_1X1) + ".alpha": np.asarray(1.0, np.float32),
        g(LINEAR) + ".lokr_w1_a": rand(rng, 4, 2),
        g(LINEAR) + ".lokr_w1_b": rand(rng, 2, 8),
        g(LINEAR) + ".lokr_w2_a": rand(rng, 8, 3),
        g(LINEAR) + ".lokr_w2_b": rand(rng, 3, 96),
        g(LINEAR) + ".alpha": np.asarray(6.0, np.float32),
        g("input_blocks.2.0.in_layers.2") + ".diff": rand(rng, 32, 32, 3, 3),
        g(NORM) + ".w_norm": rand(rng, 32),
        g(NORM) + ".b_norm": rand(rng, 32),
        g("input_blocks.2.0.out_layers.3") + ".diff_b": rand(rng, 32),
        "lora_unet_input_blocks_2_0_out_layers_3.lokr_w1": rand(rng, 4, 4),
        "lora_unet_input_blocks_2_0_out_layers_3.lokr_w2_a": rand(rng, 2, 8),  # Tucker form: [r, out_k]
        "lora_unet_input_blocks_2_0_out_layers_3.lokr_t2": rand(rng, 2, 2, 3, 3),
        "lora_unet_input_blocks_2_0_out_layers_3.lokr_w2_b": rand(rng, 2, 8),
        "lora_unet_input_blocks_2_0_out_layers_3.alpha": np.asarray(4.0, np.float32),
    }


def comfyui_weights(base, tensors):
    names = comfy_loader.diffusers_weight_names(base, FAMILIES["sd1"].diffusers_config)
    patched, not_loaded = comfy_loader.apply_file(base, tensors, comfy_loader.model_key_map(base, names))
    assert not_loaded == []  # the file itself is one ComfyUI loads completely
    return patched


def jaxlora_weights(model, tensors):
    attach_imported(model.network, import_adapter(model, tensors, jnp.float32))
    return effective_state_dict(model.network)


def assert_same_weights(actual, expected):
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("style", list(STYLE_TABLE))
def test_lora_in_each_key_style_applies_as_in_comfyui(tiny_model, style):
    model, base = tiny_model("sd1")
    tensors = lora_file(np.random.default_rng(0), *STYLE_TABLE[style])
    assert_same_weights(jaxlora_weights(model, tensors), comfyui_weights(base, tensors))


def test_lycoris_tucker_decomposed_and_diff_forms_apply_as_in_comfyui(tiny_model):
    model, base = tiny_model("sd1")
    tensors = lycoris_extras(np.random.default_rng(0))
    assert_same_weights(jaxlora_weights(model, tensors), comfyui_weights(base, tensors))


def lokr_conv_with_flattened_kernel(rng) -> dict[str, np.ndarray]:
    """LoKr on the [32, 32, 3, 3] conv as ComfyUI's trainer wrote it up to Oct 2025 at rank 3: in*kh*kw = 288
    factorised as (3, 96), so lokr_w2 is 2-D [16, 96] and its columns cut across input channels (96 / 9 is not
    whole); the loader reshapes kron(w1, w2) [32, 288] to the weight."""
    g = f"diffusion_model.{CONV}"
    return {g + ".lokr_w1": rand(rng, 2, 3), g + ".lokr_w2": rand(rng, 16, 96), g + ".alpha": np.float32(1.0)}


def test_lokr_conv_with_flattened_kernel_applies_and_exports_as_in_comfyui(tiny_model):
    model, base = tiny_model("sd1")
    tensors = lokr_conv_with_flattened_kernel(np.random.default_rng(0))
    assert_same_weights(jaxlora_weights(model, tensors), comfyui_weights(base, tensors))
    exported = export_adapter(model, "comfyui", jnp.float32)
    assert exported[f"diffusion_model.{CONV}.lokr_w2"].shape == (16, 96)
    assert_same_weights(effective_state_dict(model.network), comfyui_weights(base, exported))


@pytest.mark.parametrize("algorithm", ["LoRA", "LoHa", "LoKr", "OFT"])
@pytest.mark.parametrize("style", ["comfyui", "kohya"])
def test_export_import_export_is_lossless(tiny_model, algorithm, style):
    model, _ = tiny_model("sd1")
    attach_adapters(model.network, algorithm, rank=4, seed=0, lora_dtype=jnp.float32)
    randomize_adapters(model.network)
    first = export_adapter(model, style, jnp.float32)
    reloaded, _ = tiny_model("sd1")
    attach_imported(reloaded.network, import_adapter(reloaded, first, jnp.float32))
    second = export_adapter(reloaded, style, jnp.float32)
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def test_keys_that_match_no_layer_are_named(tiny_model):
    model, _ = tiny_model("sd1")
    tensors = {
        "diffusion_model.input_blocks.99.0.in_layers.2.lora_up.weight": np.zeros((4, 2), np.float32),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": np.zeros((4, 2), np.float32),
        "diffusion_model.out.2.unknown_suffix": np.zeros(2, np.float32),
    }
    with pytest.raises(AdapterFileError, match=r"3 keys match no layer.*input_blocks\.99.*lora_te_text_model"):
        import_adapter(model, tensors)


def test_factors_of_the_wrong_shape_are_named(tiny_model):
    model, _ = tiny_model("sd1")
    tensors = {
        f"diffusion_model.{LINEAR}.lora_up.weight": np.zeros((32, 4), np.float32),
        f"diffusion_model.{LINEAR}.lora_down.weight": np.zeros((4, 32), np.float32),
    }
    with pytest.raises(AdapterFileError, match=r"attn2\.to_k.*down \(4, 32\) do not fit the weight \(32, 768\)"):
        import_adapter(model, tensors)


def dora_file(rng):
    """DoRA on a linear (per output, LyCORIS' default) and on a conv (per input)."""
    tensors = lora_file(rng, *STYLE_TABLE["kohya-ldm"])
    tensors["lora_unet_" + LINEAR.replace(".", "_") + ".dora_scale"] = 1 + rand(rng, 32, 1)
    tensors["lora_unet_" + CONV.replace(".", "_") + ".dora_scale"] = 1 + rand(rng, 1, 32, 1, 1)
    return tensors


def test_dora_applies_as_in_comfyui(tiny_model):
    model, base = tiny_model("sd1")
    tensors = dora_file(np.random.default_rng(0))
    assert_same_weights(jaxlora_weights(model, tensors), comfyui_weights(base, tensors))


def test_dora_survives_export_and_loads_in_comfyui(tiny_model):
    model, base = tiny_model("sd1")
    attach_imported(model.network, import_adapter(model, dora_file(np.random.default_rng(1)), jnp.float32))
    exported = export_adapter(model, "comfyui", jnp.float32)
    assert f"diffusion_model.{CONV}.dora_scale" in exported
    assert_same_weights(effective_state_dict(model.network), comfyui_weights(base, exported))


def test_dora_scale_of_the_wrong_shape_is_named(tiny_model):
    model, _ = tiny_model("sd1")
    tensors = lora_file(np.random.default_rng(0), *STYLE_TABLE["comfyui"])
    tensors[f"diffusion_model.{LINEAR}.dora_scale"] = np.ones((5, 1), np.float32)
    with pytest.raises(AdapterFileError, match=r"to_k.*dora_scale of shape \(5, 1\) fits neither"):
        import_adapter(model, tensors)
