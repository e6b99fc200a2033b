"""Training Wan through the same loop as the other families, on video latents [N, C, T, H, W]: buckets by frame
count and size (an image bucket trains as 1-frame videos beside a 3-frame one), each algorithm lowers the loss on
the tiny Wan 2.1, and data a model cannot take is refused before weights load."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora import load_model
from jaxlora.models.demo import write_random_checkpoint
from jaxlora.models.wan_family import A14B_BOUNDARY, TINY_WAN21, TINY_WAN22_TI2V
from jaxlora.train.config import SettingsError, TrainConfig
from jaxlora.train.data import DatasetError, device_arrays, load_dataset, make_dataset
from jaxlora.train.loop import adapted_network, preflight, run_training
from jaxlora.train.objective import Objective, draw_percent, restrict_sigma
from tests.train.test_train import FP32, ONE_LEVEL, QUIET, fixed_draw_loss, small_data


def video_data(count=4, frames=3, size=(4, 6), seed=0):
    """Smooth 16-channel latents at VAE scale that move from frame to frame, and one umT5 caption for all."""
    rng = np.random.default_rng(seed)
    t, y, x = np.meshgrid(np.arange(frames), *(np.linspace(-1.0, 1.0, n) for n in size), indexing="ij")
    phases = rng.uniform(0, 2 * np.pi, (count, 16, 1, 1, 1))
    latents = (2.0 * np.sin(2.0 * (x + y + 0.3 * t) * np.pi + phases)).astype(np.float32)
    return latents, {"c_crossattn": rng.standard_normal((1, 6, 4096)).astype(np.float32)}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(write_random_checkpoint(TINY_WAN21, tmp_path_factory.mktemp("wan") / "w.safetensors", 3), "fp32")


def mixed_dataset():
    """A 3-frame video bucket and a bucket of images (4-D latents) of another size."""
    video, caption = video_data()
    images = video_data(count=2, frames=1, size=(4, 4), seed=1)[0][:, :, 0]
    return make_dataset([video, images], caption)


# Each run compiles its own backward of the scanned blocks: LoRA in CI, the other algorithms with `pytest -m slow`.
SLOW = ("LoHa", "LoKr", "OFT")


@pytest.mark.parametrize("algorithm", ["LoRA", *(pytest.param(a, marks=pytest.mark.slow) for a in SLOW)])
def test_training_wan_on_videos_and_images_lowers_the_loss(model, algorithm):
    dataset = mixed_dataset()
    assert [b.shape for b in dataset.buckets] == [(16, 3, 4, 6), (16, 4, 4)]
    arrays = device_arrays(dataset.buckets[1], model, jnp.float32)
    assert arrays["latents"].shape == (2, 1, 4, 4, 16)  # images are 1-frame videos, channels last
    config = TrainConfig(
        steps=20, batch_size=2, rank=4, algorithm=algorithm, learning_rate=3e-3, gradient_checkpointing=False, **FP32
    )
    untrained, _ = adapted_network(model, config, jnp.float32)
    result = run_training(model, dataset, config, **QUIET)
    evaluate = lambda network: fixed_draw_loss(model, network, dataset=dataset)  # noqa: E731 (the video bucket)
    before, after = evaluate(untrained), evaluate(result.model_with_lora.network)
    assert len(result.loss_map["loss"]) == 20
    assert after < 0.9 * before, (before, after)
    assert "diffusion_model.blocks.1.self_attn.norm_k.diff" in result.lora
    assert not any("modulation" in key for key in result.lora)


def test_data_the_model_cannot_take_is_refused_before_training(model, tmp_path):
    latents, caption = video_data()
    with pytest.raises(DatasetError, match=r"c_crossattn \(4096-d\), found 2560-d: the umT5-XXL hidden states"):
        preflight(model, make_dataset(latents, {"c_crossattn": np.zeros((1, 5, 2560), np.float32)}), TrainConfig())
    with pytest.raises(DatasetError, match="latents have 48 channels, the model takes 16"):
        preflight(model, make_dataset(np.zeros((1, 48, 2, 4, 4), np.float32), caption), TrainConfig())
    unet = load_model(write_random_checkpoint(ONE_LEVEL, tmp_path / "unet.safetensors"), weights=False)
    with pytest.raises(DatasetError, match=r"video latents \[4, 16, 3, 4, 6\] .* an image model"):
        preflight(unet, make_dataset(latents, caption), TrainConfig())


def test_an_a14b_expert_trains_only_its_own_noise_range(model, tmp_path):
    """min_sigma/max_sigma rescale each drawn sigma onto the expert's range (musubi-tuner's min/max timestep):
    the high-noise expert of Wan 2.2 A14B T2V sees sigma in [0.875, 1] only, the low-noise one [0, 0.875]."""
    key = jax.random.key(0)
    percent = draw_percent(key, 4096, Objective())
    sigma = model.sampling.percent_to_sigma(percent)
    boundary = A14B_BOUNDARY["t2v"]
    high = np.asarray(restrict_sigma(sigma, Objective(min_sigma=boundary)))
    low = np.asarray(restrict_sigma(sigma, Objective(max_sigma=boundary)))
    assert high.min() >= boundary and high.max() <= 1.0 and low.max() <= boundary
    np.testing.assert_allclose(high, boundary + (1.0 - boundary) * np.asarray(sigma), rtol=1e-6)
    assert restrict_sigma(sigma, Objective()) is sigma  # the full range is the draw itself
    with pytest.raises(SettingsError, match="min_sigma"):
        TrainConfig(min_sigma=0.9, max_sigma=0.5)
    unet = load_model(write_random_checkpoint(ONE_LEVEL, tmp_path / "unet.safetensors"), weights=False)
    with pytest.raises(ValueError, match="min_sigma/max_sigma apply to flow models"):
        preflight(unet, make_dataset(*small_data()), TrainConfig(min_sigma=0.5))
    preflight(model, make_dataset(*video_data()), TrainConfig(min_sigma=boundary))


def test_a_comfyui_video_dataset_loads_into_buckets_by_frames_and_size(model, tmp_path):
    """SaveTrainingDataset shards of Wan video latents [1, 16, t, h, w] (and an image [1, 16, h, w]) with umT5
    conditioning [1, 512, 4096]: one bucket per (frames, size), checked against the model."""
    import torch

    from tests.train.test_comfy_dataset import save_training_dataset

    g = torch.Generator().manual_seed(0)
    shapes = [(1, 16, 3, 4, 6), (1, 16, 2, 4, 4), (1, 16, 3, 4, 6), (1, 16, 4, 4)]
    latents = [{"samples": torch.randn(*shape, generator=g)} for shape in shapes]
    conditioning = [[[torch.randn(1, 512, 4096, generator=g), {}]] for _ in shapes]
    folder = save_training_dataset(tmp_path / "ds", latents, conditioning, shard_size=2)
    dataset = load_dataset(folder)
    assert [(b.size, b.shape) for b in dataset.buckets] == [(2, (16, 3, 4, 6)), (1, (16, 2, 4, 4)), (1, (16, 4, 4))]
    np.testing.assert_array_equal(dataset.buckets[0].latents[1], latents[2]["samples"][0].numpy())
    preflight(model, dataset, TrainConfig())


@pytest.mark.slow  # a second tiny model's compile; the Wan 2.1 run above covers the shared code in CI
def test_training_wan22_ti2v_on_48_channel_videos_lowers_the_loss(tmp_path):
    ti2v = load_model(write_random_checkpoint(TINY_WAN22_TI2V, tmp_path / "ti2v.safetensors", 3), "fp32")
    video, caption = video_data()
    latents = np.concatenate([video, video[:, ::-1], -video], axis=1)  # 48 channels of the same smooth kind
    dataset = make_dataset(latents, caption)
    config = TrainConfig(steps=20, batch_size=2, rank=4, learning_rate=3e-3, gradient_checkpointing=False, **FP32)
    untrained, _ = adapted_network(ti2v, config, jnp.float32)
    result = run_training(ti2v, dataset, config, **QUIET)
    before = fixed_draw_loss(ti2v, untrained, dataset=dataset)
    after = fixed_draw_loss(ti2v, result.model_with_lora.network, dataset=dataset)
    assert after < 0.9 * before, (before, after)
