"""The wheel and the sdist: the licence, the schema file, the metadata; one version everywhere."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

import agentpolicy

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir",
         str(out), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return out


def test_the_wheel_carries_the_licence_the_schema_and_the_metadata(built: Path) -> None:
    (wheel,) = built.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode()
        (licence,) = [n for n in names if n.endswith("/licenses/LICENSE")]
        assert "MIT License" in archive.read(licence).decode()
        assert "agentpolicy developers" in archive.read(licence).decode()
    assert "agentpolicy/policy.schema.json" in names
    assert "agentpolicy/py.typed" in names
    assert "agentpolicy/serve/templates/approvals.html" in names  # the pages are package data
    assert "agentpolicy/serve/static/app.js" in names
    assert "Provides-Extra: serve" in text
    assert "License-Expression: MIT" in text
    assert "Classifier: Programming Language :: Python :: 3.13" in text
    assert "Project-URL: Homepage, " in text
    assert f"Version: {agentpolicy.__version__}\n" in text


def test_the_sdist_carries_the_licence(built: Path) -> None:
    (sdist,) = built.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
    assert f"agentpolicy-{agentpolicy.__version__}/LICENSE" in names
    assert f"agentpolicy-{agentpolicy.__version__}/src/agentpolicy/policy.schema.json" in names


def test_one_version_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    from agentpolicy import _version, cli
    from agentpolicy.mcp import command

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert agentpolicy.__version__ == metadata.version("agentpolicy") == declared
    assert cli.__version__ == command.__version__ == declared
    mcp_exe = Path(sys.executable).with_name("agent-policy-mcp")
    shown = subprocess.run([str(mcp_exe), "--version"], capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == f"agent-policy-mcp {declared}"

    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    _version.package_version.cache_clear()
    monkeypatch.setattr(metadata, "version", missing)
    try:
        assert _version.package_version() == declared  # an uninstalled tree reads pyproject.toml
    finally:
        _version.package_version.cache_clear()
