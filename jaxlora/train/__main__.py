"""`python -m jaxlora.train`: train an adapter from the command line, with the node's settings as flags.

With neither --model nor --dataset it runs the built-in demo: a tiny model with seeded random weights and a
synthetic dataset, to show the whole path (training, adapter file, loss history and plot) in about a minute.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tomllib
from dataclasses import fields, replace
from pathlib import Path

import jax

from jaxlora.files import FolderInUseError, remove_abandoned_partials, scratch_folder
from jaxlora.models.demo import demo_dataset, write_random_checkpoint
from jaxlora.models.diffusion import load_model
from jaxlora.models.family import STYLES
from jaxlora.models.registry import DEMO_FAMILY, supported_models
from jaxlora.parallel import distributed
from jaxlora.parallel.placement import is_writer
from jaxlora.train.config import CHOICES, TrainConfig
from jaxlora.train.data import load_dataset, make_dataset
from jaxlora.train.loop import NonFiniteLossError, preflight, run_training, with_host_adapters
from jaxlora.train.report import output_stem, write_run_outputs

DEFAULT_PREFIX = "loras/jaxlora_trained_lora"
RUN_FLAGS = {"model", "dataset", "output_dir", "prefix", "format", "checkpoint_every", "resume", "keep_checkpoints"}
INTERRUPTED = 130  # the shell's exit status for a process stopped by Ctrl-C


def enable_compilation_cache(directory: str | None = None) -> Path:
    """JAX's persistent compilation cache in a per-user folder: a second run of the same shapes skips most of
    the compile. The cache is trusted code; keep it private to the user."""
    path = Path(directory or os.environ.get("JAXLORA_CACHE_DIR") or Path.home() / ".cache" / "jaxlora" / "xla")
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path


def non_negative(text: str) -> int:
    """An argparse type: a whole number of 0 or more (argparse names the flag in its error)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (0: only at the end and on Ctrl-C), not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jaxlora.train", description=__doc__.splitlines()[0])
    run = parser.add_argument_group("run")
    run.add_argument("--model", help=f".safetensors checkpoint ({supported_models()})")
    run.add_argument("--dataset", help="dataset .safetensors file, folder of them, or ComfyUI dataset folder")
    run.add_argument("--output-dir", default="output", help="where the adapter, loss history and plot go")
    run.add_argument("--prefix", default=DEFAULT_PREFIX, help="file name prefix, may include subfolders")
    run.add_argument("--format", default="comfyui", choices=STYLES, help="adapter key style")
    run.add_argument(
        "--checkpoint-every", type=non_negative, default=0, help="save a resumable checkpoint every N steps"
    )
    run.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="RUN",
        help="continue the latest unfinished run of this prefix, or the run named (run_00002)",
    )
    run.add_argument(
        "--keep-checkpoints", action="store_true", default=None, help="keep the final checkpoint of a finished run"
    )
    run.add_argument("--config", type=Path, help="TOML file with these settings (flags override it)")
    run.add_argument("--no-compile-cache", action="store_true", help="do not use the persistent compile cache")
    run.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run (jax.distributed; found by itself on TPU slices, Slurm, Open MPI, or "
        "JAX_COORDINATOR_ADDRESS)",
    )
    node = parser.add_argument_group("training settings (the Train LoRA node's inputs)")
    for spec in fields(TrainConfig):
        flag = "--" + spec.name.replace("_", "-")
        if spec.type in ("bool", "bool | None"):
            node.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float, "float | None": float}.get(spec.type, str)
            node.add_argument(flag, type=kind, default=None, choices=CHOICES.get(spec.name), metavar=spec.name.upper())
    return parser


def settings_from(args: argparse.Namespace) -> dict:
    """TOML file values, then the flags given on the command line."""
    settings = {}
    if args.config is not None:
        with open(args.config, "rb") as file:
            settings = {key.replace("-", "_"): value for key, value in tomllib.load(file).items()}
    for key, value in vars(args).items():
        if value is not None and key not in ("config", "no_compile_cache", "distributed"):
            settings[key] = value
    return settings


def demo_inputs(scratch: Path, settings: dict) -> None:
    print("No --model and --dataset given: running the built-in demo (a tiny model with random weights and a")
    print("synthetic dataset). Pass --model CHECKPOINT --dataset DATA to train a real adapter.\n")
    settings["model"] = str(write_random_checkpoint(DEMO_FAMILY.demo_config, scratch / "demo_model.safetensors"))
    defaults = {"steps": 60, "batch_size": 2, "learning_rate": 0.002, "rank": 4, "training_dtype": "fp32"}
    for key, value in defaults.items():
        settings.setdefault(key, value)


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
    rows += [(name, str(path)) for name, path in paths.items()]
    return "\n".join(f"  {name:<12}{value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return train(args)
    except KeyboardInterrupt:
        print(
            "\ninterrupted: no adapter was written; a run that had saved a checkpoint continues with --resume",
            file=sys.stderr,
        )
        return INTERRUPTED


def train(args: argparse.Namespace) -> int:
    """The command: check everything, train, write the outputs. Exit status 0, 1 (the loss diverged), 2 (bad
    input) or 130 (stopped by Ctrl-C, checkpoint saved, no adapter written)."""
    distributed.initialize(args.distributed, os.environ)
    if not args.no_compile_cache:
        enable_compilation_cache()
    settings = settings_from(args)
    run = {key: settings.pop(key) for key in list(settings) if key in RUN_FLAGS}
    with scratch_folder("jaxlora-demo-") as scratch:
        demo = "model" not in run and "dataset" not in run
        if demo:
            demo_inputs(scratch, settings)
            run.setdefault("model", settings.pop("model"))
        elif "model" not in run or "dataset" not in run:
            print("give both --model and --dataset (or neither, for the demo)", file=sys.stderr)
            return 2
        try:
            config = TrainConfig.from_dict(settings)
            dataset = make_dataset(*demo_dataset()) if demo else load_dataset(run["dataset"])
            existing = preflight(load_model(run["model"], weights=False), dataset, config)
            model = load_model(
                run["model"], dtype=config.training_dtype, prediction=config.prediction, mesh=config.mesh
            )
        except (ValueError, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        output_dir = Path(run.get("output_dir", "output"))
        prefix = run.get("prefix", DEFAULT_PREFIX)
        if is_writer() and output_stem(output_dir, prefix, None).parent.is_dir():
            remove_abandoned_partials(output_stem(output_dir, prefix, None).parent)
        print(
            f"training {config.algorithm} rank {config.rank} on {model.variant.description} ({model.source.name}), "
            f"{dataset.size} samples in {len(dataset.buckets)} bucket(s), {config.steps} steps"
        )
        started = time.perf_counter()
        try:
            result = run_training(
                model,
                dataset,
                config,
                checkpoint_dir=output_dir / f"{prefix}_checkpoints",
                checkpoint_every=run.get("checkpoint_every", 0),
                resume=run.get("resume", False),
                existing=existing,
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
        result = replace(result, model_with_lora=with_host_adapters(result.model_with_lora))
        if not is_writer():  # on several processes, process 0 writes the outputs
            return 0
        paths = write_run_outputs(
            result, config, output_dir, prefix, run.get("format", "comfyui"), run.get("keep_checkpoints", False)
        )
    print(f"done in {time.perf_counter() - started:.1f} s" + (" (demo)" if demo else ""))
    print(summary(result, result.stats, paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
