"""A run's lifecycle and the reliability of what it leaves on disk: runs are independent unless resumed, resume
finds the right run (or says why there is none), Ctrl-C and kill -9 lose nothing and leave no half-written
adapter, corrupt checkpoints are skipped, concurrent runs never share a folder, outputs are readable by others
and byte-identical for identical runs."""

import fcntl
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors import safe_open

from jaxlora import files
from jaxlora.adapters.lora_files import read_lora_file
from jaxlora.files import folder_lock, remove_abandoned_partials, safetensors_bytes, scratch_folder, write_new_file
from jaxlora.models.checkpoint import read_index
from jaxlora.models.demo import demo_dataset, write_random_checkpoint
from jaxlora.models.unet_family import DEMO_UNET
from jaxlora.train import loop
from jaxlora.train.__main__ import main
from jaxlora.train.checkpoints import RUN_FILE, ResumeError, new_run, open_run, resumable_run
from jaxlora.train.config import TrainConfig
from jaxlora.train.data import load_dataset, save_dataset
from jaxlora.train.loop import RunStats, TrainResult
from jaxlora.train.memory_plan import DeviceMemory
from jaxlora.train.report import RunInterruptedError, write_run_outputs

PREFIX = "loras/style"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    model = write_random_checkpoint(DEMO_UNET, folder / "unet.safetensors", seed=2)
    dataset = save_dataset(folder / "data.safetensors", *demo_dataset(4, 8))
    return model, dataset


def command(inputs, output_dir, *flags: str) -> list[str]:
    model, dataset = inputs
    return ["--model", str(model), "--dataset", str(dataset), "--output-dir", str(output_dir), "--prefix", PREFIX,
            "--steps", "3", "--rank", "2", "--training-dtype", "fp32", "--no-compile-cache", *flags]  # fmt: skip


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def runs(output_dir) -> dict[str, dict]:
    folder = output_dir / "loras" / "style_checkpoints"
    return {p.name: json.loads((p / RUN_FILE).read_text()) for p in sorted(folder.iterdir()) if p.is_dir()}


def test_the_same_command_twice_makes_two_identical_readable_adapters(inputs, tmp_path, capsys):
    umask = os.umask(0o022)
    try:
        assert main(command(inputs, tmp_path)) == 0
        assert main(command(inputs, tmp_path, "--keep-checkpoints")) == 0
    finally:
        os.umask(umask)
    first, second = (tmp_path / "loras" / f"style_3_steps_0000{n}_.safetensors" for n in (1, 2))
    assert sha256(first) == sha256(second)  # same seed, same settings: the same bytes, metadata included
    for suffix in ("loss.json", "loss.csv"):  # (the plot's title names its file)
        assert sha256(first.with_name(f"style_3_steps_00001_{suffix}")) == sha256(
            first.with_name(f"style_3_steps_00002_{suffix}")
        )
    for path in (tmp_path / "loras").iterdir():
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name
    records = runs(tmp_path)
    assert [(r["state"], r["step"], r["adapter"].endswith(f"0000{n}_.safetensors")) for n, r in
            enumerate(records.values(), 1)] == [("finished", 3, True)] * 2  # fmt: skip
    checkpoint_files = {name: sorted(p.name for p in (tmp_path / "loras" / "style_checkpoints" / name).iterdir())
                        for name in records}  # fmt: skip
    assert "3" not in checkpoint_files["run_00001"]  # the final checkpoint goes once the adapter is written
    assert "3" in checkpoint_files["run_00002"]  # unless --keep-checkpoints
    capsys.readouterr()
    assert main(command(inputs, tmp_path, "--resume")) == 2
    assert "nothing to do: run_00002 finished at step 3" in capsys.readouterr().err
    assert main(command(inputs, tmp_path, "--resume", "run_00001", "--steps", "4")) == 2
    assert "its checkpoints were deleted (--keep-checkpoints keeps them)" in capsys.readouterr().err
    assert main(command(inputs, tmp_path, "--resume", "--steps", "4")) == 0  # a kept run trains further
    assert "resumed from step 3 of run_00002" in capsys.readouterr().err
    assert (tmp_path / "loras" / "style_4_steps_00003_.safetensors").is_file()


