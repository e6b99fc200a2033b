"""`python -m jaxlora.train` end to end: the demo, a run from files with a TOML config, and bad input."""

import json
import os
import re
import subprocess
import sys
import tracemalloc
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

import jaxlora.train.__main__ as cli
from jaxlora.models.demo import demo_dataset, write_random_checkpoint
from jaxlora.models.unet_family import DEMO_UNET
from jaxlora.train.__main__ import NODE_INPUTS, build_parser, main, resolve_settings
from jaxlora.train.config import (
    CHOICES,
    MEANINGS,
    RunOptions,
    TrainConfig,
    check_output_folder,
    check_prefix,
)
from jaxlora.train.data import DatasetError, load_dataset, save_dataset


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    model = write_random_checkpoint(DEMO_UNET, folder / "unet.safetensors", seed=2)
    latents, context = demo_dataset(4, 8)
    dataset = save_dataset(folder / "data.safetensors", latents, context)
    return model, dataset


def test_demo_runs_end_to_end_and_says_it_is_a_demo(tmp_path):
    command = [
        sys.executable,
        "-m",
        "jaxlora.train",
        "--output-dir",
        str(tmp_path),
        "--steps",
        "3",
        "--no-compile-cache",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=True)
    assert "built-in demo" in result.stdout
    names = sorted(p.name for p in (tmp_path / "loras").iterdir())
    stem = "jaxlora_trained_lora_3_steps_00001_"
    assert names == [
        stem + ".safetensors",
        stem + "loss.csv",
        stem + "loss.json",
        stem + "loss.png",
        "jaxlora_trained_lora_checkpoints",
    ]
    assert len(json.loads((tmp_path / "loras" / f"{stem}loss.json").read_text())["loss"]) == 3


def test_files_and_toml_config_with_flag_overrides(files, tmp_path, capsys):
    model, dataset = files
    config = tmp_path / "settings.toml"
    config.write_text(
        'steps = 2\nrank = 3\nalgorithm = "LoKr"\ntraining_dtype = "fp32"\ngrad-accumulation-steps = 2\n'
        f'output_dir = "{tmp_path}"\nprefix = "me/run"\nformat = "kohya"\ncheckpoint_every = 1\n'
    )
    argv = ["--model", str(model), "--dataset", str(dataset), "--config", str(config), "--rank", "2",
            "--no-compile-cache"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "compiling the train step for latents [4, 8, 8], batch 1 x 2 micro-step(s)" in err
    assert [p.name for p in (tmp_path / "me" / "run_checkpoints").iterdir()]  # checkpoint_every from the file
    lines = re.findall(r"step (\d+)/2 \[.*\] mean loss (\S+) ", err)
    losses = json.loads((tmp_path / "me" / "run_2_steps_00001_loss.json").read_text())["loss"]
    previous = 0
    for step, shown in lines:  # each line: the mean of the micro-steps since the line before
        assert float(shown) == pytest.approx(np.mean(losses[previous * 2 : int(step) * 2]), abs=1e-4)
        previous = int(step)
    assert previous == 2
    assert main(argv) == 0  # runs are independent: the same command again writes the next file
    assert main(argv + ["--resume"]) == 2  # and both finished: there is nothing to resume
    assert "nothing to do: run_00002 finished at step 2" in capsys.readouterr().err
    first, second = (
        tmp_path / "me" / "run_2_steps_00001_.safetensors",
        tmp_path / "me" / "run_2_steps_00002_.safetensors",
    )
    assert first.is_file() and second.is_file()
    with safe_open(first, framework="numpy") as f:
        metadata, keys = f.metadata(), list(f.keys())
    settings = json.loads(metadata["training_settings"])
    assert (settings["rank"], settings["algorithm"], settings["grad_accumulation_steps"]) == (2, "LoKr", 2)
    assert metadata["ss_network_args"] == '{"algo": "lokr"}'
    assert all(key.startswith("lora_unet_") for key in keys)
    losses = json.loads((tmp_path / "me" / "run_2_steps_00001_loss.json").read_text())["loss"]
    assert len(losses) == 4 and np.isfinite(losses).all()  # 2 steps x 2 micro-steps


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch-size", "0"], "batch_size must be between 1 and 10000"),
        (["--learning-rate", "3"], "learning_rate must be between"),
        (["--dataset", "missing.safetensors"], "dataset not found: missing.safetensors"),
        (["--existing-lora", "nope.safetensors"], "adapter file not found: nope.safetensors"),
    ],
)
def test_bad_input_fails_with_a_message_before_training(files, tmp_path, capsys, flags, message):
    model, dataset = files
    argv = ["--model", str(model), "--dataset", str(dataset), "--output-dir", str(tmp_path), "--no-compile-cache"]
    assert main(argv + flags) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "loras").exists()


