"""The bundled demo: verifiable instruction tasks and a tiny teacher trained on them.

It plugs into the core as `builtin:demo` (a source) and `builtin:demo-teacher` (a model), through the
entry points in pyproject.toml; the core never imports it.
"""

from pathlib import Path

TEACHER_DIR = Path(__file__).parent / "teacher"


def teacher_folder() -> Path:
    """The bundled teacher's folder (`builtin:demo-teacher`)."""
    from stillhouse.errors import InputError

    if not (TEACHER_DIR / "config.json").is_file():
        raise InputError(
            f"the bundled demo teacher is missing at {TEACHER_DIR}; run `python -m stillhouse.demo.train_teacher`"
        )
    return TEACHER_DIR
