"""Resumable training state with orbax-checkpoint: the adapter tree, the optimizer state, the step and the loss
history. Randomness and data order are functions of (seed, step), so nothing else is needed to continue a run
exactly where it stopped. Sharded arrays are saved by every process writing its shards, and restored straight onto
the shardings of the run that resumes (which may use another mesh, or none).

Each run has its own folder, `<checkpoint_dir>/run_<number:05>`, so runs are independent unless one is resumed.
Its `run.json` records the settings that must match to resume, the last complete checkpoint and whether the run
finished. A checkpoint counts only once `run.json` names it, and `run.json` is replaced atomically after the
checkpoint's files are on disk, so a crash at any moment leaves the previous checkpoint in force. A running
run holds a lock on its folder: a second process cannot resume it at the same time, and a folder whose run was
killed is known to be free.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from jaxlora.files import (
    STARTED,
    folder_lock,
    is_locked,
    remove_abandoned_partials,
    replace_file,
    sync_tree,
)
from jaxlora.parallel.placement import is_writer

RUN_FILE = "run.json"
RUN_NAME = re.compile(r"run_(\d{5,})")


class ResumeError(ValueError):
    """A run that cannot be resumed (another run's settings, finished, in use, none there); the message says why
    and names the folder or setting."""


def _numbered(tree) -> dict[str, jax.Array]:
    """A pytree's leaves keyed by position: the structure itself comes back from the run's own fresh state."""
    return {str(i): leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


def _abstract(tree) -> dict[str, jax.ShapeDtypeStruct]:
    """What to restore a tree's numbered leaves as: their shapes, dtypes and shardings."""
    return {
        key: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
        for key, leaf in _numbered(tree).items()
    }


def _unnumbered(template, numbered: dict):
    leaves, treedef = jax.tree.flatten(template)
    return jax.tree.unflatten(treedef, [numbered[str(i)] for i in range(len(leaves))])


ValidationRecords = Sequence[tuple[int, float, float | None]]


class Restored(NamedTuple):
    """A restored checkpoint: its step, adapters, optimizer state, loss history and validation records."""

    step: int
    adapters: nnx.State
    opt_state: object
    losses: list[float]
    validation: list[tuple[int, float, float | None]]


def _validation_array(records: ValidationRecords) -> np.ndarray:
    """[n, 3] float32 rows (step, loss, EMA loss or NaN)."""
    rows = [(step, loss, np.nan if ema is None else ema) for step, loss, ema in records]
    return np.asarray(rows, np.float32).reshape(-1, 3)


def _validation_records(array: np.ndarray) -> list[tuple[int, float, float | None]]:
    return [(int(step), float(loss), None if np.isnan(ema) else float(ema)) for step, loss, ema in array]


def read_record(folder: Path) -> dict | None:
    """A run folder's `run.json`, or None (with a warning naming the file) where it is missing, empty or not
    what jaxlora writes: such a folder is skipped, never a reason to refuse a new run."""
    path = folder / RUN_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        warnings.warn(f"{path} is missing; skipping {folder.name}", stacklevel=2)
        return None
    except (OSError, ValueError) as error:
        warnings.warn(f"{path} is unreadable or corrupt ({error}); skipping {folder.name}", stacklevel=2)
        return None
    if not isinstance(record, dict) or not isinstance(record.get("fingerprint"), dict):
        warnings.warn(f"{path} is not a jaxlora run record; skipping {folder.name}", stacklevel=2)
        return None
    return record


class Checkpoints:
    """The step checkpoints of one run, in its own folder, described by `fingerprint` (the settings that must
    match to resume: seed, algorithm, rank, data, ...)."""

    def __init__(self, directory: str | Path, fingerprint: dict, keep: int = 2):
        self.directory = Path(directory).absolute()
        self.fingerprint = fingerprint
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
        )

    @property
    def name(self) -> str:
        return self.directory.name

    def record(self) -> dict:
        """This run's `run.json`, or a fresh one (no checkpoint yet)."""
        if (self.directory / RUN_FILE).exists():
            return read_record(self.directory) or {}
        return {"fingerprint": self.fingerprint, "step": None, "state": "running"}

    def latest_step(self) -> int | None:
        """The last complete checkpoint: the one `run.json` names (a step orbax wrote after it is unconfirmed)."""
        return self.record().get("step")

    @contextmanager
    def in_use(self) -> Iterator[Checkpoints]:
        """Hold this run's folder while training (the writing process locks it; FolderInUseError if another
        process has it). A run that stops before its first checkpoint (an error, Ctrl-C while compiling) leaves
        no folder behind."""
        if not is_writer():
            yield self
            return
        with folder_lock(self.directory):
            try:
                yield self
            except BaseException:
                self.discard()
                raise

    def save(
        self, step: int, adapters: nnx.State, opt_state, losses: list[float], validation: ValidationRecords = ()
    ) -> None:
        """Write the checkpoint of `step`; it counts only once its files are synced and `run.json` names it.
        `validation` holds the run's (step, loss, EMA loss or None) records so far."""
        tree = {
            "adapters": _numbered(adapters),
            "opt_state": _numbered(opt_state),
            "losses": np.asarray(losses, np.float32),
        }
        if validation:  # orbax saves no empty arrays; a checkpoint without validation records has none
            tree["validation"] = _validation_array(validation)
        self.manager.save(step, args=ocp.args.StandardSave(tree))
        self.manager.wait_until_finished()
        if is_writer():
            sync_tree(self.directory / str(step))
            self._write_record(step=step)

    def restore(self, adapters: nnx.State, opt_state) -> Restored:
        """The latest readable checkpoint, shaped and laid out like the given (freshly initialised) adapters and
        optimizer state. An unreadable one is named in a warning and the one before it is used; checkpoints after
        the one restored are deleted, so the run continues from there."""
        committed = self.latest_step()
        if committed is None:
            raise ResumeError(f"no checkpoint to resume from in {self.directory}")
        self.check_fingerprint()
        for step in sorted((s for s in self.manager.all_steps() if s <= committed), reverse=True):
            try:
                restored = self._restore_step(step, adapters, opt_state)
            except (OSError, ValueError, KeyError) as error:
                warnings.warn(
                    f"checkpoint {self.directory / str(step)} is unreadable ({error}); using an earlier one",
                    stacklevel=2,
                )
                continue
            self._delete_steps_after(step)
            return restored
        raise ResumeError(f"no readable checkpoint in {self.directory}; start a new run without --resume")

    def _restore_step(self, step: int, adapters: nnx.State, opt_state) -> Restored:
        saved = self.manager.item_metadata(step)
        target = {
            "adapters": _abstract(adapters),
            "opt_state": _abstract(opt_state),
            "losses": np.zeros(saved["losses"].shape, np.float32),
        }
        if "validation" in saved:  # none before the first validation (and from before validation existed)
            target["validation"] = np.zeros(saved["validation"].shape, np.float32)
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(target))
        return Restored(
            step,
            _unnumbered(adapters, restored["adapters"]),
            _unnumbered(opt_state, restored["opt_state"]),
            [float(x) for x in restored["losses"]],
            _validation_records(restored.get("validation", np.zeros((0, 3)))),
        )

    def _delete_steps_after(self, step: int) -> None:
        """Drop unconfirmed or unreadable checkpoints after `step`: the resumed run writes those steps anew."""
        for later in [s for s in self.manager.all_steps() if s > step]:
            self.manager.delete(later)
        if is_writer() and self.latest_step() != step:
            self._write_record(step=step)

    def finish(self, adapter: Path, keep_checkpoints: bool = False) -> None:
        """Mark the run finished (it wrote `adapter`), so --resume says there is nothing to do; its checkpoints
        are deleted unless `keep_checkpoints`."""
        if not is_writer():
            return
        self._write_record(state="finished", adapter=str(adapter))
        if not keep_checkpoints:  # removed directly: orbax's delete waits for every process, and only one is here
            for step in self.manager.all_steps():
                shutil.rmtree(self.directory / str(step), ignore_errors=True)

    def reopen(self) -> None:
        """Mark a finished run running again: it is being trained further, and a crash now leaves it resumable."""
        self._write_record(state="running", adapter=None)

    def discard(self) -> None:
        """Remove the folder of a run that stopped before its first checkpoint: there is nothing to resume."""
        if is_writer() and self.latest_step() is None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _write_record(self, **changes) -> None:
        record = {**self.record(), "fingerprint": self.fingerprint, **changes}
        text = json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"
        replace_file(self.directory / RUN_FILE, text.encode())

    def check_fingerprint(self) -> None:
        """ResumeError naming every setting that differs from the run's own."""
        saved = self.record()["fingerprint"]
        current = json.loads(json.dumps(self.fingerprint, default=str))
        differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if differing:
            details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in differing)
            raise ResumeError(f"the checkpoints in {self.directory} belong to a different run ({details})")


