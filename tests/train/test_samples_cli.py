"""Sample images with real text encoders (slow: each compiles encoders, a sampler and a VAE decoder): through
`python -m jaxlora.train` on a tiny SD1.x checkpoint holding UNet, VAE and CLIP-L (DPM++ 2M, the normal
schedule, a negative prompt through CFG), and on a tiny Flux.1 dev with T5 and CLIP-L files and a 16-channel VAE
file (Euler, no CFG, the guidance input)."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxlora import load_model
from jaxlora.encoders.clip import CLIPTextConfig, CLIPTextModel
from jaxlora.encoders.model_files import EncoderFiles
from jaxlora.encoders.t5 import T5Config, T5Encoder
from jaxlora.encoders.vae import AutoencoderKL, VAEConfig
from jaxlora.models.demo import random_network_tensors, write_random_checkpoint
from jaxlora.models.flux_family import TINY_FLUX_DEV
from jaxlora.train.__main__ import main as train_main
from jaxlora.train.config import TrainConfig
from jaxlora.train.data import make_dataset
from jaxlora.train.loop import run_training
from jaxlora.train.samples import SampleSettings, prepare_samples
from tests.encoders.conftest import T5_PIECES, write_clip_tokenizer, write_t5_tokenizer
from tests.encoders.test_make_dataset import write_images, write_sd1_checkpoint
from tests.train.test_flux_train import flux_data
from tests.train.test_train import FP32, QUIET

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """CLIP's files at the top of one folder, T5's in its t5_tokenizer/, as ComfyUI's comfy/ folder holds them."""
    return write_t5_tokenizer(write_clip_tokenizer(tmp_path_factory.mktemp("tokenizers")))


def test_cli_samples_from_a_prompts_file(tmp_path, tokenizers):
    checkpoint = write_sd1_checkpoint(tmp_path / "sd1.safetensors")
    images = write_images(tmp_path / "photos", sizes=((128, 128), (128, 128)))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat --n dog\n# a comment\na dog\n")
    out = tmp_path / "out"
    flags = ["--model", str(checkpoint), "--images", str(images), "--tokenizers", str(tokenizers)]
    flags += ["--resolution", "128", "--output-dir", str(out), "--prefix", "loras/x", "--steps", "2", "--rank", "2"]
    flags += ["--training-dtype", "fp32", "--lora-dtype", "fp32", "--no-gradient-checkpointing"]
    samples = ["--sample-every", "1", "--sample-prompts", str(prompts), "--sample-steps", "3"]
    samples += ["--sample-sampler", "dpmpp_2m", "--sample-scheduler", "normal", "--sample-cfg", "5"]
    assert train_main(flags + samples) == 0
    folder = out / "loras" / "x_samples"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"00000{s}_{n}.png" for s in (1, 2) for n in ("00", "01", "grid")]
    first, second = (np.asarray(Image.open(folder / f"000002_0{i}.png")) for i in (0, 1))
    assert first.shape == (128, 128, 3) and first.std() > 1 and not np.array_equal(first, second)
    # a prompts file that cannot be used is refused before anything loads
    prompts.write_text("a cat --d 5\n")
    assert train_main(flags + samples) == 2


def test_flux_dev_samples_with_t5_clip_and_a_vae_file(tmp_path, tokenizers):
    t5 = T5Config(width=64, depth=2, heads=4, head_width=16, mlp_width=96, vocab_size=len(T5_PIECES))
    clip = CLIPTextConfig(width=768, depth=2, mlp_width=256, vocab_size=521)
    vae = VAEConfig(base_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1, latent_channels=16, quant_conv=False)
    save_file(random_network_tensors(T5Encoder(t5), 1), str(tmp_path / "t5xxl_fp16.safetensors"))
    save_file(random_network_tensors(CLIPTextModel(clip), 2), str(tmp_path / "clip_l.safetensors"))
    save_file(random_network_tensors(AutoencoderKL(vae), 3), str(tmp_path / "ae.safetensors"))
    config = replace(TINY_FLUX_DEV, context_dim=64)
    model = load_model(write_random_checkpoint(config, tmp_path / "flux.safetensors", 4), "fp32")
    latents, conditioning = flux_data(count=2, size=8)
    dataset = make_dataset(latents, {**conditioning, "c_crossattn": conditioning["c_crossattn"][..., :64]})
    files = EncoderFiles.of(
        tmp_path / "flux.safetensors",
        tmp_path / "ae.safetensors",
        [tmp_path / "t5xxl_fp16.safetensors", tmp_path / "clip_l.safetensors"],
        tokenizers,
    )
    hook = prepare_samples(model, dataset, ["a red cat", "a dog"], files, SampleSettings(steps=2), tmp_path / "s")
    assert hook.negative is None and hook.positive[0]["c_crossattn"].shape == (1, 256, 64)
    training = TrainConfig(steps=2, batch_size=2, rank=2, gradient_checkpointing=False, **FP32)
    run_training(model, dataset, training, sample_every=2, on_sample=hook, **QUIET)
    image = np.asarray(Image.open(tmp_path / "s" / "000002_01.png"))
    assert image.shape == (64, 64, 3) and image.std() > 1  # latents 8 x 8, 8 pixels per latent


def readme_settings_file() -> str:
    """The `settings.toml` README shows under Training controls."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    return readme.split("```toml\n# settings.toml")[1].split("```")[0]


def test_the_readme_settings_file_trains_with_every_control(tmp_path, tokenizers, monkeypatch):
    """Warmup + cosine, Prodigy, logit-normal noise levels, EMA, validation, TensorBoard and samples from the one
    TOML file of README (its step counts shortened by flags, which override the file)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "settings.toml").write_text("# settings.toml" + readme_settings_file())
    (tmp_path / "prompts.txt").write_text("a red cat\n")
    checkpoint = write_sd1_checkpoint(tmp_path / "sd1.safetensors")
    images = write_images(tmp_path / "photos", sizes=((128, 128),) * 4)
    flags = ["--model", str(checkpoint), "--images", str(images), "--tokenizers", str(tokenizers)]
    flags += ["--resolution", "128", "--config", "settings.toml", "--output-dir", "out", "--prefix", "x"]
    flags += ["--steps", "4", "--warmup-steps", "2", "--validate-every", "2", "--sample-every", "4"]
    flags += ["--sample-steps", "2", "--rank", "2", "--training-dtype", "fp32", "--lora-dtype", "fp32"]
    assert train_main(flags) == 0
    out = tmp_path / "out"
    adapter, ema = out / "x_4_steps_00001_.safetensors", out / "x_4_steps_00001_ema.safetensors"
    with safe_open(str(adapter), "np") as file:
        settings = json.loads(file.metadata()["training_settings"])
    expected = {"optimizer": "Prodigy", "lr_scheduler": "cosine", "warmup_steps": 2, "ema_decay": 0.999}
    assert {key: settings[key] for key in expected} == expected
    assert settings["timestep_sampling"] == "logit_normal" and settings["validation_split"] == 0.1
    assert ema.is_file()
    validation = json.loads((out / "x_4_steps_00001_loss.json").read_text())["validation"]
    assert validation["step"] == [2, 4] and np.isfinite(validation["loss"]).all()
    assert len(list((tmp_path / "logs").glob("events.out.tfevents.*"))) == 1
    assert (out / "x_samples" / "000004_grid.png").is_file()
