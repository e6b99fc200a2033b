"""Adapters on Chroma: every exported style is consumed whole by ComfyUI's load math (its Flux key map, which
ComfyUI's Chroma inherits) and patches the weights as trained (fp32: rtol 1e-5, atol 1e-6); community files
(ai-toolkit's `diffusion_model.<path>.lora_A/B`, diffusers/PEFT row slices) import; `peft` has no name for the
approximator."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxlora.adapters.attach import attach_adapters, attach_imported
from jaxlora.adapters.formats import AdapterFileError, export_adapter, import_adapter
from jaxlora.models.chroma_family import TINY_CHROMA
from jaxlora.models.demo import random_tensors
from jaxlora.models.diffusion import load_model
from tests.adapters import comfy_loader
from tests.adapters.conftest import effective_state_dict, randomize_adapters


@pytest.fixture(scope="module")
def chroma_file(tmp_path_factory):
    tensors = {f"diffusion_model.{k}": v for k, v in random_tensors(TINY_CHROMA, seed=5).items()}
    path = tmp_path_factory.mktemp("chroma") / "chroma.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def outside_approximator(path: str) -> bool:
    return not path.startswith("distilled_guidance_layer.")


def adapted(chroma_file, algorithm, include=None, seed=0):
    path, base = chroma_file
    model = load_model(path, dtype="fp32")
    attach_adapters(model.network, algorithm, rank=4, seed=seed, lora_dtype=jnp.float32, include=include)
    randomize_adapters(model.network, seed=seed)
    return model, base


def assert_same_weights(patched, expected):
    assert patched.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(patched[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)


def assert_loads_whole_as_trained(model, base, tensors):
    patched, not_loaded = comfy_loader.apply_file(base, tensors, comfy_loader.chroma_key_map(base))
    assert not_loaded == []
    assert_same_weights(patched, effective_state_dict(model.network))


ALGORITHMS = ["LoRA", *(pytest.param(a, marks=pytest.mark.slow) for a in ("LoHa", "LoKr", "OFT"))]


def assert_imports_as_trained(chroma_file, model, tensors):
    fresh = load_model(chroma_file[0], dtype="fp32")
    attach_imported(fresh.network, import_adapter(fresh, tensors, jnp.float32))
    assert_same_weights(effective_state_dict(fresh.network), effective_state_dict(model.network))


@pytest.mark.parametrize("style", ["comfyui", "kohya"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_layer_exports_in_comfyui_and_kohya_names_that_comfyui_applies_as_trained(chroma_file, algorithm, style):
    model, base = adapted(chroma_file, algorithm)
    tensors = export_adapter(model, style, jnp.float32)
    approximator = {
        "comfyui": "diffusion_model.distilled_guidance_layer.layers.1.out_layer.",
        "kohya": "lora_unet_distilled_guidance_layer_layers_1_out_layer.",
    }
    assert any(key.startswith(approximator[style]) for key in tensors)
    # RMSNorm scales (QK-norms, the approximator's norms) are not trained
    assert not any(n in key for key in tensors for n in ("query_norm", "key_norm", "norms"))
    assert_loads_whole_as_trained(model, base, tensors)


def test_peft_export_of_the_blocks_loads_whole_and_reimports_fused(chroma_file):
    model, base = adapted(chroma_file, "LoRA", include=outside_approximator)
    peft = export_adapter(model, "peft", jnp.float32)
    for piece in ("transformer_blocks.1.attn.add_k_proj", "single_transformer_blocks.0.proj_mlp", "proj_out"):
        assert f"transformer.{piece}.lora_B.weight" in peft
    assert_loads_whole_as_trained(model, base, peft)
    assert_imports_as_trained(chroma_file, model, peft)


def test_peft_refuses_the_approximator_by_name(chroma_file):
    model, _ = adapted(chroma_file, "LoRA")
    with pytest.raises(AdapterFileError, match=r"distilled_guidance_layer\.in_proj"):
        export_adapter(model, "peft", jnp.float32)


def test_ai_toolkit_chroma_file_imports(chroma_file):
    """ai-toolkit writes Chroma LoRAs with ComfyUI's names and PEFT suffixes (`diffusion_model.<path>.lora_A.weight`,
    no alpha: scale 1); ComfyUI and the importer read the same weights from it."""
    model, base = adapted(chroma_file, "LoRA")
    comfyui = export_adapter(model, "comfyui", jnp.float32)
    ai_toolkit = {}
    for key, value in comfyui.items():
        stem, _, suffix = key.rpartition(".lora_")
        if suffix == "up.weight":
            alpha = float(comfyui[f"{stem}.alpha"])
            ai_toolkit[f"{stem}.lora_B.weight"] = value * np.float32(alpha / value.shape[1])
        elif suffix == "down.weight":
            ai_toolkit[f"{stem}.lora_A.weight"] = value
        elif not key.endswith(".alpha"):
            ai_toolkit[key] = value
    assert_loads_whole_as_trained(model, base, ai_toolkit)
    assert_imports_as_trained(chroma_file, model, ai_toolkit)
