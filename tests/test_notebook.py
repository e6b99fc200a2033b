"""The Colab notebook: committed without outputs, its form is the node's inputs, and it runs top to bottom
headless (no Colab: the built-in demo on CPU), so a broken cell fails here."""

import ast
import json
import re
from dataclasses import asdict, fields
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from safetensors import safe_open

from jaxlora.adapters.formats import STYLES
from jaxlora.train.config import CHOICES, TRAINING_CONTROLS, RunOptions, TrainConfig
from tests.encoders.conftest import write_clip_tokenizer
from tests.encoders.test_make_dataset import write_images, write_sd1_checkpoint

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "train_lora_colab_tpu.ipynb"
NAMES = [f.name for f in fields(TrainConfig)]
NODE_INPUTS = NAMES[: NAMES.index("existing_lora") + 1]  # the Train LoRA node's inputs; jaxlora's additions follow
PARAM = re.compile(r"^(\w+) = (.+?)  # @param (.+)$", re.MULTILINE)


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def form_fields(notebook) -> dict[str, tuple[object, object]]:
    """name -> (value, choices or the {type: ...} annotation) of every `# @param` line."""
    found = {}
    for cell in notebook.cells:
        for name, value, spec in PARAM.findall(cell.source):
            found[name] = (ast.literal_eval(value), ast.literal_eval(spec) if spec.startswith("[") else spec)
    return found


def with_parameters(notebook, **values):
    """Set form values the way papermill injects parameters: the `name = value  # @param` line is rewritten."""
    for name, value in values.items():
        pattern = re.compile(rf"^{name} = .+?(  # @param .+)$", re.MULTILINE)
        cells = [cell for cell in notebook.cells if pattern.search(cell.source)]
        assert len(cells) == 1, f"form field {name} not found once"
        cells[0].source = pattern.sub(lambda m, n=name, v=value: f"{n} = {v!r}{m.group(1)}", cells[0].source)
    return notebook


def test_notebook_is_committed_without_outputs():
    notebook = read_notebook()
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)


def test_form_holds_the_node_inputs_with_their_defaults_and_choices():
    form = form_fields(read_notebook())
    defaults = TrainConfig()
    for name in NODE_INPUTS:
        assert name in form, f"the form has no {name}"
        value, spec = form[name]
        default = getattr(defaults, name)
        assert value == ("" if default is None else default), name  # existing_lora: "" stands for none
        if name in CHOICES:
            assert spec == list(CHOICES[name]), name
    TrainConfig.from_dict({name: form[name][0] for name in NODE_INPUTS if name != "existing_lora"})
    assert form["key_style"] == ("comfyui", list(STYLES))


def test_form_controls_have_the_settings_defaults_and_choices():
    """The training controls on the form (empty text stands for none) start at the node's behaviour."""
    form = form_fields(read_notebook())
    defaults = {**asdict(TrainConfig()), **asdict(RunOptions())}
    run_controls = ("ema_export", "save_every", "save_last", "validation_dataset", "validate_every", "log_dir")
    samples = tuple(spec.name for spec in fields(RunOptions) if spec.name.startswith("sample_"))
    shown = [name for name in (*TRAINING_CONTROLS, *run_controls, "wandb_project", *samples) if name in form]
    assert {"lr_scheduler", "warmup_steps", "timestep_sampling", "ema_decay", "save_every"} <= set(shown)
    assert {"validation_split", "validation_dataset", "validate_every", "log_dir", "wandb_project"} <= set(shown)
    assert {"sample_every", "sample_prompts", "sample_steps", "sample_seed", "sample_sampler"} <= set(shown)
    for name in shown:
        value, spec = form[name]
        assert value == ("" if defaults[name] is None else defaults[name]), name
        if name in CHOICES:
            assert spec == list(CHOICES[name]), name


def test_defaults_fit_together_and_the_install_source_is_documented():
    form = form_fields(read_notebook())
    assert 0 < form["checkpoint_every"][0] < form["steps"][0]  # a default run writes a checkpoint before its end
    assert form["guidance"] == ("", '{type:"string"}') and form["flow_shift"] == ("", '{type:"string"}')
    source = form["JAXLORA_SOURCE"][0]
    assert f"`{source}`" in (NOTEBOOK.parent.parent / "README.md").read_text()


def test_gitignore_covers_the_folders_the_headless_notebook_writes():
    ignored = (NOTEBOOK.parent.parent / ".gitignore").read_text().splitlines()
    source = "".join(cell.source for cell in read_notebook().cells)
    for folder in ("output", "jaxlora_demo", "jaxlora_datasets"):
        assert f'WORK / "{folder}"' in source and f"{folder}/" in ignored


