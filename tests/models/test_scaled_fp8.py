"""ComfyUI's scaled-fp8 checkpoints (jaxlora.models.scaled_fp8) in both layouts ComfyUI reads: the stored fp8
bytes kept with the file's scales, the weights they stand for equal to the published dequant math (torch:
`weight.float() * scale`, comfy/quant_ops.py TensorCoreFP8Layout.dequantize) bit for bit, a forward equal to the
forward of the dequantized file, training equal to training on jaxlora's own fp8 quantization of those weights,
and bad files refused naming the key."""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

from jaxlora import load_model
from jaxlora.models.checkpoint import torch_parameters
from jaxlora.models.demo import random_tensors
from jaxlora.models.flux_family import TINY_FLUX_DEV
from jaxlora.models.quantize import FP8, WeightScale
from jaxlora.models.scaled_fp8 import ScaledFp8Error
from jaxlora.train.config import TrainConfig
from jaxlora.train.data import make_dataset
from jaxlora.train.loop import run_training
from tests.train.test_train import FP32, ONE_LEVEL, QUIET, small_data

PREFIX = "model.diffusion_model."
# ComfyUI's scaled files scale linears only, and its Flux files keep the input and output projections wide
WIDE = ("img_in.", "txt_in.", "final_layer.", "shared.")  # shared.: T5's token embedding
LAYOUTS = ("legacy", "comfy_quant", "metadata")


