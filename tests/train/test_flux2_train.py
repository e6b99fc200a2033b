"""Training Flux.2 through the same loop as the other families: each algorithm lowers the loss on the tiny klein
model, and the data is checked against Flux.2's inputs (128-channel latents, one text context of the model's
width) before weights load."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora import load_model
from jaxlora.models.demo import write_random_checkpoint
from jaxlora.models.flux2_family import TINY_FLUX2_KLEIN
from jaxlora.train.config import TrainConfig
from jaxlora.train.data import DatasetError, make_dataset
from jaxlora.train.loop import adapted_network, preflight, run_training
from tests.train.test_train import FP32, QUIET, fixed_draw_loss


def flux2_data(count=4, size=4, width=7680, seed=0):
    """Smooth 128-channel latents (the Flux.2 VAE's 32 channels in 2x2 patches), one Qwen3-width context."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(-1.0, 1.0, size)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    phases = rng.uniform(0, 2 * np.pi, (count, 128, 1, 1))
    latents = (1.5 * np.sin(2.0 * (xx + yy) * np.pi + phases)).astype(np.float32)
    return latents, {"c_crossattn": rng.standard_normal((1, 4, width)).astype(np.float32)}


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    path = write_random_checkpoint(TINY_FLUX2_KLEIN, tmp_path_factory.mktemp("f") / "k.safetensors", 3)
    return load_model(path, "fp32")


# Each algorithm compiles its own backward of the scanned blocks: LoRA runs in CI, the others with `-m slow`.
@pytest.mark.parametrize(
    "algorithm", ["LoRA", *(pytest.param(a, marks=pytest.mark.slow) for a in ("LoHa", "LoKr", "OFT"))]
)
def test_training_flux2_klein_lowers_the_loss(klein, algorithm):
    config = TrainConfig(
        steps=20, batch_size=2, rank=4, algorithm=algorithm, learning_rate=1e-2, gradient_checkpointing=False, **FP32
    )
    dataset = make_dataset(*flux2_data(count=2))
    untrained, _ = adapted_network(klein, config, jnp.float32)
    result = run_training(klein, dataset, config, **QUIET)
    evaluate = lambda network: fixed_draw_loss(klein, network, dataset=dataset)  # noqa: E731
    before, after = evaluate(untrained), evaluate(result.model_with_lora.network)
    assert len(result.loss_map["loss"]) == 20
    # OFT only rotates each weight's blocks and moves this random tiny model more slowly (measured: 1.857 to 1.743
    # in 20 steps, 1.698 in 60): for it the test asks for a lower loss, for the others for 10% lower.
    assert after < (1.0 if algorithm == "OFT" else 0.9) * before, (before, after)
    assert "diffusion_model.double_stream_modulation_img.lin.lora_up.weight" in result.lora or algorithm != "LoRA"


def test_flux2_data_is_checked_against_the_model(klein):
    latents, conditioning = flux2_data()
    with pytest.raises(DatasetError, match="c_crossattn"):
        preflight(klein, make_dataset(latents, flux2_data(width=12288)[1]), TrainConfig())
    with pytest.raises(DatasetError, match="16 channels, the model takes 128"):
        preflight(klein, make_dataset(latents[:, :16], conditioning), TrainConfig())
    with pytest.raises(ValueError, match="guidance input"):
        preflight(klein, make_dataset(latents, conditioning), TrainConfig(guidance=3.0))
