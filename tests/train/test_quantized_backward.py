"""The node's quantized_backward on a quantized base (jaxlora.models.narrow_backward): a LoRA micro-step with it
against the same micro-step without it (same base, adapters, batch and noise), the narrow matrix product in the
step's program only when it is on, training with it, and its refusals."""

from __future__ import annotations

import re
from functools import cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora import load_model
from jaxlora.models.demo import write_random_checkpoint
from jaxlora.train.config import SettingsError, TrainConfig
from jaxlora.train.data import make_dataset
from jaxlora.train.loop import adapted_network, prepare_run, run_training
from jaxlora.train.step import noise_key_data
from tests.train.test_quantized_base import _loss_and_grads
from tests.train.test_train import FP32, ONE_LEVEL, QUIET, fixed_draw_loss, small_data

# A matrix product of two narrow operands in the step's StableHLO: int8 x int8, or e4m3 x e4m3.
NARROW_DOT = {
    "int8": re.compile(r"stablehlo\.dot_general .*\(tensor<[^>]*xi8>, tensor<[^>]*xi8>\)"),
    "fp8": re.compile(r"stablehlo\.dot_general .*\(tensor<[^>]*xf8E4M3FN>, tensor<[^>]*xf8E4M3FN>\)"),
}
# Relative L2 error of one micro-step's adapter gradient with quantized_backward against the same step without
# it, measured on this tiny UNet: int8 0.91%, fp8 2.4% (fp8_channel 2.3%; e4m3 keeps 3 mantissa bits). Bounds about
# twice the measurements. For scale: the quantized base itself moves the gradient 3% (int8) and 14% (fp8) from
# the wide base's (tests/train/test_quantized_base.py).
GRADIENT_TOLERANCE = {"int8": 0.02, "fp8": 0.05}
SETTINGS = dict(batch_size=4, rank=4, gradient_checkpointing=False, **FP32)


@pytest.fixture(scope="module")
def unet_file(tmp_path_factory):
    return write_random_checkpoint(ONE_LEVEL, tmp_path_factory.mktemp("qb") / "unet.safetensors", seed=5)


@pytest.fixture(scope="module")
def micro_steps(unet_file):
    """mode -> (without, with quantized_backward), each (loss, flattened adapter gradient, StableHLO text of the
    step, the step's arguments) for micro-step 0: one compile per mode and setting, shared by the tests."""

    @cache
    def pair(mode):
        model = load_model(unet_file, "fp32", quantization=mode)
        return tuple(
            micro_step(model, TrainConfig(base_quantization=mode, quantized_backward=on, **SETTINGS))
            for on in (False, True)
        )

    return pair


def micro_step(model, config):
    run = prepare_run(model, make_dataset(*small_data()), config)
    args = (run.graph, run.adapters, run.base, run.data[0], jnp.asarray(noise_key_data(7, 0, 1)[0]), run.settings)
    program = _loss_and_grads.lower(*args).as_text()
    loss, grads = _loss_and_grads(*args)
    return float(loss), np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)]), program, args


@pytest.mark.parametrize("mode", ["int8", pytest.param("fp8", marks=pytest.mark.slow)])
def test_narrow_backward_gives_the_gradient_within_tolerance_and_the_same_loss(micro_steps, mode):
    (loss, gradient, program, _), (q_loss, q_gradient, q_program, _) = micro_steps(mode)
    assert q_loss == loss  # the forward is unchanged: dequantize, multiply in the compute dtype
    error = np.linalg.norm(q_gradient - gradient) / np.linalg.norm(gradient)
    assert 0 < error <= GRADIENT_TOLERANCE[mode], error  # 0 would mean the narrow product never ran
    # the backward pass multiplies narrow by narrow (one product per quantized linear layer's input gradient;
    # the forward's products are in the compute dtype), and without the flag nothing does
    assert NARROW_DOT[mode].search(q_program) and not NARROW_DOT[mode].search(program)


def test_descending_the_narrow_gradient_lowers_the_loss(micro_steps):
    """Gradient descent on micro-step 0's batch and noise with quantized_backward (int8 base), the compiled step
    of the test above (no other compile): every step lowers the loss, 8.7% in all (measured; bound 5%). A wrong
    sign, scale or axis in the narrow product would not descend."""
    graph, adapters, *rest = micro_steps("int8")[1][3]
    losses = []
    for _ in range(4):
        loss, grads = _loss_and_grads(graph, adapters, *rest)
        losses.append(float(loss))
        adapters = jax.tree.map(lambda a, g: a - 0.05 * g, adapters, grads)
    assert all(after < before for before, after in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < 0.95 * losses[0], losses


@pytest.mark.slow
def test_training_with_quantized_backward_lowers_the_loss(unet_file):
    """The trainer's own run (AdamW, 30 steps) on an int8 base with quantized_backward: the loss over fixed noise
    draws falls by more than 10%, as test_train.py asks of every run on the wide base."""
    model = load_model(unet_file, "fp32", quantization="int8")
    config = TrainConfig(steps=30, learning_rate=3e-3, base_quantization="int8", quantized_backward=True, **SETTINGS)
    untrained, _ = adapted_network(model, config, jnp.float32)
    result = run_training(model, make_dataset(*small_data()), config, **QUIET)
    before, after = fixed_draw_loss(model, untrained), fixed_draw_loss(model, result.model_with_lora.network)
    assert after < 0.9 * before, (before, after)


def test_quantized_backward_is_refused_without_a_quantized_base_or_with_weight_patching(unet_file):
    with pytest.raises(SettingsError, match="needs a quantized base: base_quantization int8") as error:
        TrainConfig(quantized_backward=True)
    assert error.value.key == "quantized_backward"
    with pytest.raises(SettingsError, match="LoHa patches the weight here: set bypass_mode") as error:
        TrainConfig(quantized_backward=True, base_quantization="int8", algorithm="LoHa")
    assert error.value.key == "quantized_backward"
    TrainConfig(quantized_backward=True, base_quantization="int8", algorithm="LoHa", bypass_mode=True)
    # training_dtype none passes the settings check (the file may store fp8) but a file of fp32 weights has no
    # quantized linear layer: refused before any compile
    stored = load_model(unet_file, "none")
    with pytest.raises(ValueError, match="quantized_backward needs linear layers with quantized weights"):
        adapted_network(stored, TrainConfig(training_dtype="none", quantized_backward=True, rank=4), None)
