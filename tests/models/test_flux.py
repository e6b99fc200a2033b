"""Flux.1 in BFL layout: output parity with diffusers' FluxTransformer2DModel loaded from the same single file,
config inference, full-size parameter counts, and the loader's errors."""

from __future__ import annotations

import contextlib
import json
from unittest import mock

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxlora.models.checkpoint import KeyMismatchError, ShapeMismatchError, torch_parameters
from jaxlora.models.demo import random_tensors, write_random_checkpoint
from jaxlora.models.diffusion import load_model
from jaxlora.models.flux import FLUX_DEV, FLUX_SCHNELL, Flux
from jaxlora.models.flux_family import TINY_FLUX_DEV, TINY_FLUX_SCHNELL


def stream_diffusers_config(config) -> dict:
    """The diffusers config entries of a Flux-line transformer's streams (2x2 patches packed into channels)."""
    return {
        "patch_size": 1,
        "in_channels": 4 * config.in_channels,
        "num_layers": config.depth,
        "num_single_layers": config.depth_single_blocks,
        "attention_head_dim": config.head_dim,
        "num_attention_heads": config.num_heads,
        "joint_attention_dim": config.context_dim,
        "axes_dims_rope": list(config.axes_dim),
    }


def diffusers_config(config) -> dict:
    return {
        "_class_name": "FluxTransformer2DModel",
        **stream_diffusers_config(config),
        "pooled_projection_dim": config.vec_in_dim,
        "guidance_embeds": config.guidance_embed,
    }


@contextlib.contextmanager
def tiny_linear1_split(config):
    """diffusers' converter splits `linear1` at the full-size widths (3072 x 3, 12288); scale them to the tiny
    model for the call, leaving every other split alone."""
    import torch

    original = torch.split
    full = (3072, 3072, 3072, 12288)
    tiny = (config.hidden_size,) * 3 + (config.mlp_hidden,)

    def split(tensor, sizes, dim=0):
        return original(tensor, tiny if tuple(np.atleast_1d(sizes)) == full else sizes, dim)

    with mock.patch.object(torch, "split", split):
        yield


def diffusers_forward(path, config, config_dir, x_nhwc, sigma, context, pooled, guidance):
    import torch
    from diffusers import FluxTransformer2DModel

    (config_dir / "config.json").write_text(json.dumps(diffusers_config(config)))
    with tiny_linear1_split(config):
        model = FluxTransformer2DModel.from_single_file(
            str(path), config=str(config_dir), local_files_only=True, torch_dtype=torch.float32
        )
    with torch.no_grad():
        out = pipeline_call(
            model,
            x_nhwc,
            context,
            sigma,
            pooled_projections=torch.from_numpy(pooled),
            guidance=None if guidance is None else torch.from_numpy(guidance),
        )
    return out, model


def pipeline_call(model, x_nhwc, context, sigma, **inputs) -> np.ndarray:
    """The diffusers pipelines' packing, position ids and unpacking around a Flux-line transformer (transcribed:
    the pipelines need transformers); NHWC in and out."""
    import torch

    batch, height, width, channels = x_nhwc.shape
    h, w = height // 2, width // 2
    latents = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    packed = latents.view(batch, channels, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5).reshape(batch, h * w, channels * 4)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] += torch.arange(h)[:, None]
    img_ids[..., 2] += torch.arange(w)[None, :]
    out = model(
        hidden_states=packed,
        encoder_hidden_states=torch.from_numpy(context),
        timestep=torch.from_numpy(sigma),
        img_ids=img_ids.reshape(h * w, 3),
        txt_ids=torch.zeros(context.shape[1], 3),
        **inputs,
    ).sample
    out = out.view(batch, h, w, -1, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(batch, -1, height, width)
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("config", [TINY_FLUX_DEV, TINY_FLUX_SCHNELL], ids=["dev", "schnell"])
def test_flux_matches_diffusers_single_file_in_fp32(tmp_path, config):
    path = write_random_checkpoint(config, tmp_path / "flux.safetensors", seed=1)
    model = load_model(path, dtype="fp32")
    assert model.config == config
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 10, 16)).astype(np.float32)  # non-square: rows and columns distinct
    sigma = np.array([0.25, 0.9], np.float32)
    context = rng.standard_normal((2, 7, 4096)).astype(np.float32)
    pooled = rng.standard_normal((2, 768)).astype(np.float32)
    guidance = np.array([3.5, 1.0], np.float32) if config.guidance_embed else None

    expected, reference = diffusers_forward(path, config, tmp_path, x, sigma, context, pooled, guidance)
    # Every converted tensor was consumed: the reference holds exactly as many parameters as the file.
    assert sum(p.numel() for p in reference.parameters()) == model.param_count
    got = model.network(
        jnp.asarray(x),
        jnp.asarray(sigma),
        jnp.asarray(context),
        jnp.asarray(pooled),
        **({} if guidance is None else {"guidance": jnp.asarray(guidance)}),
    )
    scale = np.abs(expected).max()
    assert scale > 0.1
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=2e-5 * scale)


