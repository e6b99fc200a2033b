"""Training Flux through the same loop as the UNets: each algorithm lowers the loss on the tiny model, the data
is checked against Flux's inputs, and guidance comes from the data, the setting or the 3.5 default."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora import load_model
from jaxlora.models.demo import write_random_checkpoint
from jaxlora.models.flux_family import TINY_FLUX_DEV, TINY_FLUX_SCHNELL
from jaxlora.train.config import TrainConfig
from jaxlora.train.data import DatasetError, device_arrays, make_dataset
from jaxlora.train.loop import adapted_network, preflight, run_training
from tests.train.test_train import FP32, QUIET, fixed_draw_loss


def flux_data(count=4, size=8, seed=0):
    """Smooth 16-channel latents at VAE scale, one T5 context and one pooled CLIP-L vector for all."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(-1.0, 1.0, size)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    phases = rng.uniform(0, 2 * np.pi, (count, 16, 1, 1))
    latents = (2.0 * np.sin(2.0 * (xx + yy) * np.pi + phases)).astype(np.float32)
    conditioning = {
        "c_crossattn": rng.standard_normal((1, 4, 4096)).astype(np.float32),
        "pooled_output": rng.standard_normal((1, 768)).astype(np.float32),
    }
    return latents, conditioning


@pytest.fixture(scope="module")
def flux_dev(tmp_path_factory):
    return load_model(write_random_checkpoint(TINY_FLUX_DEV, tmp_path_factory.mktemp("f") / "f.safetensors", 3), "fp32")


# Each algorithm compiles its own backward of the scanned blocks (tens of seconds on a small CPU): LoRA runs in
# CI, the others with `pytest -m slow` (their math and stacking are covered in CI by the UNet training tests
# and the Flux export tests).
@pytest.mark.parametrize(
    "algorithm", ["LoRA", *(pytest.param(a, marks=pytest.mark.slow) for a in ("LoHa", "LoKr", "OFT"))]
)
def test_training_flux_lowers_the_loss(flux_dev, algorithm):
    result = assert_training_lowers_the_loss(flux_dev, make_dataset(*flux_data()), algorithm)
    assert "diffusion_model.single_blocks.1.linear1.diff_b" in result.lora


def assert_training_lowers_the_loss(model, dataset, algorithm):
    """20 steps of batch 4, rank 4, fp32, no remat: the loss on a fixed draw falls by at least 10%."""
    config = TrainConfig(
        steps=20, batch_size=4, rank=4, algorithm=algorithm, learning_rate=3e-3, gradient_checkpointing=False, **FP32
    )
    untrained, _ = adapted_network(model, config, jnp.float32)
    result = run_training(model, dataset, config, **QUIET)
    evaluate = lambda network: fixed_draw_loss(model, network, dataset=dataset)  # noqa: E731
    before, after = evaluate(untrained), evaluate(result.model_with_lora.network)
    assert len(result.loss_map["loss"]) == 20
    assert after < 0.9 * before, (before, after)
    return result


def test_flux_data_needs_pooled_output_of_the_right_width(flux_dev):
    latents, conditioning = flux_data()
    config = TrainConfig()
    for pooled, found in ((None, "none"), (np.zeros((1, 1280), np.float32), "1280-d")):
        fields = {"c_crossattn": conditioning["c_crossattn"]} | ({} if pooled is None else {"pooled_output": pooled})
        with pytest.raises(DatasetError, match=f"pooled_output \\(768-d\\), found {found}"):
            preflight(flux_dev, make_dataset(latents, fields), config)
    with pytest.raises(DatasetError, match="4 channels, the model takes 16"):
        preflight(flux_dev, make_dataset(latents[:, :4], conditioning), config)


def test_guidance_from_data_setting_or_default(flux_dev, tmp_path):
    latents, conditioning = flux_data()
    bucket = make_dataset(latents, conditioning).buckets[0]
    assert device_arrays(bucket, flux_dev, jnp.float32)["guidance"].tolist() == [3.5]
    assert device_arrays(bucket, flux_dev, jnp.float32, guidance=2.0)["guidance"].tolist() == [2.0]
    per_sample = make_dataset(latents, {**conditioning, "guidance": np.array([1.0, 2.0, 3.0, 4.0])}).buckets[0]
    assert device_arrays(per_sample, flux_dev, jnp.float32, guidance=2.0)["guidance"].tolist() == [1, 2, 3, 4]
    schnell = load_model(write_random_checkpoint(TINY_FLUX_SCHNELL, tmp_path / "s.safetensors"), weights=False)
    assert "guidance" not in device_arrays(bucket, schnell, jnp.float32)
    with pytest.raises(ValueError, match="guidance input"):
        preflight(schnell, make_dataset(latents, conditioning), TrainConfig(guidance=3.0))
