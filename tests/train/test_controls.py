"""Training controls in a real (tiny) run: each changes what it should and nothing else, and reaches the exported
adapter and the run's fingerprint."""

import json
import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file

from jaxlora import attach_adapters, load_model
from jaxlora.adapters.base import AdapterParam
from jaxlora.models.demo import write_random_checkpoint
from jaxlora.models.unet_family import DEMO_UNET
from jaxlora.train.__main__ import build_parser, resolve_settings
from jaxlora.train.checkpoints import Checkpoints, ResumeError, open_run
from jaxlora.train.config import KNOB_OWNERS, SettingsError, TrainConfig
from jaxlora.train.data import make_dataset
from jaxlora.train.loop import fingerprint, prepare_run, run_training
from jaxlora.train.optim import eval_params
from jaxlora.train.report import AdapterSaves, write_run_outputs
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
def test_schedule_free_run_exports_the_averaged_iterate(one_level_model, tmp_path):
    """The adapter a schedule-free run returns (and exports) is x, computed from the final y and the optimizer
    state in the last checkpoint, not the y the gradients were taken at."""
    dataset = make_dataset(*small_data())
    config = TrainConfig(optimizer="ScheduleFreeAdamW", learning_rate=0.01, **TINY)
    result = run_training(one_level_model, dataset, config, checkpoint_dir=tmp_path, **QUIET)
    fresh = prepare_run(one_level_model, dataset, config)
    saved = Checkpoints(result.checkpoints.directory, fingerprint(config, one_level_model, dataset))
    _, trained, opt_state, _, _ = saved.restore(fresh.adapters, fresh.opt_state)
    assert_trees_equal(adapter_tree(result.model_with_lora), eval_params(config.optimizer, opt_state, trained))
    differences = [
        np.abs(np.asarray(x) - np.asarray(y)).max()
        for x, y in zip(jax.tree.leaves(trained), jax.tree.leaves(adapter_tree(result.model_with_lora)), strict=True)
    ]
    assert max(differences) > 1e-6  # y and x differ after three steps


def test_every_control_together_trains_and_reaches_the_files(one_level_model, tmp_path):
    """One run with every control off its default (one compile): finite losses, the rate in the progress
    line, the EMA adapter beside (or instead of) the trained one, and the settings in the files' metadata."""
    latents, context = small_data()
    dataset = make_dataset(latents, context, empty={"c_crossattn": np.zeros_like(context[:1])})
    controls = {
        "lr_scheduler": "cosine",
        "warmup_steps": 1,
        "optimizer": "Lion",
        "learning_rate": 1e-3,
        "weight_decay": 0.01,
        "max_grad_norm": 1.0,
        "timestep_sampling": "logit_normal",
        "noise_offset": 0.05,
        "min_snr_gamma": 5.0,
        "loss_target": "native",
        "caption_dropout": 0.5,
        "ema_decay": 0.9,
    }
    config = TrainConfig(**{**TINY, "steps": 4}, **controls)
    lines = []
    saves = AdapterSaves(config, tmp_path / "saves", "loras/x", keep_last=2)
    result = run_training(
        one_level_model, dataset, config, progress=lines.append, log_every_seconds=0.0, save_every=1, on_save=saves
    )
    assert len(result.loss_map["loss"]) == 4 and np.isfinite(result.loss_map["loss"]).all()
    # saved after steps 1, 2 and 3 (the last step's adapter is the run's output), the last two kept, EMA beside
    names = sorted(path.name for path in (tmp_path / "saves" / "loras" / "x_saves").iterdir())
    assert names == [f"x_{s}_steps_0000{s}_{w}.safetensors" for s in (2, 3) for w in ("", "ema")]
    rates = [float(m.group(1)) for line in lines if (m := re.search(r" lr (\S+) ", line))]
    assert rates[0] == 0.0 and max(rates) == pytest.approx(1e-3, rel=1e-6)  # warmup from 0, then the peak

    beside = write_run_outputs(result, config, tmp_path / "beside", "x")
    instead = write_run_outputs(result, config, tmp_path / "instead", "x", ema_export="instead")
    assert beside["ema adapter"].name == "x_4_steps_00001_ema.safetensors" and "ema adapter" not in instead
    trained, ema = (load_file(beside[name]) for name in ("adapter", "ema adapter"))
    assert trained.keys() == ema.keys() and any(not np.array_equal(trained[k], ema[k]) for k in trained)
    replaced = load_file(instead["adapter"])
    assert all(np.array_equal(replaced[k], ema[k]) for k in ema)
    for path, weights in ((beside["adapter"], "trained"), (beside["ema adapter"], "ema"), (instead["adapter"], "ema")):
        with safe_open(path, framework="numpy") as file:
            settings = json.loads(file.metadata()["training_settings"])
        assert settings["exported_weights"] == weights
        assert {key: settings[key] for key in controls} == controls


