"""Store faults: two runs of one config at once, a read-only store, a full disk.

Each run is a real child process. The read-only case runs its writer without root's power to
ignore permission bits when the tests run as root (otherwise chmod alone would prove nothing);
the full disk is RLIMIT_FSIZE with SIGXFSZ ignored, so a write past the limit fails with EFBIG
exactly where a full disk fails with ENOSPC.
"""

import ctypes
import json
import os
import subprocess
import sys

import pytest

from stillhouse.config import CurateConfig, SampleConfig
from stillhouse.data.curate import curate
from stillhouse.sampling.teacher_outputs import read_teacher_outputs
from stillhouse.store import MANIFEST, Store, file_sha256

pytestmark = pytest.mark.slow
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2  # <linux/prctl.h>, <linux/capability.h>

# One "pipeline run" of curate -> sample in its own process; prints which stages it reused.
RUN = """
import json, logging, os, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
logging.basicConfig(level=logging.WARNING)
from stillhouse.config import CurateConfig, SampleConfig
from stillhouse.data.curate import curate
from stillhouse.sampling.sample import sample_teacher
from stillhouse.store import Store
curate_config, sample_config, root, go = sys.argv[1:5]
print("ready", flush=True)
while not Path(go).exists():  # both runs start their stages at the same moment
    time.sleep(0.01)
store = Store(root)
dataset = curate(CurateConfig.model_validate_json(Path(curate_config).read_text()), store)
samples = sample_teacher(SampleConfig.model_validate_json(Path(sample_config).read_text()), dataset, store)
print(
    json.dumps({"curate": dataset.cached, "sample": samples.cached, "rows": samples.rows, "path": samples.path}),
    flush=True,
)
"""

# Curate (and optionally sample) into a store, with a file-size limit applied just before the failing stage.
WRITE = """
import json, os, resource, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from stillhouse.config import CurateConfig, SampleConfig
from stillhouse.data.curate import curate
from stillhouse.errors import StillhouseError
from stillhouse.sampling.sample import sample_teacher
from stillhouse.store import Store
curate_config, sample_config, root, size_limit = sys.argv[1:5]
store = Store(root)
try:
    dataset = curate(CurateConfig.model_validate_json(Path(curate_config).read_text()), store)
    if sample_config != "-":
        if int(size_limit):
            # the write then fails with EFBIG instead of killing the process
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(size_limit), int(size_limit)))
        sample_teacher(SampleConfig.model_validate_json(Path(sample_config).read_text()), dataset, store)
except StillhouseError as error:
    print("error: " + str(error), file=sys.stderr)
    sys.exit(2)
"""


def error_line(stderr: str) -> str:
    return next((line for line in stderr.splitlines() if line.startswith("error: ")), stderr[-3000:])


def child_env(**extra) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", **extra}


@pytest.fixture
def configs(tmp_path, tiny_teacher, prompts_jsonl):
    """Curate + sample configs as files; sampling is slowed (one prompt per batch, 12 shards) so two runs overlap."""
    curate_path, sample_path = tmp_path / "curate.json", tmp_path / "sample.json"
    curate_path.write_text(CurateConfig(source=str(prompts_jsonl)).model_dump_json())
    sample_path.write_text(
        SampleConfig(
            teacher=str(tiny_teacher),
            max_new_tokens=8,
            temperature=1.0,
            seed=2,
            top_k_logprobs=3,
            shard_rows=10,
            batch_size=1,
        ).model_dump_json()
    )
    return curate_path, sample_path


def test_two_runs_of_one_config_at_once_compute_each_stage_once_and_the_other_reuses_it(tmp_path, configs):
    root, go = tmp_path / "store", tmp_path / "go"
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", RUN, *map(str, configs), str(root), str(go)],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for run in runs:
            assert run.stdout.readline().strip() == "ready", run.stderr.read()[-2000:]
        go.touch()
        outputs = [run.communicate(timeout=300) for run in runs]
    finally:
        for run in runs:
            run.kill()
            run.wait()
    for run, (_, stderr) in zip(runs, outputs):
        assert run.returncode == 0, stderr[-3000:]
    reports = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]
    for stage in ("curate", "sample"):
        assert sorted(report[stage] for report in reports) == [False, True], (
            f"{stage}: exactly one run computes it, the other reuses it"
        )
    assert any("waiting for it to finish" in stderr for _, stderr in outputs), "the second run waited for the first"

    (sample_folder,) = list((root / "sample").iterdir())
    manifest = json.loads((sample_folder / MANIFEST).read_text())
    assert {shard["name"]: shard["sha256"] for shard in manifest["shards"]} == {
        path.name: file_sha256(path) for path in sample_folder.glob("shard-*.parquet")
    }
    rows = read_teacher_outputs(sample_folder)
    assert (
        len(rows) == reports[0]["rows"] == reports[1]["rows"] == 120
        and not rows.duplicated(["prompt_id", "sample_index"]).any()
    )
    assert not list(sample_folder.glob(".*")), "no temporary shard left behind"


