"""The project files that ship inside the wheel (package `stillhouse.bundled`): prefect.yaml, configs/, infra/k8s/.

In a checkout they are the repository's own files; installed, they sit in site-packages. A config named
on the command line or in a deployment is looked up where the user is first, then among the bundled
ones, so `stillhouse run configs/demo.yaml` and `stillhouse deploy` work from any folder.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from stillhouse.config import ConfigError


def _bundled_root() -> Path:
    try:  # installed from a wheel: site-packages/stillhouse/bundled
        return Path(
            files("stillhouse.bundled").joinpath("prefect.yaml")
        ).parent  # a namespace package: join to get a real path
    except ModuleNotFoundError:
        # An editable checkout: setuptools' editable finder can't map a folder without __init__.py (the
        # repository root) into a package, and the files are the repository's own, beside flows/.
        return Path(__file__).resolve().parents[1]


BUNDLED = _bundled_root()
PREFECT_FILE = BUNDLED / "prefect.yaml"
DEMO_CONFIG = "configs/demo.yaml"


def bundled_configs() -> list[str]:
    """The configs shipped with Stillhouse, as `configs/NAME.yaml`."""
    return sorted(f"configs/{path.name}" for path in (BUNDLED / "configs").glob("*.yaml"))


def resolve_config(reference: str | Path) -> Path:
    """``reference`` as a path that exists: relative to the working directory, else a bundled config
    (`configs/demo.yaml`)."""
    path = Path(reference).expanduser()
    if path.is_file():
        return path.resolve()
    bundled = BUNDLED / "configs" / path.name
    if not path.is_absolute() and path.parent in (Path("configs"), Path(".")) and bundled.is_file():
        return bundled
    raise ConfigError(
        f"{reference}: config file not found (relative paths start from {Path.cwd()}); "
        f"pass a YAML file, or one of the bundled configs: {', '.join(bundled_configs())}"
    )
