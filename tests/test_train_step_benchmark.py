"""benchmarks/train_step.py's concrete section end to end on the demo UNet: the trainer's step compiled and run,
its losses checked finite, and one timed row per remat setting printed as markdown."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_step_benchmark_runs_the_demo_step_and_prints_a_row_per_remat_setting():
    command = [sys.executable, "benchmarks/train_step.py", "--section", "demo", "--steps", "1"]
    env = os.environ | {"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'benchmarks'}"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line.strip("|").split("|") for line in result.stdout.splitlines() if line.startswith("| ")]
    header, rows = [cell.strip() for cell in table[0]], [[cell.strip() for cell in row] for row in table[1:]]
    values = [dict(zip(header, row, strict=True)) for row in rows]
    assert [v["remat"] for v in values] == ["nothing_saveable", "off"]
    for row in values:
        assert row["model"] == "demo" and float(row["s/step"]) > 0 and float(row["samples/s"]) > 0
        assert 0 < float(row["temp GiB"]) < 1
