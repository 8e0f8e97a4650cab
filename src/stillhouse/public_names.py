"""What a published card and ``stillhouse.json`` call the teacher, the base model and the data: public names,
never the local paths they were read from.

A run reads its models and data from wherever the user keeps them (``/home/alice/models/teacher``). Those
paths name nothing to a reader of the Hub page, and they give away the machine's layout and the user's
name. So each of the three has a public name:

- ``publish.teacher_name``, ``publish.base_model_name``, ``publish.dataset_names`` when set;
- else the config's own value when it is public: a Hub id (``Qwen/Qwen2.5-1.5B-Instruct``), a served model's
  name, or a ``builtin:`` model or source (the project's demo);
- else (a local path) nothing public is known: `check_public_names` refuses a push (``publish.repo_id``)
  before the run starts, naming the field to set, and a folder written only locally shows the folder's
  own name with "(local)", never its path.

Right before a push, `private_lines` reads the final card and ``stillhouse.json`` once more for an
absolute local path, the home folder or the user's login name.

    names = public_names(config)         # names.teacher, names.base_model, names.datasets
    check_public_names(config)           # InputError naming publish.teacher_name & co. when a push would leak
    private_lines(card_text, allowed=[config.publish.repo_id, *names.given])
"""

from __future__ import annotations

import getpass
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from stillhouse.builtins import is_builtin
from stillhouse.errors import InputError

if TYPE_CHECKING:
    from stillhouse.config import PipelineConfig

# The project's own demo, public by construction: what the card calls it.
BUILTIN_NAMES = {
    "builtin:demo-teacher": "the Stillhouse demo teacher (builtin:demo-teacher)",
    "builtin:demo": "the Stillhouse demo task (builtin:demo)",
}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# An absolute path in text: a `/` that starts a word (not one inside a URL or an `org/name` id), then at least two
# segments: `/home/alice/x`, `"/tmp/run/teacher"`. A local sqlite or file URI: `sqlite:////abs`, `file:///abs`.
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~%@+#?&-])/[\w.@+~-]+/[\w.@+~/-]*|sqlite:////[\w.~-]|file:///[\w.~-]")
# Login names that say nothing about a person (containers, CI runners, cloud images): never searched for.
GENERIC_USERS = frozenset(
    {"root", "user", "users", "admin", "administrator", "ubuntu", "debian", "ec2-user", "runner", "jovyan", "nobody",
     "guest", "test", "tester", "worker", "app", "default", "docker", "vagrant", "centos", "fedora", "pi", "builder"}
)  # fmt: skip
LOCAL = "<local path>"  # what stillhouse.json says instead of a local path that has no public name


def is_local_path(reference: str | None) -> bool:
    """Whether a model or data reference is a path on this machine rather than a public id or name."""
    if not reference or is_builtin(reference):
        return False
    if reference.startswith(("/", "~", "./", "../", "file:")) or reference in (".", "..") or "\\" in reference:
        return True
    if "://" in reference:  # s3://, hf://, https://: not a path on this machine
        return False
    try:
        return Path(reference).exists()  # a relative path to an existing file or folder
    except OSError:
        return False


def is_hub_id(name: str | None) -> bool:
    """`org/name`, the form the Hub's card metadata (`base_model:`, `datasets:`) links."""
    return bool(name) and HUB_ID.fullmatch(name) is not None and not is_local_path(name)


def local_placeholder(reference: str) -> str:
    """A local reference's name in a folder that is not pushed: the folder's or file's own name, never the path."""
    return f"{Path(reference).expanduser().name or reference} (local)"


@dataclass(frozen=True)
class PublicNames:
    """The names to publish, and for each local reference without one, the message that names the field to set."""

    teacher: str
    base_model: str | None  # None: the student was built from scratch
    datasets: list[str]
    problems: list[str] = field(default_factory=list)
    given: list[str] = field(default_factory=list)  # the publish.*_name values: text the publisher chose to show

    @property
    def public(self) -> bool:
        return not self.problems


def _name(reference: str, given: str | None) -> tuple[str, bool]:
    """(the name to show, whether it is public)."""
    if given:
        return given, True
    if is_builtin(reference):
        return BUILTIN_NAMES.get(reference, reference), True
    if is_local_path(reference):
        return local_placeholder(reference), False
    return reference, True


