"""The version of agentpolicy, read in one place: the installed package's metadata.

An uninstalled source tree (no metadata) reads ``version`` from the
``pyproject.toml`` beside ``src/``, and ``0+unknown`` when there is none.
"""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def package_version() -> str:
    """The version of the installed ``agentpolicy`` distribution."""
    from importlib import metadata  # noqa: PLC0415 - only when the version is asked for

    try:
        return metadata.version("agentpolicy")
    except metadata.PackageNotFoundError:
        return _source_tree_version()


def _source_tree_version() -> str:
    import tomllib  # noqa: PLC0415

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "0+unknown"
    return str(project.get("version", "0+unknown"))
