"""The license table and the check a student goes through before it is published.

.venv/bin/python -m pytest tests/test_licenses.py -q
"""

import pytest

from stillhouse.config import parse_config
from stillhouse.licenses import (
    LICENSES,
    LicenseError,
    check_licenses,
    check_pipeline_licenses,
    license_from_front_matter,
    preflight_licenses,
)


def test_every_license_quotes_the_clause_behind_each_duty():
    for terms in LICENSES.values():
        if terms.name_prefix:
            assert (
                terms.clauses["name_prefix"].text and terms.name_prefix.split()[0] in terms.clauses["name_prefix"].text
            )
        if terms.outputs_only_improve:
            assert "output" in terms.clauses["outputs"].text
        if not terms.commercial:
            assert terms.clauses["non_commercial"].text
        if terms.derivative_licenses is not None:
            assert terms.clauses["derivatives"].text
    assert {
        "apache-2.0",
        "mit",
        "llama3",
        "llama3.1",
        "llama3.2",
        "llama3.3",
        "gemma",
        "qwen",
        "qwen-research",
        "deepseek",
        "mrl",
        "cc-by-nc-4.0",
        "openrail",
        "openrail++",
    } <= set(LICENSES)


def test_permissive_teacher_and_base_model_let_the_student_pick_its_license():
    check = check_licenses(
        "mit", "alice/tiny", "apache-2.0", "apache-2.0", has_base_model=True, base_model_name="org/base"
    )
    assert check.ok
    assert check.obligations == [
        "The teacher is licensed under Apache License 2.0 (https://www.apache.org/licenses/LICENSE-2.0); "
        "the student was trained on its outputs.",
        "The base model org/base is licensed under Apache License 2.0 (https://www.apache.org/licenses/LICENSE-2.0).",
    ]


def test_a_llama_31_teacher_requires_the_name_prefix_even_for_outputs_only():
    broken = check_licenses(
        "apache-2.0",
        "alice/tiny-student",
        "llama3.1",
        None,
        has_base_model=False,
        teacher_name="meta-llama/Llama-3.1-8B",
    )
    assert len(broken.violations) == 1
    message = str(broken.violations[0])
    assert "must start with “Llama”" in message and "alice/Llama-tiny-student" in message
    assert "include “Llama” at the beginning of any such AI model name" in message  # the clause, quoted
    with pytest.raises(LicenseError, match="publish.license_override"):
        broken.enforce(None)

    fine = check_licenses("apache-2.0", "alice/llama-3.1-tiny-student", "llama3.1", None, has_base_model=False)
    assert fine.ok
    assert any(line.startswith("Built with Llama") for line in fine.obligations)
    assert any("https://www.llama.com/llama3_1/use-policy/" in line for line in fine.obligations)


def test_a_llama_base_model_must_keep_its_license():
    check = check_licenses("apache-2.0", "alice/Llama-tiny", "apache-2.0", "llama3.2", has_base_model=True)
    assert [v.clause.section for v in check.violations] == ["§1.b.i"]
    assert "must carry llama3.2" in check.violations[0].message
    assert check_licenses("llama3.2", "alice/Llama-tiny", "apache-2.0", "llama3.2", has_base_model=True).ok


def test_llama_3_outputs_may_only_improve_llama_3_models():
    scratch = check_licenses("llama3", "alice/Llama-3-tiny", "llama3", None, has_base_model=False)
    assert any("improve any other large language model" in str(v) for v in scratch.violations)
    assert check_licenses("llama3", "alice/Llama-3-tiny", "llama3", "llama3", has_base_model=True).ok


def test_a_gemma_teacher_makes_the_student_a_model_derivative():
    check = check_licenses("apache-2.0", "alice/tiny", "gemma", None, has_base_model=False)
    assert (
        "must carry gemma" in check.violations[0].message and "distillation methods" in check.violations[0].clause.text
    )
    passed_on = check_licenses("gemma", "alice/tiny", "gemma", None, has_base_model=False)
    assert passed_on.ok and any("prohibited_use_policy" in line for line in passed_on.obligations)


def test_non_commercial_terms_need_a_non_commercial_student():
    check = check_licenses("apache-2.0", "alice/tiny", "qwen-research", None, has_base_model=False)
    assert ["non-commercial" in v.message for v in check.violations] == [True]
    assert check_licenses("cc-by-nc-4.0", "alice/tiny", "mrl", None, has_base_model=False).ok


def test_unknown_licenses_stop_publishing():
    check = check_licenses("my-own-license", "alice/tiny", None, "wtfpl-9", has_base_model=True)
    messages = " | ".join(v.message for v in check.violations)
    assert "publish.license 'my-own-license' is not in" in messages
    assert "set publish.teacher_license" in messages and "publish.base_model_license 'wtfpl-9'" in messages
    check.enforce("we hold a written agreement with the teacher's authors")  # an override lets it through


def test_front_matter_license_and_license_name():
    assert license_from_front_matter("---\nlicense: Apache-2.0\n---\n# x\n") == "apache-2.0"
    assert license_from_front_matter("---\nlicense: other\nlicense_name: qwen-research\n---\n") == "qwen-research"
    assert license_from_front_matter("# no front matter\n") is None


def test_pipeline_ids_come_from_config_or_the_teacher_folder(pipeline_raw, tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text("{}")
    (teacher / "README.md").write_text("---\nlicense: llama3.1\n---\n")
    pipeline_raw["sample"]["teacher"] = str(teacher)
    pipeline_raw["publish"] = {"repo_id": "alice/tiny", "license": "apache-2.0"}
    config = parse_config(pipeline_raw)
    assert check_pipeline_licenses(config).teacher_license == "llama3.1"
    with pytest.raises(LicenseError, match="(?s)preflight: .*must start with “Llama”"):
        preflight_licenses(config)

    # Without a repo nothing leaves the machine: the folder's card records the duty instead.
    pipeline_raw["publish"] = {"repo_id": None}
    assert any("must start with “Llama”" in line for line in preflight_licenses(parse_config(pipeline_raw)).obligations)
    pipeline_raw["publish"] = {"repo_id": None, "license": "unknown-1.0"}
    assert not preflight_licenses(parse_config(pipeline_raw)).ok  # reported, not raised
    # The config's id wins over the README's.
    pipeline_raw["publish"] = {"repo_id": "alice/tiny", "teacher_license": "mit"}
    assert preflight_licenses(parse_config(pipeline_raw)).ok
