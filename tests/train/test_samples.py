"""Sample images during training, on the cheapest UNet with a small VAE and given caption embeddings: the files
written, the image against a plain loop over the trained model (the adapter applied as the train step applies
it), an adapter bit-identical to a run without samples, no device memory kept between samplings and one compiled
function; the prompts file and the refusals before any weight is read. With text encoders, through the command
line and on Flux: tests/train/test_samples_cli.py (slow)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from jaxlora import load_model
from jaxlora.encoders.loading import load_vae
from jaxlora.encoders.vae import AutoencoderKL, VAEConfig
from jaxlora.files import write_new_file
from jaxlora.models.chroma_family import TINY_CHROMA
from jaxlora.models.demo import random_network_tensors, random_tensors
from jaxlora.models.diffusion import abstract_model
from jaxlora.models.flux2_family import TINY_FLUX2_DEV
from jaxlora.models.flux_family import TINY_FLUX_DEV
from jaxlora.models.nextdit_family import TINY_Z_IMAGE
from jaxlora.models.qwen_image_family import TINY_QWEN_IMAGE
from jaxlora.models.samplers import simple_sigmas
from jaxlora.models.sampling import ModelSampling, scaled_linear_schedule
from jaxlora.models.wan_family import TINY_WAN21
from jaxlora.train.__main__ import build_parser, resolve_settings
from jaxlora.train.config import RunOptions, SettingsError, TrainConfig
from jaxlora.train.data import make_dataset
from jaxlora.train.loop import run_training
from jaxlora.train.sample_prompts import SamplePrompt, read_sample_prompts
from jaxlora.train.samples import ImageSamples, SampleSettings, check_sampling, write_unused
from tests.train.test_train import FP32, ONE_LEVEL, QUIET, small_data

PROMPTS = [SamplePrompt("a red cat"), SamplePrompt("a dog", negative="red")]
SETTINGS = SampleSettings(seed=3, steps=3, cfg=4.0)
CONFIG = TrainConfig(steps=4, batch_size=2, rank=4, learning_rate=3e-2, gradient_checkpointing=False, **FP32)
ONE_LEVEL_VAE = VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1)  # 2 pixels per latent


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The cheapest UNet with a two-level VAE in one checkpoint, synthetic data, random caption embeddings."""
    root = tmp_path_factory.mktemp("samples")
    tensors = {f"model.diffusion_model.{k}": v for k, v in random_tensors(ONE_LEVEL, 1).items()}
    tensors |= {f"first_stage_model.{k}": v for k, v in random_network_tensors(AutoencoderKL(ONE_LEVEL_VAE), 3).items()}
    save_file(tensors, str(root / "unet.safetensors"))
    model = load_model(root / "unet.safetensors", "fp32")
    rng = np.random.default_rng(5)
    captions = [{"c_crossattn": rng.standard_normal((1, 8, 768)).astype(np.float32)} for _ in range(4)]
    return root, model, make_dataset(*small_data(4, 8)), captions


@pytest.fixture(scope="module")
def sampled(small):
    """One run with samples every 2 steps (the hook's calls and the device memory around them recorded) and one
    without."""
    root, model, dataset, captions = small
    vae = load_vae(root / "unet.safetensors", "fp32")
    hook = ImageSamples(model, PROMPTS, captions[:2], captions[2:], vae, SETTINGS, (8, 8), root / "out", **QUIET)
    calls = []

    def recording(steps, run, adapters):
        live = sum(a.nbytes for a in jax.live_arrays())
        images = hook(steps, run, adapters)
        calls.append((steps, images, live, sum(a.nbytes for a in jax.live_arrays())))
        return images

    logged = ImageLog()
    with_samples = run_training(model, dataset, CONFIG, sample_every=2, on_sample=recording, logger=logged, **QUIET)
    without = run_training(model, dataset, CONFIG, **QUIET)
    return hook, calls, with_samples, without, logged.images


class ImageLog:
    """A `tracking.RunLog` that keeps the images it is given."""

    def __init__(self):
        self.images = []

    def scalars(self, step, values):
        pass

    def image(self, name, step, image):
        self.images.append((name, step, image))

    def close(self):
        pass


def test_samples_are_written_every_n_steps_and_change_nothing_trained(sampled):
    hook, calls, with_samples, without, logged = sampled
    assert [c[0] for c in calls] == [2, 4]
    assert [(name, step) for name, step, _ in logged] == [(f"samples/0{i}", s) for s in (2, 4) for i in (0, 1)]
    np.testing.assert_array_equal(logged[-1][2], calls[-1][1][1])  # the logs get the images written
    names = sorted(p.name for p in hook.folder.iterdir())
    assert names == [f"{s:06d}_{n}.png" for s in (2, 4) for n in ("00", "01", "grid")]
    assert Image.open(hook.folder / "000004_00.png").size == (16, 16)  # latents 8 x 8, 2 pixels per latent
    assert Image.open(hook.folder / "000004_grid.png").size == (32, 16)
    for key, value in with_samples.lora.items():
        np.testing.assert_array_equal(value, without.lora[key], err_msg=key)
    assert with_samples.loss_map == without.loss_map
    images = [c[1] for c in calls]
    assert images[0].std() > 1 and not np.array_equal(images[0], images[1])  # not blank; the adapter moved
    assert not np.array_equal(images[1][0], images[1][1])  # two prompts, two images
    assert hook.function._cache_size() == 1  # compiled once, reused
    for *_, before, after in calls:
        assert after == before  # nothing sampling made stays on the device
    with pytest.raises(FileExistsError):  # a second writer of the same step gets new names, never the old
        write_new_file(hook.folder / "000004_00.png", b"")
    assert write_unused(hook.folder / "000004_00.png", b"x").name == "000004_00_2.png"


