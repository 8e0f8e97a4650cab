"""One rank of a multi-process training stage; started by `launch_training` under torchrun.

    python -m stillhouse.training.agent --nproc-per-node 2 -m stillhouse.training.worker STAGE_FOLDER/launch.json

Global rank 0 writes ``result.json`` beside the spec; the launching process turns it into the manifest. A
rank that stops on an error a user can fix (a NaN loss, bad input) writes its message to ``error.txt``, so
the launching process can raise it instead of just torchrun's exit code.

torchrun starts each worker in a session of its own, so a kill of the launching process (a crashed or
cancelled stage, a kill -9) would leave the workers training on, writing into the folder a rerun resumes
from. Each worker therefore watches the launcher's process id and kills itself once it is gone; torchrun,
seeing its workers die, exits too.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from stillhouse.config import OpenAIEngineConfig, TrainConfig
from stillhouse.errors import StillhouseError
from stillhouse.refs import DatasetRef, SamplesRef
from stillhouse.store import write_json_atomic
from stillhouse.training.train import LAUNCHER_PID_ENV, STEP_FILE, run_training


def die_with_launcher(launcher_pid: int, every_s: float = 0.5) -> None:
    """Kill this process (SIGKILL, as the launcher was) once ``launcher_pid`` no longer runs; checked in a thread."""

    def watch() -> None:
        while True:
            try:
                os.kill(launcher_pid, 0)
            except ProcessLookupError:
                os.kill(os.getpid(), signal.SIGKILL)
            except PermissionError:  # alive, owned by someone else
                pass
            time.sleep(every_s)

    threading.Thread(target=watch, name="die-with-launcher", daemon=True).start()


def show_stillhouse_logs() -> None:
    """Print this package's INFO logs (a resume, dropped rows) to stderr, as the launching process's console does;
    a worker has no Prefect logging set up, and Python alone would print warnings only."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s.%(msecs)03d | %(levelname)-7s | %(name)s - %(message)s", datefmt="%H:%M:%S")
    )
    package = logging.getLogger("stillhouse")
    package.addHandler(handler)
    package.setLevel(logging.INFO)


def main(spec_path: str) -> None:
    show_stillhouse_logs()
    if os.environ.get(LAUNCHER_PID_ENV):
        die_with_launcher(int(os.environ[LAUNCHER_PID_ENV]))
    spec = json.loads(Path(spec_path).read_text())
    folder = Path(spec["folder"])
    endpoint = spec.get("teacher_endpoint")
    try:
        result = run_training(
            TrainConfig.model_validate(spec["config"]),
            DatasetRef.model_validate(spec["dataset"]),
            SamplesRef.model_validate(spec["samples"]),
            folder,
            teacher_endpoint=OpenAIEngineConfig.model_validate(endpoint) if endpoint else None,
            step_file=folder / STEP_FILE,
        )
    except StillhouseError as error:
        (folder / "error.txt").write_text(str(error))
        raise
    except KeyboardInterrupt:  # torchrun passed on a Ctrl-C or SIGTERM: the launching process says where it stopped
        sys.exit(130)
    if int(os.environ.get("RANK", "0")) == 0:  # the global rank 0 saved the student and counted its parameters
        write_json_atomic(folder / "result.json", result)
    # No rank ends before the result is written: another node's launcher reads it once its own workers are done
    # (torchrun's exit barrier would wait only 5 minutes for rank 0 to save a large student).
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
