"""Wan in ComfyUI's layout: output parity with diffusers' WanTransformer3DModel loaded from the same single file
(Wan 2.1 and Wan 2.2 TI2V-5B layouts) on video latents, config inference under every prefix, exact full-size
parameter counts, sampling and latent formats as ComfyUI sets them, and the files refused by key."""

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
from jaxlora.models.wan import Wan
from jaxlora.models.wan_family import (
    TINY_WAN21,
    TINY_WAN22_TI2V,
    WAN21_1_3B,
    WAN21_14B,
    WAN21_LATENT,
    WAN22_LATENT,
    WAN22_TI2V_5B,
)


def diffusers_config(config) -> dict:
    return {
        "patch_size": [1, 2, 2],
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "text_dim": config.text_dim,
        "ffn_dim": config.ffn_dim,
        "num_layers": config.num_layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
    }


@pytest.mark.parametrize("config", [TINY_WAN21, TINY_WAN22_TI2V], ids=["wan2.1", "wan2.2-ti2v"])
def test_wan_matches_diffusers_single_file_on_video_latents_in_fp32(tmp_path, config):
    import torch
    from diffusers import WanTransformer3DModel

    path = write_random_checkpoint(config, tmp_path / "wan.safetensors", seed=1)
    model = load_model(path, dtype="fp32")
    assert model.config == config
    (tmp_path / "config.json").write_text(
        json.dumps({"_class_name": "WanTransformer3DModel", **diffusers_config(config)})
    )
    reference = WanTransformer3DModel.from_single_file(
        str(path), config=str(tmp_path), local_files_only=True, torch_dtype=torch.float32
    )
    # Every converted tensor was consumed: the reference holds exactly as many parameters as the file.
    assert sum(p.numel() for p in reference.parameters()) == model.param_count
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, config.in_channels, 3, 4, 6)).astype(np.float32)  # 3 frames; rows != columns
    timestep = np.array([250.0, 900.0], np.float32)  # 1000 sigma
    context = rng.standard_normal((2, 7, config.text_dim)).astype(np.float32)
    with torch.no_grad():
        expected = reference(
            hidden_states=torch.from_numpy(x),
            timestep=torch.from_numpy(timestep),
            encoder_hidden_states=torch.from_numpy(context),
        ).sample.numpy()
    got = model.network(jnp.asarray(np.moveaxis(x, 1, -1)), jnp.asarray(timestep), jnp.asarray(context))
    scale = np.abs(expected).max()
    assert scale > 0.1
    np.testing.assert_allclose(np.moveaxis(np.asarray(got), -1, 1), expected, rtol=0, atol=2e-5 * scale)


def count(config) -> int:
    return sum(int(np.prod(s.torch_shape(n))) for _, s, n in torch_parameters(Wan(config)))


# Published sizes: "1.3B", "14B" (each Wan 2.2 A14B expert is a Wan 2.1 14B-shaped network), "5B".
@pytest.mark.parametrize(
    ("config", "expected"),
    [(WAN21_1_3B, 1_418_996_800), (WAN21_14B, 14_288_491_584), (WAN22_TI2V_5B, 4_999_787_712)],
    ids=["wan2.1-1.3b", "wan2.1-14b", "wan2.2-ti2v-5b"],
)
def test_full_size_parameter_counts_are_exact_and_equal_diffusers(config, expected):
    import torch
    from diffusers import WanTransformer3DModel

    assert count(config) == expected
    with torch.device("meta"):  # diffusers' model at full size, without memory
        reference = WanTransformer3DModel(**diffusers_config(config))
    assert sum(p.numel() for p in reference.parameters()) == expected


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model.", ""])
@pytest.mark.parametrize(
    ("config", "variant", "channels"),
    [(TINY_WAN21, "wan2.1-t2v", 16), (TINY_WAN22_TI2V, "wan2.2-ti2v-5b", 48)],
)
def test_config_and_variant_are_inferred_under_every_prefix(tmp_path, config, variant, channels, prefix):
    path = write_random_checkpoint(config, tmp_path / "w.safetensors", prefix=prefix)
    model = load_model(path, weights=False)
    assert model.config == config
    assert model.variant.name == variant
    assert model.latent_channels == channels
    assert len(model.latent_format.channel_mean) == channels
    assert [(f.name, f.width) for f in model.conditioning_fields] == [("c_crossattn", 4096)]


