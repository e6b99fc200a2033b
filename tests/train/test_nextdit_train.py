"""Training NextDiT through the same loop as the other families: each algorithm lowers the loss on the tiny
Z-Image and LoRA on the tiny Lumina 2, and the data is checked against the caption width before weights load."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora import load_model
from jaxlora.models.demo import write_random_checkpoint
from jaxlora.models.nextdit_family import TINY_LUMINA2, TINY_Z_IMAGE
from jaxlora.train.config import TrainConfig
from jaxlora.train.data import DatasetError, make_dataset
from jaxlora.train.loop import adapted_network, preflight, run_training
from tests.train.test_train import FP32, QUIET, fixed_draw_loss


def nextdit_data(width, count=4, size=8, seed=0):
    """Smooth 16-channel latents at VAE scale and one caption (5 tokens: Z-Image pads it to 32) for all."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(-1.0, 1.0, size)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    phases = rng.uniform(0, 2 * np.pi, (count, 16, 1, 1))
    latents = (2.0 * np.sin(2.0 * (xx + yy) * np.pi + phases)).astype(np.float32)
    return latents, {"c_crossattn": rng.standard_normal((1, 5, width)).astype(np.float32)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """variant name -> the tiny model of that variant, loaded once per module."""
    loaded = {}

    def get(name):
        if name not in loaded:
            config = {"z-image": TINY_Z_IMAGE, "lumina2": TINY_LUMINA2}[name]
            path = write_random_checkpoint(config, tmp_path_factory.mktemp(name) / "n.safetensors", 3)
            loaded[name] = load_model(path, "fp32")
        return loaded[name]

    return get


# Each run compiles its own backward of the scanned blocks (a minute on a small CPU): Z-Image's LoRA runs in CI,
# Lumina 2's LoRA and the other algorithms (on Z-Image: the block code is shared) with `pytest -m slow`.
@pytest.mark.parametrize(
    ("name", "algorithm"),
    [
        ("z-image", "LoRA"),
        pytest.param("lumina2", "LoRA", marks=pytest.mark.slow),
        *(pytest.param("z-image", a, marks=pytest.mark.slow) for a in ("LoHa", "LoKr", "OFT")),
    ],
)
def test_training_nextdit_lowers_the_loss(models, name, algorithm):
    model = models(name)
    config = TrainConfig(
        steps=20, batch_size=4, rank=4, algorithm=algorithm, learning_rate=3e-3, gradient_checkpointing=False, **FP32
    )
    dataset = make_dataset(*nextdit_data(model.config.cap_feat_dim))
    untrained, _ = adapted_network(model, config, jnp.float32)
    result = run_training(model, dataset, config, **QUIET)
    evaluate = lambda network: fixed_draw_loss(model, network, dataset=dataset)  # noqa: E731
    before, after = evaluate(untrained), evaluate(result.model_with_lora.network)
    assert len(result.loss_map["loss"]) == 20
    assert after < 0.9 * before, (before, after)
    assert "diffusion_model.layers.1.attention.k_norm.diff" in result.lora
    assert not any("pad_token" in key for key in result.lora)


@pytest.mark.parametrize("name", ["z-image", "lumina2"])
def test_captions_of_the_wrong_width_are_refused_before_training(models, name):
    model = models(name)
    latents, conditioning = nextdit_data(model.config.cap_feat_dim)
    wrong = {"c_crossattn": np.zeros((1, 5, 4096), np.float32)}
    width = model.config.cap_feat_dim
    with pytest.raises(DatasetError, match=f"c_crossattn \\({width}-d\\), found 4096-d"):
        preflight(model, make_dataset(latents, wrong), TrainConfig())
    preflight(model, make_dataset(latents, conditioning), TrainConfig())
