"""Training on a quantized frozen base (jaxlora.models.quantize): a LoRA step on an int8 or fp8 base against the
same step on the wide (fp32) base, gradients reaching only the adapter, and the trained adapter loading in
ComfyUI's load math onto the unquantized model, in the same file format as one trained on the wide base."""

from __future__ import annotations

import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jaxlora import load_model
from jaxlora.adapters.attach import attach_imported
from jaxlora.adapters.formats import export_adapter, import_adapter
from jaxlora.adapters.lora_files import read_lora_file
from jaxlora.models.demo import write_random_checkpoint
from jaxlora.models.flux_family import TINY_FLUX_DEV
from jaxlora.models.quantize import WeightScale
from jaxlora.train.config import TrainConfig
from jaxlora.train.data import make_dataset
from jaxlora.train.loop import adapted_network, prepare_run, run_training
from jaxlora.train.report import save_adapter
from jaxlora.train.step import micro_step_loss, noise_key_data
from tests.adapters.conftest import effective_state_dict
from tests.adapters.test_export_loads_in_comfyui import assert_same_weights, comfyui_patched
from tests.train.test_flux_train import flux_data
from tests.train.test_train import FP32, ONE_LEVEL, QUIET, small_data

# Relative error of one micro-step's loss and of its adapter gradient (L2), quantized base against the fp32
# base, measured on these tiny random models: loss 0.1-0.3% for every mode; gradient int8 3.2% (UNet) and 4.0%
# (Flux), fp8 13.9% and 10.7%, fp8_channel 13.9% and 11.5% (e4m3 keeps 3 mantissa bits, so a per-channel scale
# changes only the range, hardly the rounding). Bounds about 1.5 times the measurements.
LOSS_TOLERANCE = {"int8": 0.005, "fp8": 0.005, "fp8_channel": 0.005}
GRADIENT_TOLERANCE = {"int8": 0.06, "fp8": 0.2, "fp8_channel": 0.2}


@pytest.fixture(scope="module")
def unet_file(tmp_path_factory):
    return write_random_checkpoint(ONE_LEVEL, tmp_path_factory.mktemp("q") / "unet.safetensors", seed=2)


@partial(jax.jit, static_argnums=(0, 5))
def _loss_and_grads(graph, adapters, base, data, key_data, settings):
    perm = jax.random.key(0)
    return jax.value_and_grad(micro_step_loss, argnums=1)(graph, adapters, base, data, key_data, perm, 0, settings)


def loss_and_gradient(model, dataset, config):
    """The loss and the flattened adapter gradient of micro-step 0 (same adapters, batch, noise for every base)."""
    run = prepare_run(model, dataset, config)
    loss, grads = _loss_and_grads(
        run.graph, run.adapters, run.base, run.data[0], jnp.asarray(noise_key_data(7, 0, 1)[0]), run.settings
    )
    return float(loss), np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])


@pytest.fixture(scope="module")
def unet_reference(unet_file):
    dataset = make_dataset(*small_data())
    config = TrainConfig(batch_size=4, rank=4, **FP32)
    return dataset, loss_and_gradient(load_model(unet_file, "fp32"), dataset, config)


# int8 in CI, fp8 with `pytest -m slow` (each mode compiles its own step; fp8 rounding is checked per tensor in
# tests/models/test_quantize.py).
@pytest.mark.parametrize("mode", ["int8", *(pytest.param(m, marks=pytest.mark.slow) for m in ("fp8", "fp8_channel"))])
def test_unet_lora_step_on_a_quantized_base_is_within_tolerance_of_the_wide_step(unet_file, unet_reference, mode):
    dataset, (loss, gradient) = unet_reference
    model = load_model(unet_file, "fp32", quantization=mode)
    config = TrainConfig(batch_size=4, rank=4, base_quantization=mode, **FP32)
    q_loss, q_gradient = loss_and_gradient(model, dataset, config)
    assert abs(q_loss - loss) <= LOSS_TOLERANCE[mode] * abs(loss), (q_loss, loss)
    error = np.linalg.norm(q_gradient - gradient) / np.linalg.norm(gradient)
    assert 0 < error <= GRADIENT_TOLERANCE[mode], error  # 0 would mean the base was not quantized at all


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "fp8", "fp8_channel"])
def test_flux_lora_step_on_a_quantized_base_is_within_tolerance_of_the_wide_step(tmp_path_factory, mode):
    path = write_random_checkpoint(TINY_FLUX_DEV, tmp_path_factory.mktemp("qf") / "flux.safetensors", 3)
    dataset = make_dataset(*flux_data())
    wide = TrainConfig(batch_size=2, rank=4, **FP32)
    loss, gradient = loss_and_gradient(load_model(path, "fp32"), dataset, wide)
    q_loss, q_gradient = loss_and_gradient(
        load_model(path, "fp32", quantization=mode),
        dataset,
        TrainConfig(batch_size=2, rank=4, base_quantization=mode, **FP32),
    )
    assert abs(q_loss - loss) <= LOSS_TOLERANCE[mode] * abs(loss), (q_loss, loss)
    error = np.linalg.norm(q_gradient - gradient) / np.linalg.norm(gradient)
    assert 0 < error <= GRADIENT_TOLERANCE[mode], error


