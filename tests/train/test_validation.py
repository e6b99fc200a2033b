"""Validation loss, TensorBoard / W&B logs and their controls in real (tiny) runs: validation scores held-out
samples at the same draws every time, never touches the training, and survives a resume; the logs carry the
numbers the run fetched, under their tags and steps."""

import json
import struct
import sys
from dataclasses import replace
from types import ModuleType, SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from tensorboardX.proto import event_pb2

from jaxlora import load_model
from jaxlora.models.demo import write_random_checkpoint
from jaxlora.train.__main__ import build_parser, resolve_settings
from jaxlora.train.checkpoints import ResumeError, open_run
from jaxlora.train.config import SettingsError, TrainConfig
from jaxlora.train.data import make_dataset
from jaxlora.train.loop import fingerprint, prepare_run, run_training
from jaxlora.train.report import write_run_outputs
from jaxlora.train.tracking import LoggerUnavailableError, TensorBoardLog, open_logs
from jaxlora.train.validation import held_out_count, split_dataset
from tests.train.test_controls import adapter_tree, assert_trees_equal
from tests.train.test_train import FP32, ONE_LEVEL, QUIET, small_data

SETTINGS = {"steps": 4, "batch_size": 2, "rank": 2, "gradient_checkpointing": False, "ema_decay": 0.9, **FP32}
SPLIT = 0.34  # 2 of 6 samples held out, 4 trained on


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(write_random_checkpoint(ONE_LEVEL, tmp_path_factory.mktemp("m") / "unet.safetensors", 4), "fp32")


@pytest.fixture(scope="module")
def data():
    return make_dataset(*small_data(count=6))


def read_events(folder) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every scalar in the folder's event files (TFRecord framing: length, its CRC, the
    Event proto, its CRC; CRCs not checked), parsed with tensorboardX's own protobuf definitions."""
    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        raw, offset = path.read_bytes(), 0
        while offset < len(raw):
            (length,) = struct.unpack("<Q", raw[offset : offset + 8])
            event = event_pb2.Event.FromString(raw[offset + 12 : offset + 12 + length])
            offset += 16 + length
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


@pytest.fixture(scope="module")
def logged_run(model, data, tmp_path_factory):
    """A run holding out 34% of the data, validating every 2 steps (with an EMA) and logging to TensorBoard."""
    folder = tmp_path_factory.mktemp("logs")
    logs = TensorBoardLog(folder)
    config = TrainConfig(validation_split=SPLIT, **SETTINGS)
    result = run_training(model, data, config, validate_every=2, logger=logs, log_every_seconds=0.0, **QUIET)
    logs.close()
    return SimpleNamespace(config=config, result=result, events=read_events(folder))


def test_split_holds_out_a_seeded_fraction_and_trains_on_the_rest(data):
    train, held = split_dataset(data, SPLIT, seed=0)
    assert held.size == held_out_count(6, SPLIT) == 2 and train.size == 4
    rows = lambda d: {bytes(x) for b in d.buckets for x in b.latents}  # noqa: E731
    assert rows(train) | rows(held) == rows(data) and not rows(train) & rows(held)
    assert rows(split_dataset(data, SPLIT, seed=0)[1]) == rows(held)  # chosen from the seed
    assert any(rows(split_dataset(data, SPLIT, seed=s)[1]) != rows(held) for s in (1, 2, 3))
    with pytest.raises(ValueError, match="leaving none to train on"):
        split_dataset(make_dataset(*small_data(count=1)), 0.5, 0)


def test_validation_neither_changes_training_nor_uses_the_held_out_samples(model, data, logged_run):
    """The same steps on the training part alone, with no validation and no logs, end with the bit-identical
    adapter and EMA (so the held-out samples were not trained on, and validating and logging changed nothing)."""
    train, _ = split_dataset(data, SPLIT, seed=0)
    plain = run_training(model, train, TrainConfig(**SETTINGS), **QUIET)
    assert plain.validation is None
    assert_trees_equal(adapter_tree(plain.model_with_lora), adapter_tree(logged_run.result.model_with_lora))
    assert_trees_equal(adapter_tree(plain.ema_model), adapter_tree(logged_run.result.ema_model))
    assert plain.loss_map == logged_run.result.loss_map


