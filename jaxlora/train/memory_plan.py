"""Whether the compiled train step fits its device, known before the first step runs.

XLA plans a program's memory when it compiles it: the buffers of its arguments, outputs and temporaries. The
trainer reads that plan and the device's free memory, and stops with a clear error naming the settings that would
make the step fit, instead of an allocator failure in the first step (a GPU) or the compiler's bare
RESOURCE_EXHAUSTED (XLA:TPU refuses a program that cannot fit its chip at compile time). On a device that reports
no memory figures (the CPU) the plan is still reported and nothing is checked."""

from __future__ import annotations

import re
from dataclasses import dataclass

import jax

GIB = 2**30

# XLA:TPU's refusal of a program larger than the chip's HBM, e.g. "Ran out of memory on HBM, the total memory
# required for HLO temporaries (40.00G) exceeds available HBM (15.75G)."
_COMPILER_REFUSAL = re.compile(r"HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)")

ADVICE = (
    "lower --batch-size (--grad-accumulation-steps keeps the effective batch), keep --gradient-checkpointing on "
    "(--checkpoint-depth 1 keeps the least), turn on --offloading, or store the base in 8 bits "
    "(--base-quantization int8)"
)


class StepDoesNotFitError(ValueError):
    """The train step needs more device memory than the device has free; the message says how much and what to
    change. A ValueError: the settings, not the data or the code, are what must change."""


@dataclass(frozen=True)
class StepMemory:
    """XLA's memory plan of one compiled step on one device, in bytes. The arguments (weights, adapter, optimizer
    state, the batch's data) are on the device before the step runs; the step allocates its outputs, less those
    written into donated arguments, and its temporaries."""

    arguments: int
    outputs: int
    aliased: int  # outputs written into donated arguments' buffers
    temporaries: int

    @property
    def allocated_by_step(self) -> int:
        return self.outputs - self.aliased + self.temporaries

    @property
    def total(self) -> int:
        return self.arguments + self.allocated_by_step

    @classmethod
    def of(cls, compiled: jax.stages.Compiled) -> StepMemory | None:
        """The plan of a compiled program; None where the backend gives no memory analysis."""
        try:
            analysis = compiled.memory_analysis()
        except NotImplementedError:
            return None
        if analysis is None:
            return None
        return cls(
            arguments=analysis.argument_size_in_bytes,
            outputs=analysis.output_size_in_bytes,
            aliased=analysis.alias_size_in_bytes,
            temporaries=analysis.temp_size_in_bytes,
        )


@dataclass(frozen=True)
class DeviceMemory:
    """A device's memory as its allocator reports it, in bytes: what it may use in all, and what is in use now
    (the weights, adapter, optimizer state and data already placed there)."""

    limit: int
    in_use: int

    @property
    def free(self) -> int:
        return self.limit - self.in_use

    @classmethod
    def of(cls, device: jax.Device) -> DeviceMemory | None:
        """None where the device reports no memory figures (XLA's CPU client)."""
        stats = device.memory_stats() or {}
        if "bytes_limit" not in stats:
            return None
        return cls(limit=stats["bytes_limit"], in_use=stats.get("bytes_in_use", 0))


def check_step_fits(plan: StepMemory | None, device: DeviceMemory | None, what: str) -> str:
    """A line describing the step's memory on its device; raises StepDoesNotFitError when the memory the step
    allocates when it runs exceeds what the device has free. `what` names the step (its latent shape, its batch)."""
    if plan is None:
        return f"{what}: the backend gives no memory plan"
    line = (
        f"{what} needs {plan.total / GIB:.2f} GiB per device ({plan.arguments / GIB:.2f} GiB of inputs, "
        f"{plan.allocated_by_step / GIB:.2f} GiB allocated while it runs)"
    )
    if device is None:
        return line
    if plan.allocated_by_step > device.free:
        raise StepDoesNotFitError(
            f"{line}, but the device has {device.free / GIB:.2f} GiB free of {device.limit / GIB:.2f} GiB: "
            f"the step would run out of memory. To fit it, {ADVICE}"
        )
    return f"{line}; {device.free / GIB:.2f} GiB of {device.limit / GIB:.2f} GiB free"


def compile_within_memory(lowered: jax.stages.Lowered, what: str) -> jax.stages.Compiled:
    """`lowered.compile()`, with XLA:TPU's refusal of a program too large for the chip turned into a
    StepDoesNotFitError that names the step, the memory it needs and the settings that shrink it."""
    try:
        return lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        refusal = _COMPILER_REFUSAL.search(str(error))
        if refusal is None:
            raise
        needed, available = refusal.groups()
        raise StepDoesNotFitError(
            f"{what} needs {needed} GiB of temporaries, more than the {available} GiB the device has: the "
            f"compiler refused it. To fit it, {ADVICE}"
        ) from error