def scaled_checkpoint(
    layout: str, fp8=torch.float8_e4m3fn, wide_tensors: dict | None = None, prefix: str = PREFIX
) -> tuple[dict, dict, dict]:
    """(tensors, header metadata, dequantized float32 tensors) of a tiny model (float32 `wide_tensors`, by default
    a tiny Flux) stored as ComfyUI's scaled fp8: its linear weights w8 = (w / s) in fp8, s = amax / 448 per
    tensor, in the `layout`'s keys under `prefix`; the oracle is w8.float() * s."""
    tensors, dequantized, layers = {}, {}, {}
    wide_tensors = random_tensors(TINY_FLUX_DEV, seed=3) if wide_tensors is None else wide_tensors
    for key, value in wide_tensors.items():
        wide, key = torch.from_numpy(value), prefix + key
        if value.ndim != 2 or key.removeprefix(prefix).startswith(WIDE):
            tensors[key] = dequantized[key] = wide
            continue
        layer = key.removesuffix(".weight")
        scale = (wide.abs().amax() / torch.finfo(fp8).max).float()
        tensors[key] = (wide / scale).to(fp8)
        dequantized[key] = tensors[key].float() * scale
        suffix = "scale_weight" if layout == "legacy" else "weight_scale"
        tensors[f"{layer}.{suffix}"] = scale
        tensors[f"{layer}.{'scale_input' if layout == 'legacy' else 'input_scale'}"] = torch.ones(())
        layers[layer] = {"format": str(fp8).removeprefix("torch.")}
    metadata = {}
    if layout == "legacy":
        tensors[prefix + "scaled_fp8"] = torch.empty(0, dtype=fp8)
    elif layout == "comfy_quant":
        for layer, conf in layers.items():
            tensors[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
    else:
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    return tensors, metadata, dequantized


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Each layout's scaled file (same weights) and tensors, and the dequantized (wide, float32) file and
    tensors."""
    folder = tmp_path_factory.mktemp("scaled")
    paths, stored, wide = {}, {}, random_tensors(TINY_FLUX_DEV, seed=3)
    for layout in LAYOUTS:
        stored[layout], metadata, dequantized = scaled_checkpoint(layout, wide_tensors=wide)
        save_file(stored[layout], folder / f"{layout}.safetensors", metadata=metadata)
        paths[layout] = folder / f"{layout}.safetensors"
    save_file(dequantized, folder / "dequantized.safetensors")
    return paths, folder / "dequantized.safetensors", {k: v.numpy() for k, v in dequantized.items()}, stored


def sites(model) -> dict:
    return {PREFIX + key: site for key, site, name in torch_parameters(model.network) if name == "weight"}


def scaled_keys(tensors: dict) -> list[str]:
    return [key for key, value in tensors.items() if key.endswith(".weight") and value.dtype == torch.float8_e4m3fn]


def wide_weight(site) -> np.ndarray:
    """A weight in float32 and torch layout, as the layer computes with it (dequantized when stored quantized)."""
    return np.transpose(np.asarray(site.weight_as(jnp.float32)), np.argsort(site.permutation("weight")))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scaled_file_keeps_its_fp8_bytes_and_scales_and_dequantizes_exactly(files, layout):
    paths, _, oracle, tensors = files
    stored = tensors[layout]
    scaled = scaled_keys(stored)
    assert len(scaled) > 10
    # (training dtype, quantization, the model's quantization): the file's fp8 kept under fp8, fp8_channel and
    # training_dtype "none" (an fp8 base, as the fp8 mode stores it); the layouts differ only in keys, so the others
    # are loaded one way
    kept = (("fp32", "fp8", "fp8"), ("bf16", "fp8_channel", "fp8_channel"), ("none", "none", "fp8"))
    for dtype, mode, stored_as in kept if layout == "legacy" else kept[:1]:
        model = load_model(paths[layout], dtype, quantization=mode)
        weights = sites(model)
        for key in scaled:
            site = weights[key]
            assert site.value("weight").dtype == FP8 and site.layer.weight_scale is not None, key
            file_bytes = stored[key].view(torch.uint8).numpy()
            loaded = np.transpose(np.asarray(site.value("weight")), np.argsort(site.permutation("weight")))
            np.testing.assert_array_equal(loaded.view(np.uint8), file_bytes, err_msg=key)
            np.testing.assert_array_equal(wide_weight(site), oracle[key], err_msg=key)
        assert model.quantization == stored_as


def test_scaled_file_is_multiplied_out_without_an_fp8_mode(files):
    """A wide training dtype and no quantization: weight times scale in that dtype, never the fp8 values unscaled.
    int8: re-quantized from the multiplied-out weights, within half a step of each output channel."""
    paths, _, oracle, tensors = files
    scaled = scaled_keys(tensors["legacy"])
    for dtype, wide in (("fp32", np.float32), ("bf16", ml_dtypes.bfloat16)):
        weights = sites(load_model(paths["legacy"], dtype))
        for key in scaled:
            assert weights[key].value("weight").dtype == wide and weights[key].layer.weight_scale is None
            np.testing.assert_array_equal(np.asarray(weights[key].weight_as(wide)).T, oracle[key].astype(wide))
    weights = sites(load_model(paths["legacy"], "fp32", quantization="int8"))
    for key in scaled:
        step = np.abs(oracle[key]).max(axis=1, keepdims=True) / 127
        assert weights[key].value("weight").dtype == np.int8
        assert np.all(np.abs(wide_weight(weights[key]) - oracle[key]) <= step / 2 * (1 + 1e-5)), key


def test_scaled_file_forward_matches_the_dequantized_file(files):
    """Loaded as stored (training_dtype "none": the fp8 weights with their scales, the wide layers as they are),
    the layers compute with the same float32 weights, so the forwards differ only by XLA's fusion choices: 1e-6
    of the output's scale (measured: identical)."""
    paths, dequantized_path, _, _ = files
    rng = np.random.default_rng(0)
    inputs = (
        rng.standard_normal((2, 6, 10, 16)).astype(np.float32),
        np.array([0.25, 0.9], np.float32),
        rng.standard_normal((2, 7, 4096)).astype(np.float32),
        rng.standard_normal((2, 768)).astype(np.float32),
    )
    forward = lambda model: np.asarray(model.network(*map(jnp.asarray, inputs), guidance=jnp.array([3.5, 1.0])))  # noqa: E731
    expected = forward(load_model(dequantized_path, "fp32"))
    got = forward(load_model(paths["legacy"], "none"))
    scale = np.abs(expected).max()
    assert scale > 0.1
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * scale)


def frozen(network) -> dict:
    return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(network, (nnx.Param, WeightScale)))}