def test_a_step_too_large_for_the_device_stops_before_training_and_does_not_block_the_next_run(
    inputs, tmp_path, capsys, monkeypatch
):
    """On a device with less free memory than XLA's plan of the step (a stand-in for a GPU's allocator figures; the
    CPU reports none) the run stops after compiling, before any step, naming the memory and the settings to
    change; the same command on a device with room then trains."""
    monkeypatch.setattr(DeviceMemory, "of", classmethod(lambda cls, device: DeviceMemory(limit=2**20, in_use=0)))
    assert main(command(inputs, tmp_path)) == 2
    error = capsys.readouterr().err
    assert "\nerror: the train step for latents [4, 8, 8], batch 1 needs " in error
    assert "but the device has 0.00 GiB free of 0.00 GiB" in error and "--batch-size" in error
    assert not list((tmp_path / "loras").glob("*.safetensors"))
    monkeypatch.undo()
    assert main(command(inputs, tmp_path)) == 0
    assert "the train step for latents [4, 8, 8], batch 1 needs " in capsys.readouterr().err
    assert (tmp_path / "loras" / "style_3_steps_00001_.safetensors").is_file()


def test_resume_with_nothing_to_resume_is_refused(inputs, tmp_path, capsys):
    assert main(command(inputs, tmp_path, "--resume")) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert not list((tmp_path / "loras").glob("*.safetensors"))


def stop_like_ctrl_c_at_step(monkeypatch, stop_step: int) -> None:
    """Deliver SIGINT while the loop draws the bucket of `stop_step` (counted from 1), as a Ctrl-C would."""
    choose = loop.choose_bucket

    def choose_and_interrupt(sizes, seed, step):
        if step + 1 == stop_step:
            signal.raise_signal(signal.SIGINT)
        return choose(sizes, seed, step)

    monkeypatch.setattr(loop, "choose_bucket", choose_and_interrupt)


def test_ctrl_c_while_training_keeps_the_checkpoint_and_writes_no_adapter(inputs, tmp_path, capsys, monkeypatch):
    stop_like_ctrl_c_at_step(monkeypatch, 2)
    assert main(command(inputs, tmp_path)) == 130
    error = capsys.readouterr().err
    assert "interrupted at step 2 of 3" in error and "no adapter was written" in error
    assert "--resume run_00001" in error
    assert not list((tmp_path / "loras").glob("*.safetensors"))
    assert main(command(inputs, tmp_path, "--resume", "--rank", "4")) == 2  # other arithmetic: refused, named
    assert "rank: checkpoint 2, now 4" in capsys.readouterr().err
    assert runs(tmp_path)["run_00001"]["step"] == 2
    monkeypatch.undo()
    longer = ["--steps", "4", "--format", "kohya", "--checkpoint-every", "2"]  # none of these changes the arithmetic
    assert main(command(inputs, tmp_path, "--resume", "run_00001", *longer)) == 0
    assert (tmp_path / "loras" / "style_4_steps_00001_.safetensors").is_file()
    assert runs(tmp_path)["run_00001"]["state"] == "finished"


def test_outputs_of_an_interrupted_run_are_refused():
    """The notebook's path: it writes outputs with write_run_outputs, which must not name a partial adapter as the
    finished one."""
    result = TrainResult(None, {}, {"loss": [1.0]}, steps=1, stats=RunStats(interrupted=True))
    config = TrainConfig(steps=3)
    with pytest.raises(RunInterruptedError, match="stopped at step 1 of 3; no adapter is written"):
        write_run_outputs(result, config, "unused", "unused")


