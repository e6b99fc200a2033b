"""`python -m jaxlora.train` end to end: the demo, a run from files with a TOML config, and bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

from jaxlora.models.demo import demo_dataset, write_random_checkpoint
from jaxlora.models.unet_family import DEMO_UNET
from jaxlora.train.__main__ import main
from jaxlora.train.data import save_dataset


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
    config.write_text('steps = 2\nrank = 3\nalgorithm = "LoKr"\ntraining_dtype = "fp32"\ngrad-accumulation-steps = 2\n')
    argv = ["--model", str(model), "--dataset", str(dataset), "--output-dir", str(tmp_path), "--prefix", "me/run",
            "--config", str(config), "--rank", "2", "--format", "kohya", "--no-compile-cache"]  # fmt: skip
    assert main(argv) == 0
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
    assert "give both --model and --dataset" in capsys.readouterr().err
