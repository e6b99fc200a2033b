"""Learning-rate schedules, composed from `optax.schedules`: a linear warmup from 0 over `warmup_steps`, then the
named shape over the rest of the run's `steps`, down to `min_ratio` times the peak rate. Step s (counted from 0)
of the optimizer uses the rate `schedule(s)`, as torch's LambdaLR schedulers do (the first warmup step has rate 0).

"constant" is the Train LoRA node's fixed rate and is returned as a plain float, so the default optimizer is the
very transformation it was before schedules existed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import numpy as np
import optax

if TYPE_CHECKING:
    from jaxlora.train.config import TrainConfig

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
DECAYING = SCHEDULES[2:]  # shapes that depend on the run's length


def _warmup_then(peak: float, warmup_steps: int, after: optax.Schedule) -> optax.Schedule:
    if warmup_steps == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), after], [warmup_steps])


def _restarts(peak: float, length: int, cycles: int, min_ratio: float) -> optax.Schedule:
    """`cycles` cosine decays from the peak, each restarting at the peak; cycle k ends at round(k * length / cycles)
    (lengths differ by at most one step when `cycles` does not divide `length`)."""
    ends = [round(k * length / cycles) for k in range(1, cycles + 1)]
    starts = [0, *ends[:-1]]
    lengths = [end - start for start, end in zip(starts, ends, strict=True)]
    pieces = [optax.cosine_decay_schedule(peak, n, alpha=min_ratio) for n in lengths]
    return optax.join_schedules(pieces, starts[1:])


def learning_rate_schedule(config: TrainConfig) -> float | optax.Schedule:
    """The rate of every optimizer step of a run of `config.steps` steps (a float for the node's constant rate):
    `lr_scheduler` names the shape, `lr_cycles` is cosine_with_restarts' count, `lr_power` polynomial's power and
    `lr_min_ratio` the decaying shapes' final rate over the peak `learning_rate`."""
    learning_rate, name = config.learning_rate, config.lr_scheduler
    if name == "constant":
        return learning_rate
    warmup = config.warmup_steps
    length = max(config.steps - warmup, 1)
    end = learning_rate * config.lr_min_ratio
    after = {
        "constant_with_warmup": lambda: optax.constant_schedule(learning_rate),
        "linear": lambda: optax.linear_schedule(learning_rate, end, length),
        "cosine": lambda: optax.cosine_decay_schedule(learning_rate, length, alpha=config.lr_min_ratio),
        "cosine_with_restarts": lambda: _restarts(learning_rate, length, config.lr_cycles, config.lr_min_ratio),
        "polynomial": lambda: optax.polynomial_schedule(learning_rate, end, config.lr_power, length),
    }
    if name not in after:
        raise ValueError(f"unknown lr_scheduler {name!r}; use one of {list(SCHEDULES)}")
    return _warmup_then(learning_rate, warmup, after[name]())


def rates(schedule: float | optax.Schedule, steps: int) -> np.ndarray:
    """The rate of every optimizer step 0..steps-1, computed once on the host for the logs (fetching a rate per
    step from the device would wait for the step in flight)."""
    if not callable(schedule):
        return np.full(steps, float(schedule))
    return np.asarray(jax.device_get(schedule(np.arange(steps))), np.float64)


def rate_at(schedule: float | optax.Schedule, step: int) -> float:
    """The rate optimizer step `step` (from 0) uses."""
    return float(schedule(step)) if callable(schedule) else float(schedule)
