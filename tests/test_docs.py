"""Every Python example in the docs runs, and every JSON policy in docs/policy.md loads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from agentpolicy import dump_policy, load_policy

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(language: str) -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        for i, match in enumerate(FENCE.finditer(path.read_text())):
            if match.group(1) == language:
                found.append((f"{path.name}#{i}", match.group(2)))
    return found


@pytest.mark.parametrize(("where", "code"), blocks("python"), ids=lambda v: str(v)[:30])
def test_python_examples_run(
    where: str, code: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    if "AGENT_POLICY_POSTGRES_URL" in code:  # the example reads the server's URL from there
        monkeypatch.setenv("AGENT_POLICY_POSTGRES_URL", request.getfixturevalue("pg_schema"))
    exec(compile(code, where, "exec"), {"__name__": "__doc_example__"})


POLICY_JSON = [b for b in blocks("json") if b[0].startswith("policy.md")]


@pytest.mark.parametrize(("where", "text"), POLICY_JSON, ids=lambda v: str(v)[:30])
def test_policy_json_examples_load(where: str, text: str) -> None:
    policy = load_policy(json.loads(text))
    assert load_policy(dump_policy(policy)) == policy


def test_the_docs_have_examples() -> None:
    assert len(blocks("python")) >= 4
    assert len(POLICY_JSON) >= 7
