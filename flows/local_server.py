"""The temporary Prefect server of one `stillhouse run`, started and stopped by the run itself.

Without PREFECT_API_URL, Prefect would start its own temporary server inside the run's process group: a
Ctrl-C in the terminal then killed that server first, and the run spent minutes retrying calls to it
(hundreds of `ConnectError` tracebacks) before it exited; a SIGTERM left the server orphaned. This one is
the same server (Prefect's API app under uvicorn, on sqlite in PREFECT_HOME), but in a session of its own,
so a signal to the run reaches the run only, which then stops the server on its way out. It starts while
the run imports and checks its inputs, so its start-up (8-15 s on a 2-core machine) mostly overlaps them.

    with temporary_prefect_server():     # sets PREFECT_API_URL unless it is set already
        distill(config)
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stillhouse.errors import StillhouseError

STARTUP_TIMEOUT_S = 120.0
SERVER_NICENESS = 10  # added to the run's nice value: the bookkeeping server yields the CPU to the run's work


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TemporaryServer:
    """A Prefect API on 127.0.0.1, in its own session; `wait` blocks until it answers, `stop` ends its process group."""

    def __init__(self) -> None:
        # Not `import prefect`: Prefect reads its settings (PREFECT_API_URL among them) once, when first imported,
        # and this runs before the URL is known.
        package = Path(importlib.util.find_spec("prefect").origin).parent
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        environment = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1"}
        environment.pop("PREFECT_API_URL", None)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(package.parent),
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # the terminal's Ctrl-C goes to the run, not to its server
        )

    def wait(self) -> str:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        self.yield_to_the_run()
                        return self.url
            except OSError:
                pass
            if self.process.poll() is not None:
                detail = (self.process.stderr.read() or b"").decode(errors="replace").strip().splitlines()[-3:]
                raise StillhouseError(
                    f"Prefect's temporary server exited at start-up ({' / '.join(detail)}); check "
                    "PREFECT_HOME's database, or point PREFECT_API_URL at a running server"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise StillhouseError(
                    f"Prefect's temporary server did not answer within {STARTUP_TIMEOUT_S:.0f} s; "
                    "point PREFECT_API_URL at a running server (prefect server start)"
                )
            time.sleep(0.2)

    def yield_to_the_run(self) -> None:
        """Lower the server's CPU priority (nice `SERVER_NICENESS`), once it has started.

        Idle, the server still polls its background-task queue (docket, every 250 ms) and holds about 15% of a
        core. On a 2-core machine that is enough to stall a 2-thread training step, whose threads wait for each
        other: the demo's training loop ran 1.5-1.6x faster with the server niced (400 steps, 2 alternating
        repeats). Each thread is reniced (Linux gives every thread its own nice value, and new threads inherit
        their creator's); the server still answers at once when a core is free. Best effort: not on every OS.
        """
        lower = min(19, os.getpriority(os.PRIO_PROCESS, 0) + SERVER_NICENESS)  # relative to the run's own
        with contextlib.suppress(OSError):
            for thread in os.listdir(f"/proc/{self.process.pid}/task"):
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PROCESS, int(thread), lower)

    def stop(self) -> None:
        """TERM the server's process group, KILL it after 5 s: nothing is left behind."""
        for sent, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, None)):
            if self.process.poll() is not None:
                break
            try:
                os.killpg(self.process.pid, sent)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        if self.process.stderr:
            self.process.stderr.close()


@contextmanager
def temporary_prefect_server(ready=None) -> Iterator[None]:
    """Serve Prefect's API for the block unless PREFECT_API_URL names one; ``ready()`` runs while it starts.

    PREFECT_API_URL names the server from the moment it is spawned (its port is chosen first), so ``ready`` may
    import Prefect, which reads its settings once, at import: the flow's imports then overlap the server's start-up
    instead of following it (2.5 s of a cached demo rerun's 10.7 s, measured with py-spy).
    """
    if os.environ.get("PREFECT_API_URL"):
        try:
            if ready is not None:
                ready()
            yield
        finally:
            drain_prefect_workers()  # logs and events for the user's server leave before this returns
        return
    home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    home_existed = home.exists()
    server = TemporaryServer()
    os.environ["PREFECT_API_URL"] = server.url
    try:
        if ready is not None:
            try:
                ready()  # imports and checks overlap the server's start-up
            except BaseException:
                # A run refused by its checks leaves nothing behind, not even the database the server began to
                # create (only a PREFECT_HOME this start made: an existing one may hold other runs).
                server.stop()
                if not home_existed:
                    shutil.rmtree(home, ignore_errors=True)
                raise
        server.wait()
        yield
    finally:
        drain_prefect_workers()  # while the server still answers: else they retry against a dead one at exit
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def drain_prefect_workers(timeout_s: float = 5.0) -> None:
    """Send the logs and events Prefect's background workers still hold (nothing to do if Prefect never loaded)."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        # Best effort: a lost log line is better than a run that won't exit.
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout_s)
