"""One rank of a multi-process training stage; started by `launch_training` under torchrun.

    python -m torch.distributed.run --nproc_per_node 2 -m stillhouse.training.worker STAGE_FOLDER/launch.json

Rank 0 writes ``result.json`` beside the spec; the launching process turns it into the manifest. A
rank that stops on an error a user can fix (a NaN loss, bad input) writes its message to
``error.txt``, so the launching process can raise it instead of just torchrun's exit code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from stillhouse.config import TrainConfig
from stillhouse.errors import StillhouseError
from stillhouse.refs import DatasetRef, SamplesRef
from stillhouse.store import write_json_atomic
from stillhouse.training.train import run_training


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    folder = Path(spec["folder"])
    try:
        result = run_training(
            TrainConfig.model_validate(spec["config"]),
            DatasetRef.model_validate(spec["dataset"]),
            SamplesRef.model_validate(spec["samples"]),
            folder,
        )
    except StillhouseError as error:
        (folder / "error.txt").write_text(str(error))
        raise
    if result["parameters"]:  # only rank 0 saves the student and counts its parameters
        write_json_atomic(folder / "result.json", result)


if __name__ == "__main__":
    main(sys.argv[1])
