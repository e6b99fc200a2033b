"""A folder of generated images and captions -> dataset -> LoRA that lowers the loss, through a tiny SD1.x
checkpoint that holds all three parts (UNet, VAE, CLIP-L) in their real layouts; the folder's rules and
errors; re-use of an unchanged dataset."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from jaxlora import load_dataset, load_model
from jaxlora.dataset import main as dataset_main
from jaxlora.encoders.clip import CLIPTextConfig, CLIPTextModel
from jaxlora.encoders.images import ImageFolderError, bucket_sizes, place
from jaxlora.encoders.loading import MissingEncoderError
from jaxlora.encoders.make_dataset import ImageDatasetSettings, make_image_dataset
from jaxlora.encoders.vae import AutoencoderKL, VAEConfig
from jaxlora.models.demo import random_network_tensors, random_tensors
from jaxlora.models.unet_family import DEMO_UNET
from jaxlora.train.__main__ import main as train_main
from jaxlora.train.config import TrainConfig
from jaxlora.train.loop import adapted_network, run_training
from tests.train.test_train import FP32, QUIET, fixed_draw_loss

TINY_VAE = VAEConfig(base_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1)  # 8 pixels per latent
TINY_CLIP = CLIPTextConfig(width=768, depth=2, mlp_width=256, vocab_size=521)
QUIET_PROGRESS = {"progress": lambda line: None}
# The training of the dataset made from images, in the library and through the command line.
TRAINING = {"steps": 30, "batch_size": 2, "rank": 4, "learning_rate": 3e-3, **FP32}


def write_sd1_checkpoint(path, with_vae=True):
    tensors = {f"model.diffusion_model.{k}": v for k, v in random_tensors(DEMO_UNET, 1).items()}
    tensors |= {
        f"cond_stage_model.transformer.{k}": v for k, v in random_network_tensors(CLIPTextModel(TINY_CLIP), 2).items()
    }
    if with_vae:
        tensors |= {f"first_stage_model.{k}": v for k, v in random_network_tensors(AutoencoderKL(TINY_VAE), 3).items()}
    save_file(tensors, str(path))
    return path


def write_images(folder, sizes=((128, 128), (160, 128), (128, 160), (256, 96)), repeats_folder="3_style"):
    """Smooth colour patterns with captions; the last image sits in a kohya repeats folder."""
    rng = np.random.default_rng(0)
    for i, (width, height) in enumerate(sizes):
        target = folder / repeats_folder if i == len(sizes) - 1 else folder
        target.mkdir(parents=True, exist_ok=True)
        yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
        phase = rng.uniform(0, 6, 3)
        pixels = 127.5 * (1 + np.sin(6 * xx[..., None] + 4 * yy[..., None] + phase))
        Image.fromarray(pixels.astype(np.uint8)).save(target / f"img{i}.png")
        (target / f"img{i}.txt").write_text(f"a red cat number {i}")
    return folder


@pytest.fixture(scope="module")
def made(tmp_path_factory, tokenizer_folder):
    root = tmp_path_factory.mktemp("images")
    checkpoint = write_sd1_checkpoint(root / "sd1.safetensors")
    images = write_images(root / "photos")
    out = make_image_dataset(
        images, checkpoint, root / "dataset", tokenizer_folder, ImageDatasetSettings(128), **QUIET_PROGRESS
    )
    return checkpoint, images, out


def test_dataset_from_images_trains_a_lora(made):
    checkpoint, _, out = made
    manifest = json.loads((out / "dataset.json").read_text())
    assert {(b["width"], b["height"]) for b in manifest["buckets"]} == {(128, 128), (192, 64)}
    assert sum(b["samples"] for b in manifest["buckets"]) == 3 + 3  # three images, and one counted three times
    dataset = load_dataset(out)
    assert sorted(b.latents.shape for b in dataset.buckets) == [(3, 4, 8, 24), (3, 4, 16, 16)]
    assert all(b.empty["c_crossattn"].shape == (1, 77, 768) for b in dataset.buckets)  # for caption dropout
    model = load_model(checkpoint, "fp32")
    config = TrainConfig(**TRAINING, gradient_checkpointing=False)
    untrained, _ = adapted_network(model, config, jnp.float32)
    result = run_training(model, dataset, config, **QUIET)
    before = fixed_draw_loss(model, untrained, dataset=dataset)
    after = fixed_draw_loss(model, result.model_with_lora.network, dataset=dataset)
    assert after < 0.9 * before, (before, after)


def test_unchanged_inputs_reuse_the_dataset_and_changed_ones_never_overwrite(made, tokenizer_folder):
    checkpoint, images, out = made
    lines = []
    settings = ImageDatasetSettings(128)
    assert make_image_dataset(images, checkpoint, out, tokenizer_folder, settings, progress=lines.append) == out
    assert lines == [f"{out}: already made from these images, captions, files and settings; re-used"]
    caption = images / "img0.txt"
    original = caption.read_text()
    caption.write_text("a blue dog")
    try:
        with pytest.raises(FileExistsError, match="other inputs"):
            make_image_dataset(images, checkpoint, out, tokenizer_folder, settings, **QUIET_PROGRESS)
    finally:
        caption.write_text(original)


def test_folder_problems_are_named_before_encoding(tmp_path, tokenizer_folder):
    checkpoint = write_sd1_checkpoint(tmp_path / "sd1.safetensors")
    settings = ImageDatasetSettings(128)

    def make(folder, model=checkpoint):
        return make_image_dataset(folder, model, tmp_path / "out", tokenizer_folder, settings, **QUIET_PROGRESS)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageFolderError, match="holds no images"):
        make(empty)
    orphan = write_images(tmp_path / "orphan", sizes=((128, 128),))
    (orphan / "lost.txt").write_text("no image")
    with pytest.raises(ImageFolderError, match="lost.txt"):
        make(orphan)
    truncated = write_images(tmp_path / "truncated", sizes=((128, 128), (128, 128)))
    data = (truncated / "img0.png").read_bytes()
    (truncated / "img0.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageFolderError, match="img0.png is not a readable image"):
        make(truncated)
    small = write_images(tmp_path / "small", sizes=((64, 64),))
    with pytest.raises(ImageFolderError, match="64x64, smaller than its 128x128 bucket"):
        make(small)
    uncaptioned = write_images(tmp_path / "uncaptioned", sizes=((128, 128),))
    (uncaptioned / "3_style" / "img0.txt").unlink()
    no_vae = write_sd1_checkpoint(tmp_path / "no_vae.safetensors", with_vae=False)
    with pytest.warns(UserWarning, match="no caption file"), pytest.raises(MissingEncoderError, match="models/vae/"):
        make(uncaptioned, no_vae)
    assert not (tmp_path / "out").exists()


def test_buckets_keep_the_area_and_never_upscale():
    buckets = bucket_sizes(512)
    assert (512, 512) in buckets and all(w * h <= 512 * 512 and w % 64 == h % 64 == 0 for w, h in buckets)
    placement = place((1200, 800), buckets)
    assert placement.bucket == (640, 384)  # aspect 1.67 for 1.5: the nearest in log scale
    assert placement.scaled == (640, 427) and placement.crop == (0, 21)


def test_command_line_reuses_the_folder_and_names_errors(made, tokenizer_folder, tmp_path, capsys):
    checkpoint, images, out = made
    common = ["--model", str(checkpoint), "--tokenizers", str(tokenizer_folder), "--resolution", "128"]
    assert dataset_main([str(images), "--out", str(out), *common]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out) and "re-used" in captured.err
    assert dataset_main([str(tmp_path / "missing"), "--out", str(tmp_path / "new"), *common]) == 2
    assert "error: image folder not found" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_train_command_encodes_images_then_trains_and_reuses_them(made, tokenizer_folder, tmp_path, capsys):
    """`python -m jaxlora.train --images`: the dataset is made in the output folder, named by its inputs, and
    found again by the next run; --dataset and --images together are a usage error. The settings are `TRAINING`'s,
    so the runs take the steps test_dataset_from_images_trains_a_lora compiled from the session's cache."""
    checkpoint, images, _ = made
    flags = ["--model", str(checkpoint), "--images", str(images), "--tokenizers", str(tokenizer_folder)]
    flags += ["--resolution", "128", "--steps", "1", "--output-dir", str(tmp_path), "--prefix", "photos_lora"]
    flags += [f"--{name.replace('_', '-')}={value}" for name, value in TRAINING.items() if name != "steps"]
    flags += ["--no-gradient-checkpointing", "--no-compile-cache"]
    assert train_main(flags) == 0
    datasets = list((tmp_path / "photos_lora_datasets").iterdir())
    assert len(datasets) == 1 and datasets[0].name.startswith("photos_")
    assert "re-used" not in capsys.readouterr().err
    assert train_main(flags) == 0
    assert "re-used" in capsys.readouterr().err
    assert list((tmp_path / "photos_lora_datasets").iterdir()) == datasets
    assert len(list(tmp_path.glob("photos_lora*.safetensors"))) == 2  # two runs, two adapters, none overwritten
    assert train_main(["--model", str(checkpoint), "--images", str(images), "--dataset", str(images)]) == 2
    assert "not both" in capsys.readouterr().err
