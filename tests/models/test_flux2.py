"""Flux.2 in BFL layout: output parity with diffusers' Flux2Transformer2DModel loaded from the same single file
(dev and klein), config inference, exact full-size parameter counts, variant detection and the loader's
errors."""

from __future__ import annotations

import json
from dataclasses import replace

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxlora.models.checkpoint import torch_parameters
from jaxlora.models.demo import random_tensors, write_random_checkpoint
from jaxlora.models.diffusion import load_model
from jaxlora.models.family import UnknownLayoutError
from jaxlora.models.flux2 import FLUX2_DEV, FLUX2_KLEIN_4B, FLUX2_KLEIN_9B, Flux2
from jaxlora.models.flux2_family import TINY_FLUX2_DEV, TINY_FLUX2_KLEIN
from jaxlora.models.registry import find_family


def diffusers_config(config) -> dict:
    return {
        "_class_name": "Flux2Transformer2DModel",
        "patch_size": 1,
        "in_channels": config.in_channels,
        "num_layers": config.depth,
        "num_single_layers": config.depth_single_blocks,
        "attention_head_dim": config.head_dim,
        "num_attention_heads": config.num_heads,
        "joint_attention_dim": config.context_dim,
        "mlp_ratio": config.mlp_hidden / config.hidden_size,
        "guidance_embeds": config.guidance_embed,
        "axes_dims_rope": list(config.axes_dim),
        "rope_theta": int(config.theta),
    }


def diffusers_forward(path, config, config_dir, x_nhwc, sigma, context, guidance):
    import torch
    from diffusers import Flux2Transformer2DModel

    (config_dir / "config.json").write_text(json.dumps(diffusers_config(config)))
    model = Flux2Transformer2DModel.from_single_file(
        str(path), config=str(config_dir), local_files_only=True, torch_dtype=torch.float32
    )
    # Flux2Pipeline's packing (one token per latent pixel) and position ids (t, h, w, l), transcribed.
    batch, height, width, channels = x_nhwc.shape
    tokens = torch.from_numpy(np.ascontiguousarray(x_nhwc.reshape(batch, height * width, channels)))
    img_ids = torch.cartesian_prod(
        torch.zeros(1), torch.arange(height).float(), torch.arange(width).float(), torch.zeros(1)
    )
    txt_ids = torch.cartesian_prod(
        torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.arange(context.shape[1]).float()
    )
    with torch.no_grad():
        out = model(
            hidden_states=tokens,
            encoder_hidden_states=torch.from_numpy(context),
            timestep=torch.from_numpy(sigma),
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=None if guidance is None else torch.from_numpy(guidance),
        ).sample
    return out.numpy().reshape(batch, height, width, -1), model


@pytest.mark.parametrize("config", [TINY_FLUX2_DEV, TINY_FLUX2_KLEIN], ids=["dev", "klein"])
def test_flux2_matches_diffusers_single_file_in_fp32(tmp_path, config):
    # Bare keys, as BFL's release files: diffusers' Flux.2 converter reads no key prefix.
    path = write_random_checkpoint(config, tmp_path / "flux2.safetensors", seed=1, prefix="")
    model = load_model(path, dtype="fp32")
    assert model.config == config
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 128)).astype(np.float32)  # non-square: rows and columns distinct
    sigma = np.array([0.25, 0.9], np.float32)
    context = rng.standard_normal((2, 7, config.context_dim)).astype(np.float32)
    guidance = np.array([3.5, 1.0], np.float32) if config.guidance_embed else None

    expected, reference = diffusers_forward(path, config, tmp_path, x, sigma, context, guidance)
    # Every converted tensor was consumed: the reference holds exactly as many parameters as the file.
    assert sum(p.numel() for p in reference.parameters()) == model.param_count
    got = model.network(
        jnp.asarray(x),
        jnp.asarray(sigma),
        jnp.asarray(context),
        **({} if guidance is None else {"guidance": jnp.asarray(guidance)}),
    )
    scale = np.abs(expected).max()
    assert scale > 0.1
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=2e-5 * scale)


def count(config) -> int:
    return sum(int(np.prod(s.torch_shape(n))) for _, s, n in torch_parameters(Flux2(config)))