def test_ctrl_c_while_compiling_exits_cleanly_and_leaves_no_run(inputs, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "compile_step", interrupted)
    assert main(command(inputs, tmp_path)) == 130
    error = capsys.readouterr().err
    assert "interrupted: no adapter was written" in error and "Traceback" not in error
    assert runs(tmp_path) == {}  # the run had no checkpoint: its folder is gone


def test_negative_checkpoint_interval_is_refused_naming_the_flag(inputs, tmp_path, capsys):
    assert main(command(inputs, tmp_path, "--checkpoint-every", "-1")) == 2
    assert "checkpoint_every must be 0 or more, got -1" in capsys.readouterr().err


def test_run_in_use_by_another_process_is_not_resumed(inputs, tmp_path, capsys, monkeypatch):
    stop_like_ctrl_c_at_step(monkeypatch, 1)
    assert main(command(inputs, tmp_path)) == 130
    monkeypatch.undo()
    with folder_lock(tmp_path / "loras" / "style_checkpoints" / "run_00001"):  # as a live run would hold it
        capsys.readouterr()
        assert main(command(inputs, tmp_path, "--resume")) == 2
        assert "run_00001 is in use by another run" in capsys.readouterr().err
        assert new_run(tmp_path / "loras" / "style_checkpoints", {}).name == "run_00002"  # a new run is not blocked


def test_corrupt_checkpoint_is_named_and_the_one_before_it_used(inputs, tmp_path, capsys, monkeypatch):
    stop_like_ctrl_c_at_step(monkeypatch, 2)
    assert main(command(inputs, tmp_path, "--checkpoint-every", "1")) == 130
    monkeypatch.undo()
    run = tmp_path / "loras" / "style_checkpoints" / "run_00001"
    for path in (run / "2").rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated by a crash
    with pytest.warns(UserWarning, match=rf"checkpoint {run / '2'} is unreadable"):
        assert main(command(inputs, tmp_path, "--resume")) == 0
    assert "resumed from step 1 of run_00001" in capsys.readouterr().err
    assert (tmp_path / "loras" / "style_3_steps_00001_.safetensors").is_file()


def test_empty_run_record_is_named_and_blocks_nothing(tmp_path):
    parent = tmp_path / "checkpoints"
    (parent / "run_00001").mkdir(parents=True)
    (parent / "run_00001" / RUN_FILE).write_bytes(b"")
    with pytest.warns(UserWarning, match=r"run_00001/run.json is unreadable or corrupt"):
        with pytest.raises(ResumeError, match="nothing to resume"):
            resumable_run(parent, {}, steps=1)
    assert new_run(parent, {}).name == "run_00002"


def test_runs_killed_before_their_first_checkpoint_are_tidied(tmp_path, monkeypatch):
    parent = tmp_path / "checkpoints"
    dead = new_run(parent, {}).directory
    (dead / ".run.json.1234.partial").write_bytes(b"{")
    monkeypatch.setattr(files, "STARTED", time.time() + 60)  # as seen by a process started after the kill
    monkeypatch.setattr("jaxlora.train.checkpoints.STARTED", files.STARTED)
    assert open_run(parent, {}, resume=False, steps=1).name == "run_00001"  # the dead run and its partial: gone
    assert not (dead / ".run.json.1234.partial").exists()


def test_partial_files_are_removed_only_when_abandoned(tmp_path, monkeypatch):
    abandoned, live = tmp_path / ".a.safetensors.x.partial", tmp_path / ".b.safetensors.y.partial"
    abandoned.write_bytes(b"half")
    live.write_bytes(b"half")
    monkeypatch.setattr(files, "STARTED", time.time() + 60)
    with open(live, "rb") as writer:
        fcntl.flock(writer, fcntl.LOCK_EX)  # what write_new_file holds while it writes
        assert remove_abandoned_partials(tmp_path) == [abandoned]
    assert live.exists()