def run_folders(parent: Path) -> list[Path]:
    """The run folders under `parent`, oldest (lowest number) first."""
    if not parent.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in parent.iterdir() if p.is_dir() and (m := RUN_NAME.fullmatch(p.name))]
    return [path for _, path in sorted(found)]


def new_run(parent: str | Path, fingerprint: dict) -> Checkpoints:
    """A new run folder, `run_<n>` with n one more than the largest there. The folder is made with mkdir, which
    fails if another run took the number meanwhile, so two runs started together get separate folders. On
    several processes, process 0 chooses and the others follow."""
    parent = Path(parent).absolute()
    number = 0
    if is_writer():
        parent.mkdir(parents=True, exist_ok=True)
        folders = run_folders(parent)
        number = int(RUN_NAME.fullmatch(folders[-1].name).group(1)) + 1 if folders else 1
        while True:
            try:
                (parent / f"run_{number:05}").mkdir()
                break
            except FileExistsError:
                number += 1
    if jax.process_count() > 1:
        number = int(multihost_utils.broadcast_one_to_all(np.int32(number)))
    return Checkpoints(parent / f"run_{number:05}", fingerprint)


def remove_dead_runs(parent: Path) -> None:
    """Tidy after killed runs: remove leftover `.partial` files, and run folders that never got a checkpoint
    (no `run.json`, or one without a step), where the folder predates this process and no live process holds
    it. A folder with a corrupt `run.json` is kept: its checkpoints may still be worth recovering by hand."""
    remove_abandoned_partials(parent)
    for folder in run_folders(parent):
        if folder.stat().st_mtime >= STARTED or is_locked(folder):
            continue
        remove_abandoned_partials(folder)
        if not (folder / RUN_FILE).exists() or (_quietly_read(folder) or {"step": 0}).get("step") is None:
            shutil.rmtree(folder, ignore_errors=True)


