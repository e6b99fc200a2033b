"""Adapters on Flux's stacked blocks: per-block initialisation, per-block export keys that ComfyUI's load math
consumes and applies exactly as trained (fp32: rtol 1e-5, atol 1e-6), and re-import into the stacked layout,
including diffusers/PEFT names whose row-slice pieces fuse into one LoRA per BFL weight."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxlora.adapters.attach import attach_adapters, attach_imported, weight_layers
from jaxlora.adapters.base import Target, layer_rng
from jaxlora.adapters.formats import AdapterFileError, export_adapter, import_adapter
from jaxlora.adapters.lora import LoRA
from jaxlora.models.demo import random_tensors
from jaxlora.models.diffusion import load_model
from jaxlora.models.flux_family import TINY_FLUX_DEV
from tests.adapters import comfy_loader
from tests.adapters.conftest import effective_state_dict, randomize_adapters


@pytest.fixture(scope="module")
def flux_file(tmp_path_factory):
    tensors = random_tensors(TINY_FLUX_DEV, seed=5)
    path = tmp_path_factory.mktemp("flux") / "flux.safetensors"
    save_file({f"diffusion_model.{k}": v for k, v in tensors.items()}, str(path))
    return path, {f"diffusion_model.{k}": v for k, v in tensors.items()}


def adapted(flux_file, algorithm, seed=0, include=None):
    """The model of a (path, base tensors) file with random adapters on the layers `include` accepts (all)."""
    path, base = flux_file
    model = load_model(path, dtype="fp32")
    attach_adapters(model.network, algorithm, rank=4, seed=seed, lora_dtype=jnp.float32, include=include)
    randomize_adapters(model.network, seed=seed)
    return model, base


def comfyui_patched(base, tensors):
    return comfy_loader.apply_file(base, tensors, comfy_loader.flux_key_map(base))


def assert_same_weights(patched, expected):
    assert patched.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(patched[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("style", ["comfyui", "kohya"])
@pytest.mark.parametrize("algorithm", ["LoRA", "LoHa", "LoKr", "OFT"])
def test_stacked_adapters_export_per_block_keys_that_comfyui_applies_as_trained(flux_file, algorithm, style):
    model, base = adapted(flux_file, algorithm)
    tensors = export_adapter(model, style, jnp.float32)
    block = {"comfyui": "diffusion_model.double_blocks.1.img_attn.qkv", "kohya": "lora_unet_single_blocks_1_linear1"}
    assert any(key.startswith(block[style] + ".") for key in tensors)
    assert not any("query_norm" in key or "key_norm" in key for key in tensors)  # QK-norm scales are not trained
    patched, not_loaded = comfyui_patched(base, tensors)
    assert not_loaded == []
    assert_same_weights(patched, effective_state_dict(model.network))


def test_each_block_is_initialised_from_its_own_path(flux_file):
    path, _ = flux_file
    model = load_model(path, dtype="fp32", weights=False)
    attach_adapters(model.network, "LoRA", rank=4, seed=7)
    sites = dict(weight_layers(model.network))
    ups = []
    for block in (0, 1):
        name = f"double_blocks.{block}.txt_attn.qkv"
        fresh = LoRA.create(Target.of(sites[name]), 4, layer_rng(7, name), jnp.bfloat16)
        up = np.asarray(sites[name].adapter.weight.up[...])
        np.testing.assert_array_equal(up, np.asarray(fresh.up[...]))
        ups.append(up)
    assert not np.array_equal(*ups)


@pytest.mark.parametrize("algorithm", ["LoRA", "LoKr"])
def test_exported_file_restacks_on_import(flux_file, algorithm):
    model, base = adapted(flux_file, algorithm)
    tensors = export_adapter(model, "comfyui", jnp.float32)
    fresh = load_model(flux_file[0], dtype="fp32")
    attach_imported(fresh.network, import_adapter(fresh, tensors, jnp.float32))
    assert_same_weights(effective_state_dict(fresh.network), effective_state_dict(model.network))


def test_import_of_some_blocks_with_their_own_alphas(flux_file):
    """A file with block 0 only (block 1 is left unchanged), and alphas that differ between layers' blocks."""
    model, base = adapted(flux_file, "LoRA")
    tensors = export_adapter(model, "comfyui", jnp.float32)
    tensors = {k: v for k, v in tensors.items() if ".double_blocks.1." not in k}
    tensors["diffusion_model.single_blocks.1.linear1.alpha"] = np.asarray(3.0, np.float32)
    fresh = load_model(flux_file[0], dtype="fp32")
    attach_imported(fresh.network, import_adapter(fresh, tensors, jnp.float32))
    patched, not_loaded = comfyui_patched(base, tensors)
    assert not_loaded == []
    assert_same_weights(effective_state_dict(fresh.network), patched)


