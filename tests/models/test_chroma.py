"""Chroma in the layout ComfyUI loads: output parity with diffusers' ChromaTransformer2DModel loaded from the same
single file, config inference, the full-size parameter count, detection beside Flux, sampling and the loader's
errors."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxlora.models.checkpoint import torch_parameters
from jaxlora.models.chroma import CHROMA, MOD_INDEX_LENGTH, Chroma
from jaxlora.models.chroma_family import CHROMA_FAMILY, TINY_CHROMA
from jaxlora.models.demo import random_tensors, write_random_checkpoint
from jaxlora.models.diffusion import load_model
from jaxlora.models.family import UnknownLayoutError
from jaxlora.models.registry import find_family
from tests.models.test_flux import pipeline_call, stream_diffusers_config, tiny_linear1_split


def diffusers_config(config) -> dict:
    return {
        "_class_name": "ChromaTransformer2DModel",
        **stream_diffusers_config(config),
        "approximator_num_channels": 64,
        "approximator_hidden_dim": config.approximator_hidden,
        "approximator_layers": config.approximator_layers,
    }


def comfyui_index_table(model) -> None:
    """ComfyUI reads the approximator at 344 modulation indices whatever the depth (the final layer's two rows are
    the last two of 344); diffusers sizes its table from the depth (3 x single + 12 x double + 2), the same 344
    at full size. Give the tiny diffusers model ComfyUI's table, built by diffusers' own embedding."""
    import torch
    from diffusers.models.embeddings import get_timestep_embedding

    table = get_timestep_embedding(
        torch.arange(MOD_INDEX_LENGTH) * 1000, 32, flip_sin_to_cos=True, downscale_freq_shift=0
    )
    model.time_text_embed.mod_proj = table


def diffusers_forward(path, config, config_dir, x_nhwc, sigma, context):
    import torch
    from diffusers import ChromaTransformer2DModel

    (config_dir / "config.json").write_text(json.dumps(diffusers_config(config)))
    with tiny_linear1_split(config):
        model = ChromaTransformer2DModel.from_single_file(
            str(path), config=str(config_dir), local_files_only=True, torch_dtype=torch.float32
        )
    comfyui_index_table(model)
    with torch.no_grad():
        return pipeline_call(model, x_nhwc, context, sigma), model


def test_chroma_matches_diffusers_single_file_in_fp32(tmp_path):
    path = write_random_checkpoint(TINY_CHROMA, tmp_path / "chroma.safetensors", seed=1)
    model = load_model(path, dtype="fp32")
    assert model.config == TINY_CHROMA
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 10, 16)).astype(np.float32)  # non-square: rows and columns distinct
    sigma = np.array([0.25, 0.9], np.float32)
    context = rng.standard_normal((2, 7, 4096)).astype(np.float32)

    expected, reference = diffusers_forward(path, TINY_CHROMA, tmp_path, x, sigma, context)
    # Every converted tensor was consumed: the reference holds exactly as many parameters as the file.
    assert sum(p.numel() for p in reference.parameters()) == model.param_count
    # diffusers' Chroma has no guidance input: it embeds 0, ComfyUI's default when the conditioning has none.
    inputs = (jnp.asarray(x), jnp.asarray(sigma), jnp.asarray(context))
    got = model.network(*inputs)
    scale = np.abs(expected).max()
    assert scale > 0.1
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=2e-5 * scale)
    # A guidance value reaches the modulations (ComfyUI embeds it beside the timestep).
    guided = model.network(*inputs, guidance=jnp.array([4.0, 4.0]))
    assert np.abs(np.asarray(guided) - np.asarray(got)).max() > 1e-3 * scale


def test_full_size_parameter_count_is_exact():
    count = sum(int(np.prod(s.torch_shape(n))) for _, s, n in torch_parameters(Chroma(CHROMA)))
    # By hand: img_in 199,680 + txt_in 12,585,984 + approximator 278,285,312 + 19 double blocks x 226,548,224
    # + 38 single blocks x 113,271,040 + final_layer 196,672.
    assert count == 8_899_983_424
    assert CHROMA.modulation_rows == MOD_INDEX_LENGTH  # the full model reads every approximator row


def test_full_size_keys_are_the_comfyui_layout():
    keys = {key for key, _, _ in torch_parameters(Chroma(CHROMA))}
    for key in (
        "distilled_guidance_layer.in_proj.weight",
        "distilled_guidance_layer.layers.4.out_layer.bias",
        "distilled_guidance_layer.norms.4.scale",
        "double_blocks.18.txt_attn.qkv.bias",
        "single_blocks.37.linear2.weight",
        "final_layer.linear.weight",
    ):
        assert key in keys
    assert not any(part in key for key in keys for part in ("_mod.", "modulation", "vector_in", "guidance_in"))


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model.", ""])
def test_chroma_is_told_from_flux_and_inferred_under_every_prefix(tmp_path, prefix):
    path = write_random_checkpoint(TINY_CHROMA, tmp_path / "c.safetensors", prefix=prefix)
    model = load_model(path, weights=False)
    assert model.family is CHROMA_FAMILY and model.config == TINY_CHROMA
    assert model.variant.name == "chroma"
    assert model.sampling.prediction == "const"
    # ModelSamplingFlux with mu 1.15: sigma(t) = e^1.15 t / (1 + (e^1.15 - 1) t)
    np.testing.assert_allclose(float(model.sampling.schedule.sigma(0.5)), np.exp(1.15) / (np.exp(1.15) + 1), 1e-6)


def test_a_diffusers_format_chroma_is_named(tmp_path):
    keys = ["distilled_guidance_layer.layers.0.linear_1.weight", "x_embedder.weight"]
    with pytest.raises(UnknownLayoutError, match="diffusers-format Chroma"):
        find_family(keys)


def test_an_approximator_of_another_width_is_refused_by_key(tmp_path):
    tensors = random_tensors(TINY_CHROMA)
    tensors["distilled_guidance_layer.in_proj.weight"] = np.zeros((128, 32), np.float32)
    save_file(tensors, str(tmp_path / "c.safetensors"))
    with pytest.raises(UnknownLayoutError, match="distilled_guidance_layer"):
        load_model(tmp_path / "c.safetensors", weights=False)


def test_too_many_blocks_for_the_index_table_are_refused():
    with pytest.raises(ValueError, match="344"):
        type(TINY_CHROMA)(hidden_size=256, num_heads=2, depth=20, depth_single_blocks=38)


def test_chroma_refuses_an_eps_or_v_override(tmp_path):
    path = write_random_checkpoint(TINY_CHROMA, tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="flow"):
        load_model(path, prediction="v", weights=False)
