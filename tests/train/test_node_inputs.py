"""The node's newer inputs (training_dtype "none", quantized_backward, checkpoint_depth, offloading, bucket_mode,
bypass_mode) and jaxlora's base_quantization: names, defaults and meanings, refusals, the flags and TOML keys
that set them, and how the run fingerprint classifies them (what alters results must match on resume)."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from jaxlora import load_model
from jaxlora.models.demo import demo_dataset, write_random_checkpoint
from jaxlora.models.unet_family import DEMO_UNET
from jaxlora.train.__main__ import NODE_INPUTS, build_parser, resolve_settings
from jaxlora.train.config import SettingsError, TrainConfig
from jaxlora.train.data import make_dataset
from jaxlora.train.loop import compute_dtype, fingerprint, preflight

NEWER = ("quantized_backward", "checkpoint_depth", "offloading", "bucket_mode", "bypass_mode")


def test_newer_inputs_have_the_nodes_names_and_defaults_and_are_node_flags():
    config = TrainConfig()
    assert [getattr(config, name) for name in NEWER] == [False, 1, False, False, False]
    assert config.training_dtype == "bf16" and TrainConfig(training_dtype="none").training_dtype == "none"
    assert set(NEWER) <= set(NODE_INPUTS) and "base_quantization" not in NODE_INPUTS
    argv = ["--model", "m", "--dataset", "d", "--training-dtype", "none", "--checkpoint-depth", "3", "--bypass-mode"]
    _, config, _ = resolve_settings(build_parser().parse_args([*argv, "--base-quantization", "fp8", "--offloading"]))
    assert (config.training_dtype, config.checkpoint_depth, config.bypass_mode) == ("none", 3, True)
    assert (config.base_quantization, config.offloading) == ("fp8", True)


@pytest.mark.parametrize(
    ("settings", "policy"),
    [
        ({}, "nothing_saveable"),  # the node's depth 1 (whole network): jaxlora's per-block remat
        ({"checkpoint_depth": 2}, "nothing_saveable"),
        ({"checkpoint_depth": 3}, "dots_with_no_batch_dims_saveable"),
        ({"checkpoint_depth": 5}, "dots_with_no_batch_dims_saveable"),
        ({"offloading": True}, "offload_block_inputs"),
        ({"remat_policy": "dots_saveable"}, "dots_saveable"),
        ({"gradient_checkpointing": False, "checkpoint_depth": 4}, None),
    ],
)
def test_checkpoint_depth_and_offloading_choose_the_per_block_remat_policy(settings, policy):
    assert TrainConfig(**settings).remat == policy


@pytest.mark.parametrize(
    ("settings", "key", "message"),
    [
        ({"checkpoint_depth": 6}, "checkpoint_depth", "between 1 and 5"),
        ({"quantized_backward": True}, "quantized_backward", "needs a quantized base"),
        ({"remat_policy": "dots_saveable", "checkpoint_depth": 3}, "remat_policy", "set one or the other"),
        ({"gradient_checkpointing": False, "offloading": True}, "offloading", "gradient checkpointing, which is off"),
        ({"bypass_mode": True, "bypass": False}, "bypass", "contradicts bypass false"),
        ({"base_quantization": "nf4"}, "base_quantization", "one of"),
    ],
)
def test_contradictions_and_what_cannot_be_honoured_are_refused_by_name(settings, key, message):
    with pytest.raises(SettingsError, match=message) as error:
        TrainConfig(**settings)
    assert error.value.key == key


@pytest.mark.parametrize("algorithm", ["LoRA", "LoHa", "LoKr", "OFT"])
def test_bypass_mode_puts_every_algorithm_in_activation_form(algorithm):
    assert TrainConfig(algorithm=algorithm, bypass_mode=True).uses_bypass
    assert TrainConfig(algorithm=algorithm).uses_bypass == (algorithm == "LoRA")  # jaxlora's default


@pytest.fixture(scope="module")
def header_and_data(tmp_path_factory):
    path = write_random_checkpoint(DEMO_UNET, tmp_path_factory.mktemp("n") / "unet.safetensors", seed=1)
    return path, load_model(path, weights=False), make_dataset(*demo_dataset(2, 8))


def test_fingerprint_ignores_memory_settings_and_records_what_alters_results(header_and_data):
    _, model, dataset = header_and_data
    base = fingerprint(TrainConfig(), model, dataset)
    assert not set(NEWER) & set(base) and "base_quantization" not in base  # runs from before them still resume
    memory = TrainConfig(checkpoint_depth=4, bucket_mode=True, offloading=True)
    assert fingerprint(memory, model, dataset) == base
    assert fingerprint(TrainConfig(bypass_mode=True), model, dataset)["bypass_mode"] is True
    assert fingerprint(TrainConfig(training_dtype="none"), model, dataset)["training_dtype"] == "none"


def test_training_dtype_none_keeps_stored_weights_and_computes_as_comfyui_autocasts(header_and_data):
    path, _, dataset = header_and_data
    fp16 = load_model(path, "fp16")
    assert compute_dtype(TrainConfig(training_dtype="none"), fp16) == jnp.float16
    stored = load_model(path, "none")  # the file's fp32, as stored
    assert stored.dtype == jnp.float32 and compute_dtype(TrainConfig(training_dtype="none"), stored) == jnp.bfloat16
    assert stored.quantization == "none"  # a wide file kept as stored is no quantized base
    with pytest.raises(ValueError, match="load_model\\(path, quantization='int8'\\)"):
        preflight(stored, dataset, TrainConfig(base_quantization="int8"))