def test_a_full_disk_during_sampling_names_the_folder_and_marks_nothing_complete(tmp_path, configs):
    root = tmp_path / "store"
    failed = subprocess.run(
        [sys.executable, "-c", WRITE, *map(str, configs), str(root), "1500"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert failed.returncode == 2, failed.stderr[-3000:]
    message = error_line(failed.stderr)
    (sample_folder,) = (root / "sample").iterdir()
    assert f"cannot write the store output {sample_folder}/shard-" in message and "File too large" in message
    assert "Free space or make" in message and "nothing was marked complete" in message
    assert not (sample_folder / MANIFEST).exists() and not list(sample_folder.glob("shard-*.parquet"))

    # Space again: the rerun completes, and only then is the output marked complete.
    rerun = subprocess.run(
        [sys.executable, "-c", WRITE, *map(str, configs), str(root), "0"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (sample_folder / MANIFEST).exists() and len(read_teacher_outputs(sample_folder)) == 120


def drop_root_override() -> None:
    """In the child, before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set.

    Root then obeys permission bits like any user (a read-only folder stays read-only for it), while
    it can still read its own files (the interpreter under /root). A capability dropped from the
    bounding set never comes back, also not across exec.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def run_without_write_permission(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        command,
        env=child_env(),
        preexec_fn=drop_root_override if os.geteuid() == 0 else None,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_read_only_store_still_serves_completed_outputs_and_refuses_new_ones_naming_the_path(tmp_path, prompts_jsonl):
    root = tmp_path / "store"
    done, new = CurateConfig(source=str(prompts_jsonl)), CurateConfig(source=str(prompts_jsonl), eval_fraction=0.3)
    completed = curate(done, Store(root))
    configs = {}
    for name, config in (("done", done), ("new", new)):
        configs[name] = tmp_path / f"{name}.json"
        configs[name].write_text(config.model_dump_json())
    for path in [root, *root.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    before = sorted(str(path) for path in root.rglob("*"))
    try:
        reused = run_without_write_permission([sys.executable, "-c", WRITE, str(configs["done"]), "-", str(root), "0"])
        assert reused.returncode == 0, reused.stderr[-3000:]
        refused = run_without_write_permission([sys.executable, "-c", WRITE, str(configs["new"]), "-", str(root), "0"])
    finally:
        for path in [root, *root.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert refused.returncode == 2, refused.stderr[-3000:]
    message = error_line(refused.stderr)
    assert f"cannot write the store output {root}/curate/" in message and "Permission denied" in message
    assert f"make {root} writable for this user" in message and "set `store:`" in message
    assert sorted(str(path) for path in root.rglob("*")) == before, "nothing was written, nothing lost"
    assert Store(root).manifest("curate", completed.fingerprint) is not None


def test_a_damaged_output_in_a_read_only_store_is_refused_naming_it_never_reused(tmp_path, prompts_jsonl):
    root = tmp_path / "store"
    config = CurateConfig(source=str(prompts_jsonl))
    completed = curate(config, Store(root))
    (tmp_path / "curate.json").write_text(config.model_dump_json())
    damaged = root / "curate" / completed.fingerprint / "train.parquet"
    content = bytearray(damaged.read_bytes())
    content[len(content) // 2] ^= 0xFF
    damaged.write_bytes(bytes(content))
    for path in [root, *root.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    before = {str(path): path.stat().st_mtime_ns for path in root.rglob("*")}
    try:
        refused = run_without_write_permission(
            [sys.executable, "-c", WRITE, str(tmp_path / "curate.json"), "-", str(root), "0"]
        )
    finally:
        for path in [root, *root.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert refused.returncode == 2, refused.stderr[-3000:]
    message = error_line(refused.stderr)
    assert f"cannot write the store output {root}/curate/{completed.fingerprint}" in message
    assert "Permission denied" in message and f"make {root} writable for this user" in message
    assert "Traceback" not in refused.stderr
    assert f"{root}/curate/{completed.fingerprint} is invalid (train.parquet: sha256" in refused.stderr
    assert {str(path): path.stat().st_mtime_ns for path in root.rglob("*")} == before, "nothing moved or written"
