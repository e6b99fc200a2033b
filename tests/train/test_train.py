"""The training loop on the smallest UNet: it learns, it changes only the adapter, accumulation and remat are
exact, interrupted runs resume to the same adapter, and bad input fails before compiling."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from jaxlora import load_model, save_lora
from jaxlora.adapters.base import AdapterParam
from jaxlora.adapters.metadata import AdapterInfo
from jaxlora.models.checkpoint import torch_parameters
from jaxlora.models.demo import demo_dataset, write_random_checkpoint
from jaxlora.models.unet import UNetConfig
from jaxlora.train.checkpoints import Checkpoints
from jaxlora.train.config import TrainConfig
from jaxlora.train.data import DatasetError, device_arrays, make_dataset
from jaxlora.train.loop import NonFiniteLossError, adapted_network, run_training, train_lora
from jaxlora.train.optim import LOSSES, make_optimizer
from jaxlora.train.step import StepSettings, compile_step, micro_step_loss, noise_key_data, permutation_key

FP32 = {"training_dtype": "fp32", "lora_dtype": "fp32"}
EVAL_OPTIMIZER = make_optimizer("SGD", 0.0)
# The cheapest UNet to compile (one level, every block type): every training run here uses it. Runs that differ
# in nothing compiled (steps, checkpoints, resuming) share their step through the session's compilation cache, so
# the tests keep to one setting (`PLAIN`) where theirs is not the point.
ONE_LEVEL = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=32,
    channel_mult=(1,),
    num_res_blocks=(1,),
    transformer_depth=(1,),
    transformer_depth_middle=1,
    transformer_depth_output=(1, 1),
    context_dim=768,
    num_heads=8,
)
QUIET = {"progress": lambda line: None}
PLAIN = {"rank": 2, "gradient_checkpointing": False, **FP32}


@pytest.fixture(scope="module")
def one_level_checkpoint(tmp_path_factory):
    return write_random_checkpoint(ONE_LEVEL, tmp_path_factory.mktemp("one") / "unet.safetensors", seed=4)


@pytest.fixture
def model(one_level_checkpoint):
    """A fresh model for each test (one checks that training leaves its input untouched)."""
    return load_model(one_level_checkpoint, dtype="fp32")


@pytest.fixture(scope="module")
def one_level_model(one_level_checkpoint):
    return load_model(one_level_checkpoint, "fp32")


def small_data(count=4, size=8):
    latents, context = demo_dataset(count, size)
    return latents, context


def adapter_leaves(network):
    return [np.asarray(v[...]) for _, v in nnx.to_flat_state(nnx.state(network, AdapterParam))]


@partial(jax.jit, static_argnums=(0, 4))
def _mean_loss_over_draws(graph, adapters, base, data, settings, keys):
    perm = permutation_key(1234)
    losses = jax.lax.map(
        lambda i: micro_step_loss(graph, adapters, base, data, keys[i], perm, i, settings), jnp.arange(len(keys))
    )
    return jnp.mean(losses)


def fixed_draw_loss(model, network, draws=8, dataset=None):
    """Mean x0-space MSE of the whole dataset (default `small_data`) over fixed noise/sigma draws: a yardstick
    that, unlike the training loss, does not jump with each step's random sigma. Compiled once per network
    structure."""
    dataset = dataset or make_dataset(*small_data())
    data = device_arrays(dataset.buckets[0], model, jnp.float32)
    settings = StepSettings(dataset.size, 1, jnp.float32, LOSSES["MSE"], EVAL_OPTIMIZER, model.sampling)
    graph, adapters, base = nnx.split(network, AdapterParam, ...)
    return float(
        _mean_loss_over_draws(graph, adapters, base, data, settings, jnp.asarray(noise_key_data(1234, 0, draws)))
    )


ALGORITHMS = ["LoRA", "LoHa", "LoKr", "OFT"]
OPTIMIZERS = ["AdamW", "Adam", "SGD", "RMSprop"]
LOSS_FUNCTIONS = ["MSE", "L1", "Huber", "SmoothL1"]


def learning_rate(optimizer, loss):
    """Adaptive optimizers take the same rate; plain SGD follows the gradient's scale, which MSE makes larger
    than the bounded-gradient losses do."""
    if optimizer == "SGD":
        return 3e-3 if loss == "MSE" else 3e-2
    return 1e-3 if optimizer == "RMSprop" else 3e-3


# The runs in CI: every optimizer, every loss and every algorithm trained once. The update rules and the losses
# themselves are checked against torch in test_optim.py.
IN_CI = {("AdamW", "SmoothL1", "OFT"), ("Adam", "L1", "LoHa"), ("SGD", "MSE", "LoKr"), ("RMSprop", "Huber", "LoRA")}


def combinations():
    """All 64 (optimizer, loss, algorithm) runs, each its own compile: the 4 `IN_CI`, and the other 60 in
    `pytest -m slow`."""
    for optimizer in OPTIMIZERS:
        for loss in LOSS_FUNCTIONS:
            for algorithm in ALGORITHMS:
                marks = () if (optimizer, loss, algorithm) in IN_CI else (pytest.mark.slow,)
                yield pytest.param(optimizer, loss, algorithm, marks=marks, id=f"{optimizer}-{loss}-{algorithm}")


@pytest.mark.parametrize(("optimizer", "loss", "algorithm"), list(combinations()))
def test_training_lowers_the_loss(one_level_model, optimizer, loss, algorithm):
    model = one_level_model
    config = TrainConfig(
        steps=30,
        batch_size=4,
        rank=4,
        optimizer=optimizer,
        loss_function=loss,
        algorithm=algorithm,
        learning_rate=learning_rate(optimizer, loss),
        gradient_checkpointing=False,
        **FP32,
    )
    untrained, _ = adapted_network(model, config, jnp.float32)
    result = run_training(model, make_dataset(*small_data()), config, **QUIET)
    before, after = fixed_draw_loss(model, untrained), fixed_draw_loss(model, result.model_with_lora.network)
    assert len(result.loss_map["loss"]) == 30
    assert after < 0.9 * before, (before, after)


def test_only_the_adapter_changes_and_the_input_model_is_untouched(model):
    before = {key: np.asarray(site.value(name)) for key, site, name in torch_parameters(model.network)}
    result = train_lora(model, *small_data(), steps=3, **PLAIN, **QUIET)
    assert all(site.layer.adapter is None for _, site, _ in torch_parameters(model.network))
    trained = result.model_with_lora.network
    for key, site, name in torch_parameters(trained):
        np.testing.assert_array_equal(np.asarray(site.value(name)), before[key], err_msg=key)
    assert any(np.abs(leaf).max() > 0 for leaf in adapter_leaves(trained))
    assert result.steps == 3 and set(result.lora) and all(k.startswith("diffusion_model.") for k in result.lora)


def test_accumulated_step_is_the_mean_of_its_micro_steps(model):
    """SGD is linear in the gradient: one step over k micro-steps must move the adapter by the mean of the k
    single-micro-step moves (so k micro-steps of batch b act as one step of batch k*b)."""
    config = TrainConfig(rank=2, optimizer="SGD", learning_rate=0.01, gradient_checkpointing=False, **FP32)
    network, _ = adapted_network(model, config, jnp.float32)
    graph, adapters, base = nnx.split(network, AdapterParam, ...)
    data = device_arrays(make_dataset(*small_data()).buckets[0], model, jnp.float32)
    optimizer = make_optimizer("SGD", 0.01)
    perm = permutation_key(0)

    def moved(micro_steps, first):
        settings = StepSettings(2, micro_steps, jnp.float32, LOSSES["MSE"], optimizer, model.sampling)
        start = jax.tree.map(jnp.copy, adapters)
        new, _, _ = compile_step(graph, settings)(
            start, optimizer.init(start), base, data, noise_key_data(0, first, micro_steps), perm, first
        )
        return jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), new, adapters)

    together = moved(3, 0)
    separately = [moved(1, i) for i in range(3)]
    mean = jax.tree.map(lambda *moves: sum(moves) / 3, *separately)
    for a, b in zip(jax.tree.leaves(together), jax.tree.leaves(mean), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_gradient_checkpointing_does_not_change_the_result(model):
    results = [
        train_lora(
            model, *small_data(), steps=2, rank=2, optimizer="SGD", gradient_checkpointing=remat, **FP32, **QUIET
        )
        for remat in (False, True)
    ]
    for a, b in zip(*(adapter_leaves(r.model_with_lora.network) for r in results), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_killed_run_resumes_to_the_same_adapter(model, tmp_path):
    settings = dict(steps=6, **PLAIN)
    straight = train_lora(model, *small_data(), **settings, **QUIET)

    def kill_at_step_5(line):
        if line.startswith("step 5/"):
            raise RuntimeError("killed")

    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(RuntimeError, match="killed"):
        train_lora(model, *small_data(), **settings, checkpoint_dir=checkpoints, checkpoint_every=2,
                   progress=kill_at_step_5, log_every_seconds=0)  # fmt: skip
    resumed = train_lora(model, *small_data(), **settings, checkpoint_dir=checkpoints, resume=True, **QUIET)
    assert resumed.loss_map["loss"] == straight.loss_map["loss"]
    for a, b in zip(
        adapter_leaves(straight.model_with_lora.network), adapter_leaves(resumed.model_with_lora.network), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_resume_refuses_checkpoints_of_another_run(model, tmp_path):
    train_lora(model, *small_data(), steps=2, checkpoint_dir=tmp_path, **PLAIN, **QUIET)
    with pytest.raises(ValueError, match="rank: checkpoint 2, now 4"):
        train_lora(model, *small_data(), steps=4, rank=4, checkpoint_dir=tmp_path, resume=True, **FP32, **QUIET)


def test_existing_adapter_continues_and_counts_its_steps(model, tmp_path):
    first = train_lora(model, *small_data(), steps=3, **PLAIN, **QUIET)
    info = AdapterInfo("sd1", "eps", "LoRA", 2, 1.0, "fp32", steps=3)
    path = save_lora(first.model_with_lora, tmp_path / "first.safetensors", lora_dtype="fp32", info=info)
    continued = train_lora(model, *small_data(), steps=1, existing_lora=str(path), learning_rate=1e-7, **PLAIN, **QUIET)
    assert continued.steps == 4
    for a, b in zip(
        adapter_leaves(first.model_with_lora.network), adapter_leaves(continued.model_with_lora.network), strict=True
    ):
        np.testing.assert_allclose(a, b, atol=1e-5)  # one step at lr 1e-7 barely moves it


def test_mixed_resolutions_train_as_buckets(model):
    small, context = small_data()  # the shape the other tests compile
    large, _ = demo_dataset(2, 12)
    result = train_lora(model, [small, large], context, steps=4, **PLAIN, **QUIET)
    assert len(result.loss_map["loss"]) == 4
    assert np.isfinite(result.loss_map["loss"]).all()


def test_diverging_run_stops_with_the_step_number(model, tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"at step (\d+)") as stopped:
        train_lora(model, *small_data(), steps=40, rank=2, optimizer="SGD", learning_rate=1.0, **FP32,
                   checkpoint_dir=tmp_path, checkpoint_every=1, log_every_seconds=0, **QUIET)  # fmt: skip
    step = int(stopped.value.args[0].split("at step ")[1].split(";")[0])
    last_good = Checkpoints(tmp_path / "run_00001", {}).latest_step()
    assert last_good == step - 1  # the last good step is kept, nothing after it


@pytest.mark.parametrize(
    ("latents", "context", "message"),
    [
        (np.zeros((2, 3, 8, 8)), np.zeros((1, 4, 768)), "latents have 3 channels, the model takes 4"),
        (np.zeros((2, 4, 8, 8)), np.zeros((1, 4, 1024)), "c_crossattn \\(768-d\\), found 1024-d"),
        (np.zeros((3, 4, 8, 8)), np.zeros((2, 4, 768)), "`c_crossattn` has 2 entries for 3 latents"),
        (np.zeros((4, 8, 8)), np.zeros((1, 4, 768)), r"latents must be \[N, C, H, W\]"),
        (np.full((1, 4, 8, 8), np.nan), np.zeros((1, 4, 768)), "NaN or infinite"),
    ],
)
def test_bad_data_is_refused_before_compiling(model, latents, context, message):
    with pytest.raises(DatasetError, match=message):
        train_lora(model, latents.astype(np.float32), context.astype(np.float32), steps=1, **QUIET)


def test_existing_adapter_that_does_not_fit_is_named(model, tmp_path):
    path = tmp_path / "other_model_lora.safetensors"
    save_file({"diffusion_model.input_blocks.7.1.proj_in.lora_up.weight": np.zeros((8, 2), np.float32)}, str(path))
    with pytest.raises(ValueError, match=r"input_blocks\.7\.1\.proj_in"):
        train_lora(model, *small_data(), steps=1, existing_lora=str(path), **QUIET)


def test_settings_outside_the_node_ranges_are_named(model):
    with pytest.raises(ValueError, match="grad_accumulation_steps must be between 1 and 1024"):
        train_lora(model, *small_data(), grad_accumulation_steps=2000)
    with pytest.raises(ValueError, match="loss_function must be one of"):
        train_lora(model, *small_data(), loss_function="Charbonnier")
