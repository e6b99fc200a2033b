"""NextDiT (Z-Image, Lumina 2) in ComfyUI's layout: output parity with diffusers' ZImageTransformer2DModel and
Lumina2Transformer2DModel loaded from the same single file, config inference, full-size parameter counts, and
the loader's errors."""

from __future__ import annotations

import contextlib
import json
from unittest import mock

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxlora.models.checkpoint import torch_parameters
from jaxlora.models.demo import random_tensors, write_random_checkpoint
from jaxlora.models.diffusion import load_model
from jaxlora.models.family import UnknownLayoutError
from jaxlora.models.nextdit import NextDiT
from jaxlora.models.nextdit_family import LUMINA2_FULL, TINY_LUMINA2, TINY_Z_IMAGE, Z_IMAGE_FULL

# fp32 on both sides; the remaining difference is ComfyUI's QK-norm epsilon (float32's, 1.2e-7) against
# diffusers' 1e-5, and summation order.
TOLERANCE = 2e-5


def z_image_forward(path, config, config_dir, x, sigma, context):
    import torch
    from diffusers import ZImageTransformer2DModel

    (config_dir / "config.json").write_text(
        json.dumps(
            {
                "_class_name": "ZImageTransformer2DModel",
                "dim": config.dim,
                "n_layers": config.n_layers,
                "n_refiner_layers": config.n_refiner_layers,
                "n_heads": config.n_heads,
                "n_kv_heads": config.n_kv_heads,
                "cap_feat_dim": config.cap_feat_dim,
                "axes_dims": list(config.axes_dims),
                "rope_theta": config.rope_theta,
                "t_scale": config.time_scale,
            }
        )
    )
    model = ZImageTransformer2DModel.from_single_file(
        str(path), config=str(config_dir), local_files_only=True, torch_dtype=torch.float32
    )
    latents = [torch.from_numpy(np.ascontiguousarray(sample.transpose(2, 0, 1)))[:, None] for sample in x]
    # ZImagePipeline feeds t = 1 - sigma and negates the output.
    with torch.no_grad():
        out = model(latents, torch.from_numpy(1.0 - sigma), list(torch.from_numpy(context))).sample
    return -np.stack([o[:, 0].numpy().transpose(1, 2, 0) for o in out]), model


@contextlib.contextmanager
def tiny_qkv_split(config):
    """diffusers' Lumina 2 converter splits qkv at the full-size widths (2304, 768, 768); scale them to the tiny
    model for the call, leaving every other split alone."""
    import torch

    original = torch.split
    tiny = (config.dim, config.n_kv_heads * config.head_dim, config.n_kv_heads * config.head_dim)

    def split(tensor, sizes, dim=0):
        return original(tensor, list(tiny) if list(np.atleast_1d(sizes)) == [2304, 768, 768] else sizes, dim)

    with mock.patch.object(torch, "split", split):
        yield


def lumina2_forward(path, config, config_dir, x, sigma, context):
    import torch
    from diffusers import Lumina2Transformer2DModel

    (config_dir / "config.json").write_text(
        json.dumps(
            {
                "_class_name": "Lumina2Transformer2DModel",
                "hidden_size": config.dim,
                "num_layers": config.n_layers,
                "num_refiner_layers": config.n_refiner_layers,
                "num_attention_heads": config.n_heads,
                "num_kv_heads": config.n_kv_heads,
                "cap_feat_dim": config.cap_feat_dim,
                "axes_dim_rope": list(config.axes_dims),
            }
        )
    )
    with tiny_qkv_split(config):
        model = Lumina2Transformer2DModel.from_single_file(
            str(path), config=str(config_dir), local_files_only=True, torch_dtype=torch.float32
        )
    latents = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    mask = torch.ones(context.shape[:2], dtype=torch.bool)  # every caption token counts, as in ComfyUI
    with torch.no_grad():
        out = model(latents, torch.from_numpy(1.0 - sigma), torch.from_numpy(context), mask).sample
    return -out.numpy().transpose(0, 2, 3, 1), model


