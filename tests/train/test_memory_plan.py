"""The train step's memory plan against its device: read from XLA's compiled programs, checked before the first
step, and XLA:TPU's refusal of a program too large for its chip turned into an error that says what to change."""

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding

from jaxlora.train.memory_plan import (
    DeviceMemory,
    StepDoesNotFitError,
    StepMemory,
    check_step_fits,
    compile_within_memory,
)

MIB = 2**20


def test_the_plan_counts_inputs_outputs_and_the_donated_buffers_the_step_writes_into():
    """A step of two 4 MiB inputs, one of them donated and rewritten: its output goes into the donated buffer, so
    the step allocates only the 4-byte sum (and XLA's table of its two outputs) beside its temporaries."""
    x = jax.ShapeDtypeStruct((MIB,), jnp.float32)

    def step(state, batch):
        return state + batch, batch.sum()

    plan = StepMemory.of(jax.jit(step, donate_argnums=0).lower(x, x).compile())
    assert plan.arguments == 8 * MIB
    assert plan.aliased == 4 * MIB
    assert 4 * MIB + 4 <= plan.outputs <= 4 * MIB + 64
    assert plan.allocated_by_step == plan.outputs - 4 * MIB + plan.temporaries < 1024
    assert plan.total == 8 * MIB + plan.allocated_by_step
    kept = StepMemory.of(jax.jit(step).lower(x, x).compile())  # without donation the new state is a new buffer
    assert kept.aliased == 0 and kept.outputs == plan.outputs
    assert kept.allocated_by_step == plan.allocated_by_step + 4 * MIB


def test_a_step_that_needs_more_than_the_free_memory_is_refused_with_the_figures_and_what_to_change():
    plan = StepMemory(arguments=5 * 2**30, outputs=2**30, aliased=2**30, temporaries=9 * 2**30)
    what = "the train step for latents [4, 128, 128], batch 8"
    with pytest.raises(StepDoesNotFitError) as refused:
        check_step_fits(plan, DeviceMemory(limit=16 * 2**30, in_use=8 * 2**30), what)
    message = str(refused.value)
    assert message.startswith(what)
    assert "needs 14.00 GiB per device (5.00 GiB of inputs, 9.00 GiB allocated while it runs)" in message
    assert "8.00 GiB free of 16.00 GiB" in message
    assert "--batch-size" in message and "--offloading" in message
    # the same step where 9 GiB are free: it fits, and the line says by how much
    line = check_step_fits(plan, DeviceMemory(limit=16 * 2**30, in_use=7 * 2**30), what)
    assert line.endswith("9.00 GiB of 16.00 GiB free")


def test_without_device_figures_the_plan_is_reported_and_nothing_is_checked():
    plan = StepMemory(arguments=2**30, outputs=0, aliased=0, temporaries=100 * 2**30)
    assert check_step_fits(plan, None, "the step") == (
        "the step needs 101.00 GiB per device (1.00 GiB of inputs, 100.00 GiB allocated while it runs)"
    )
    assert check_step_fits(None, DeviceMemory(limit=1, in_use=0), "the step") == (
        "the step: the backend gives no memory plan"
    )
    assert DeviceMemory.of(jax.devices("cpu")[0]) is None  # XLA's CPU client reports no memory figures


def test_the_tpu_compilers_refusal_becomes_an_error_naming_the_memory_and_the_settings():
    """Compiled for one TPU v5e chip (16 GiB) by XLA's TPU compiler on this host: an 8 GiB input whose step keeps
    three times its size live is refused at compile time, with the temporaries it needs."""
    chip = SingleDeviceSharding(topologies.get_topology_desc("v5e:2x2", "tpu").devices[0])

    def step(x):
        y = jnp.sin(x)[None] * jnp.arange(3.0)[:, None, None]
        return (jnp.cumsum(y, axis=0) * y).sum(0)

    lowered = jax.jit(step).lower(jax.ShapeDtypeStruct((2**15, 2**16), jnp.float32, sharding=chip))
    with pytest.raises(StepDoesNotFitError, match=r"^the step needs 40\.00 GiB of temporaries, more than the") as e:
        compile_within_memory(lowered, "the step")
    assert "the compiler refused it" in str(e.value) and "--batch-size" in str(e.value)
    assert isinstance(e.value.__cause__, jax.errors.JaxRuntimeError)  # XLA's own message stays attached
