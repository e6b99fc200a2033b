"""The benchmarks run each case in a spawned process (`load_and_forward.in_fresh_process`); a benchmark stopped
with SIGTERM must take its running case with it, not leave a compile running orphaned for half an hour."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The case only writes its process id and sleeps; the benchmark helpers are imported under the main guard so that
# the spawned interpreter, which re-imports this file, starts in a moment.
SCRIPT = """
import os, sys, time

def case(path):
    with open(path + ".tmp", "w") as file:
        file.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(300)

if __name__ == "__main__":
    sys.path.insert(0, sys.argv[1])
    from load_and_forward import in_fresh_process
    in_fresh_process(case, sys.argv[2])
"""


def running(pid: int) -> bool:
    """Whether the process exists and is not a zombie waiting to be reaped."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_sigterm_to_a_benchmark_ends_its_spawned_case(tmp_path):
    script, pid_file = tmp_path / "benchmark.py", tmp_path / "case.pid"
    script.write_text(SCRIPT)
    command = [sys.executable, str(script), str(ROOT / "benchmarks"), str(pid_file)]
    stderr = tmp_path / "stderr"  # a file, not a pipe: an orphaned case would hold a pipe open
    with stderr.open("w") as errors:
        benchmark = subprocess.Popen(command, env=os.environ | {"PYTHONPATH": str(ROOT)}, stderr=errors)
    try:
        assert wait_until(pid_file.exists, 120), "the spawned case never started"
        case_pid = int(pid_file.read_text())
        assert running(case_pid)
        benchmark.send_signal(signal.SIGTERM)
        assert benchmark.wait(timeout=60) == 128 + signal.SIGTERM, stderr.read_text()[-2000:]
        assert wait_until(lambda: not running(case_pid), 30), f"the case (pid {case_pid}) outlived the benchmark"
    finally:
        benchmark.kill()
        if pid_file.exists() and running(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