def test_dataset_for_another_model_is_refused(files, tmp_path, capsys):
    model, _ = files
    latents, _ = demo_dataset(2, 8)
    dataset = save_dataset(tmp_path / "sdxl_like.safetensors", latents, np.zeros((1, 4, 2048), np.float32))
    assert (
        main(["--model", str(model), "--dataset", str(dataset), "--output-dir", str(tmp_path), "--no-compile-cache"])
        == 2
    )
    assert "needs c_crossattn (768-d), found 2048-d" in capsys.readouterr().err


def test_model_without_dataset_is_a_usage_error(files, capsys):
    assert main(["--model", str(files[0])]) == 2
    assert "give --model and --dataset (or --images)" in capsys.readouterr().err


def test_help_shows_every_flag_with_default_choices_and_meaning_grouped_and_the_demo():
    parser = build_parser()
    text = parser.format_help()
    node, extra = text.index("the Train LoRA node's inputs:"), text.index("jaxlora's additions:")
    for spec in (*fields(RunOptions), *fields(TrainConfig)):
        name, flag = spec.name, "--" + spec.name.replace("_", "-")
        action = next(a for a in parser._actions if flag in a.option_strings)
        default = "none" if spec.default is None else spec.default
        if isinstance(spec.default, bool):
            default = "on" if spec.default else "off"
        assert action.help == f"{MEANINGS[name]} (default: {default})", name
        assert action.choices is None or list(action.choices) == list(CHOICES[name]), name
        where = re.search(rf"\n  {flag}[ ,\n]", text).start()  # not a longer flag it begins (--bypass-mode)
        assert (node < where < extra) == (name in NODE_INPUTS), name
    assert "{AdamW,Adam,SGD,RMSprop,Adafactor,Lion,Prodigy,ScheduleFreeAdamW}" in text and "(default: AdamW)" in text
    assert "built-in demo" in text


def test_choices_are_the_registries_names():
    from jaxlora.adapters.attach import ALGORITHMS
    from jaxlora.models.family import STYLES
    from jaxlora.train.optim import LOSSES, OPTIMIZERS

    assert CHOICES["algorithm"] == tuple(ALGORITHMS)
    assert CHOICES["optimizer"] == tuple(OPTIMIZERS) and CHOICES["loss_function"] == tuple(LOSSES)
    assert CHOICES["format"] == STYLES


def test_usage_and_settings_errors_never_import_jax(tmp_path):
    """Refusals that need no model come before JAX is imported, so they take a fraction of a second."""
    bad = tmp_path / "bad.toml"
    bad.write_text('learning_rate = "1e-4"\n')
    code = (
        "import sys\n"
        "from jaxlora.train.__main__ import main\n"
        "try:\n"
        "    main(['--bogus'])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 2\n"
        f"assert main(['--config', {str(bad)!r}]) == 2\n"
        f"assert main(['--prefix', '../escaped']) == 2\n"
        "assert main(['--model', 'only.safetensors']) == 2\n"
        "print('jax' in sys.modules, 'jaxlora.train.loop' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"], result.stderr


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('learning_rate = "1e-4"', "learning_rate must be a number, got '1e-4' (a string)"),
        ('format = "bogus"', "format must be one of ['comfyui', 'kohya', 'peft'], got 'bogus'"),
        ('checkpoint_every = "often"', "checkpoint_every must be an integer, got 'often' (a string)"),
        ("mesh = 2", "mesh must be a string or unset, got 2 (an integer)"),
        ("dataset = 5", "dataset must be a string or unset, got 5 (an integer)"),
        ("steps = 0", "steps must be between 1 and 100000, got 0"),
        ("steps = ", "is not valid TOML: Invalid value (at line 1, column 9)"),
        ("stpes = 3", "unknown setting 'stpes'"),
        (None, "--config {path}: no such file"),
    ],
)
def test_bad_config_file_is_one_line_naming_the_file_and_key(tmp_path, capsys, toml, message):
    path = tmp_path / "settings.toml"
    if toml is not None:
        path.write_text(toml + "\n")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and message.format(path=path) in err


