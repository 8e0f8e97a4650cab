"""Ctrl-C and SIGTERM during training, as a user sends them to a real `stillhouse run`.

The run is a child in its own session; Ctrl-C is SIGINT to its whole process group (what a terminal sends), SIGTERM
goes to the process (what `kill`, a pod's eviction or systemd send). Either way it must:
- exit within 10 s, with one line saying where it stopped and which checkpoint a rerun resumes from,
- mark the MLflow run KILLED (not FAILED, not left RUNNING),
- leave no process behind (the run's temporary Prefect server included),
- and the rerun resumes from that checkpoint, says so, and warns about nothing (no "missing keys").
"""

from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

REPO = Path(__file__).parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.integration]


def processes_with(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker`` (this test's PREFECT_HOME): what a run could leave behind."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def as_at_a_terminal() -> None:
    """In the child before it starts: SIGINT handled by default, as in a terminal's foreground job. A suite started in
    the background by a shell without job control (`make test &` in a script) passes SIGINT down as ignored, and
    Python then never turns it into KeyboardInterrupt: the run would finish instead of stopping."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupted_run_stops_fast_says_where_and_the_rerun_resumes(how, tmp_path):
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    config.update(
        store=str(tmp_path / "store"), tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": how}
    )
    config["curate"].update(demo_rows=400, eval_fraction=0.1)
    config["train"].update(max_steps=200, save_steps=20, logging_steps=10)
    config["evaluate"].update(latency_prompts=1)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "stillhouse.flows.cli", "run", str(path)]

    with open(tmp_path / "err.txt", "w") as errors:
        run = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=errors,
            start_new_session=True,
            preexec_fn=as_at_a_terminal,
        )
        try:
            deadline = time.monotonic() + 600
            while not glob.glob(str(tmp_path / "store" / "train" / "*" / "checkpoints" / "checkpoint-40")):
                assert run.poll() is None, (tmp_path / "err.txt").read_text()[-3000:]
                assert time.monotonic() < deadline, "training never reached its second checkpoint"
                time.sleep(0.2)
            sent = time.monotonic()
            if how == "ctrl-c":
                os.killpg(run.pid, signal.SIGINT)
            else:
                os.kill(run.pid, signal.SIGTERM)
            code = run.wait(timeout=60)
            seconds = time.monotonic() - sent
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
    stderr = (tmp_path / "err.txt").read_text()
    assert code == 130, stderr[-3000:]
    assert seconds < 10, f"took {seconds:.1f} s to exit"
    last = stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"train: interrupted at step (\d+) of 200; rerun to resume from (checkpoint-\d+)", last)
    assert match, last
    assert "Traceback" not in stderr and "ConnectError" not in stderr
    time.sleep(1)
    assert processes_with(str(home)) == [], "a process of the run (its Prefect server?) outlived it"

    client = MlflowClient(config["tracking"]["uri"])
    runs = {
        r.info.run_name: r.info.status for r in client.search_runs([client.get_experiment_by_name(how).experiment_id])
    }
    assert runs == {
        "demo · sft": "KILLED",
        "curate · sft": "FINISHED",
        "sample · sft": "FINISHED",
        "train · sft": "KILLED",
    }

    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode in (0, 3), output[-3000:]  # 3: trained well below the teacher, the gate keeps it back
    assert f"train: resuming from {match.group(2)} (of 200 steps)" in output
    assert "missing keys" not in output and "Traceback" not in output
