"""Each benchmark case in a freshly spawned interpreter, so that compiler memory, caches and device state never
carry over from one case to the next, and a case's peak memory is its own.

Written on `multiprocessing.Process` and a pipe rather than a `multiprocessing.Pool`: a pool silently replaces a
worker the kernel's out-of-memory killer ended and then waits for its result forever, where here the lost case
is an error that says so. And since Python's default SIGTERM kills a process on the spot, leaving its spawned
case (perhaps half an hour into a compile) running as an orphan, SIGTERM raises SystemExit while cases run, and
the cases are stopped on the way out.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import traceback
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection


def _send_outcome(sending: Connection, fn: Callable, args: tuple) -> None:
    """The child's side: fn's value, or its exception as text (an exception need not survive pickling)."""
    try:
        outcome = (True, fn(*args))
    except BaseException as error:  # noqa: BLE001 - everything the case raised is reported in the parent
        outcome = (False, "".join(traceback.format_exception(error)))
    sending.send(outcome)


class _Case:
    """fn(*args) started in a spawned interpreter."""

    def __init__(self, fn: Callable, args: tuple) -> None:
        context = multiprocessing.get_context("spawn")
        self.name = getattr(fn, "__name__", repr(fn))
        self.receiving, sending = context.Pipe(duplex=False)
        self.process = context.Process(target=_send_outcome, args=(sending, fn, args), daemon=True)
        self.process.start()
        sending.close()  # only the child holds the sending end now, so its death ends the pipe

    def result(self):
        try:
            succeeded, value = self.receiving.recv()
        except EOFError:
            self.process.join()
            code = self.process.exitcode
            cause = " (SIGKILL: the out-of-memory killer, or a kill -9)" if code == -signal.SIGKILL else ""
            raise ChildProcessError(f"{self.name} ended without a result: exit code {code}{cause}") from None
        self.process.join()  # the case returns on its own (terminating it makes libtpu print a crash report)
        if not succeeded:
            raise ChildProcessError(f"{self.name} failed in its process:\n{value}")
        return value

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def in_fresh_processes(fn: Callable, argument_tuples: Sequence[tuple], jobs: int = 1) -> list:
    """fn(*arguments) for each tuple, each in its own newly spawned interpreter, `jobs` at a time, in order.

    Cases start in groups of `jobs` (put the longest first so that a group's cases end together)."""
    results = []
    with _sigterm_as_exit():
        for start in range(0, len(argument_tuples), jobs):
            group = []
            try:
                for args in argument_tuples[start : start + jobs]:
                    group.append(_Case(fn, tuple(args)))
                results += [case.result() for case in group]
            finally:
                for case in group:
                    case.stop()
    return results


def in_fresh_process(fn: Callable, *args):
    """fn(*args) in a newly spawned interpreter, so its memory neither counts here nor starts from ours."""
    return in_fresh_processes(fn, [args])[0]
