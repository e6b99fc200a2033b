"""benchmarks/fresh_process.py: each benchmark case runs in a spawned interpreter. A case's value or error comes
back; a case the kernel kills (the out-of-memory killer) is an error, not a wait forever; a benchmark stopped
with SIGTERM takes its running case with it, not leaving a compile running orphaned for half an hour."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The benchmark helper is imported under the main guard, so that the spawned interpreter, which re-imports this
# file to find the case, starts in a moment.
SCRIPT = """
import os, signal, sys, time

def write_pid_and_sleep(path):
    with open(path + ".tmp", "w") as file:
        file.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(300)

def killed():
    os.kill(os.getpid(), signal.SIGKILL)

def fails():
    raise ValueError("the case's own error")

def squares(n):
    return [i * i for i in range(n)]

if __name__ == "__main__":
    sys.path.insert(0, sys.argv[1])
    from fresh_process import in_fresh_process, in_fresh_processes
    case = sys.argv[2]
    try:
        if case == "sleep":
            in_fresh_process(write_pid_and_sleep, sys.argv[3])
        elif case == "values":
            print(in_fresh_processes(squares, [(2,), (3,), (4,)], jobs=2))
        else:
            in_fresh_process(killed if case == "killed" else fails)
    except ChildProcessError as error:
        print(f"{type(error).__name__}: {error}")
"""


def run_script(tmp_path: Path, *arguments: str) -> subprocess.Popen:
    script, stderr = tmp_path / "benchmark.py", tmp_path / "stderr"
    script.write_text(SCRIPT)
    command = [sys.executable, str(script), str(ROOT / "benchmarks"), *arguments]
    with stderr.open("w") as errors:  # a file, not a pipe: an orphaned case would hold a pipe open
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True)


def output_of(tmp_path: Path, *arguments: str) -> str:
    benchmark = run_script(tmp_path, *arguments)
    stdout, _ = benchmark.communicate(timeout=120)
    assert benchmark.returncode == 0, (tmp_path / "stderr").read_text()[-2000:]
    return stdout


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


def test_values_come_back_in_order_from_cases_run_side_by_side(tmp_path):
    assert output_of(tmp_path, "values").strip() == "[[0, 1], [0, 1, 4], [0, 1, 4, 9]]"


def test_a_case_killed_by_the_kernel_is_an_error_not_a_wait(tmp_path):
    assert (
        output_of(tmp_path, "killed")
        .strip()
        .startswith("ChildProcessError: killed ended without a result: exit code -9 (SIGKILL: the out-of-memory killer")
    )


def test_a_case_that_raises_reports_its_traceback(tmp_path):
    stdout = output_of(tmp_path, "fails")
    assert stdout.startswith("ChildProcessError: fails failed in its process:")
    assert "ValueError: the case's own error" in stdout and "in fails" in stdout


def test_sigterm_to_a_benchmark_ends_its_spawned_case(tmp_path):
    pid_file = tmp_path / "case.pid"
    benchmark = run_script(tmp_path, "sleep", str(pid_file))
    try:
        assert wait_until(pid_file.exists, 120), "the spawned case never started"
        case_pid = int(pid_file.read_text())
        assert running(case_pid)
        benchmark.send_signal(signal.SIGTERM)
        assert benchmark.wait(timeout=60) == 128 + signal.SIGTERM, (tmp_path / "stderr").read_text()[-2000:]
        assert wait_until(lambda: not running(case_pid), 30), f"the case (pid {case_pid}) outlived the benchmark"
    finally:
        benchmark.kill()
        if pid_file.exists() and running(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