@pytest.mark.parametrize(
    ("config", "expected"),
    [(FLUX2_DEV, 32_223_281_152), (FLUX2_KLEIN_4B, 3_875_544_576), (FLUX2_KLEIN_9B, 9_078_581_248)],
    ids=["dev", "klein-4b", "klein-9b"],
)
def test_full_size_parameter_counts_are_exact_and_equal_diffusers(config, expected):
    import torch
    from diffusers import Flux2Transformer2DModel

    assert count(config) == expected
    with torch.device("meta"):  # diffusers' model at full size, without memory
        reference = Flux2Transformer2DModel(**{k: v for k, v in diffusers_config(config).items() if k[0] != "_"})
    assert sum(p.numel() for p in reference.parameters()) == expected


def test_full_size_keys_are_the_bfl_layout():
    keys = {key for key, _, _ in torch_parameters(Flux2(FLUX2_DEV))}
    assert len(keys) == 8 * 12 + 48 * 4 + 11
    for key in (
        "double_stream_modulation_img.lin.weight",
        "single_stream_modulation.lin.weight",
        "double_blocks.7.txt_attn.qkv.weight",
        "double_blocks.0.img_attn.norm.key_norm.scale",
        "single_blocks.47.linear1.weight",
        "guidance_in.out_layer.weight",
        "final_layer.adaLN_modulation.1.weight",
    ):
        assert key in keys
    assert not any(key.endswith(".bias") for key in keys)


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model.", ""])
@pytest.mark.parametrize(
    ("config", "variant"),
    [
        (TINY_FLUX2_DEV, "flux2-dev"),
        (TINY_FLUX2_KLEIN, "flux2-klein-4b"),
        (replace(TINY_FLUX2_KLEIN, context_dim=12288), "flux2-klein-9b"),
    ],
)
def test_config_and_variant_are_inferred_under_every_prefix(tmp_path, config, variant, prefix):
    path = write_random_checkpoint(config, tmp_path / "f.safetensors", prefix=prefix)
    model = load_model(path, weights=False)
    assert model.config == config
    assert model.variant.name == variant
    assert model.sampling.prediction == "const"
    assert model.latent_channels == 128


def test_flux1_and_flux2_files_are_told_apart():
    flux2_keys = [key for key, _, _ in torch_parameters(Flux2(TINY_FLUX2_DEV))]
    assert find_family(flux2_keys)[0].name == "flux2"
    assert "img_in.weight" in flux2_keys  # the Flux.1 marker alone would not tell them apart


def test_a_klein_file_with_an_unknown_text_width_is_refused_by_key(tmp_path):
    tensors = random_tensors(replace(TINY_FLUX2_KLEIN, context_dim=4096))
    save_file(tensors, str(tmp_path / "f.safetensors"))
    with pytest.raises(UnknownLayoutError, match=r"txt_in\.weight takes 4096-d text.*7680"):
        load_model(tmp_path / "f.safetensors", weights=False)


def test_sampling_is_model_sampling_flux_at_mu_2_02(tmp_path):
    model = load_model(write_random_checkpoint(TINY_FLUX2_KLEIN, tmp_path / "f.safetensors"), weights=False)
    sigma = float(model.sampling.percent_to_sigma(0.5))
    assert sigma == pytest.approx(np.exp(2.02) / (np.exp(2.02) + 1.0), rel=1e-6)  # flux_time_shift at t = 0.5
    with pytest.raises(ValueError, match="predicts a flow"):
        load_model(write_random_checkpoint(TINY_FLUX2_KLEIN, tmp_path / "g.safetensors"), prediction="v", weights=False)


def test_context_is_front_padded_to_512_tokens_as_comfyui_does(tmp_path):
    model = load_model(write_random_checkpoint(TINY_FLUX2_DEV, tmp_path / "f.safetensors"), weights=False)
    context = np.arange(2 * 3 * 15360, dtype=np.float32).reshape(2, 3, 15360)
    inputs = model.network_inputs({"c_crossattn": context}, (4, 4), jnp.float32)
    assert inputs["context"].shape == (2, 512, 15360)
    np.testing.assert_array_equal(np.asarray(inputs["context"][:, -3:]), context)
    assert not np.asarray(inputs["context"][:, :-3]).any()
    assert inputs["guidance"].tolist() == [3.5]