def test_adapter_trained_on_int8_base_loads_in_comfyui_onto_the_wide_model(unet_file, tmp_path):
    quantized = load_model(unet_file, "fp32", quantization="int8")
    frozen = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(quantized.network, (nnx.Param, WeightScale)))}
    config = TrainConfig(
        steps=2,
        batch_size=2,
        rank=4,
        learning_rate=1e-2,
        base_quantization="int8",
        gradient_checkpointing=False,
        **FP32,
    )
    result = run_training(quantized, make_dataset(*small_data()), config, **QUIET)

    # only the adapter moved: the int8 weights and their scales are the loaded ones, bit for bit
    after = nnx.to_flat_state(nnx.state(result.model_with_lora.network, (nnx.Param, WeightScale)))
    assert {k: np.asarray(v).dtype for k, v in after} == {k: v.dtype for k, v in frozen.items()}
    assert all(np.array_equal(np.asarray(v), frozen[k]) for k, v in after)
    assert any(v.dtype == np.int8 for v in frozen.values())
    assert np.abs(result.lora["diffusion_model.input_blocks.1.0.in_layers.2.lora_down.weight"]).max() > 0

    # the file records the base's storage with the run's settings
    _, metadata = read_lora_file(save_adapter(result.model_with_lora, str(tmp_path / "a"), config, 2, "comfyui"))
    assert json.loads(metadata["training_settings"])["base_quantization"] == "int8"

    # the file is what a run on the wide base writes: same keys, shapes, dtypes
    wide = load_model(unet_file, "fp32")
    fresh, _ = adapted_network(wide, TrainConfig(rank=4, **FP32), jnp.float32)
    like = export_adapter(wide.__class__(fresh, wide.family, wide.variant, wide.sampling), "comfyui", jnp.float32)
    assert {k: (v.shape, v.dtype) for k, v in result.lora.items()} == {k: (v.shape, v.dtype) for k, v in like.items()}

    # ComfyUI's load math patches the unquantized weights exactly as the adapter does in jaxlora's wide model
    attach_imported(wide.network, import_adapter(wide, result.lora, jnp.float32))
    base = {k[len("model.") :]: v for k, v in load_file(str(unet_file)).items()}
    patched, not_loaded = comfyui_patched(wide, base, result.lora, "sd1")
    assert not_loaded == []
    assert_same_weights(patched, effective_state_dict(wide.network))


# Per family: the checkpoint, its dataset, a streamed weight matrix, a stacked vector and a weight outside the
# stacks. The UNet's stacked blocks are its SpatialTransformers' transformer blocks.
OFFLOADED = {
    "flux": (
        TINY_FLUX_DEV,
        lambda: make_dataset(*flux_data()),
        ("double_blocks", "block", "img_attn", "qkv", "weight"),
        ("double_blocks", "block", "img_attn", "qkv", "weight_scale"),
        ("img_in", "weight"),
        "diffusion_model.double_blocks.1.img_attn.qkv.lora_up.weight",
    ),
    "unet": (
        ONE_LEVEL,
        lambda: make_dataset(*small_data()),
        ("middle_block", 1, "transformer_blocks", "block", "attn1", "to_q", "weight"),
        ("middle_block", 1, "transformer_blocks", "block", "attn1", "to_q", "weight_scale"),
        ("input_blocks", 0, 0, "weight"),
        "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.lora_up.weight",
    ),
}


@pytest.mark.parametrize("family", OFFLOADED)
def test_offloading_trains_a_lora_on_an_int8_base_as_without_it(tmp_path_factory, family):
    """`offloading` keeps the stacked blocks' int8 weight matrices in host memory (fetched per block inside the
    step) and the block inputs saved for the backward pass there too: on XLA:CPU the trained adapter equals the one
    trained without it, over two optimizer steps of two micro-steps each (the unrolled micro-steps offloading
    needs). SGD, so that each weight's change is proportional to its gradient (Adam's first step is lr * sign(g),
    which turns rounding noise in a near-zero gradient into a full-size difference). Tolerances: loss 1e-5
    relative; adapter weights 1e-5 of the adapter's largest weight (2.3e-6 measured on the UNet, where weights
    near 1e-8 that hardly move differ in their rounding). The two programs may fuse and sum in different orders."""
    config, dataset, streamed, vector, outside, trained_key = OFFLOADED[family]
    path = write_random_checkpoint(config, tmp_path_factory.mktemp("of") / "model.safetensors", 3)
    model = load_model(path, "fp32", quantization="int8")
    settings = dict(steps=2, batch_size=2, grad_accumulation_steps=2, rank=4, base_quantization="int8", **FP32)
    settings |= dict(optimizer="SGD", learning_rate=0.5)
    plain = run_training(model, dataset(), TrainConfig(**settings), **QUIET)
    offloaded = run_training(model, dataset(), TrainConfig(offloading=True, **settings), **QUIET)

    network = offloaded.model_with_lora.network
    kinds = {path: value.sharding.memory_kind for path, value in nnx.to_flat_state(nnx.state(network))}
    assert kinds[streamed] == "pinned_host"
    assert kinds[vector] == "device"  # vectors stay
    assert kinds[outside] == "device"  # and so do weights outside the stacks
    assert offloaded.loss_map == plain.loss_map or np.allclose(
        offloaded.loss_map["loss"], plain.loss_map["loss"], rtol=1e-5
    )
    assert plain.lora.keys() == offloaded.lora.keys()
    scale = max(np.abs(value).max() for value in plain.lora.values())
    differences = {key: np.abs(offloaded.lora[key] - value).max() / scale for key, value in plain.lora.items()}
    assert max(differences.values()) < 1e-5, max(differences.items(), key=lambda item: item[1])
    assert np.abs(plain.lora[trained_key]).max() > 0
