"""`python -m jaxlora.train`: train an adapter from the command line, with the node's settings as flags.

With neither --model nor --dataset it runs the built-in demo: a tiny model with seeded random weights and a
synthetic dataset, to show the whole path (training, adapter file, loss history and plot) in a minute or two.

The arguments, the TOML file and the output folder are checked before JAX is imported, so mistakes there are
refused at once; the model's header, the dataset and the adapter style are checked before any weights are read.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tomllib
from dataclasses import MISSING, Field, fields, replace
from pathlib import Path

from jaxlora.train.config import (
    CHOICES,
    MEANINGS,
    RunOptions,
    SettingsError,
    TrainConfig,
    check_output_folder,
    check_run,
)

RUN_FLAGS = {spec.name for spec in fields(RunOptions)}
CLI_ONLY = {"config", "no_compile_cache", "distributed"}  # flags that are not settings (not read from TOML)
_TRAINING = [spec.name for spec in fields(TrainConfig)]
NODE_INPUTS = ("model", "dataset", *_TRAINING[: _TRAINING.index("bypass_mode") + 1])  # the rest: jaxlora's
INTERRUPTED = 130  # the shell's exit status for a process stopped by Ctrl-C
DEMO_SETTINGS = {"steps": 60, "batch_size": 2, "learning_rate": 0.002, "rank": 4, "training_dtype": "fp32"}
EPILOG = f"""\
With neither --model nor --dataset: the built-in demo, a tiny model with random weights trained on a
synthetic dataset in a minute or two on a CPU, with its own defaults:
{", ".join(f"{k} {v}" for k, v in DEMO_SETTINGS.items())}.

