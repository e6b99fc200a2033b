"""benchmarks/chip_step.py end to end on the demo UNet, on the CPU: the trainer's step set up on random weights,
compiled, run and timed, its row printed as markdown (on a GPU or TPU the same script gives the chip's figures)."""

import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_chip_step_times_the_trainers_step_on_random_weights():
    command = [sys.executable, "benchmarks/chip_step.py", "--model", "demo", "--pixels", "32", "--batch", "2"]
    command += ["--warmup", "1", "--steps", "2"]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("jax ") and "(cpu)" in result.stdout.splitlines()[0]
    table = [line.strip("|").split("|") for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 2  # the header and one case
    values = dict(zip([c.strip() for c in table[0]], [c.strip() for c in table[1]], strict=True))
    assert values["model"] == "demo" and values["batch"] == "2" and values["attention"] == "auto"
    milliseconds, samples_per_second = float(values["ms/step"]), float(values["samples/s"])
    assert milliseconds > 0 and math.isclose(samples_per_second, 2 / (milliseconds / 1e3), rel_tol=0.01)
    assert float(values["TFLOP"]) > 0 and 0 < float(values["MFU"].rstrip("%")) < 100
    assert math.isfinite(float(values["last loss"]))