def printed(notebook) -> str:
    return "".join(out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", []))


def test_notebook_runs_headless_twice_as_it_is_then_resumes(tmp_path, monkeypatch):
    """Run all, Run all again unchanged (a second, independent run: the next file counter, the same losses), then
    Run all in a fresh runtime with `resume` ticked and more steps, as after a disconnect: it continues the latest
    run from its checkpoint under the chosen output folder. A quarter of the data is held out for validation; the
    resumed run also validates every 2 steps and writes TensorBoard logs (neither is part of the fingerprint)."""
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    where = {"metadata": {"path": str(tmp_path)}}  # the kernel's working folder
    held_out = {"validation_split": 0.25}
    logs = {"validate_every": 2, "log_dir": str(tmp_path / "logs")}
    runs = [
        with_parameters(read_notebook(), steps=3, checkpoint_every=2, **held_out),
        with_parameters(read_notebook(), steps=3, checkpoint_every=2, **held_out),
        with_parameters(read_notebook(), steps=4, checkpoint_every=2, resume=True, **held_out, **logs),
    ]
    for notebook in runs:
        NotebookClient(notebook, timeout=600, kernel_name="python3", resources=where).execute()

    first, _, resumed = runs
    assert "not on Colab" in printed(first) and "backend cpu" in printed(first) and "built-in demo" in printed(first)
    assert "resumed from step 3" in printed(resumed)
    loras = tmp_path / "output" / "ComfyUI" / "models" / "loras"
    histories, validations = [], []
    for steps, counter in ((3, 1), (3, 2), (4, 3)):
        stem = loras / f"jaxlora_trained_lora_{steps}_steps_{counter:05}_"
        with safe_open(f"{stem}.safetensors", framework="numpy") as file:
            keys = list(file.keys())
            assert json.loads(file.metadata()["training_settings"])["steps"] == steps
        assert keys and all(key.startswith("diffusion_model.") for key in keys)
        histories.append(json.loads(Path(f"{stem}loss.json").read_text())["loss"])
        validations.append(json.loads(Path(f"{stem}loss.json").read_text())["validation"])
    assert histories[1] == histories[0]  # the same settings train the same run again
    assert len(histories[2]) == 4 and np.isfinite(histories[2]).all()
    assert histories[2][:3] == histories[1]  # the resumed run carries the latest run's history on
    assert validations[0] == validations[1] and validations[0]["step"] == [3]
    assert validations[2]["step"] == [3, 4]  # from its checkpoint (run 2's last step), then step 4
    assert validations[2]["loss"][0] == validations[1]["loss"][0]
    assert len(list((tmp_path / "logs").glob("events.out.tfevents.*"))) == 1
    for notebook in runs:
        plots = [out for out in notebook.cells[-2].outputs if "image/png" in out.get("data", {})]
        assert len(plots) == 1  # the loss plot, inline
    assert (loras / "jaxlora_trained_lora_checkpoints").is_dir()  # inside the chosen output folder


@pytest.mark.slow  # two notebook runs; the images path itself runs in CI in tests/encoders/test_make_dataset.py
def test_notebook_trains_from_a_folder_of_captioned_images(tmp_path, monkeypatch):
    """IMAGES instead of DATASET: the folder is encoded with the checkpoint's own VAE and CLIP (a tiny SD1.x
    checkpoint in the real layout), trained on, and found again by a second Run all."""
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    checkpoint = write_sd1_checkpoint(tmp_path / "sd1.safetensors")
    images = write_images(tmp_path / "photos")
    tokenizers = write_clip_tokenizer(tmp_path / "tokenizers")
    form = {"CHECKPOINT": str(checkpoint), "IMAGES": str(images), "TOKENIZERS": str(tokenizers), "RESOLUTION": 128}
    runs = [with_parameters(read_notebook(), steps=2, checkpoint_every=1, **form) for _ in range(2)]
    for notebook in runs:
        NotebookClient(
            notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    assert "6 samples in 2 buckets" in printed(runs[0]) and "re-used" in printed(runs[1])
    assert len(list((tmp_path / "jaxlora_datasets").iterdir())) == 1
    loras = tmp_path / "output" / "ComfyUI" / "models" / "loras"
    assert len(list(loras.glob("jaxlora_trained_lora_2_steps_*_.safetensors"))) == 2


@pytest.mark.slow
def test_notebook_samples_images_during_training(tmp_path, monkeypatch):
    """sample_every and a SAMPLE_PROMPTS file on the form: the prompts are encoded with the checkpoint's CLIP,
    and the samples and their grid land in `<prefix>_samples` beside the adapter."""
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    checkpoint = write_sd1_checkpoint(tmp_path / "sd1.safetensors")
    images = write_images(tmp_path / "photos")
    tokenizers = write_clip_tokenizer(tmp_path / "tokenizers")
    (tmp_path / "prompts.txt").write_text("a red cat\na dog --n red\n")
    form = {"CHECKPOINT": str(checkpoint), "IMAGES": str(images), "TOKENIZERS": str(tokenizers), "RESOLUTION": 128}
    form |= {"sample_every": 2, "sample_prompts": str(tmp_path / "prompts.txt"), "sample_steps": 2}
    notebook = with_parameters(read_notebook(), steps=2, checkpoint_every=1, **form)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    samples = tmp_path / "output" / "ComfyUI" / "models" / "loras" / "jaxlora_trained_lora_samples"
    assert sorted(p.name for p in samples.iterdir()) == ["000002_00.png", "000002_01.png", "000002_grid.png"]