def _quietly_read(folder: Path) -> dict | None:
    """`read_record` without its warning, for tidying (the warning comes when a run is looked for)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_record(folder)


def resumable_run(parent: str | Path, fingerprint: dict, steps: int, name: str | None = None) -> Checkpoints:
    """The run to continue to `steps`: the one named, or the latest run with a checkpoint that no process is
    running and that is unfinished, or finished before `steps` with its checkpoints kept (trained further).
    ResumeError says why there is none (finished: nothing to do; in use; nothing there)."""
    parent = Path(parent).absolute()
    if name is not None:
        folder = parent / name
        if not (RUN_NAME.fullmatch(name) and folder.is_dir()):
            runs = ", ".join(p.name for p in run_folders(parent)) or "none"
            raise ResumeError(f"no run {name!r} in {parent} (runs there: {runs})")
        candidates = [folder]
    else:
        candidates = list(reversed(run_folders(parent)))
    finished, in_use = None, None
    for folder in candidates:
        record = read_record(folder)
        if record is None:
            continue
        kept = (folder / str(record.get("step"))).is_dir()
        if record.get("state") == "finished" and not (kept and record["step"] < steps):
            finished = finished or (folder, record)
        elif is_writer() and is_locked(folder):
            in_use = in_use or folder
        elif record.get("step") is not None:
            return Checkpoints(folder, fingerprint)
    if in_use is not None:
        raise ResumeError(f"{in_use} is in use by another run: wait for it to end, or start a new run without --resume")
    if finished is not None:
        folder, record = finished
        done = f"nothing to do: {folder.name} finished at step {record['step']} and wrote {record.get('adapter')}"
        if (folder / str(record["step"])).is_dir():
            raise ResumeError(f"{done}; resume it with more steps to train it further")
        raise ResumeError(
            f"{done}; its checkpoints were deleted (--keep-checkpoints keeps them), so to train it further start a "
            "new run with --existing-lora set to that file"
        )
    if name is not None:
        raise ResumeError(f"{parent / name} has no usable checkpoint (see the warning above); start a new run")
    raise ResumeError(f"nothing to resume: {parent} holds no unfinished run with a checkpoint; start without --resume")


def open_run(parent: str | Path, fingerprint: dict, resume: bool | str, steps: int) -> Checkpoints:
    """The run folder a training run uses: a new one, or with `resume` the latest unfinished run (True) or the
    one named, checked to have the same settings and to be at most `steps` along."""
    if is_writer() and Path(parent).is_dir():
        remove_dead_runs(Path(parent))
    if not resume:
        return new_run(parent, fingerprint)
    run = resumable_run(parent, fingerprint, steps, None if resume is True else str(resume))
    run.check_fingerprint()
    if is_writer() and run.record().get("state") == "finished":
        run.reopen()
    if run.latest_step() > steps:
        step = run.latest_step()
        raise ResumeError(f"{run.directory} is at step {step}, past steps {steps}: resume it with more steps")
    return run
