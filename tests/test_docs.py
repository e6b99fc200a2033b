"""docs/comfyui.md, run as written: its `bash` blocks in order, in one shell, against a ComfyUI folder of tiny
files in the real layouts (a demo-size SD1.x checkpoint, a SaveTrainingDataset folder written the way ComfyUI
writes it, an adapter as ComfyUI's trainer saves it, a kohya adapter). Only the ComfyUI location and the step
counts are substituted; each substitution must match the page, so the page cannot drift from what runs."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxlora import attach_adapters, load_model, save_lora
from jaxlora.adapters.formats import export_adapter
from jaxlora.adapters.lora_files import read_lora_file
from jaxlora.adapters.metadata import adapter_info
from jaxlora.models.demo import write_random_checkpoint
from jaxlora.models.unet_family import DEMO_UNET
from jaxlora.train.__main__ import RUN_FLAGS, build_parser, settings_from
from jaxlora.train.config import TrainConfig
from tests.adapters import comfy_loader
from tests.adapters.conftest import randomize_adapters
from tests.train.test_comfy_dataset import save_training_dataset

ROOT = Path(__file__).parent.parent
PAGE = ROOT / "docs" / "comfyui.md"
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)


def bash_blocks(text: str) -> list[str]:
    return BLOCK.findall(text)


def commands(text: str) -> list[list[str]]:
    """Every command of the page's bash blocks, split as the shell splits it (variables left unexpanded)."""
    lines = "\n".join(bash_blocks(text)).replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.strip()]


def substituted(script: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in script, f"docs/comfyui.md no longer contains {old!r}"
        script = script.replace(old, new)
    return script


def comfyui_folder(root: Path) -> Path:
    """ComfyUI's folders with what the page expects in them before its first command."""
    checkpoint = write_random_checkpoint(
        DEMO_UNET, _new(root / "models" / "checkpoints" / "v1-5-pruned-emaonly.safetensors"), seed=4
    )
    g = torch.Generator().manual_seed(0)
    latents = [{"samples": torch.randn(1, 4, 8, 8, generator=g)} for _ in range(3)]  # MakeTrainingDataset's lists
    conditioning = [[[torch.randn(1, 77, 768, generator=g), {}]] for _ in range(3)]
    save_training_dataset(root / "output" / "training_dataset", latents, conditioning, shard_size=2)

    model = load_model(checkpoint, dtype="fp32")
    attach_adapters(model.network, "LoRA", rank=8, seed=1)
    randomize_adapters(model.network, seed=1)  # what Save LoRA Weights writes: ComfyUI keys, bf16, no metadata
    comfy_trained = export_adapter(model, "comfyui", jnp.bfloat16)
    save_file(comfy_trained, str(_new(root / "output" / "loras" / "ComfyUI_trained_lora_16_steps_00001_.safetensors")))

    model = load_model(checkpoint, dtype="fp32")
    attach_adapters(model.network, "LoRA", rank=8, seed=2)
    randomize_adapters(model.network, seed=2)
    info = adapter_info(model, "fp16", steps=1000)
    save_lora(model, _new(root / "models" / "loras" / "my_kohya_lora.safetensors"), "kohya", "fp16", info)
    return root


def _new(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def metadata_steps(path: Path) -> str:
    with safe_open(path, framework="numpy") as file:
        return file.metadata()["steps"]


def test_guide_commands_are_valid_shell_and_valid_training_settings():
    """The quick check CI runs on every change: the page is valid bash, and every `python -m jaxlora.train`
    command parses with the CLI's own parser into settings TrainConfig accepts."""
    text = PAGE.read_text()
    subprocess.run(["bash", "-n", "-c", "\n".join(bash_blocks(text))], check=True)
    trainings = [c[3:] for c in commands(text) if c[:3] == ["python", "-m", "jaxlora.train"]]
    assert len(trainings) == 3
    for argv in trainings:
        settings = settings_from(build_parser().parse_args(argv))
        TrainConfig.from_dict({k: v for k, v in settings.items() if k not in RUN_FLAGS})


@pytest.mark.slow  # three CLI trainings of the demo-size UNet: about two minutes of CPU, mostly XLA compiles
def test_every_command_of_the_comfyui_guide_runs_and_its_files_load_in_comfyui(tmp_path):
    comfyui = comfyui_folder(tmp_path / "ComfyUI")
    script = substituted(
        "\n".join(bash_blocks(PAGE.read_text())),
        {
            "COMFYUI=~/ComfyUI": f"COMFYUI={comfyui}",
            "--steps 500": "--steps 2",
            "my_style_500_steps_": "my_style_2_steps_",
            "--steps 200": "--steps 1",
        },
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` is this interpreter
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    assert "shard_0000.pkl" in run.stdout and "metadata.json" in run.stdout  # the `ls` of the dataset folder
    loras, outputs = comfyui / "models" / "loras", comfyui / "output" / "loras"
    trained = loras / "my_style_2_steps_00001_.safetensors"
    assert trained.read_bytes() == (outputs / trained.name).read_bytes()
    assert len(json.loads((outputs / "my_style_2_steps_00001_loss.json").read_text())["loss"]) == 2

    # What LoraLoaderModelOnly does with the file: ComfyUI's load math consumes every key (ComfyUI-native
    # names need no diffusers name map) and changes the weights.
    checkpoint, _ = read_lora_file(comfyui / "models" / "checkpoints" / "v1-5-pruned-emaonly.safetensors")
    base = {key[len("model.") :]: value for key, value in checkpoint.items()}
    tensors, _ = read_lora_file(trained)
    patched, not_loaded = comfy_loader.apply_file(base, tensors, comfy_loader.model_key_map(base, {}))
    assert not_loaded == []
    assert any(not np.array_equal(patched[k], base[k]) for k in base)

    continued = outputs / "my_style_continued_17_steps_00001_.safetensors"  # 16 from the file name + 1
    comfy_file = outputs / "ComfyUI_trained_lora_16_steps_00001_.safetensors"
    assert metadata_steps(continued) == "17"
    assert read_lora_file(continued)[0].keys() == read_lora_file(comfy_file)[0].keys()  # the same adapter, trained on

    kohya_tensors, metadata = read_lora_file(outputs / "my_kohya_lora_continued_1001_steps_00001_.safetensors")
    assert metadata["ss_steps"] == "1001" and all(k.startswith("lora_unet_") for k in kohya_tensors)
    assert kohya_tensors.keys() == read_lora_file(loras / "my_kohya_lora.safetensors")[0].keys()

    converted, _ = read_lora_file(loras / "my_style_kohya.safetensors")
    assert converted and all(k.startswith("lora_unet_") for k in converted)