def test_fingerprint_holds_every_control_and_no_output_setting():
    """Each training control changes the fingerprint (a resumed run with another value is refused); the output
    settings (ema_export, save_every, save_last) are run options, outside it. steps enter only through a
    decaying schedule."""
    model = SimpleNamespace(variant=SimpleNamespace(name="sd1"), quantization="none")
    dataset = make_dataset(*small_data())
    base = fingerprint(TrainConfig(), model, dataset)
    changed = {
        "lr_scheduler": "constant_with_warmup",
        "warmup_steps": 2,
        "lr_cycles": 2,
        "lr_power": 2.0,
        "lr_min_ratio": 0.1,
        "weight_decay": 0.1,
        "beta1": 0.8,
        "beta2": 0.9,
        "eps": 1e-6,
        "max_grad_norm": 1.0,
        "timestep_sampling": "mode",
        "logit_mean": 0.5,
        "logit_std": 0.5,
        "mode_scale": 1.0,
        "noise_offset": 0.1,
        "min_snr_gamma": 5.0,
        "loss_target": "native",
        "caption_dropout": 0.1,
        "ema_decay": 0.99,
    }
    for key, value in changed.items():
        owner = KNOB_OWNERS.get(key, ("lr_scheduler", ("constant_with_warmup",)) if key == "warmup_steps" else None)
        settings = {key: value, **({owner[0]: owner[1][0]} if owner else {})}
        other = fingerprint(TrainConfig(**settings), model, dataset)
        assert other[key] == value and key not in base, key  # defaults are left out: older runs still match
    assert not {"ema_export", "save_every", "save_last", "schedule_steps"} & set(base)
    longer = fingerprint(TrainConfig(steps=32), model, dataset)
    assert longer == base  # a constant rate resumes to more steps
    cosine = [fingerprint(TrainConfig(steps=s, lr_scheduler="cosine"), model, dataset) for s in (16, 32)]
    assert cosine[0]["schedule_steps"] == 16 and cosine[0] != cosine[1]


def test_ema_settings_that_cannot_work_are_refused():
    with pytest.raises(SettingsError, match="needs an EMA") as error:
        resolve_settings(build_parser().parse_args(["--ema-export", "instead"]))
    assert error.value.key == "ema_export"
    with pytest.raises(SettingsError, match="average of its iterates") as error:
        TrainConfig(optimizer="ScheduleFreeAdamW", ema_decay=0.99)
    assert error.value.key == "ema_decay"


def test_saves_keep_the_last_k_of_this_run_and_never_overwrite(tmp_path):
    """AdapterSaves on a model with fresh adapters: counters go on past other runs' files, only this run's older
    saves are deleted, and each file is a complete adapter with its steps in the metadata."""
    model = load_model(write_random_checkpoint(DEMO_UNET, tmp_path / "unet.safetensors"), dtype="fp32")
    attach_adapters(model.network, "LoRA", 2, 0)
    folder = tmp_path / "out" / "x_saves"
    folder.mkdir(parents=True)
    (folder / "x_9_steps_00004_.safetensors").write_bytes(b"another run's")
    saves = AdapterSaves(TrainConfig(), tmp_path / "out", "x", keep_last=2)
    for steps in (10, 20, 30):
        saves(steps, model, None)
    names = sorted(path.name for path in folder.iterdir())
    assert names == ["x_20_steps_00006_.safetensors", "x_30_steps_00007_.safetensors", "x_9_steps_00004_.safetensors"]
    with safe_open(folder / names[1], framework="numpy") as file:
        assert file.metadata()["steps"] == "30" and len(list(file.keys())) > 0


def test_resume_refuses_a_changed_control_naming_it(tmp_path):
    """A run checkpointed with ema_decay 0.99 does not resume with 0.9 (the message names the setting), and does
    resume with the same training settings."""
    model = SimpleNamespace(variant=SimpleNamespace(name="sd1"), quantization="none")
    dataset = make_dataset(*small_data())
    run = open_run(tmp_path, fingerprint(TrainConfig(ema_decay=0.99), model, dataset), False, 16)
    run.save(1, {"a": jnp.zeros(2)}, {"b": jnp.zeros(1)}, [0.5])
    with pytest.raises(ResumeError, match="ema_decay: checkpoint 0.99, now 0.9"):
        open_run(tmp_path, fingerprint(TrainConfig(ema_decay=0.9), model, dataset), True, 16)
    resumed = open_run(tmp_path, fingerprint(TrainConfig(ema_decay=0.99), model, dataset), True, 16)
    assert resumed.directory == run.directory
