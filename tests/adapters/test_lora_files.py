"""Adapter files on disk: metadata, lora_dtype storage, no overwrite, and a save/load round trip."""

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

import jaxlora
from jaxlora.adapters.formats import export_adapter
from jaxlora.adapters.metadata import AdapterInfo
from jaxlora.files import write_new_file
from tests.adapters.conftest import randomize_adapters

KOHYA_MINIMUM = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha")


def header(path):
    with safe_open(path, framework="numpy") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def test_saved_file_stores_lora_dtype_and_describes_the_training(tiny_model, tmp_path):
    model, _ = tiny_model("sdxl")
    jaxlora.attach_adapters(model.network, "LoRA", rank=4, seed=0)
    randomize_adapters(model.network)
    info = AdapterInfo("sdxl", "eps", "LoRA", 4, 1.0, "bf16", steps=16, training_dtype="bf16", settings={"seed": 3})
    path = jaxlora.save_lora(model, tmp_path / "x_16_steps_00001_.safetensors", lora_dtype="bf16", info=info)
    metadata, tensors = header(path)
    assert {metadata[k] for k in ("steps", "algorithm", "rank", "alpha", "base_model", "lora_dtype")} >= {
        "16",
        "LoRA",
        "4",
        "1.0",
        "sdxl",
        "bf16",
    }
    assert json.loads(metadata["training_settings"]) == {"seed": 3}
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert all(v.dtype == ml_dtypes.bfloat16 for v in tensors.values())
    alpha = tensors["diffusion_model.input_blocks.0.0.alpha"]
    assert alpha.shape == () and float(alpha) == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_16_steps_00001_.safetensors"]  # no temporary left


def test_kohya_file_carries_the_ss_fields_a1111_reads(tiny_model, tmp_path):
    model, _ = tiny_model("sd1")
    jaxlora.attach_adapters(model.network, "LoKr", rank=4, seed=0)
    metadata, _ = header(jaxlora.save_lora(model, tmp_path / "k.safetensors", style="kohya"))
    assert all(key in metadata for key in KOHYA_MINIMUM)
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"]) == {"algo": "lokr"}


def test_saving_never_overwrites(tiny_model, tmp_path):
    model, _ = tiny_model("sd1")
    jaxlora.attach_adapters(model.network, "LoRA", rank=2, seed=0)
    path = jaxlora.save_lora(model, tmp_path / "a.safetensors")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="never overwrites"):
        jaxlora.save_lora(model, path)
    assert path.read_bytes() == before


def test_saving_a_model_without_adapters_is_refused(tiny_model, tmp_path):
    model, _ = tiny_model("sd1")
    with pytest.raises(ValueError, match="no weight adapters"):
        jaxlora.save_lora(model, tmp_path / "a.safetensors")


def test_save_then_load_restores_the_adapter_in_lora_dtype(tiny_model, tmp_path):
    model, _ = tiny_model("sd1")
    jaxlora.attach_adapters(model.network, "OFT", rank=4, seed=0)
    randomize_adapters(model.network)
    path = jaxlora.save_lora(model, tmp_path / "o.safetensors", lora_dtype="bf16")
    reloaded, _ = tiny_model("sd1")
    loaded = jaxlora.load_lora(reloaded, path)
    assert loaded.layers == 280 and loaded.metadata["algorithm"] == "OFT"
    saved = export_adapter(model, "comfyui", jnp.bfloat16)
    again = export_adapter(reloaded, "comfyui", jnp.bfloat16)
    for key in saved:
        np.testing.assert_array_equal(saved[key], again[key], err_msg=key)


def test_write_new_file_refuses_an_existing_path(tmp_path):
    path = write_new_file(tmp_path / "sub" / "f.bin", b"one")
    with pytest.raises(FileExistsError):
        write_new_file(path, b"two")
    assert path.read_bytes() == b"one"
    assert [p.name for p in path.parent.iterdir()] == ["f.bin"]


def test_missing_or_corrupt_adapter_file_is_named(tiny_model, tmp_path):
    model, _ = tiny_model("sd1")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        jaxlora.load_lora(model, tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00xxxxx")
    with pytest.raises(ValueError, match="bad.safetensors is not a readable"):
        jaxlora.load_lora(model, bad)