# diffusers' Lumina 2 converter lists the keys before it strips `model.diffusion_model.`, so that file is bare.
@pytest.mark.parametrize(
    ("config", "reference", "prefix"),
    [(TINY_Z_IMAGE, z_image_forward, "model.diffusion_model."), (TINY_LUMINA2, lumina2_forward, "")],
    ids=["z-image", "lumina2"],
)
def test_nextdit_matches_diffusers_single_file_in_fp32(tmp_path, config, reference, prefix):
    path = write_random_checkpoint(config, tmp_path / "nextdit.safetensors", seed=1, prefix=prefix)
    model = load_model(path, dtype="fp32")
    assert model.config == config
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 10, 16)).astype(np.float32)  # non-square: rows and columns distinct
    sigma = np.array([0.25, 0.9], np.float32)
    context = rng.standard_normal((2, 7, config.cap_feat_dim)).astype(np.float32)

    expected, torch_model = reference(path, config, tmp_path, x, sigma, context)
    # Every converted tensor was consumed: the reference holds exactly as many parameters as the file.
    assert sum(p.numel() for p in torch_model.parameters()) == model.param_count
    got = model.network(jnp.asarray(x), jnp.asarray(sigma), jnp.asarray(context))
    scale = np.abs(expected).max()
    assert scale > 0.1
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=TOLERANCE * scale)


def test_full_size_parameter_counts_are_exact():
    count = lambda config: sum(int(np.prod(s.torch_shape(n))) for _, s, n in torch_parameters(NextDiT(config)))  # noqa: E731
    assert count(Z_IMAGE_FULL) == 6_154_908_736
    assert count(LUMINA2_FULL) == 2_609_769_152  # without the unused `norm_final.weight` (2304) of some files


def test_full_size_keys_are_comfyuis_layout():
    keys = {key for key, _, _ in torch_parameters(NextDiT(Z_IMAGE_FULL))}
    assert len(keys) == 453
    for key in (
        "layers.29.attention.qkv.weight",
        "noise_refiner.1.adaLN_modulation.0.bias",
        "context_refiner.0.attention.k_norm.weight",
        "x_pad_token",
        "cap_embedder.0.weight",
        "final_layer.adaLN_modulation.1.weight",
    ):
        assert key in keys
    assert not any("context_refiner" in key and "adaLN" in key for key in keys)


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model.", ""])
def test_lumina2_config_is_inferred_under_every_prefix(tmp_path, prefix):
    path = write_random_checkpoint(TINY_LUMINA2, tmp_path / "l.safetensors", prefix=prefix)
    model = load_model(path, weights=False)
    assert model.config == TINY_LUMINA2
    assert model.variant.name == "lumina2"
    assert model.sampling.prediction == "const"


def test_shifts_are_comfyuis_and_the_unused_final_norm_is_skipped(tmp_path):
    tensors = random_tensors(TINY_LUMINA2)
    tensors["norm_final.weight"] = np.ones(TINY_LUMINA2.dim, np.float32)
    save_file(tensors, str(tmp_path / "l.safetensors"))
    lumina = load_model(tmp_path / "l.safetensors", weights=False)
    z_image = load_model(write_random_checkpoint(TINY_Z_IMAGE, tmp_path / "z.safetensors"), weights=False)
    # ModelSamplingDiscreteFlow: sigma(t) = shift t / (1 + (shift - 1) t), timestep = sigma.
    for model, shift in ((z_image, 3.0), (lumina, 6.0)):
        assert float(model.sampling.percent_to_sigma(0.5)) == pytest.approx(shift * 0.5 / (1 + (shift - 1) * 0.5))
        assert float(model.sampling.timestep(0.3)) == pytest.approx(0.3)


def test_wrong_files_are_refused_with_the_key_named(tmp_path):
    tensors = random_tensors(TINY_Z_IMAGE)
    tensors["layers.0.attention.q_norm.weight"] = np.ones(96, np.float32)
    save_file(tensors, str(tmp_path / "head.safetensors"))
    with pytest.raises(UnknownLayoutError, match=r"q_norm\.weight: head width 96.*need 128"):
        load_model(tmp_path / "head.safetensors", weights=False)
    renamed = {k.replace("x_embedder", "all_x_embedder.2-1"): v for k, v in random_tensors(TINY_Z_IMAGE).items()}
    renamed = {k.replace("k_norm", "norm_k"): v for k, v in renamed.items()}
    save_file(renamed, str(tmp_path / "diffusers.safetensors"))
    with pytest.raises(UnknownLayoutError, match="original/diffusers layout"):
        load_model(tmp_path / "diffusers.safetensors", weights=False)