A --config TOML file holds any of these settings under their names (with - or _); flags given on the
command line override it, and the defaults apply to what neither gives."""


def _setting_flag(group: argparse._ArgumentGroup, spec: Field) -> None:
    """One flag per setting, with its choices, default and meaning in --help. Flags not given are absent from the
    parsed namespace (argparse.SUPPRESS), so a TOML file's value is only replaced by a flag the user typed."""
    flag = "--" + spec.name.replace("_", "-")
    default = spec.default
    if isinstance(default, bool):
        default = "on" if default else "off"
    elif default is None or default is MISSING:
        default = "none"
    help_text = f"{MEANINGS[spec.name]} (default: {default})"
    kinds = spec.type.split(" | ")
    if kinds == ["bool", "str"]:  # on by itself, or given a name (--resume, --resume run_00002)
        group.add_argument(flag, nargs="?", const=True, metavar=spec.name.upper() + "_NAME", help=help_text)
        return
    if "bool" in kinds:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        return
    choices = CHOICES.get(spec.name)
    kind = {"int": int, "float": float}.get(kinds[0], str)
    metavar = None if choices else {"int": "N", "float": "X"}.get(kinds[0], spec.name.upper())
    group.add_argument(flag, type=kind, choices=choices, metavar=metavar, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxlora.train",
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    settings = {spec.name: spec for spec in (*fields(RunOptions), *fields(TrainConfig))}
    node = parser.add_argument_group("the Train LoRA node's inputs")
    for name in NODE_INPUTS:
        _setting_flag(node, settings[name])
    extra = parser.add_argument_group("jaxlora's additions")
    for name, spec in settings.items():
        if name not in NODE_INPUTS:
            _setting_flag(extra, spec)
    extra.add_argument("--config", type=Path, metavar="FILE.toml", help="TOML file with any of these settings")
    extra.add_argument(
        "--no-compile-cache", action="store_true", default=False, help="do not use the persistent compile cache"
    )
    extra.add_argument(
        "--distributed",
        action="store_true",
        default=False,
        help="join a multi-process run (jax.distributed; found by itself on TPU slices, Slurm, Open MPI, or "
        "JAX_COORDINATOR_ADDRESS)",
    )
    return parser


def read_toml(path: Path) -> dict:
    """A --config file's settings (`-` in keys read as `_`), every key known; a missing or malformed file is a
    SettingsError naming it."""
    try:
        with open(path, "rb") as file:
            values = tomllib.load(file)
    except FileNotFoundError:
        raise SettingsError("config", f"--config {path}: no such file") from None
    except OSError as error:
        raise SettingsError("config", f"--config {path}: cannot read it ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise SettingsError("config", f"{path} is not valid TOML: {error}") from None
    settings = {key.replace("-", "_"): value for key, value in values.items()}
    known = [spec.name for spec in (*fields(RunOptions), *fields(TrainConfig))]
    for key in settings:
        if key not in known:
            raise SettingsError(key, f"{path}: unknown setting {key!r}; known: {', '.join(known)}")
    return settings


def flags_given(args: argparse.Namespace) -> dict:
    """The settings typed on the command line (flags not given are absent: argparse.SUPPRESS)."""
    return {key: value for key, value in vars(args).items() if key not in CLI_ONLY}


def settings_from(args: argparse.Namespace) -> dict:
    """The TOML file's values, then the flags given on the command line over them."""
    settings = read_toml(args.config) if getattr(args, "config", None) is not None else {}
    return {**settings, **flags_given(args)}


def resolve_settings(args: argparse.Namespace) -> tuple[RunOptions, TrainConfig, bool]:
    """(run options, training settings, whether this is the demo), every value checked; an error in a value
    that came from the TOML file (not replaced by a flag) names the file."""
    settings = settings_from(args)
    try:
        run = RunOptions.from_dict({k: v for k, v in settings.items() if k in RUN_FLAGS})
        demo = run.model is None and run.dataset is None and run.images is None
        if run.dataset is not None and run.images is not None:
            raise SettingsError("images", "give --dataset or --images, not both")
        if not demo and (run.model is None or (run.dataset is None and run.images is None)):
            raise SettingsError("model", "give --model and --dataset (or --images), or neither for the demo")
        training = {k: v for k, v in settings.items() if k not in RUN_FLAGS}
        config = TrainConfig.from_dict({**DEMO_SETTINGS, **training} if demo else training)
        check_run(run, config)
    except SettingsError as error:
        if error.key in settings and error.key not in flags_given(args) and "config" in args:
            raise type(error)(error.key, f"{args.config}: {error}") from None
        raise
    return run, config, demo


def main(argv: list[str] | None = None) -> int:
    """Exit status 0, 1 (the loss diverged), 2 (bad input) or 130 (stopped by Ctrl-C: a run past its first step
    saved its checkpoint; no adapter is written)."""
    args = build_parser().parse_args(argv)
    try:
        run, config, demo = resolve_settings(args)
        check_output_folder(run.output_dir, run.prefix)
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        return train(run, config, demo, distributed=args.distributed, compile_cache=not args.no_compile_cache)
    except KeyboardInterrupt:
        print(
            "\ninterrupted: no adapter was written; a run that had saved a checkpoint continues with --resume",
            file=sys.stderr,
        )
        return INTERRUPTED


def train(run: RunOptions, config: TrainConfig, demo: bool, distributed: bool, compile_cache: bool) -> int:
    """The run, once its settings are valid: JAX and the model code are imported here."""
    from jaxlora.files import FolderInUseError, remove_abandoned_partials, scratch_folder
    from jaxlora.parallel import distributed as processes
    from jaxlora.parallel.placement import is_writer
    from jaxlora.train.compile_cache import enable_compilation_cache
    from jaxlora.train.loop import NonFiniteLossError, run_training, with_host_adapters
    from jaxlora.train.report import AdapterSaves, output_stem, write_run_outputs
    from jaxlora.train.tracking import open_logs

    processes.initialize(distributed, os.environ)
    if compile_cache:
        enable_compilation_cache()
    with scratch_folder("jaxlora-demo-") as scratch:
        try:
            model, dataset, existing, validation = load_inputs(run, config, demo, scratch)
        except (ValueError, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        outputs = output_stem(run.output_dir, run.prefix, None).parent
        if is_writer() and outputs.is_dir():
            remove_abandoned_partials(outputs)
        print(
            f"training {config.algorithm} rank {config.rank} on {model.variant.description} ({model.source.name}), "
            f"{dataset.size} samples in {len(dataset.buckets)} bucket(s), {config.steps} steps"
        )
        started = time.perf_counter()
        log_dir, wandb_project = (run.log_dir, run.wandb_project) if is_writer() else (None, None)
        try:
            with open_logs(log_dir, wandb_project, {**config.as_dict(), **vars(run)}) as logs:
                result = run_training(
                    model,
                    dataset,
                    config,
                    checkpoint_dir=Path(run.output_dir) / f"{run.prefix}_checkpoints",
                    checkpoint_every=run.checkpoint_every,
                    resume=run.resume,
                    existing=existing,
                    save_every=run.save_every,
                    on_save=AdapterSaves(config, run.output_dir, run.prefix, run.format, run.save_last, run.ema_export),
                    validation_dataset=validation,
                    validate_every=run.validate_every,
                    logger=logs,
                )
        except (ValueError, OSError, FolderInUseError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except NonFiniteLossError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        if result.stats.interrupted:
            checkpoints = result.checkpoints
            print(
                f"interrupted at step {checkpoints.latest_step()} of {config.steps}: the checkpoint is saved in "
                f"{checkpoints.directory} and no adapter was written; continue with --resume {checkpoints.name}",
                file=sys.stderr,
            )
            return INTERRUPTED
        result = replace(
            result,
            model_with_lora=with_host_adapters(result.model_with_lora),
            ema_model=result.ema_model and with_host_adapters(result.ema_model),
        )
        if not is_writer():  # on several processes, process 0 writes the outputs
            return 0
        paths = write_run_outputs(
            result,
            config,
            run.output_dir,
            run.prefix,
            run.format,
            keep_checkpoints=run.keep_checkpoints,
            ema_export=run.ema_export,
        )
    print(f"done in {time.perf_counter() - started:.1f} s" + (" (demo)" if demo else ""))
    print(summary(result, result.stats, paths))
    return 0


def load_inputs(run: RunOptions, config: TrainConfig, demo: bool, scratch: Path):
    """The model, the dataset, the existing adapter file and the validation dataset (None without them), after
    every check that needs no weights: the files are what their flags say, the data fit the model, the existing
    adapter fits, and the adapter style can name what is trained."""
    from jaxlora.models.demo import demo_dataset, write_random_checkpoint
    from jaxlora.models.diffusion import load_model
    from jaxlora.models.registry import DEMO_FAMILY
    from jaxlora.train.data import batch_size_warnings, check_dataset, load_dataset, make_dataset
    from jaxlora.train.loop import preflight
    from jaxlora.train.report import check_style

    if demo:
        print("No --model and --dataset given: running the built-in demo (a tiny model with random weights and a")
        print("synthetic dataset). Pass --model CHECKPOINT --dataset DATA to train a real adapter.\n")
        model_path = write_random_checkpoint(DEMO_FAMILY.demo_config, scratch / "demo_model.safetensors")
    else:
        model_path = Path(run.model)
    header = load_model(model_path, weights=False)  # the header alone: cheaper than the dataset, so checked first
    if demo:
        dataset = make_dataset(*demo_dataset())
    else:
        dataset = load_dataset(encode_images(run, header) if run.images is not None else run.dataset)
    existing = preflight(header, dataset, config)
    validation = None if run.validation_dataset is None else load_dataset(run.validation_dataset)
    if validation is not None:
        try:
            check_dataset(validation, header)
        except ValueError as error:
            raise ValueError(f"--validation-dataset: {error}") from error
    for warning in batch_size_warnings(dataset, config.batch_size):
        print(f"warning: {warning}", file=sys.stderr)
    if existing is not None:
        print(
            f"continuing {existing.path}: {existing.steps} steps trained so far, {config.steps} more now "
            f"({existing.steps + config.steps} in all)"
        )
    try:
        check_style(header, config, run.format, existing)
    except ValueError as error:
        raise ValueError(f"--format {run.format}: {error}") from error
    model = load_model(
        model_path, config.training_dtype, config.prediction, mesh=config.mesh, quantization=config.base_quantization
    )
    return model, dataset, existing, validation


def encode_images(run: RunOptions, header) -> Path:
    """The dataset folder of `run.images` for this model, made in the output folder (named by what it is made
    from, so a changed image or caption makes a new one and an unchanged folder is re-used); the encoders are
    released before the model's weights load."""
    import gc

    from jaxlora.encoders.make_dataset import ImageDatasetSettings, make_image_dataset

    text_encoders = [f.strip() for f in (run.text_encoders or "").split(",") if f.strip()]
    settings = ImageDatasetSettings(run.resolution or header.variant.resolution)
    folder = make_image_dataset(
        run.images,
        run.model,
        Path(run.output_dir) / f"{run.prefix}_datasets",
        run.tokenizers,
        settings,
        vae_path=run.vae,
        text_encoders=text_encoders,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
        name_by_inputs=True,
    )
    gc.collect()
    return folder


def summary(result, stats, paths: dict[str, Path]) -> str:
    rows = [
        ("steps", f"{result.steps} ({stats.steps_run} run now)"),
        ("compile", f"{stats.compile_seconds:.1f} s"),
        ("per step", f"{stats.seconds_per_step:.3f} s"),
        ("steps/s", f"{1 / stats.seconds_per_step:.2f}"),
        ("samples/s", f"{stats.samples_per_second:.2f}"),
    ]
    mfu = stats.mfu(stats.train_seconds)
    if mfu is not None:
        achieved = stats.flops / stats.train_seconds
        peak = f"{stats.peak_flops / 1e12:.3g} TFLOP/s, {stats.peak_source}"
        rows.append(("MFU", f"{mfu:.1%} ({achieved / 1e12:.3g} of {peak})"))
    if stats.peak_memory_bytes:
        rows.append(("peak memory", f"{stats.peak_memory_bytes / 2**30:.2f} GiB"))
    if result.validation and result.validation["step"]:
        curves = result.validation
        ema = f", EMA adapter {curves['ema_loss'][-1]:.5g}" if "ema_loss" in curves else ""
        rows.append(("validation", f"loss {curves['loss'][-1]:.5g} at step {curves['step'][-1]}{ema}"))
    rows += [(name, str(path)) for name, path in paths.items()]
    return "\n".join(f"  {name:<12}{value}" for name, value in rows)


if __name__ == "__main__":
    sys.exit(main())
