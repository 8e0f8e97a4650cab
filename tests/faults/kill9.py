"""Start a Python snippet in a child process and SIGKILL it once the files it writes show it is under way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable


def run_then_kill(
    script: str, arguments: list[str], ready: Callable[[], bool], what: str, timeout_s: float = 180
) -> None:
    """Run ``python -c script arguments`` and kill -9 it as soon as ``ready()``; fail if it exits or stalls first."""
    child = subprocess.Popen(
        [sys.executable, "-c", script, *arguments],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not ready():
            assert child.poll() is None, f"{what} exited before the kill: {child.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, f"{what} made no progress in {timeout_s} s"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:  # also when an assertion failed: never leave the child running
        child.kill()
        child.wait()
        child.stderr.close()