def test_training_on_a_scaled_file_equals_training_on_jaxlora_fp8_of_its_weights(tmp_path):
    """A tiny UNet (the loading is family-independent, and its step compiles fastest) with its linears in scaled
    fp8. jaxlora's own fp8 quantization of the dequantized weights finds the file's fp8 values again (amax / 448
    is the file's scale), so both runs train one base: same losses and adapter, to 1e-6 relative (measured:
    bit for bit, scales included). Only the adapter moves; the fp8 bytes stay as loaded."""
    tensors, metadata, dequantized = scaled_checkpoint("comfy_quant", wide_tensors=random_tensors(ONE_LEVEL, seed=3))
    save_file(tensors, tmp_path / "scaled.safetensors", metadata=metadata)
    save_file(dequantized, tmp_path / "dequantized.safetensors")
    config = TrainConfig(
        steps=3, batch_size=2, rank=4, learning_rate=1e-2, base_quantization="fp8", gradient_checkpointing=False, **FP32
    )
    scaled = load_model(tmp_path / "scaled.safetensors", "fp32", quantization="fp8")
    ours = load_model(tmp_path / "dequantized.safetensors", "fp32", quantization="fp8")
    before = frozen(scaled.network)
    ours_frozen = frozen(ours.network)
    assert before.keys() == ours_frozen.keys()
    for key, value in before.items():
        if value.dtype == FP8:
            np.testing.assert_array_equal(value.view(np.uint8), ours_frozen[key].view(np.uint8), err_msg=str(key))
        else:
            np.testing.assert_allclose(value, ours_frozen[key], rtol=2e-7, err_msg=str(key))  # scales: 1 ulp

    dataset = make_dataset(*small_data())
    on_scaled, on_ours = (run_training(m, dataset, config, **QUIET) for m in (scaled, ours))
    np.testing.assert_allclose(on_scaled.loss_map["loss"], on_ours.loss_map["loss"], rtol=1e-6)
    largest = max(np.abs(value).max() for value in on_ours.lora.values())
    for key, value in on_ours.lora.items():
        np.testing.assert_allclose(on_scaled.lora[key], value, rtol=0, atol=1e-6 * largest, err_msg=key)
    after = frozen(on_scaled.model_with_lora.network)
    assert all(np.array_equal(after[k].view(np.uint8), v.view(np.uint8)) for k, v in before.items() if v.dtype == FP8)
    assert (
        np.abs(on_scaled.lora["diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.lora_up.weight"]).max()
        > 0
    )


def test_e5m2_scaled_weights_are_kept_as_stored(tmp_path):
    tensors, metadata, dequantized = scaled_checkpoint("legacy", torch.float8_e5m2)
    save_file(tensors, tmp_path / "e5m2.safetensors", metadata=metadata)
    key = PREFIX + "double_blocks.1.img_attn.qkv.weight"
    site = sites(load_model(tmp_path / "e5m2.safetensors", "fp32", quantization="fp8"))[key]
    assert site.value("weight").dtype == ml_dtypes.float8_e5m2
    np.testing.assert_array_equal(wide_weight(site), dequantized[key].numpy())


LAYER = PREFIX + "double_blocks.0.img_attn.proj"
BAD = {
    "scale without its weight": (
        {f"{LAYER}.scale_weight": torch.ones(())},
        f"scale {LAYER}.scale_weight has no weight {LAYER}.weight",
    ),
    "scale of the wrong shape": (
        {f"{LAYER}.weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn), f"{LAYER}.weight_scale": torch.ones(4)},
        f"{LAYER}.weight_scale is F32 of shape \\[4\\]",
    ),
    "wide weight with a scale": (
        {f"{LAYER}.weight": torch.zeros(4, 4), f"{LAYER}.scale_weight": torch.ones(())},
        f"{LAYER}.weight is stored as F32 but has a scale {LAYER}.scale_weight",
    ),
    "another quantized format": (
        {
            f"{LAYER}.weight": torch.zeros(4, 2, dtype=torch.uint8),
            f"{LAYER}.comfy_quant": torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8),
        },
        f"layer {LAYER} is quantized as 'nvfp4'",
    ),
    "marked fp8 without a scale": (
        {
            f"{LAYER}.weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn),
            f"{LAYER}.comfy_quant": torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8),
        },
        f"layer {LAYER} is marked float8_e4m3fn but has no scaled weight {LAYER}.weight",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_scaled_files_are_refused_naming_the_key(tmp_path, case):
    """Refused from the header (and comfy_quant tensors) alone, before the family is even looked for."""
    tensors, message = BAD[case]
    save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(ScaledFp8Error, match=message):
        load_model(tmp_path / "bad.safetensors", "fp32", quantization="fp8")
