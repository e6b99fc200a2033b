"""Training controls in a real (tiny) run: each changes what it should and nothing else, and reaches the exported
adapter and the run's fingerprint."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlora import load_model
from jaxlora.adapters.base import AdapterParam
from jaxlora.models.demo import write_random_checkpoint
from jaxlora.train.checkpoints import Checkpoints
from jaxlora.train.config import TrainConfig
from jaxlora.train.data import make_dataset
from jaxlora.train.loop import fingerprint, prepare_run, run_training
from jaxlora.train.optim import eval_params
from tests.train.test_train import FP32, ONE_LEVEL, QUIET, small_data

TINY = {"steps": 3, "batch_size": 2, "rank": 2, "gradient_checkpointing": False, **FP32}


@pytest.fixture(scope="module")
def one_level_model(tmp_path_factory):
    return load_model(
        write_random_checkpoint(ONE_LEVEL, tmp_path_factory.mktemp("one") / "unet.safetensors", 4), "fp32"
    )


def adapter_tree(model):
    return nnx.state(model.network, AdapterParam)


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_schedule_free_run_exports_the_averaged_iterate(one_level_model, tmp_path, module_compile_cache):
    """The adapter a schedule-free run returns (and exports) is x, computed from the final y and the optimizer
    state in the last checkpoint, not the y the gradients were taken at."""
    dataset = make_dataset(*small_data())
    config = TrainConfig(optimizer="ScheduleFreeAdamW", learning_rate=0.01, **TINY)
    result = run_training(one_level_model, dataset, config, checkpoint_dir=tmp_path, **QUIET)
    fresh = prepare_run(one_level_model, dataset, config)
    saved = Checkpoints(result.checkpoints.directory, fingerprint(config, one_level_model, dataset))
    _, trained, opt_state, _ = saved.restore(fresh.adapters, fresh.opt_state)
    assert_trees_equal(adapter_tree(result.model_with_lora), eval_params(config.optimizer, opt_state, trained))
    differences = [
        np.abs(np.asarray(x) - np.asarray(y)).max()
        for x, y in zip(jax.tree.leaves(trained), jax.tree.leaves(adapter_tree(result.model_with_lora)), strict=True)
    ]
    assert max(differences) > 1e-6  # y and x differ after three steps
