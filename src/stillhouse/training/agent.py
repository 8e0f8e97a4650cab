"""torchrun, quiet when stopped: the agent `launch_training` starts for a multi-process training stage.

    python -m stillhouse.training.agent --nproc-per-node 2 -m stillhouse.training.worker STAGE_FOLDER/launch.json

Its arguments are torchrun's. A stop is the launching process's to report ("train: interrupted at step N of M;
rerun to resume from checkpoint-K"): on SIGINT or SIGTERM torchrun passes the signal on to its workers, waits for
them and raises `SignalException`, whose traceback (and, on a second signal, a second one) would bury that line.
This exits with 128 + the signal's number instead.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main

if __name__ == "__main__":
    try:
        main()
    except SignalException as stop:
        sys.exit(128 + int(stop.sigval))