def test_full_size_parameter_counts_are_exact():
    count = lambda config: sum(int(np.prod(s.torch_shape(n))) for _, s, n in torch_parameters(Flux(config)))  # noqa: E731
    assert count(FLUX_DEV) == 11_901_408_320
    assert count(FLUX_SCHNELL) == 11_891_178_560


def test_full_size_keys_are_the_bfl_layout():
    keys = {key for key, _, _ in torch_parameters(Flux(FLUX_DEV))}
    assert len(keys) == 780
    for key in (
        "double_blocks.18.img_attn.qkv.weight",
        "double_blocks.0.txt_attn.norm.key_norm.scale",
        "single_blocks.37.linear1.weight",
        "single_blocks.0.modulation.lin.bias",
        "guidance_in.out_layer.weight",
        "final_layer.adaLN_modulation.1.weight",
    ):
        assert key in keys


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model.", ""])
def test_schnell_config_is_inferred_under_every_prefix(tmp_path, prefix):
    path = write_random_checkpoint(TINY_FLUX_SCHNELL, tmp_path / "f.safetensors", prefix=prefix)
    model = load_model(path, weights=False)
    assert model.config == TINY_FLUX_SCHNELL
    assert model.variant.name == "flux-schnell"
    assert model.sampling.prediction == "const"


def test_loader_names_missing_and_misshaped_block_keys(tmp_path):
    tensors = random_tensors(TINY_FLUX_DEV)
    del tensors["single_blocks.1.linear2.bias"]
    save_file(tensors, str(tmp_path / "missing.safetensors"))
    with pytest.raises(KeyMismatchError, match=r"single_blocks\.1\.linear2\.bias"):
        load_model(tmp_path / "missing.safetensors", weights=False)
    tensors = random_tensors(TINY_FLUX_DEV)
    tensors["double_blocks.1.txt_mlp.0.weight"] = np.zeros((1024, 255), np.float32)
    save_file(tensors, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ShapeMismatchError, match=r"double_blocks\.1\.txt_mlp\.0\.weight"):
        load_model(tmp_path / "shape.safetensors", weights=False)


def test_flux_refuses_an_eps_or_v_override(tmp_path):
    path = write_random_checkpoint(TINY_FLUX_DEV, tmp_path / "f.safetensors")
    with pytest.raises(ValueError, match="flow"):
        load_model(path, prediction="v", weights=False)


def test_stacked_blocks_load_per_block_tensors_in_order(tmp_path):
    tensors = random_tensors(TINY_FLUX_DEV, seed=4)
    save_file(tensors, str(tmp_path / "f.safetensors"))
    model = load_model(tmp_path / "f.safetensors", dtype="fp32")
    for key, site, name in torch_parameters(model.network):
        np.testing.assert_array_equal(site.to_torch(name, np.asarray(site.value(name))), tensors[key], err_msg=key)