def test_sampling_is_discrete_flow_shift_8_multiplier_1000(tmp_path):
    model = load_model(write_random_checkpoint(TINY_WAN21, tmp_path / "w.safetensors"), weights=False)
    assert model.sampling.prediction == "const"
    sigma = float(model.sampling.percent_to_sigma(0.5))
    assert sigma == pytest.approx(8.0 * 0.5 / (1.0 + 7.0 * 0.5), rel=1e-6)  # time_snr_shift(8, 0.5)
    assert float(model.sampling.timestep(sigma)) == pytest.approx(1000.0 * sigma, rel=1e-6)
    assert float(model.run_sampling(shift=5.0).percent_to_sigma(0.5)) == pytest.approx(5.0 / 6.0, rel=1e-6)
    with pytest.raises(ValueError, match="predicts a flow"):
        model.run_sampling(prediction="v")


def test_latent_formats_are_comfyuis_per_channel_mean_and_std():
    x = np.random.default_rng(0).standard_normal((2, 16, 3, 4, 4)).astype(np.float32)
    mean = np.asarray(WAN21_LATENT.channel_mean, np.float32).reshape(1, 16, 1, 1, 1)
    std = np.asarray(WAN21_LATENT.channel_std, np.float32).reshape(1, 16, 1, 1, 1)
    np.testing.assert_allclose(WAN21_LATENT.process_in(x), (x - mean) / std, rtol=1e-6)
    np.testing.assert_allclose(WAN21_LATENT.process_out(WAN21_LATENT.process_in(x)), x, atol=1e-5)
    assert (WAN21_LATENT.channel_mean[0], WAN21_LATENT.channel_std[-1]) == (-0.7571, 1.9160)
    assert (len(WAN22_LATENT.channel_mean), WAN22_LATENT.channel_mean[-1], WAN22_LATENT.channel_std[0]) == (
        48,
        -0.0667,
        0.4765,
    )
    with pytest.raises(ValueError, match="latents have 16 channels, the latent format has 48"):
        WAN22_LATENT.process_in(x)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"img_emb.proj.0.bias": np.zeros(1280, np.float32)}, r"img_emb\.proj\.0\.bias.*image-to-video"),
        ({"vace_patch_embedding.weight": np.zeros((256, 96, 1, 2, 2), np.float32)}, "VACE"),
    ],
    ids=["i2v-clip", "vace"],
)
def test_image_to_video_and_other_wan_files_are_refused_by_key(tmp_path, extra, match):
    save_file({**random_tensors(TINY_WAN21), **extra}, str(tmp_path / "w.safetensors"))
    with pytest.raises(UnknownLayoutError, match=match):
        load_model(tmp_path / "w.safetensors", weights=False)


def test_wan22_i2v_concat_channels_are_refused_by_key(tmp_path):
    tensors = random_tensors(replace(TINY_WAN21, in_channels=36))
    save_file(tensors, str(tmp_path / "w.safetensors"))
    with pytest.raises(UnknownLayoutError, match=r"patch_embedding\.weight takes 36 channels for 16"):
        load_model(tmp_path / "w.safetensors", weights=False)


def test_inspect_describes_a_wan_file_and_runs_a_one_frame_forward(tmp_path, capsys):
    from jaxlora.inspect import main

    main([str(write_random_checkpoint(TINY_WAN22_TI2V, tmp_path / "w.safetensors")), "--latent-size", "4"])
    out = capsys.readouterr().out
    assert "wan2.2-ti2v-5b (Wan 2.2 TI2V-5B)" in out and "2 heads of 128" in out
    assert "per-channel mean and std (48 channels)" in out
    assert "output (1, 1, 4, 4, 48) finite" in out