def test_sample_equals_a_plain_loop_over_the_trained_model(sampled, small):
    """Euler with CFG 4 written as a Python loop over the model `run_training` returned (its merged network),
    the same noise, ComfyUI's start scaling (sqrt(sigma^2 + 1)) and the VAE: the hook's last image of the second
    prompt within one level of 255 of the truncated reference (float32 on both sides; truncation to uint8 may
    flip a level)."""
    hook, calls, with_samples, *_ = sampled
    root, model, _, captions = small
    network, sampling = with_samples.model_with_lora.network, with_samples.model_with_lora.sampling
    positive = model.network_inputs(captions[1], (8, 8), jnp.float32)
    negative = model.network_inputs(captions[3], (8, 8), jnp.float32)
    key = jax.random.fold_in(jax.random.wrap_key_data(np.array([0, 3], np.uint32), impl="threefry2x32"), 1)
    noise = jax.random.normal(key, (1, 8, 8, 4), jnp.float32)
    sigmas = simple_sigmas(sampling, SETTINGS.steps)
    x = noise * np.sqrt(1 + sigmas[0] ** 2)

    @jax.jit
    def x0(x, sigma, inputs):
        out = network(x / jnp.sqrt(sigma**2 + 1), jnp.full((1,), sampling.timestep(sigma)), **inputs)
        return x - sigma * out

    for sigma, following in zip(sigmas[:-1], sigmas[1:], strict=True):
        uncond = x0(x, sigma, negative)
        denoised = uncond + 4.0 * (x0(x, sigma, positive) - uncond)
        x = x + (x - denoised) / sigma * (following - sigma)
    vae = load_vae(root / "unet.safetensors", "fp32")
    expected = np.floor(np.clip(np.asarray(vae.decode(x / model.latent_format.scale_factor)) * 255, 0, 255)[0])
    difference = np.abs(calls[-1][1][1].astype(np.float32) - expected)
    assert difference.max() <= 1.0 and difference.mean() < 0.05, (difference.max(), difference.mean())


def test_prompts_file_lines_negative_prompts_and_refusals(tmp_path, small):
    path = tmp_path / "prompts.txt"
    path.write_text("# samples\na red cat\n\n  a dog --n blurry, red  \n")
    assert read_sample_prompts(path) == [SamplePrompt("a red cat"), SamplePrompt("a dog", "blurry, red")]
    path.write_text("a cat --w 512\n")
    with pytest.raises(SettingsError, match=r"prompts.txt:1: per-line option --w is not supported"):
        read_sample_prompts(path)
    with pytest.raises(SettingsError, match="no such file"):
        read_sample_prompts(tmp_path / "missing.txt")
    with pytest.raises(SettingsError, match="sample_every needs sample_prompts"):
        RunOptions(sample_every=5)
    with pytest.raises(SettingsError, match="multiple of 64"):
        RunOptions(sample_width=100, sample_height=128)
    _, model, _, _ = small
    with pytest.raises(ValueError, match="act only through CFG"):
        check_sampling(model, SampleSettings(cfg=1.0), PROMPTS, model.sampling)
    with pytest.raises(ValueError, match="sample_guidance applies to models with a guidance input"):
        check_sampling(model, SampleSettings(guidance=3.5), PROMPTS[:1], model.sampling)


@pytest.mark.parametrize(
    "config",
    [TINY_CHROMA, TINY_Z_IMAGE, TINY_FLUX2_DEV, TINY_QWEN_IMAGE, TINY_WAN21],
    ids=["chroma", "nextdit", "flux2", "qwen", "wan"],
)
def test_families_without_text_encoders_refuse_sampling_before_loading(config):
    model = abstract_model(config)
    with pytest.raises(ValueError, match="no text encoders for .* yet"):
        check_sampling(model, SampleSettings(), PROMPTS[:1], model.sampling)


def test_flow_models_sample_with_euler_and_without_cfg_by_default():
    flux = abstract_model(TINY_FLUX_DEV)
    assert SampleSettings().cfg_for(flux.sampling) == 1.0
    assert SampleSettings().cfg_for(ModelSampling("eps", scaled_linear_schedule())) == 8.0
    with pytest.raises(ValueError, match="flow model; use"):
        check_sampling(flux, SampleSettings(sampler="dpmpp_2m"), PROMPTS[:1], flux.sampling)
    check_sampling(flux, SampleSettings(guidance=2.0), PROMPTS[:1], flux.sampling)  # dev has a guidance input


def test_toml_file_turns_sampling_on_and_a_bad_prompts_file_is_refused_before_loading(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n")
    settings = tmp_path / "run.toml"
    settings.write_text(
        f'model = "m.safetensors"\ndataset = "d"\nsample_every = 50\nsample_prompts = "{prompts}"\n'
        'sample_sampler = "dpmpp_2m"\nsample-cfg = 6.5\nsample_width = 768\nsample_height = 512\n'
    )
    run, config, demo = resolve_settings(build_parser().parse_args(["--config", str(settings)]))
    assert (run.sample_every, run.sample_sampler, run.sample_cfg, run.sample_width) == (50, "dpmpp_2m", 6.5, 768)
    assert not demo and config == TrainConfig()  # sampling settings are outputs, not training settings
    prompts.write_text("a red cat --s 30\n")
    with pytest.raises(SettingsError, match="per-line option --s"):
        resolve_settings(build_parser().parse_args(["--config", str(settings)]))
    with pytest.raises(SettingsError, match="built-in demo has no VAE"):
        resolve_settings(build_parser().parse_args(["--sample-every", "5", "--sample-prompts", str(prompts)]))
