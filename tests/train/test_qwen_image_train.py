"""Training Qwen-Image through the same loop as the other families: each algorithm lowers the loss on the tiny
model; ComfyUI's 5-D one-frame latents read from a SaveTrainingDataset folder and from a `.safetensors` file give
the same samples, scaled by the Wan 2.1 per-channel format; the data is checked against the model's inputs before
weights load."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxlora import load_model
from jaxlora.models.demo import write_random_checkpoint
from jaxlora.models.qwen_image_family import TINY_QWEN_IMAGE, WAN21_LATENT
from jaxlora.train.config import TrainConfig
from jaxlora.train.data import DatasetError, device_arrays, load_dataset, make_dataset
from jaxlora.train.loop import adapted_network, preflight, run_training
from tests.train.test_train import FP32, QUIET, fixed_draw_loss


def qwen_image_data(count=2, size=4, width=3584, seed=0):
    """Smooth 16-channel latents around the Wan 2.1 VAE's channel means, 5-D with a frame axis of 1 as ComfyUI
    keeps them, and one Qwen2.5-VL-width caption (6 tokens) for all."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(-1.0, 1.0, size)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    phases = rng.uniform(0, 2 * np.pi, (count, 16, 1, 1))
    mean = np.asarray(WAN21_LATENT.channel_mean).reshape(1, 16, 1, 1)
    std = np.asarray(WAN21_LATENT.channel_std).reshape(1, 16, 1, 1)
    latents = (mean + std * np.sin(2.0 * (xx + yy) * np.pi + phases)).astype(np.float32)[:, :, None]
    return latents, {"c_crossattn": rng.standard_normal((1, 6, width)).astype(np.float32)}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path = write_random_checkpoint(TINY_QWEN_IMAGE, tmp_path_factory.mktemp("q") / "q.safetensors", 3)
    return load_model(path, "fp32")


# Each algorithm compiles its own backward of the scanned blocks: LoRA runs in CI, the others with `-m slow`.
@pytest.mark.parametrize(
    "algorithm", ["LoRA", *(pytest.param(a, marks=pytest.mark.slow) for a in ("LoHa", "LoKr", "OFT"))]
)
def test_training_qwen_image_lowers_the_loss(qwen, algorithm):
    config = TrainConfig(
        steps=20, batch_size=2, rank=4, algorithm=algorithm, learning_rate=1e-2, gradient_checkpointing=False, **FP32
    )
    dataset = make_dataset(*qwen_image_data())
    untrained, _ = adapted_network(qwen, config, jnp.float32)
    result = run_training(qwen, dataset, config, **QUIET)
    evaluate = lambda network: fixed_draw_loss(qwen, network, dataset=dataset)  # noqa: E731
    before, after = evaluate(untrained), evaluate(result.model_with_lora.network)
    assert len(result.loss_map["loss"]) == 20
    assert after < (1.0 if algorithm == "OFT" else 0.9) * before, (before, after)
    if algorithm == "LoRA":
        assert "diffusion_model.transformer_blocks.1.attn.add_k_proj.lora_up.weight" in result.lora
        assert "diffusion_model.txt_norm.diff" in result.lora


def test_comfyui_one_frame_latents_read_alike_from_shards_and_files(qwen, tmp_path):
    import torch

    from tests.train.test_comfy_dataset import save_training_dataset

    latents, conditioning = qwen_image_data()
    context = torch.from_numpy(conditioning["c_crossattn"])
    # What SaveTrainingDataset writes for Qwen-Image: LATENT samples [1, 16, 1, h, w]; the text encoder's
    # attention mask (kept only when it masks something), which ComfyUI's Qwen-Image model never reads.
    mask = torch.ones(1, 6, dtype=torch.long)
    folder = save_training_dataset(
        tmp_path / "ds",
        [{"samples": torch.from_numpy(latent[None])} for latent in latents],
        [[[context, {"attention_mask": mask}]] for _ in latents],
        shard_size=10,
    )
    save_file({"latents": latents, **conditioning}, str(tmp_path / "data.safetensors"))
    for dataset in (load_dataset(folder), load_dataset(tmp_path / "data.safetensors")):
        preflight(qwen, dataset, TrainConfig())
        (bucket,) = dataset.buckets
        assert bucket.shape == (16, 4, 4)
        arrays = device_arrays(bucket, qwen, jnp.float32)
        mean = np.asarray(WAN21_LATENT.channel_mean).reshape(1, 1, 1, 16)
        std = np.asarray(WAN21_LATENT.channel_std).reshape(1, 1, 1, 16)
        expected = (latents[:, :, 0].transpose(0, 2, 3, 1) - mean) / std
        np.testing.assert_allclose(np.asarray(arrays["latents"]), expected, rtol=1e-5, atol=1e-6)
        assert arrays["context"].shape[-2:] == (6, 3584)


def test_qwen_image_data_is_checked_against_the_model(qwen):
    latents, conditioning = qwen_image_data()
    with pytest.raises(DatasetError, match=r"c_crossattn \(3584-d\), found 4096-d"):
        preflight(qwen, make_dataset(latents, qwen_image_data(width=4096)[1]), TrainConfig())
    with pytest.raises(DatasetError, match="4 channels, the model takes 16"):
        preflight(qwen, make_dataset(latents[:, :4], conditioning), TrainConfig())
    with pytest.raises(DatasetError, match=r"video latents \[2, 16, 3, 4, 4\] .* an image model"):
        preflight(qwen, make_dataset(np.repeat(latents, 3, axis=2), conditioning), TrainConfig())
    with pytest.raises(ValueError, match="guidance input"):
        preflight(qwen, make_dataset(latents, conditioning), TrainConfig(guidance=3.0))