def test_demo_scratch_folders_of_killed_runs_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    killed = tmp_path / "jaxlora-demo-killed"
    killed.mkdir()
    (killed / "demo_unet.safetensors").write_bytes(b"weights")
    monkeypatch.setattr(files, "STARTED", time.time() + 60)
    with scratch_folder("jaxlora-demo-") as scratch:
        assert not killed.exists()
        with scratch_folder("jaxlora-demo-"):
            assert scratch.exists()  # in use (locked) by this run: a concurrent one leaves it alone
    assert not scratch.exists()


def test_safetensors_metadata_is_written_in_sorted_order(tmp_path):
    tensors = {"b": np.ones(2, np.float32), "a": np.zeros(3, np.float16)}
    metadata = {f"key{i}": f"value {i} é" for i in range(20)}
    data = safetensors_bytes(tensors, metadata)
    assert all(safetensors_bytes(tensors, dict(reversed(metadata.items()))) == data for _ in range(5))
    path = write_new_file(tmp_path / "x.safetensors", data)
    with safe_open(path, framework="numpy") as f:
        assert f.metadata() == metadata
        np.testing.assert_array_equal(f.get_tensor("b"), tensors["b"])
    header = data[8 : 8 + int.from_bytes(data[:8], "little")]
    assert list(json.loads(header)["__metadata__"]) == sorted(metadata)


def deny_reading(monkeypatch, path) -> None:
    """`os.access` answers as for a mode-000 file that the user does not own."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, *a, **k: False if str(p) == str(path) else real_access(p, *a, **k))


@pytest.mark.parametrize(
    ("read", "name"),
    [(read_index, "unet.safetensors"), (load_dataset, "data.safetensors"), (read_lora_file, "unet.safetensors")],
)
def test_unreadable_file_is_reported_as_permission_denied(inputs, monkeypatch, read, name):
    """Tests run as root, who can read a mode-000 file: the refusal a user would get is simulated."""
    path = inputs[0].parent / name
    deny_reading(monkeypatch, path)
    with pytest.raises(PermissionError, match=f"permission denied: {path}"):
        read(path)


def test_unreadable_model_fails_the_command_with_its_name(inputs, tmp_path, capsys, monkeypatch):
    model = str(inputs[0])
    deny_reading(monkeypatch, model)
    assert main(command(inputs, tmp_path)) == 2
    assert f"error: permission denied: {model}" in capsys.readouterr().err


def demo_command(output_dir, *flags: str) -> list[str]:
    return [sys.executable, "-m", "jaxlora.train", "--output-dir", str(output_dir), "--steps", "100",
            "--checkpoint-every", "1", "--batch-size", "1", *flags]  # fmt: skip


@pytest.mark.slow
def test_killed_run_blocks_nothing_and_resumes(tmp_path):
    """kill -9 in the middle of training: the next start tidies the demo's temporary folder, a new run is not
    blocked, and --resume finishes the killed run."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    # a cold compile cache of its own: the session's warm one could let the run finish before it is killed
    env = {**os.environ, "TMPDIR": str(scratch), "JAXLORA_CACHE_DIR": str(tmp_path / "xla")}
    out = tmp_path / "out"
    runs_folder = out / "loras" / "jaxlora_trained_lora_checkpoints"
    process = subprocess.Popen(demo_command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record = runs_folder / "run_00001" / RUN_FILE
    deadline = time.time() + 600
    while not (record.exists() and json.loads(record.read_text())["step"] >= 2):
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert list(scratch.glob("jaxlora-demo-*"))  # left behind by the kill

    subprocess.run(demo_command(out, "--steps", "2"), env=env, check=True, capture_output=True, timeout=900)
    assert not list(scratch.glob("jaxlora-demo-*"))  # the next start removed the killed run's folder
    assert (out / "loras" / "jaxlora_trained_lora_2_steps_00001_.safetensors").is_file()
    resume = demo_command(out, "--resume", "--checkpoint-every", "0")  # the interval may change on resume
    resumed = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step" in resumed.stderr
    assert (out / "loras" / "jaxlora_trained_lora_100_steps_00002_.safetensors").is_file()
