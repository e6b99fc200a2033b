"""Qwen-Image in ComfyUI's layout: output parity with diffusers' QwenImageTransformer2DModel loaded from the same
single file, config inference, the exact full-size parameter count, sampling and latent format as ComfyUI sets
them, and the loader's errors."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxlora.models.checkpoint import torch_parameters
from jaxlora.models.demo import random_tensors, write_random_checkpoint
from jaxlora.models.diffusion import load_model
from jaxlora.models.family import UnknownLayoutError
from jaxlora.models.qwen_image import QWEN_IMAGE, QwenImage, qwen_position_ids
from jaxlora.models.qwen_image_family import TINY_QWEN_IMAGE
from jaxlora.models.registry import find_family


def diffusers_config(config) -> dict:
    return {
        "_class_name": "QwenImageTransformer2DModel",
        "patch_size": 2,
        "in_channels": 4 * config.in_channels,
        "out_channels": config.out_channels,
        "num_layers": config.depth,
        "attention_head_dim": config.head_dim,
        "num_attention_heads": config.num_heads,
        "joint_attention_dim": config.context_dim,
        "axes_dims_rope": list(config.axes_dim),
    }


def diffusers_forward(path, config, config_dir, x_nhwc, sigma, context):
    import torch
    from diffusers import QwenImageTransformer2DModel

    (config_dir / "config.json").write_text(json.dumps(diffusers_config(config)))
    model = QwenImageTransformer2DModel.from_single_file(
        str(path), config=str(config_dir), local_files_only=True, torch_dtype=torch.float32
    )
    # QwenImagePipeline._pack_latents, transcribed: 2x2 patches, features ordered (c, ph, pw).
    batch, height, width, channels = x_nhwc.shape
    x = x_nhwc.transpose(0, 3, 1, 2).reshape(batch, channels, height // 2, 2, width // 2, 2)
    tokens = np.ascontiguousarray(x.transpose(0, 2, 4, 1, 3, 5).reshape(batch, -1, 4 * channels))
    with torch.no_grad():
        out = model(
            hidden_states=torch.from_numpy(tokens),
            encoder_hidden_states=torch.from_numpy(context),
            timestep=torch.from_numpy(sigma),
            img_shapes=[(1, height // 2, width // 2)] * batch,
        ).sample.numpy()
    out = out.reshape(batch, height // 2, width // 2, channels, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return out.reshape(batch, height, width, channels), model


def test_qwen_image_matches_diffusers_single_file_in_fp32(tmp_path):
    # The diffusion model as ComfyUI's repackaged files hold it (bare keys; diffusers converts nothing).
    path = write_random_checkpoint(TINY_QWEN_IMAGE, tmp_path / "qwen.safetensors", seed=1, prefix="")
    model = load_model(path, dtype="fp32")
    assert model.config == TINY_QWEN_IMAGE
    rng = np.random.default_rng(0)
    # A 4 x 6 token grid: rows and columns distinct, both even (where ComfyUI's and diffusers' centring agree).
    x = rng.standard_normal((2, 8, 12, 16)).astype(np.float32)
    sigma = np.array([0.25, 0.9], np.float32)
    context = rng.standard_normal((2, 7, 3584)).astype(np.float32)

    expected, reference = diffusers_forward(path, TINY_QWEN_IMAGE, tmp_path, x, sigma, context)
    # Every tensor of the file was consumed: the reference holds exactly as many parameters as jaxlora loaded.
    assert sum(p.numel() for p in reference.parameters()) == model.param_count
    got = model.network(jnp.asarray(x), jnp.asarray(sigma), jnp.asarray(context))
    scale = np.abs(expected).max()
    assert scale > 0.1
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=2e-5 * scale)


def test_full_size_parameter_count_is_exact_and_equals_diffusers():
    import torch
    from diffusers import QwenImageTransformer2DModel

    expected = 20_430_401_088  # the published "20B"
    count = sum(int(np.prod(s.torch_shape(n))) for _, s, n in torch_parameters(QwenImage(QWEN_IMAGE)))
    assert count == expected
    with torch.device("meta"):
        kwargs = {k: v for k, v in diffusers_config(QWEN_IMAGE).items() if k[0] != "_"}
        reference = QwenImageTransformer2DModel(**kwargs)
    assert sum(p.numel() for p in reference.parameters()) == expected
    keys = {key for key, _, _ in torch_parameters(QwenImage(QWEN_IMAGE))}
    assert keys == set(reference.state_dict())  # the file's keys are diffusers' own names


def test_rope_positions_are_centred_as_comfyui_places_them():
    ids = qwen_position_ids((3, 4), 2)
    assert ids[:2].tolist() == [[2, 2, 2], [3, 3, 3]]  # text starts at max(3 // 2, 4 // 2)
    assert ids[2].tolist() == [0, -1, -2] and ids[-1].tolist() == [0, 1, 1]


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model.", ""])
def test_config_is_inferred_and_sampling_is_comfyuis_under_every_prefix(tmp_path, prefix):
    path = write_random_checkpoint(TINY_QWEN_IMAGE, tmp_path / "q.safetensors", prefix=prefix)
    model = load_model(path, weights=False)
    assert model.config == TINY_QWEN_IMAGE and model.variant.name == "qwen-image"
    assert model.latent_channels == 16 and model.conditioning_fields[0].width == 3584
    # ModelSamplingFlux at mu 1.15: flux_time_shift(1.15, 1, t) at t = 0.5, timestep = sigma.
    assert model.sampling.prediction == "const"
    assert float(model.sampling.percent_to_sigma(0.5)) == pytest.approx(np.exp(1.15) / (np.exp(1.15) + 1), 1e-6)
    assert float(model.sampling.timestep(0.3)) == pytest.approx(0.3)
    assert float(model.run_sampling("auto", 3.0).percent_to_sigma(0.5)) == pytest.approx(np.exp(3) / (np.exp(3) + 1))
    with pytest.raises(ValueError, match="predicts a flow"):
        model.run_sampling("v")


def test_latent_format_is_comfyuis_wan21_per_channel():
    from jaxlora.models.qwen_image_family import WAN21_LATENT

    raw = np.random.default_rng(0).standard_normal((2, 16, 3, 3)).astype(np.float32)
    mean = np.asarray(WAN21_LATENT.channel_mean, np.float32).reshape(1, 16, 1, 1)
    std = np.asarray(WAN21_LATENT.channel_std, np.float32).reshape(1, 16, 1, 1)
    scaled = np.asarray(WAN21_LATENT.process_in(jnp.asarray(raw)))
    np.testing.assert_allclose(scaled, (raw - mean) / std, rtol=1e-6)
    assert WAN21_LATENT.channel_mean[7] == 1.5508 and WAN21_LATENT.channel_std[8] == 3.2687
    np.testing.assert_allclose(np.asarray(WAN21_LATENT.process_out(jnp.asarray(scaled))), raw, atol=1e-5)


def test_files_are_recognised_and_wrong_ones_refused_by_key(tmp_path):
    tensors = random_tensors(TINY_QWEN_IMAGE)
    assert find_family(tensors)[0].name == "qwen-image"
    bad = dict(tensors)
    bad["transformer_blocks.0.attn.norm_q.weight"] = np.ones(64, np.float32)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UnknownLayoutError, match=r"norm_q\.weight: head width 64.*need 128"):
        load_model(tmp_path / "bad.safetensors", weights=False)
    layered = {**tensors, "time_text_embed.addition_t_embedding.weight": np.zeros((2, 256), np.float32)}
    save_file(layered, str(tmp_path / "layered.safetensors"))
    with pytest.raises(UnknownLayoutError, match="Qwen-Image-Layered"):
        load_model(tmp_path / "layered.safetensors", weights=False)
