"""Resumable training state with orbax-checkpoint: the adapter tree, the optimizer state, the step and the loss
history. Randomness and data order are functions of (seed, step), so nothing else is needed to continue a run
exactly where it stopped. Sharded arrays are saved by every process writing its shards, and restored straight onto
the shardings of the run that resumes (which may use another mesh, or none)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxlora.parallel.placement import is_writer

RUN_FILE = "run.json"


class ResumeError(ValueError):
    """A checkpoint that does not belong to this run; the message names the setting that differs."""


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


class Checkpoints:
    """A folder of step checkpoints for one run, described by `fingerprint` (the settings that must match to
    resume: seed, algorithm, rank, data, ...)."""

    def __init__(self, directory: str | Path, fingerprint: dict, keep: int = 2):
        self.directory = Path(directory).absolute()
        self.fingerprint = fingerprint
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, adapters: nnx.State, opt_state, losses: list[float]) -> None:
        tree = {
            "adapters": _numbered(adapters),
            "opt_state": _numbered(opt_state),
            "losses": np.asarray(losses, np.float32),
        }
        self.manager.save(step, args=ocp.args.StandardSave(tree))
        self.manager.wait_until_finished()
        if is_writer():
            (self.directory / RUN_FILE).write_text(json.dumps(self.fingerprint, indent=2, sort_keys=True, default=str))

    def restore(self, adapters: nnx.State, opt_state) -> tuple[int, nnx.State, object, list[float]]:
        """The latest checkpoint, shaped and laid out like the given (freshly initialised) adapters and optimizer
        state."""
        step = self.latest_step()
        if step is None:
            raise ResumeError(f"no checkpoint to resume from in {self.directory}")
        self._check_fingerprint()
        saved_losses = self.manager.item_metadata(step)["losses"]
        target = {
            "adapters": _abstract(adapters),
            "opt_state": _abstract(opt_state),
            "losses": np.zeros(saved_losses.shape, np.float32),
        }
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(target))
        return (
            step,
            _unnumbered(adapters, restored["adapters"]),
            _unnumbered(opt_state, restored["opt_state"]),
            [float(x) for x in restored["losses"]],
        )

    def _check_fingerprint(self) -> None:
        path = self.directory / RUN_FILE
        if not path.is_file():
            raise ResumeError(f"{path} is missing: cannot tell which run the checkpoints in {self.directory} belong to")
        saved = json.loads(path.read_text())
        current = json.loads(json.dumps(self.fingerprint, default=str))
        differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if differing:
            details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in differing)
            raise ResumeError(f"the checkpoints in {self.directory} belong to a different run ({details})")
