"""Experiment logs: TensorBoard event files (through tensorboardX, which needs no TensorFlow) and Weights & Biases,
each optional. The training loop hands a `RunLog` the numbers it has already fetched for its progress line, so
logging adds no device synchronisation and cannot change what is trained.

Tags: `train/loss` (mean over the step's micro-steps), `train/grad_norm` (before clipping), `train/learning_rate`
(the schedule's rate), `perf/steps_per_second`, `perf/samples_per_second`, `perf/mfu`, `validation/loss` and
`validation/ema_loss`; images (e.g. samples) under their own names, HxWx3 uint8.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np


class LoggerUnavailableError(ImportError):
    """A log destination asked for whose package is not installed; the message says what to install."""


def known(values: Mapping[str, float | None]) -> dict[str, float]:
    """The values that exist (MFU where the device's peak is known, the EMA's loss where there is one)."""
    return {tag: value for tag, value in values.items() if value is not None}


class RunLog(Protocol):
    """Where a run's numbers go; `step` counts optimizer steps of the run from 1."""

    def scalars(self, step: int, values: Mapping[str, float]) -> None: ...

    def image(self, name: str, step: int, image: np.ndarray) -> None: ...

    def close(self) -> None: ...


# setting -> (module, what to install)
PACKAGES = {"log_dir": ("tensorboardX", '"jaxlora[tensorboard]"'), "wandb_project": ("wandb", "wandb")}


def _unavailable(setting: str) -> LoggerUnavailableError:
    module, install = PACKAGES[setting]
    return LoggerUnavailableError(f"{setting} needs the `{module}` package: pip install {install} (or leave it unset)")


def _import(setting: str):
    try:
        return importlib.import_module(PACKAGES[setting][0])
    except ImportError as error:
        raise _unavailable(setting) from error


def check_packages(log_dir: str | Path | None = None, wandb_project: str | None = None) -> None:
    """Refuse, before anything is loaded, a destination whose package is missing."""
    for setting, value in (("log_dir", log_dir), ("wandb_project", wandb_project)):
        if value is not None and not _installed(PACKAGES[setting][0]):
            raise _unavailable(setting)


def _installed(module: str) -> bool:
    """Importable without importing it (a module already imported, or put in sys.modules, counts)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"a logged image must be HxWx3 uint8, got shape {image.shape} {image.dtype}")
    return image


class TensorBoardLog:
    """Event files in `log_dir` (one file per run; a resumed run adds one and continues the step numbers)."""

    def __init__(self, log_dir: str | Path):
        tensorboardx = _import("log_dir")
        self.writer = tensorboardx.SummaryWriter(str(log_dir))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), step)

    def image(self, name: str, step: int, image: np.ndarray) -> None:
        self.writer.add_image(name, _check_image(image), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbLog:
    """A W&B run in `project` with the run's settings as its config."""

    def __init__(self, project: str, config: Mapping[str, object]):
        self.wandb = _import("wandb_project")
        self.run = self.wandb.init(project=project, config=dict(config))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log({tag: float(value) for tag, value in values.items()}, step=step)

    def image(self, name: str, step: int, image: np.ndarray) -> None:
        self.run.log({name: self.wandb.Image(_check_image(image))}, step=step)

    def close(self) -> None:
        self.run.finish()


class RunLogs:
    """Every destination asked for, as one `RunLog`; a context manager that closes them."""

    def __init__(self, logs: list[RunLog]):
        self.logs = logs

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for log in self.logs:
            log.scalars(step, values)

    def image(self, name: str, step: int, image: np.ndarray) -> None:
        for log in self.logs:
            log.image(name, step, image)

    def close(self) -> None:
        for log in self.logs:
            log.close()

    def __enter__(self) -> RunLogs:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_logs(
    log_dir: str | Path | None, wandb_project: str | None, settings: Mapping[str, object] | None = None
) -> RunLogs:
    """The destinations asked for (none: a `RunLogs` that drops everything). A missing package is a
    `LoggerUnavailableError`, checked before any is opened."""
    check_packages(log_dir, wandb_project)
    logs: list[RunLog] = []
    if log_dir is not None:
        logs.append(TensorBoardLog(log_dir))
    if wandb_project is not None:
        try:
            logs.append(WandbLog(wandb_project, settings or {}))
        except BaseException:  # e.g. not logged in: close the event file opened before
            RunLogs(logs).close()
            raise
    return RunLogs(logs)
