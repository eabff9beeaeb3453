"""Terminal helpers of the command lines (``ianus``, ``ianus run``, ``ianus generate``): a console bound to
stdout and a context that sends the simulator's and the compiler's output to a log file.

Kept apart from :mod:`sim.cli` and :mod:`sim.run` so that both, and the runners below them, use them
without importing each other.
"""

from __future__ import annotations

import os
import sys

__all__ = ["Quiet", "console"]


class Quiet:
    """Send the simulator's and the compiler's stdout (and with ``stderr=True`` their stderr: Verilator's
    warnings) to a log file (the CLI prints its own summary)."""

    def __init__(self, log_path, stderr=False):
        self.log_path = log_path
        self.fds = (1, 2) if stderr else (1,)

    def __enter__(self):
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        self.log = open(self.log_path, "w")
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = [os.dup(fd) for fd in self.fds]
        for fd in self.fds:
            os.dup2(self.log.fileno(), fd)
        return self

    def __exit__(self, *exc):
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in zip(self.fds, self.saved, strict=True):
            os.dup2(saved, fd)
            os.close(saved)
        self.log.close()


def console():
    from rich.console import Console

    # Bound to this stdout: while simulations run, cocotb's runner prints go elsewhere (sim.run.run_rtl_jobs).
    return Console(file=sys.stdout, highlight=False, width=None if sys.stdout.isatty() else 150)