def test_config_run_keys_are_used_and_flags_override_only_when_given(tmp_path):
    path = tmp_path / "settings.toml"
    path.write_text('output_dir = "runs"\nprefix = "a/b"\nformat = "kohya"\ncheckpoint_every = 5\nsteps = 7\n')
    run, config, demo = resolve_settings(build_parser().parse_args(["--config", str(path)]))
    assert (run.output_dir, run.prefix, run.format, run.checkpoint_every, config.steps) == (
        "runs",
        "a/b",
        "kohya",
        5,
        7,
    )
    assert demo and config.rank == 4  # the demo's defaults fill what neither gives
    argv = ["--config", str(path), "--prefix", "c", "--format", "comfyui", "--steps", "9"]
    run, config, _ = resolve_settings(build_parser().parse_args(argv))
    assert (run.output_dir, run.prefix, run.format, run.checkpoint_every, config.steps) == (
        "runs",
        "c",
        "comfyui",
        5,
        9,
    )
    run, config, _ = resolve_settings(build_parser().parse_args(["--model", "m", "--dataset", "d"]))
    assert run == RunOptions(model="m", dataset="d") and config == TrainConfig()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--prefix", "../escaped"], "prefix '../escaped' must name a file inside the output folder"),
        (["--prefix", "/tmp/abs"], "prefix '/tmp/abs' must name a file inside the output folder"),
        (["--output-dir", "{tmp}/a_file"], "{tmp}/a_file is a file, not a folder"),
        (["--output-dir", "{tmp}/a_file/below"], "{tmp}/a_file is a file, not a folder"),
    ],
)
def test_bad_output_location_is_refused_before_anything_loads(files, tmp_path, capsys, monkeypatch, flags, message):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(cli, "load_inputs", lambda *args: pytest.fail("loaded inputs"))
    model, dataset = files
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    assert main(["--model", str(model), "--dataset", str(dataset), *flags]) == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir_is_refused_before_anything_loads(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_inputs", lambda *args: pytest.fail("loaded inputs"))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert main(["--model", str(files[0]), "--dataset", str(files[1]), "--output-dir", str(locked)]) == 2
    assert f"cannot write into {locked}" in capsys.readouterr().err


def test_sub_folder_prefix_is_allowed():
    check_prefix("loras/x")
    check_output_folder(Path("output"), "loras/x")


def stop_before_training(monkeypatch):
    """run_training replaced by a refusal: what the CLI printed before it is all the run did."""

    def refuse(*args, **kwargs):
        raise ValueError("stopped before training")

    monkeypatch.setattr("jaxlora.train.loop.run_training", refuse)


@pytest.mark.parametrize("algorithm", ["LoHa", "LoKr", "OFT"])
def test_peft_that_cannot_name_the_layers_is_refused_before_training(files, tmp_path, capsys, monkeypatch, algorithm):
    stop_before_training(monkeypatch)
    model, dataset = files
    argv = ["--model", str(model), "--dataset", str(dataset), "--output-dir", str(tmp_path), "--format", "peft"]
    assert main([*argv, "--algorithm", algorithm]) == 2
    err = capsys.readouterr().err
    assert "--format peft: " in err and "have no 'peft' name" in err and "stopped before training" not in err


def test_check_style_accepts_what_the_style_can_name(files, tmp_path):
    from jaxlora.models.diffusion import load_model
    from jaxlora.models.flux_family import TINY_FLUX_DEV
    from jaxlora.train.report import check_style

    unet = load_model(files[0], weights=False)
    check_style(unet, TrainConfig(), "peft", None)
    check_style(unet, TrainConfig(algorithm="LoHa"), "kohya", None)
    check_style(unet, TrainConfig(algorithm="OFT"), "comfyui", None)
    flux = load_model(write_random_checkpoint(TINY_FLUX_DEV, tmp_path / "flux.safetensors"), weights=False)
    check_style(flux, TrainConfig(), "peft", None)  # Flux's LoRA has diffusers names
    with pytest.raises(ValueError, match="have no 'peft' name"):
        check_style(flux, TrainConfig(algorithm="LoKr"), "peft", None)


def test_swapped_model_and_dataset_are_named_as_such(files, capsys):
    model, dataset = files
    assert main(["--model", str(dataset), "--dataset", str(model)]) == 2
    assert "looks like a training dataset (it has `latents`), not a model: pass it as the dataset" in (
        capsys.readouterr().err
    )
    assert main(["--model", str(model), "--dataset", str(model)]) == 2
    err = capsys.readouterr().err
    assert ", ... (208 in all))" in err and "it looks like a unet checkpoint, not a dataset" in err
    assert len(err) < 600  # the key list is capped, not all 208 names


def test_batch_larger_than_the_dataset_and_continued_adapter_are_announced(files, tmp_path, capsys, monkeypatch):
    from jaxlora import attach_adapters, load_model, save_lora
    from jaxlora.adapters.metadata import adapter_info

    model, dataset = files
    adapted = load_model(model, "fp32")
    attach_adapters(adapted.network, "LoRA", rank=2, seed=1)
    info = adapter_info(adapted, "bf16", steps=40)
    existing = save_lora(adapted, tmp_path / "mine.safetensors", info=info)
    stop_before_training(monkeypatch)
    argv = ["--model", str(model), "--dataset", str(dataset), "--output-dir", str(tmp_path)]
    assert main([*argv, "--batch-size", "8", "--existing-lora", str(existing), "--steps", "5"]) == 2
    out, err = capsys.readouterr()
    assert f"warning: batch_size 8 is larger than the 4 samples of {dataset} (latents [4, 8, 8])" in err
    assert f"continuing {existing}: 40 steps trained so far, 5 more now (45 in all)" in out
    assert "stopped before training" in err


def test_gitignore_covers_the_demo_output_folder():
    ignored = (Path(__file__).parents[2] / ".gitignore").read_text().splitlines()
    assert f"{RunOptions().output_dir}/" in ignored


def test_a_large_dataset_file_without_latents_is_refused_from_its_header(tmp_path):
    """2 GiB of tensor data (a sparse file) behind a header without `latents`: refused without reading it."""
    header = json.dumps({"weight": {"dtype": "F32", "shape": [2**29], "data_offsets": [0, 2**31]}}).encode()
    path = tmp_path / "big.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    os.truncate(path, 8 + len(header) + 2**31)
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError, match=r"has no `latents` tensor \(keys: weight\)"):
            load_dataset(path)
        assert tracemalloc.get_traced_memory()[1] < 2**20
    finally:
        tracemalloc.stop()


def test_a_string_where_a_number_belongs_is_a_type_error_naming_the_setting():
    with pytest.raises(TypeError, match=r"learning_rate must be a number, got '1e-4' \(a string\)"):
        TrainConfig(learning_rate="1e-4")
    with pytest.raises(TypeError, match=r"steps must be an integer, got 2.0 \(a number\)"):
        TrainConfig(steps=2.0)
    with pytest.raises(TypeError, match=r"gradient_checkpointing must be true or false, got 1 \(an integer\)"):
        TrainConfig(gradient_checkpointing=1)
