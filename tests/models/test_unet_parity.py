"""The Flax UNet against diffusers' own UNet2DConditionModel, each loading the same ldm-layout file itself.

diffusers converts the ldm keys with its own single-file converter, so the oracle shares none of our key
mapping. Tolerance: max |jaxlora - diffusers| <= 1e-4 * max |diffusers| in fp32 (measured: ~2e-6).
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from jaxlora import load_model
from jaxlora.models.unet_family import sdxl_vector
from tests.models.tiny_unets import FAMILIES

RELATIVE_TOLERANCE = 1e-4


def diffusers_unet(family, checkpoint, tmp_path):
    config_dir = FAMILIES[family].write_diffusers_config(tmp_path / "config")
    model = UNet2DConditionModel.from_single_file(
        str(checkpoint), config=str(config_dir), local_files_only=True, torch_dtype=torch.float32
    )
    return model.eval()


def random_inputs(config, height, width, batch=2, tokens=10, seed=0):
    rng = np.random.default_rng(seed)
    inputs = {
        "x": rng.standard_normal((batch, 4, height, width)).astype(np.float32),
        "t": np.array([3.0, 741.0][:batch], np.float32),
        "context": rng.standard_normal((batch, tokens, config.context_dim)).astype(np.float32),
    }
    if config.adm_in_channels:
        inputs["pooled"] = rng.standard_normal((batch, 1280)).astype(np.float32)
        # height, width, crop_h, crop_w, target_height, target_width per sample
        inputs["size_ids"] = np.array([[1024, 768, 0, 16, 1024, 768], [512, 640, 32, 0, 1024, 1024]], np.float32)
    return inputs


def diffusers_output(model, inputs):
    extra = {}
    if "pooled" in inputs:
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.from_numpy(inputs["pooled"]),
            "time_ids": torch.from_numpy(inputs["size_ids"]),
        }
    with torch.no_grad():
        out = model(
            torch.from_numpy(inputs["x"]),
            torch.from_numpy(inputs["t"]),
            encoder_hidden_states=torch.from_numpy(inputs["context"]),
            **extra,
        )
    return out.sample.numpy()


def jaxlora_output(model, inputs):
    y = None
    if "pooled" in inputs:
        y = sdxl_vector(jnp.asarray(inputs["pooled"]), *inputs["size_ids"].T)
    x = jnp.asarray(inputs["x"].transpose(0, 2, 3, 1))  # the network is channels-last
    out = model.network(x, jnp.asarray(inputs["t"]), jnp.asarray(inputs["context"]), y)
    return np.asarray(out).transpose(0, 3, 1, 2)


@pytest.mark.parametrize(
    ("family", "height", "width"),
    [("sd1", 16, 16), ("sd1", 13, 11), ("sd2", 16, 8), ("sdxl", 8, 16)],
)
def test_unet_output_matches_diffusers_single_file_model(family, height, width, tiny_checkpoint, tmp_path):
    checkpoint = tiny_checkpoint(family)
    model = load_model(checkpoint, dtype="fp32")
    assert model.variant.name == family
    inputs = random_inputs(model.config, height, width)
    expected = diffusers_output(diffusers_unet(family, checkpoint, tmp_path), inputs)
    actual = jaxlora_output(model, inputs)
    scale = np.abs(expected).max()
    assert scale > 0.1  # a dead network would make the comparison vacuous
    assert np.abs(actual - expected).max() <= RELATIVE_TOLERANCE * scale
