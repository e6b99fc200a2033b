"""Training Chroma through the same loop as the other families: each algorithm lowers the loss on the tiny model,
the data is T5 context alone (checked against the model), and guidance is the data's, the setting or ComfyUI's 0."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora import load_model
from jaxlora.models.chroma_family import TINY_CHROMA
from jaxlora.models.demo import write_random_checkpoint
from jaxlora.train.config import TrainConfig
from jaxlora.train.data import DatasetError, device_arrays, make_dataset
from jaxlora.train.loop import preflight
from tests.train.test_flux_train import assert_training_lowers_the_loss, flux_data


def chroma_data(count=4, size=8, seed=0):
    """Flux-VAE latents and one T5 context for all; Chroma has no pooled input."""
    latents, conditioning = flux_data(count, size, seed)
    return latents, {"c_crossattn": conditioning["c_crossattn"]}


@pytest.fixture(scope="module")
def chroma(tmp_path_factory):
    path = write_random_checkpoint(TINY_CHROMA, tmp_path_factory.mktemp("c") / "c.safetensors", 3)
    return load_model(path, "fp32")


# As for Flux: LoRA in CI, the other algorithms (each its own backward compile) with `pytest -m slow`.
@pytest.mark.parametrize(
    "algorithm", ["LoRA", *(pytest.param(a, marks=pytest.mark.slow) for a in ("LoHa", "LoKr", "OFT"))]
)
def test_training_chroma_lowers_the_loss(chroma, algorithm):
    result = assert_training_lowers_the_loss(chroma, make_dataset(*chroma_data()), algorithm)
    assert "diffusion_model.distilled_guidance_layer.out_proj.diff_b" in result.lora


def test_chroma_data_needs_t5_context(chroma):
    latents, conditioning = chroma_data()
    with pytest.raises(DatasetError, match="c_crossattn"):
        preflight(chroma, make_dataset(latents, np.zeros((1, 4, 768), np.float32)), TrainConfig())
    with pytest.raises(DatasetError, match="4 channels, the model takes 16"):
        preflight(chroma, make_dataset(latents[:, :4], conditioning), TrainConfig())


def test_guidance_from_data_setting_or_comfyui_default(chroma):
    latents, conditioning = chroma_data()
    bucket = make_dataset(latents, conditioning).buckets[0]
    assert set(device_arrays(bucket, chroma, jnp.float32)) == {"latents", "context", "guidance"}
    assert device_arrays(bucket, chroma, jnp.float32)["guidance"].tolist() == [0.0]
    assert device_arrays(bucket, chroma, jnp.float32, guidance=2.0)["guidance"].tolist() == [2.0]
    per_sample = make_dataset(latents, {**conditioning, "guidance": np.array([1.0, 2.0, 3.0, 4.0])}).buckets[0]
    assert device_arrays(per_sample, chroma, jnp.float32)["guidance"].tolist() == [1, 2, 3, 4]
