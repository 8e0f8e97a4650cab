"""The content-addressed store: stable fingerprints, reuse of complete outputs, redo of incomplete ones."""

import json
import os

import pytest

from stillhouse.config import EvaluateConfig
from stillhouse.store import MANIFEST, Store, fingerprint


def test_fingerprint_is_stable_and_sensitive_to_config_inputs_and_code():
    base = fingerprint("train", EvaluateConfig(), {"samples": "abc"}, 1)
    assert base == fingerprint("train", EvaluateConfig(), {"samples": "abc"}, 1)
    assert base != fingerprint("train", EvaluateConfig(max_new_tokens=3), {"samples": "abc"}, 1)
    assert base != fingerprint("train", EvaluateConfig(), {"samples": "abd"}, 1)
    assert base != fingerprint("train", EvaluateConfig(), {"samples": "abc"}, 2)
    assert base != fingerprint("evaluate", EvaluateConfig(), {"samples": "abc"}, 1)


def test_build_reuses_a_completed_output(tmp_path):
    store, calls = Store(tmp_path), []

    def compute(folder):
        calls.append(folder)
        (folder / "data.txt").write_text("hello")
        return {"rows": 1}

    first = store.build("curate", "f1", compute)
    second = store.build("curate", "f1", compute)
    assert (first.cached, second.cached) == (False, True)
    assert len(calls) == 1
    assert second.manifest["rows"] == 1 and second.manifest["fingerprint"] == "f1"
    assert (tmp_path / "curate" / "f1" / "data.txt").read_text() == "hello"


def test_a_failed_compute_leaves_no_manifest_and_is_redone(tmp_path):
    store = Store(tmp_path)

    def failing(folder):
        (folder / "partial.txt").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        store.build("sample", "f2", failing)
    assert not (tmp_path / "sample" / "f2" / MANIFEST).exists()
    assert store.manifest("sample", "f2") is None
    redone = store.build("sample", "f2", lambda folder: {"ok": True})
    assert not redone.cached
    assert json.loads((tmp_path / "sample" / "f2" / MANIFEST).read_text())["ok"] is True


def test_editing_the_teachers_chat_template_changes_the_sample_fingerprint(tmp_path, tiny_teacher, prompts_jsonl):
    """The template decides what the teacher sees: samples made with the old one must not be reused."""
    import shutil

    from stillhouse.config import CurateConfig, SampleConfig
    from stillhouse.data.curate import curate
    from stillhouse.models import model_revision
    from stillhouse.sampling.sample import sample_teacher

    teacher = shutil.copytree(tiny_teacher, tmp_path / "teacher")
    store = Store(tmp_path / "store")
    dataset = curate(CurateConfig(source=str(prompts_jsonl)), store)
    config = SampleConfig(teacher=str(teacher), max_new_tokens=4, top_k_logprobs=2, batch_size=64)
    before = sample_teacher(config, dataset, store)
    template = teacher / "chat_template.jinja"
    assert template.is_file()
    template.write_text(template.read_text().replace("<|user|>", "<|user|> "))
    after = sample_teacher(config, dataset, store)
    assert after.fingerprint != before.fingerprint and not after.cached
    assert after.teacher_revision != before.teacher_revision

    # Documentation is not read by loading, so it changes nothing.
    revision = model_revision(str(teacher), None)
    (teacher / "README.md").write_text("---\nlicense: apache-2.0\n---\n# edited card\n")
    (teacher / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    assert model_revision(str(teacher), None) == revision
    for name in ("tokenizer_config.json", "generation_config.json"):
        (teacher / name).write_text((teacher / name).read_text() + " ")
        assert model_revision(str(teacher), None) != revision
        revision = model_revision(str(teacher), None)


def test_a_large_teacher_file_is_hashed_once_across_runs_and_again_when_its_content_changes(tmp_path):
    """Each run is a new process: large weights hash once per content (their digest is kept in a cache file),
    and a rewrite that keeps size and modification time (``cp -p``, ``touch -d``) still changes the revision."""
    import subprocess
    import sys

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text('{"model_type": "llama"}')
    weights = teacher / "model.safetensors"
    weights.write_bytes(b"\x01" * (1 << 20))
    cache = tmp_path / "hashes.json"
    # Files from 1 MiB count as large here; each child reports the revision and how many files it hashed.
    probe = (
        "import sys, stillhouse.models as m, stillhouse.store as s\n"
        "m.HASH_CACHE_MIN_BYTES = 1 << 20\n"
        "hashed = []\n"
        "real = s.file_sha256\n"
        "m.file_sha256 = lambda path: hashed.append(path.name) or real(path)\n"
        "print(m.model_revision(sys.argv[1], None), ','.join(sorted(hashed)))\n"
    )

    def run() -> tuple[str, str]:
        env = {**os.environ, "STILLHOUSE_HASH_CACHE": str(cache)}
        output = subprocess.run(
            [sys.executable, "-c", probe, str(teacher)], capture_output=True, text=True, env=env, check=True
        ).stdout.split()
        return output[0], (output[1] if len(output) > 1 else "")

    first, hashed = run()
    assert hashed == "config.json,model.safetensors" and cache.is_file()
    again, hashed = run()
    assert again == first and hashed == "config.json", "the weights' digest comes from the cache"

    status = weights.stat()
    weights.write_bytes(b"\x02" * (1 << 20))  # same size, then the old modification time put back
    os.utime(weights, ns=(status.st_atime_ns, status.st_mtime_ns))
    changed, hashed = run()
    assert changed != first and hashed == "config.json,model.safetensors"

    cache.write_text("{not json")  # a damaged cache is ignored and rewritten, never an error
    assert run()[0] == changed and json.loads(cache.read_text())
