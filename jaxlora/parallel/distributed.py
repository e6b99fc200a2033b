"""Start-up of a run that spans several processes (TPU pod slices, multi-node GPU): `jax.distributed`.

JAX then sees every device of every process in `jax.devices()`, the mesh spans them all, and each process
drives its own devices (the multi-controller model). It must happen before any JAX computation.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax


def spans_processes(env: Mapping[str, str]) -> bool:
    """Whether the environment describes a launch of several processes that JAX can join by itself: an explicit
    coordinator, Slurm or Open MPI with more than one task, or a TPU slice with more than one worker host."""
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    for count in ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if env.get(count, "1").isdigit() and int(env.get(count, "1")) > 1:
            return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def initialize(requested: bool, env: Mapping[str, str]) -> bool:
    """Join the other processes when asked (`--distributed`) or when the environment says there are some.
    Returns whether it did. JAX detects the arguments on TPU, Slurm and Open MPI; elsewhere set
    JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process."""
    if not (requested or spans_processes(env)):
        return False
    count, index = env.get("JAX_NUM_PROCESSES"), env.get("JAX_PROCESS_ID")
    jax.distributed.initialize(num_processes=int(count) if count else None, process_id=int(index) if index else None)
    return True