def public_names(config: PipelineConfig) -> PublicNames:
    publish = config.publish
    problems = []
    teacher, public = _name(config.sample.teacher, publish.teacher_name)
    if not public:
        problems.append(
            f"publish.teacher_name: the teacher (sample.teacher) was read from a local folder "
            f"({config.sample.teacher}); set publish.teacher_name to its public name, e.g. Qwen/Qwen2.5-1.5B-Instruct"
        )
    base_model = None
    if config.train.student is not None:
        base_model, public = _name(config.train.student, publish.base_model_name)
        if not public:
            problems.append(
                f"publish.base_model_name: the base model (train.student) was read from a local folder "
                f"({config.train.student}); set publish.base_model_name to its public name, e.g. Qwen/Qwen2.5-0.5B"
            )
    sources = [entry.source for entry in config.curate.source_list()]
    if publish.dataset_names:
        datasets = list(publish.dataset_names)
    else:
        named = [_name(source, None) for source in sources]
        datasets = [name for name, _ in named]
        local = [source for source, (_, public) in zip(sources, named) if not public]
        if local:
            problems.append(
                f"publish.dataset_names: the data (curate.source) was read from local files ({', '.join(local)}); "
                "set publish.dataset_names to their public names, e.g. [HuggingFaceH4/ultrachat_200k], or to a "
                "description such as ['support tickets, not released']"
            )
    given = [name for name in (publish.teacher_name, publish.base_model_name, *publish.dataset_names) if name]
    return PublicNames(teacher, base_model, datasets, problems, given)


def check_public_names(config: PipelineConfig) -> None:
    """Before a push (publish.repo_id set): every local model or data path has a public name; `InputError` otherwise.

    A folder that is only written locally needs none (it shows the folder's own name).
    """
    if not config.publish.repo_id:
        return
    problems = public_names(config).problems
    if problems:
        raise InputError(
            f"publish.repo_id is {config.publish.repo_id!r}, and the model card would name a local path "
            "(the Hub page would show where the files sit on this machine):\n" + "\n".join(f"  - {p}" for p in problems)
        )


def login_name() -> str | None:
    """The user's login name when it identifies someone: ≥3 characters and not a generic account (root, ubuntu)."""
    try:
        user = getpass.getuser()
    except Exception:  # no login name in the environment or the password database
        return None
    return user if len(user) >= 3 and user.lower() not in GENERIC_USERS else None


def private_lines(
    text: str, allowed: Iterable[str] = (), *, ordinary_words: Iterable[str] = (), home: str | None = None
) -> list[str]:
    """The lines of ``text`` that hold an absolute local path, the home folder or the user's login name.

    ``allowed`` (the repo id and the public names the publisher set) is taken out of each line first: a Hub
    namespace is often the login name, and the publisher chose those names. The login name is searched as a
    whole word, and not at all when it is one of ``ordinary_words`` (the card template's own words: a user
    called `model` would otherwise block every card).
    """
    home = home if home is not None else str(Path.home())
    # The home folder as a path of its own (`/home/alice`, `/home/alice/x`), not inside a URL or a longer name.
    home_pattern = re.compile(rf"(?<![\w.:/%-]){re.escape(home.rstrip('/'))}(?![\w.-])") if len(home) > 1 else None
    user = login_name()
    if user is not None and user.lower() in {word.lower() for word in ordinary_words}:
        user = None
    user_pattern = re.compile(rf"(?<![A-Za-z0-9]){re.escape(user)}(?![A-Za-z0-9])", re.IGNORECASE) if user else None
    allowed = sorted({name for name in allowed if name}, key=len, reverse=True)  # longest first: `a/b-c` before `a`
    found = []
    for line in text.splitlines():
        checked = line
        for name in allowed:
            checked = checked.replace(name, "")
        if (
            (home_pattern is not None and home_pattern.search(checked))
            or ABSOLUTE_PATH.search(checked)
            or (user_pattern is not None and user_pattern.search(checked))
        ):
            found.append(line.strip())
    return found
