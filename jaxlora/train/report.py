"""A run's outputs besides the adapter: where they go (ComfyUI's SaveLoRA naming) and the loss history as JSON, CSV
and a PNG plot (ComfyUI's Plot Loss Graph, with labels).

ComfyUI names an adapter `<prefix>_<steps>_steps_<counter:05>_.safetensors`, but its counter is read from the first
integer after the base name, which is the steps, so after `x_16_steps_00001_` it jumps to 17. Here the counter counts
runs: one more than the largest counter among files of that base name.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import jax.numpy as jnp
from flax import nnx

from jaxlora.adapters.attach import attach_adapters, attach_imported
from jaxlora.adapters.formats import export_adapter, import_adapter
from jaxlora.adapters.lora_files import save_lora
from jaxlora.adapters.metadata import adapter_info
from jaxlora.files import write_new_file
from jaxlora.train.loss_plot import render_loss_plot

if TYPE_CHECKING:
    from jaxlora.models.diffusion import DiffusionModel
    from jaxlora.train.config import TrainConfig
    from jaxlora.train.loop import ExistingAdapter, TrainResult

COUNTER_ATTEMPTS = 100  # runs of one prefix finishing within the same moment


class RunInterruptedError(RuntimeError):
    """Outputs asked of a run that stopped early; the message gives its step and where its checkpoint is."""


def output_stem(output_dir: str | Path, prefix: str, steps: int | None) -> Path:
    """The next free `<output_dir>/<folder>/<base>_<steps>_steps_<counter:05>_` stem (without steps when None),
    where `prefix` is `<folder>/<base>` as in SaveLoRA. Files `<stem>.safetensors`, `<stem>loss.json`... share it.

    The counter is 1 + the largest counter among `<base>_<int>_steps_<counter>_*` and `<base>_<counter>_*` files in
    the folder (1 if none), so runs with different step counts still number 1, 2, 3.
    """
    subfolder, base = os.path.split(prefix)
    folder = Path(output_dir) / subfolder
    inside = Path(output_dir).resolve()
    if not base or (folder.resolve() != inside and inside not in folder.resolve().parents):
        raise ValueError(f"prefix {prefix!r} must name a file inside {output_dir}, like 'loras/my_lora'")
    pattern = re.compile(rf"{re.escape(base)}_(?:\d+_steps_)?(\d+)_")
    names = [path.name for path in folder.iterdir()] if folder.is_dir() else []
    counters = [int(match.group(1)) for name in names if (match := pattern.match(name))]
    counter = max(counters, default=0) + 1
    return folder / (f"{base}_{counter:05}_" if steps is None else f"{base}_{steps}_steps_{counter:05}_")


def write_loss_history(
    stem: str | Path,
    losses: Sequence[float],
    steps_per_optimizer_step: int,
    validation: Mapping[str, Sequence] | None = None,
) -> dict[str, Path]:
    """Write `<stem>loss.json` (ComfyUI's loss_map plus `micro_steps_per_step`; non-finite losses as null),
    `<stem>loss.csv` (`micro_step,step,loss`, both counted from 1) and `<stem>loss.png`; never over a file.
    With `validation` ({"step", "loss"[, "ema_loss"]}, the run's validation losses) the JSON also holds it under
    "validation" and `<stem>validation_loss.csv` (`step,loss[,ema_loss]`) is written.

    `losses` has one entry per micro-step; `steps_per_optimizer_step` is the gradient accumulation count. All
    files are checked for existence before any is written, so a clash leaves no partial set.
    """
    if steps_per_optimizer_step < 1:
        raise ValueError(f"steps_per_optimizer_step must be >= 1, got {steps_per_optimizer_step}")
    losses = [float(loss) for loss in losses]
    stem = Path(stem)
    image = render_loss_plot(losses, steps_per_optimizer_step, stem.name.rstrip("_"), validation)
    png = io.BytesIO()
    image.save(png, format="PNG")
    contents = {
        "loss json": ("loss.json", _loss_json(losses, steps_per_optimizer_step, validation)),
        "loss csv": ("loss.csv", _loss_csv(losses, steps_per_optimizer_step)),
        "loss plot": ("loss.png", png.getvalue()),
    }
    if validation is not None:
        contents["validation csv"] = ("validation_loss.csv", _validation_csv(validation))
    paths = {name: stem.parent / (stem.name + suffix) for name, (suffix, _) in contents.items()}
    if existing := [str(path) for path in paths.values() if path.exists()]:
        raise FileExistsError(f"{', '.join(existing)} exist; jaxlora never overwrites a file")
    return {name: write_new_file(paths[name], data) for name, (_, data) in contents.items()}


def write_run_outputs(
    result: TrainResult,
    config: TrainConfig,
    output_dir: str | Path,
    prefix: str,
    style: str = "comfyui",
    keep_checkpoints: bool = False,
    ema_export: str = "beside",
) -> dict[str, Path]:
    """Save a finished run as ComfyUI's SaveLoRA would name it: `<stem>.safetensors` (the adapter in `style`, with
    the settings in its metadata) and the loss history beside it; then mark its checkpoint folder finished, its
    checkpoints deleted unless `keep_checkpoints`. Returns {"adapter", "loss json", "loss csv", "loss plot":
    path}; the CLI and the notebook share it so their files are the same. A run with an EMA (`ema_decay`) also
    writes its averaged adapter as `<stem>ema.safetensors` ("ema adapter"), or with `ema_export="instead"` as
    `<stem>.safetensors` in place of the trained one.

    An interrupted run is refused (its adapter is not the one asked for: resume it). If another run takes the
    same counter meanwhile, the next one is used: nothing is lost or overwritten."""
    if result.stats.interrupted:
        raise RunInterruptedError(
            f"the run stopped at step {result.steps} of {config.steps}; no adapter is written for it: resume it to "
            "finish" + (f" (its checkpoint is in {result.checkpoints.directory})" if result.checkpoints else "")
        )
    files = adapter_files(result.model_with_lora, result.ema_model, ema_export)
    for _ in range(COUNTER_ATTEMPTS):
        stem = output_stem(output_dir, prefix, result.steps)
        try:
            paths = {
                name: save_adapter(model, f"{stem}{suffix}.safetensors", config, result.steps, style, weights)
                for name, (model, suffix, weights) in files.items()
            }
            break
        except FileExistsError:  # another run finished with the same name just now: take the next counter
            continue
    else:
        raise FileExistsError(f"{stem}.safetensors: {COUNTER_ATTEMPTS} counters taken by other runs meanwhile")
    paths.update(write_loss_history(stem, result.loss_map["loss"], config.grad_accumulation_steps, result.validation))
    if result.checkpoints is not None:
        result.checkpoints.finish(paths["adapter"], keep_checkpoints)
    return paths


def adapter_files(
    trained: DiffusionModel, ema: DiffusionModel | None, ema_export: str
) -> dict[str, tuple[DiffusionModel, str, str]]:
    """{output name: (model carrying the adapter, file-name suffix after the stem, which weights)} of a run."""
    if ema is None:
        return {"adapter": (trained, "", "trained")}
    if ema_export == "instead":
        return {"adapter": (ema, "", "ema")}
    if ema_export != "beside":
        raise ValueError(f"ema_export must be 'beside' or 'instead', got {ema_export!r}")
    return {"adapter": (trained, "", "trained"), "ema adapter": (ema, "ema", "ema")}


def save_adapter(
    model: DiffusionModel, path: str, config: TrainConfig, steps: int, style: str, weights: str = "trained"
) -> Path:
    """One adapter file with the run's settings in its metadata; `weights` says whether it holds the trained
    adapter or its moving average (`exported_weights`). Never over an existing file (FileExistsError)."""
    settings = {**config.as_dict(), "base_quantization": model.quantization, "exported_weights": weights}
    info = adapter_info(model, config.lora_dtype, steps, config.training_dtype, settings)
    return save_lora(model, path, style, config.lora_dtype, info)


class AdapterSaves:
    """Adapter files written during a run every `save_every` steps (the loop calls this with the total steps and
    the trained and EMA models): `<output_dir>/<prefix>_saves/<base>_<steps>_steps_<counter:05>_.safetensors`
    (ComfyUI loads them; the counter as in `output_stem`), each written atomically and never over a file. Only
    the last `keep_last` saves of this run are kept (0: all); files of other runs are never touched."""

    def __init__(
        self,
        config: TrainConfig,
        output_dir: str | Path,
        prefix: str,
        style: str = "comfyui",
        keep_last: int = 0,
        ema_export: str = "beside",
    ):
        folder, base = os.path.split(prefix)
        self.folder = Path(output_dir) / folder / f"{base}_saves"
        self.base, self.config, self.style, self.keep_last, self.ema_export = base, config, style, keep_last, ema_export
        self.written: list[list[Path]] = []

    def __call__(self, steps: int, model: DiffusionModel, ema: DiffusionModel | None) -> list[Path]:
        files = adapter_files(model, ema, self.ema_export)
        for _ in range(COUNTER_ATTEMPTS):
            stem = output_stem(self.folder, self.base, steps)
            try:
                paths = [
                    save_adapter(model, f"{stem}{suffix}.safetensors", self.config, steps, self.style, weights)
                    for model, suffix, weights in files.values()
                ]
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"{stem}.safetensors: {COUNTER_ATTEMPTS} counters taken by other runs meanwhile")
        self.written.append(paths)
        while self.keep_last and len(self.written) > self.keep_last:
            for path in self.written.pop(0):
                path.unlink(missing_ok=True)
        return paths


def _finite_or_none(values: Sequence[float | None]) -> list[float | None]:
    """Strict JSON (NaN and Infinity are not JSON), so non-finite losses become null."""
    return [float(v) if v is not None and math.isfinite(v) else None for v in values]


def _loss_json(losses: list[float], per_step: int, validation: Mapping[str, Sequence] | None) -> bytes:
    contents = {"loss": _finite_or_none(losses), "micro_steps_per_step": per_step}
    if validation is not None:
        contents["validation"] = {
            name: list(map(int, values)) if name == "step" else _finite_or_none(values)
            for name, values in validation.items()
        }
    return (json.dumps(contents) + "\n").encode()


def _validation_csv(validation: Mapping[str, Sequence]) -> bytes:
    names = list(validation)
    rows = [",".join(names)] + [",".join(map(repr, row)) for row in zip(*validation.values(), strict=True)]
    return ("\n".join(rows) + "\n").encode()


def _loss_csv(losses: list[float], per_step: int) -> bytes:
    rows = ["micro_step,step,loss"] + [f"{i + 1},{i // per_step + 1},{loss!r}" for i, loss in enumerate(losses)]
    return ("\n".join(rows) + "\n").encode()


def check_style(model: DiffusionModel, config: TrainConfig, style: str, existing: ExistingAdapter | None) -> None:
    """Refuse, before any weights are read, a key style that cannot name every layer the run will train (PEFT
    has no names for LoHa, LoKr, OFT or DoRA), instead of failing after the last step.

    `model` is loaded with `weights=False`; a copy of its network gets the adapters the run would attach (the
    `existing` adapter as `preflight` read it, then fresh ones at rank 1: names do not depend on the rank), which
    are exported and dropped.
    """
    probe = replace(model, network=nnx.clone(model.network))
    if existing is not None:
        attach_imported(probe.network, import_adapter(probe, existing.tensors))
    attach_adapters(probe.network, config.algorithm, 1, config.seed, jnp.float32, bypass=config.uses_bypass)
    export_adapter(probe, style)
