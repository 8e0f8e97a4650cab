"""The README's "Bring your own model and data" block, run as written: bash, the installed CLI, a fresh folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def walkthrough() -> str:
    section = README.read_text().split("## Bring your own model and data", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    return block


@pytest.mark.slow
def test_the_readme_walkthrough_runs_as_written(tmp_path):
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PREFECT_HOME": str(tmp_path / "p"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    completed = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", walkthrough()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    assert "mine.yaml: OK (mine" in completed.stdout
    assert "Registered: models:/mine-student@candidate (version 1)" in completed.stdout
    assert "Traceback" not in output and "\r" not in output
    assert (tmp_path / ".stillhouse" / "store" / "train").is_dir()
