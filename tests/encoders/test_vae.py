"""The ldm VAE against diffusers' AutoencoderKL loaded from the same single file (fp32): posterior mean and
standard deviation, decoded images, and every parameter accounted for."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from safetensors.numpy import save_file

from jaxlora.encoders.loading import MissingEncoderError, load_vae
from jaxlora.encoders.vae import AutoencoderKL, VAEConfig, encode
from jaxlora.models.checkpoint import CheckpointError
from jaxlora.models.demo import random_network_tensors

# Three levels (downscale 4), one ResnetBlock per encoder level, widths 32/64/64: every block kind, a width change
# with its nin_shortcut, both resamplers. GroupNorm's 32 groups fix the smallest width.
SD_LIKE = VAEConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4, quant_conv=True)
FLUX_LIKE = VAEConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=16, quant_conv=False)
TOLERANCE = 2e-5  # max |diff| relative to max |value|, fp32


def write_vae(config: VAEConfig, path, prefix: str, seed: int = 0) -> dict[str, np.ndarray]:
    tensors = random_network_tensors(AutoencoderKL(config), seed)
    save_file({prefix + key: value for key, value in tensors.items()}, str(path))
    return tensors


def diffusers_vae(config: VAEConfig, path, folder) -> DiffusersAutoencoderKL:
    levels = len(config.channel_mult)
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "_class_name": "AutoencoderKL",
                "in_channels": 3,
                "out_channels": 3,
                "down_block_types": ["DownEncoderBlock2D"] * levels,
                "up_block_types": ["UpDecoderBlock2D"] * levels,
                "block_out_channels": list(config.widths()),
                "layers_per_block": config.num_res_blocks,
                "latent_channels": config.latent_channels,
                "norm_num_groups": 32,
                "use_quant_conv": config.quant_conv,
                "use_post_quant_conv": config.quant_conv,
            }
        )
    )
    model = DiffusersAutoencoderKL.from_single_file(
        str(path), config=str(folder), local_files_only=True, torch_dtype=torch.float32
    )
    return model.eval()


def relative_error(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.mark.parametrize(("config", "prefix"), [(SD_LIKE, "first_stage_model."), (FLUX_LIKE, "")])
def test_vae_matches_diffusers(config, prefix, tmp_path):
    path = tmp_path / "vae.safetensors"
    tensors = write_vae(config, path, prefix)
    if prefix:  # a full checkpoint also holds the diffusion model: the VAE loader reads only its own keys
        save_file({**{prefix + k: v for k, v in tensors.items()}, "model.diffusion_model.x.weight": np.ones(2)}, path)
    ours = load_vae(path, dtype="fp32")
    assert ours.config == config
    theirs = diffusers_vae(config, path, tmp_path / "config")
    assert sum(p.numel() for p in theirs.parameters()) == sum(v.size for v in tensors.values())

    rng = np.random.default_rng(1)
    images = rng.uniform(0.0, 1.0, (2, 16, 24, 3)).astype(np.float32)  # non-square, batch 2
    with torch.no_grad():
        posterior = theirs.encode(torch.from_numpy(images.transpose(0, 3, 1, 2) * 2 - 1)).latent_dist
    mean, logvar = ours.moments(jnp.asarray(images))
    assert mean.shape == (2, 4, 6, config.latent_channels)
    assert relative_error(mean.transpose(0, 3, 1, 2), posterior.mean) <= TOLERANCE
    assert relative_error(jnp.exp(0.5 * logvar).transpose(0, 3, 1, 2), posterior.std) <= TOLERANCE
    np.testing.assert_array_equal(encode(ours, jnp.asarray(images)), mean)

    latents = rng.standard_normal((2, 4, 6, config.latent_channels)).astype(np.float32)
    with torch.no_grad():
        decoded = theirs.decode(torch.from_numpy(latents.transpose(0, 3, 1, 2))).sample
    expected = np.clip((decoded.numpy().transpose(0, 2, 3, 1) + 1) / 2, 0, 1)
    assert relative_error(ours.decode(jnp.asarray(latents)), expected) <= TOLERANCE


def test_sampled_latents_follow_the_posterior(tmp_path):
    """A keyed encode is mean + std * N(0, 1): the same key gives the same draw, and the standardised draw is the
    key's normal noise."""
    path = tmp_path / "vae.safetensors"
    write_vae(SD_LIKE, path, "")
    vae = load_vae(path)
    images = jnp.asarray(np.random.default_rng(2).uniform(0, 1, (1, 16, 16, 3)), jnp.float32)
    key = jax.random.key(5)
    mean, logvar = vae.moments(images)
    sample = encode(vae, images, key)
    np.testing.assert_array_equal(sample, encode(vae, images, key))
    noise = jax.random.normal(key, mean.shape, jnp.float32)
    np.testing.assert_allclose((sample - mean) / jnp.exp(0.5 * logvar), noise, rtol=1e-4, atol=1e-4)


def test_file_without_vae_names_what_to_pass(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": np.zeros((4, 4, 3, 3), np.float32)}, str(path))
    with pytest.raises(MissingEncoderError, match="models/vae/"):
        load_vae(path)


def test_diffusers_layout_vae_is_refused_by_name(tmp_path):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({"encoder.down_blocks.0.resnets.0.conv1.weight": np.zeros((4, 4, 3, 3), np.float32)}, str(path))
    with pytest.raises(CheckpointError, match="diffusers layout"):
        load_vae(path)


def test_wrong_shape_is_named_before_reading(tmp_path):
    path = tmp_path / "vae.safetensors"
    tensors = random_network_tensors(AutoencoderKL(SD_LIKE))
    tensors["decoder.mid.attn_1.q.weight"] = np.zeros((64, 64, 3, 3), np.float32)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match="decoder.mid.attn_1.q.weight"):
        load_vae(path)
