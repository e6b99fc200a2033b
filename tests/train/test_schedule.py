"""Learning-rate schedules against their closed forms (written out here, as torch/diffusers define the shapes:
linear warmup from 0, then the shape over the remaining steps), and the settings that refuse impossible ones."""

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlora.train import config as config_module
from jaxlora.train.config import KNOB_OWNERS, SettingsError, TrainConfig
from jaxlora.train.loop import progress_line
from jaxlora.train.optim import make_optimizer
from jaxlora.train.schedule import SCHEDULES, learning_rate_schedule, rate_at

PEAK, STEPS, WARMUP = 0.01, 130, 10
LENGTH = STEPS - WARMUP


def closed_form(name: str, step: int, cycles: int = 3, power: float = 2.0, min_ratio: float = 0.1) -> float:
    if step < WARMUP and name != "constant":
        return PEAK * step / WARMUP
    progress = min((step - WARMUP) / LENGTH, 1.0)
    low = PEAK * min_ratio
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return {
        "constant": PEAK,
        "constant_with_warmup": PEAK,
        "linear": PEAK + (low - PEAK) * progress,
        "cosine": low + (PEAK - low) * cosine,
        "cosine_with_restarts": low + (PEAK - low) * 0.5 * (1 + math.cos(math.pi * ((cycles * progress) % 1.0))),
        "polynomial": low + (PEAK - low) * (1 - progress) ** power,
    }[name]


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_values_match_the_closed_form_at_every_step(name):
    knobs = {"lr_cycles": 3, "lr_power": 2.0, "lr_min_ratio": 0.1}  # each where its schedule takes it
    owned = {key: value for key, value in knobs.items() if name in KNOB_OWNERS[key][1]}
    config = TrainConfig(
        learning_rate=PEAK, steps=STEPS, lr_scheduler=name, warmup_steps=0 if name == "constant" else WARMUP, **owned
    )
    schedule = learning_rate_schedule(config)
    actual = [rate_at(schedule, step) for step in range(STEPS)]
    expected = [closed_form(name, step) for step in range(STEPS)]
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-9)  # float32 evaluation


def test_constant_is_the_nodes_plain_rate():
    assert learning_rate_schedule(TrainConfig()) == TrainConfig().learning_rate  # a float: no schedule state


def test_optimizer_steps_use_the_scheduled_rate():
    """SGD moves a parameter by -rate(s) * gradient at step s: the schedule reaches the update, counted from 0."""
    config = TrainConfig(learning_rate=PEAK, steps=STEPS, lr_scheduler="cosine", warmup_steps=WARMUP)
    schedule = learning_rate_schedule(config)
    optimizer = make_optimizer("SGD", schedule)
    params = {"w": jnp.zeros(3)}
    state = optimizer.init(params)
    for step in range(WARMUP + 3):
        updates, state = optimizer.update({"w": jnp.ones(3)}, state, params)
        np.testing.assert_allclose(np.asarray(updates["w"]), -rate_at(schedule, step), rtol=1e-6)
        params = optax.apply_updates(params, updates)


def test_names_match_the_settings_check():
    assert config_module.SCHEDULES == SCHEDULES


@pytest.mark.parametrize(
    ("settings", "key", "message"),
    [
        ({"warmup_steps": 5}, "warmup_steps", "constant_with_warmup"),
        ({"lr_scheduler": "cosine", "warmup_steps": 16}, "warmup_steps", "less than steps"),
        ({"lr_scheduler": "cosine_with_restarts", "lr_cycles": 0}, "lr_cycles", "between 1"),
        ({"lr_min_ratio": 1.5}, "lr_min_ratio", "between 0"),
        ({"lr_scheduler": "exponential"}, "lr_scheduler", "must be one of"),
        ({"lr_scheduler": "cosine", "lr_power": 2.0}, "lr_power", "applies to lr_scheduler polynomial"),
        ({"lr_min_ratio": 0.1}, "lr_min_ratio", "not constant"),
        ({"logit_std": 0.5}, "logit_std", "applies to timestep_sampling logit_normal"),
        ({"timestep_sampling": "logit_normal", "mode_scale": 1.0}, "mode_scale", "not logit_normal"),
    ],
)
def test_impossible_schedules_are_refused_naming_the_setting(settings, key, message):
    with pytest.raises(SettingsError, match=message) as error:
        TrainConfig(**settings)
    assert error.value.key == key


def test_progress_line_shows_the_rate():
    assert "lr 0.00025 " in progress_line(3, 10, 0.5, 1.0, 2.0, None, 2.5e-4)