def test_validation_loss_is_the_same_at_every_evaluation_of_an_adapter(model, data, logged_run):
    """The recorded losses are those of the adapter and its EMA at the end, the same at every evaluation, and a
    different adapter scores differently."""
    result = logged_run.result
    assert result.validation["step"] == [2, 4]
    train, held = split_dataset(data, SPLIT, seed=0)
    run = prepare_run(model, train, logged_run.config, validation=held)
    trained, ema = adapter_tree(result.model_with_lora), adapter_tree(result.ema_model)
    first, second = (float(run.validation(trained, run.base)) for _ in range(2))
    assert first == second == result.validation["loss"][-1]
    assert float(run.validation(ema, run.base)) == result.validation["ema_loss"][-1]
    assert float(run.validation(run.adapters, run.base)) != first  # the freshly initialised adapter


def test_tensorboard_events_hold_each_tag_at_its_steps(logged_run):
    events, result = logged_run.events, logged_run.result
    assert set(events) >= {"train/loss", "train/grad_norm", "train/learning_rate", "perf/steps_per_second"}
    assert sorted(events["train/loss"]) == [1, 2, 3, 4]
    losses = result.loss_map["loss"]  # one micro-step per step
    np.testing.assert_array_equal([events["train/loss"][s] for s in (1, 2, 3, 4)], np.float32(losses))
    assert all(np.isfinite(v) and v > 0 for v in events["train/grad_norm"].values())
    assert set(events["train/learning_rate"].values()) == {np.float32(0.0005)}
    for tag, key in (("validation/loss", "loss"), ("validation/ema_loss", "ema_loss")):
        assert events[tag] == dict(zip([2, 4], np.float32(result.validation[key]).tolist(), strict=True))


def test_validation_reaches_the_files_and_the_metadata(logged_run, tmp_path):
    paths = write_run_outputs(logged_run.result, logged_run.config, tmp_path, "run")
    validation = json.loads(paths["loss json"].read_text())["validation"]
    assert validation == logged_run.result.validation
    assert paths["validation csv"].read_text().splitlines()[0] == "step,loss,ema_loss"
    with safe_open(paths["adapter"], framework="numpy") as file:
        assert json.loads(file.metadata()["training_settings"])["validation_split"] == SPLIT


@pytest.mark.slow
def test_resume_with_validation_and_logs_added_ends_with_the_same_adapter(model, data, logged_run, tmp_path):
    """Two steps, then resumed to four with validation every step and logs (which the fingerprint ignores): the
    adapter of the uninterrupted run, and the validation losses both runs share. A changed split is refused."""
    config = TrainConfig(validation_split=SPLIT, **{**SETTINGS, "steps": 2})
    first = run_training(model, data, config, checkpoint_dir=tmp_path, **QUIET)
    assert first.validation["loss"] == logged_run.result.validation["loss"][:1]  # step 2, the same draws
    with open_logs(tmp_path / "logs", None) as logs:
        resumed = run_training(
            model, data, logged_run.config, checkpoint_dir=tmp_path, resume=True, validate_every=1, logger=logs, **QUIET
        )
    assert_trees_equal(adapter_tree(resumed.model_with_lora), adapter_tree(logged_run.result.model_with_lora))
    assert resumed.validation["step"] == [2, 3, 4]  # step 2's from the checkpoint
    assert resumed.validation["loss"][::2] == logged_run.result.validation["loss"]
    assert sorted(read_events(tmp_path / "logs")["validation/loss"]) == [3, 4]
    with pytest.raises(ResumeError, match="validation_split"):
        run_training(model, data, TrainConfig(validation_split=0.5, **SETTINGS), checkpoint_dir=tmp_path, resume=True)


