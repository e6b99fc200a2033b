"""Quantized storage of the frozen base (jaxlora.models.quantize): the rounding error of each mode, quantizing
while loading (int8 and fp8 weights on the device, norms and biases untouched, stacked layers with per-block
scales), and fp8-stored checkpoints kept as stored, never widened."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxlora import load_model
from jaxlora.models.checkpoint import TensorFile, torch_parameters
from jaxlora.models.demo import random_tensors
from jaxlora.models.diffusion import abstract_model
from jaxlora.models.flux_family import TINY_FLUX_DEV
from jaxlora.models.quantize import FP8, dequantize, quantize_weight

QKV = "double_blocks.1.img_attn.qkv.weight"


def channel_weights(seed=0):
    """[in 64, out 16] weights whose output channels span five orders of magnitude."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((64, 16)) * np.logspace(-4, 1, 16)).astype(np.float32)


def test_int8_error_is_at_most_half_a_step_of_its_channel():
    weight = channel_weights()
    stored, scale = quantize_weight(weight, "int8", out_axis=-1)
    assert stored.dtype == np.int8 and scale.shape == (1, 16)
    np.testing.assert_allclose(scale[0], np.abs(weight).max(0) / 127, rtol=1e-6)
    error = np.abs(np.asarray(dequantize(stored, scale, np.float32)) - weight)
    assert np.all(error <= scale / 2 * (1 + 1e-5))


@pytest.mark.parametrize("mode", ["fp8", "fp8_channel"])
def test_fp8_error_is_e4m3_rounding_and_channel_scales_keep_small_channels(mode):
    weight = channel_weights()
    stored, scale = quantize_weight(weight, mode, out_axis=1)
    assert stored.dtype == FP8 and scale.shape == ((1, 16) if mode == "fp8_channel" else (1, 1))
    error = np.abs(np.asarray(dequantize(stored, scale, np.float32)) - weight)
    # e4m3: relative rounding 2^-4 for normal numbers; below 2^-6 (scaled) the subnormal step 2^-9 is absolute
    assert np.all(error <= 2**-4 * np.abs(weight) + 2**-10 * scale * (1 + 1e-5))
    smallest = np.abs(weight[:, 0]).max()  # the 1e-4 channel: subnormal or flushed under one tensor scale
    assert (error[:, 0].max() < 2**-4 * smallest) == (mode == "fp8_channel")


def test_fp8_stored_tensor_is_kept_as_stored():
    weight = channel_weights().astype(FP8)
    for mode in ("fp8", "fp8_channel"):
        stored, scale = quantize_weight(weight, mode, out_axis=1)
        assert stored is weight and np.all(scale == 1)
    stored, _ = quantize_weight(weight, "int8", out_axis=1)  # int8 asked of an fp8 file: re-quantized
    assert stored.dtype == np.int8


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    """A tiny Flux checkpoint and its copy with every 2-D weight stored as float8_e4m3fn (as `*_fp8_e4m3fn`)."""
    folder = tmp_path_factory.mktemp("qflux")
    tensors = {f"diffusion_model.{k}": v for k, v in random_tensors(TINY_FLUX_DEV, seed=3).items()}
    save_file(tensors, str(folder / "wide.safetensors"))
    fp8 = {k: v.astype(FP8) if v.ndim >= 2 and "embedder" not in k else v for k, v in tensors.items()}
    save_file(fp8, str(folder / "fp8.safetensors"))
    return folder / "wide.safetensors", folder / "fp8.safetensors"


def parameters(model) -> dict:
    return {key: site for key, site, _ in torch_parameters(model.network)}


def test_int8_loading_quantizes_adapted_weights_per_block_and_leaves_the_rest(flux_files):
    wide_path, _ = flux_files
    wide, quantized = load_model(wide_path, "fp32"), load_model(wide_path, "fp32", quantization="int8")
    assert quantized.quantization == "int8" and quantized.dtype == np.float32
    sites = parameters(quantized)
    layer = sites[QKV].layer
    assert layer.weight.dtype == np.int8 and layer.weight_scale.shape == (2, 1, layer.weight.shape[-1])
    assert sites["double_blocks.1.img_attn.norm.query_norm.scale"].value("weight").dtype == np.float32
    assert sites["double_blocks.1.img_attn.qkv.bias"].value("bias").dtype == np.float32
    file = load_file(str(wide_path))[f"diffusion_model.{QKV}"]
    np.testing.assert_allclose(
        np.asarray(sites[QKV].weight_as(np.float32)).T, file, atol=np.abs(file).max() / 254 * 1.0001
    )
    nbytes = lambda m: sum(x.nbytes for x in jax.tree.leaves(nnx.state(m.network)))  # noqa: E731
    assert nbytes(quantized) < 0.3 * nbytes(wide)


def test_fp8_checkpoint_loads_without_widening(flux_files):
    _, fp8_path = flux_files
    with TensorFile(fp8_path) as f:  # safetensors' numpy reader has no fp8
        file = f.get_tensor(f"diffusion_model.{QKV}")
    assert file.dtype == FP8
    for dtype, mode in (("none", "none"), ("bf16", "fp8")):
        model = load_model(fp8_path, dtype, quantization=mode)
        layer = parameters(model)[QKV].layer
        assert layer.weight.dtype == FP8
        np.testing.assert_array_equal(np.asarray(layer.weight[1]).T.view(np.uint8), file.view(np.uint8))
        assert (layer.weight_scale is None) == (mode == "none")
    assert load_model(fp8_path, "none").dtype == np.float32  # the file's wide tensors (norms, biases) as stored
    assert ml_dtypes.finfo(FP8).max == 448


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_abstract_quantized_model_has_the_loaded_storage(flux_files, mode):
    """What AOT memory measurements compile: the same shapes and dtypes as a checkpoint loaded quantized."""
    loaded = load_model(flux_files[0], "bf16", quantization=mode)
    abstract = abstract_model(loaded.config, "bf16", quantization=mode)
    layout = lambda m: jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), nnx.state(m.network))  # noqa: E731
    assert layout(abstract) == layout(loaded) and abstract.quantization == mode