def test_blocks_of_different_rank_are_refused_by_name(flux_file):
    model, _ = adapted(flux_file, "LoRA")
    tensors = export_adapter(model, "comfyui", jnp.float32)
    key = "diffusion_model.double_blocks.1.img_mlp.0"
    tensors[f"{key}.lora_up.weight"] = tensors[f"{key}.lora_up.weight"][:, :2]
    tensors[f"{key}.lora_down.weight"] = tensors[f"{key}.lora_down.weight"][:2]
    fresh = load_model(flux_file[0], dtype="fp32", weights=False)
    with pytest.raises(AdapterFileError, match=r"double_blocks\.0\.img_mlp\.0"):
        attach_imported(fresh.network, import_adapter(fresh, tensors, jnp.float32))


def other_spellings(tensors):
    """PEFT keys of double block 1 as LyCORIS names, of single block 0 as `lora_transformer_` names, of single
    block 1 bare: every diffusers spelling ComfyUI maps, in one file."""
    spellings = {
        "transformer.transformer_blocks.1.": lambda base: "lycoris_" + base.replace(".", "_"),
        "transformer.single_transformer_blocks.0.": lambda base: "lora_transformer_" + base.replace(".", "_"),
        "transformer.single_transformer_blocks.1.": lambda base: base,
    }
    renamed = {}
    for key, value in tensors.items():
        base, suffix = re.fullmatch(r"(.*?)(\.lora_[AB]\.weight|\.diff_b)", key).groups()
        spell = next((f for prefix, f in spellings.items() if key.startswith(prefix)), None)
        renamed[key if spell is None else spell(base.removeprefix("transformer.")) + suffix] = value
    return renamed


def test_peft_export_splits_fused_weights_and_reimports_fused(flux_file):
    model, base = adapted(flux_file, "LoRA")
    peft = export_adapter(model, "peft", jnp.float32)
    for piece in (
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.1.attn.add_v_proj",
        "single_transformer_blocks.1.proj_mlp",
        "norm_out.linear",
    ):
        assert f"transformer.{piece}.lora_B.weight" in peft
    assert not any(key.startswith("diffusion_model.") and "lora_" in key for key in peft)
    comfyui = export_adapter(model, "comfyui", jnp.float32)
    patched, not_loaded = comfyui_patched(base, peft)
    assert not_loaded == []
    assert_same_weights(patched, comfyui_patched(base, comfyui)[0])

    renamed = other_spellings(peft)
    assert any(key.startswith("lycoris_transformer_blocks_1_attn_to_k.") for key in renamed)
    fresh = load_model(flux_file[0], dtype="fp32")
    attach_imported(fresh.network, import_adapter(fresh, renamed, jnp.float32))
    assert_same_weights(effective_state_dict(fresh.network), effective_state_dict(model.network))


def test_flux_peft_errors_name_the_layer_or_key(flux_file):
    lokr, _ = adapted(flux_file, "LoKr")
    with pytest.raises(AdapterFileError, match=r"double_blocks\.0\.img_attn\.qkv"):
        export_adapter(lokr, "peft", jnp.float32)
    model, _ = adapted(flux_file, "LoRA")
    peft = export_adapter(model, "peft", jnp.float32)
    key = "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"
    peft[key] = peft[key][:-1]
    with pytest.raises(AdapterFileError, match=r"transformer_blocks\.0\.attn\.to_q"):
        import_adapter(model, peft, jnp.float32)