def test_the_split_is_in_the_fingerprint_and_a_changed_one_does_not_resume(model, data, tmp_path):
    """validation_split changes what is trained: it is fingerprinted (left out at 0, so older runs resume), and a
    run does not resume with another; validate_every, validation_dataset and the logs are run options, outside
    the fingerprint (the slow test above resumes with them changed)."""
    config = TrainConfig(validation_split=SPLIT, **SETTINGS)
    train, _ = split_dataset(data, SPLIT, seed=0)
    assert fingerprint(config, model, train)["validation_split"] == SPLIT
    assert "validation_split" not in fingerprint(TrainConfig(**SETTINGS), model, train)
    run = open_run(tmp_path, fingerprint(config, model, train), False, 4)
    run.save(1, {"a": jnp.zeros(2)}, {"b": jnp.zeros(1)}, [0.5], [(1, 0.25, None)])
    other = replace(config, validation_split=0.5)
    with pytest.raises(ResumeError, match="validation_split: checkpoint 0.34, now 0.5"):
        open_run(tmp_path, fingerprint(other, model, split_dataset(data, 0.5, seed=0)[0]), True, 4)
    resumed = open_run(tmp_path, fingerprint(config, model, train), True, 4)
    restored = resumed.restore({"a": jnp.ones(2)}, {"b": jnp.ones(1)})
    assert restored.losses == [0.5] and restored.validation == [(1, 0.25, None)]
    resumed.save(2, {"a": jnp.zeros(2)}, {"b": jnp.zeros(1)}, [0.5, 0.4])  # no records yet: none saved
    assert resumed.restore({"a": jnp.ones(2)}, {"b": jnp.ones(1)}).validation == []


def test_wandb_gets_scalars_and_images_through_its_api(monkeypatch):
    """wandb is not installed here: a fake module in sys.modules records the calls the logger makes."""
    calls = []
    fake = ModuleType("wandb")
    fake.Image = lambda array: ("image", array.shape)
    fake.init = lambda project, config: SimpleNamespace(
        log=lambda values, step: calls.append((step, values)), finish=lambda: calls.append("finish")
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with open_logs(None, "project", {"rank": 2}) as logs:
        logs.scalars(3, {"train/loss": np.float32(0.5)})
        logs.image("samples/0", 3, np.zeros((4, 6, 3), np.uint8))
    assert calls == [(3, {"train/loss": 0.5}), (3, {"samples/0": ("image", (4, 6, 3))}), "finish"]


def test_missing_packages_and_inconsistent_validation_settings_are_refused_before_loading(monkeypatch, tmp_path):
    def settings(*argv):
        return resolve_settings(build_parser().parse_args(list(argv)))

    run, config, _ = settings("--validation-split", "0.2", "--validate-every", "5", "--log-dir", str(tmp_path))
    assert (config.validation_split, run.validate_every, run.log_dir) == (0.2, 5, str(tmp_path))
    toml = tmp_path / "settings.toml"
    toml.write_text('validation_dataset = "held_out.safetensors"\nvalidate-every = 10\nwandb_project = "p"\n')
    monkeypatch.setitem(sys.modules, "wandb", ModuleType("wandb"))
    run, _, _ = settings("--config", str(toml))
    assert (run.validation_dataset, run.validate_every, run.wandb_project) == ("held_out.safetensors", 10, "p")
    for argv, key in [
        (("--validate-every", "5"), "validate_every"),
        (("--validation-split", "0.2", "--validation-dataset", "x"), "validation_dataset"),
        (("--validation-split", "0.95"), "validation_split"),
    ]:
        with pytest.raises(SettingsError) as error:
            settings(*argv)
        assert error.value.key == key
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        TensorBoardLog(tmp_path / "tb").image("x", 1, np.zeros((4, 4), np.uint8))
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(SettingsError, match=r"jaxlora\[tensorboard\]"):
        settings("--log-dir", str(tmp_path))
    with pytest.raises(LoggerUnavailableError):
        open_logs(tmp_path, None)
