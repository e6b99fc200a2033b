"""benchmarks/tpu_aot.py end to end on a two-block Flux: the trainer's step compiled for a TPU v5e chip by XLA's TPU
compiler on this CPU-only host, and its per-chip figures printed as a markdown row."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# XLA's attention in the default set; the splash kernels take XLA:TPU about a minute more to compile
@pytest.mark.parametrize("attention", ["xla", pytest.param("splash", marks=pytest.mark.slow)])
def test_tpu_aot_compiles_the_step_for_a_tpu_chip_and_prints_its_memory(attention):
    command = [sys.executable, "benchmarks/tpu_aot.py", "--model", "tiny-flux", "--pixels", "256", "--chip", "v5e"]
    command += ["--attention", attention]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line.strip("|").split("|") for line in result.stdout.splitlines() if line.startswith("| ")]
    header, row = [cell.strip() for cell in table[0]], [cell.strip() for cell in table[1]]
    values = dict(zip(header, row, strict=True))
    assert values["model"] == "tiny-flux" and values["chip"] == "v5e" and values["base"] == "bf16"
    assert values["attention"] == attention
    args, temp, total = (float(values[name]) for name in ("args GiB", "temp GiB", "total GiB"))
    assert 0 < args < total and 0 < temp < total and values["fits"] == "yes"
    assert float(values["TFLOP"]) > 0 and float(values["bound ms"]) > 0 and float(values["compile s"]) > 0
