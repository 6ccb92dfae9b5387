"""The JSON Schema of a policy file: generated from the classes, shipped, and right."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
from jsonschema import Draft202012Validator

from agentpolicy import load_policy
from agentpolicy._checks import checked, int_between, optional
from agentpolicy.examples import SECTIONS, approval_example_policy, example_policy
from agentpolicy.schema import packaged_policy_schema, policy_schema
from tests.test_docs import POLICY_JSON

SCHEMA = policy_schema()
VALIDATOR = Draft202012Validator(SCHEMA)


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["additionalProperties"] is False
    assert set(SCHEMA["properties"]) == {
        "enabled", "limits", "timeRules", "merchantRules", "networkRules", "categoryRules",
        "approvalConfig", "assets", "scopedLimits", "alerts", "parent", "delegation",
    }  # fmt: skip
    assert SCHEMA["$defs"]["Amount"]["required"] == ["value"]
    assert SCHEMA["$defs"]["TimeWindow"]["required"] == ["days", "startHour", "endHour"]
    assert SCHEMA["$defs"]["TimeWindow"]["properties"]["endHour"] == {
        "type": "integer", "minimum": 1, "maximum": 24,
    }  # fmt: skip
    assert SCHEMA["$defs"]["Amount"]["properties"]["decimals"]["maximum"] == 255
    assert all(d["additionalProperties"] is False for d in SCHEMA["$defs"].values())


def test_the_packaged_schema_file_is_the_generated_one() -> None:
    # Regenerate with: python -c "from agentpolicy.schema import policy_schema; ..." (see CHANGELOG)
    assert packaged_policy_schema() == SCHEMA


@pytest.mark.parametrize(("where", "text"), POLICY_JSON, ids=lambda v: str(v)[:30])
def test_every_policy_example_in_the_docs_validates(where: str, text: str) -> None:
    VALIDATOR.validate(json.loads(text))


def test_the_example_policies_validate() -> None:
    VALIDATOR.validate(example_policy())
    VALIDATOR.validate(approval_example_policy())
    for name, section in SECTIONS.items():
        VALIDATOR.validate({name: section})


@pytest.mark.parametrize(
    "document",
    [
        {"limits": {"quarterly": {"value": "1"}}},
        {"enabled": "true"},
        {"limits": {"daily": {"value": "1.5"}}},
        {"limits": {"daily": {"value": -1}}},
        {"limits": {"daily": {"value": "1", "decimals": 256}}},
        {"limits": {"daily": {"decimals": 6}}},
        {"limits": {"daily": {"value": "1", "symbol": " USDT"}}},
        {"timeRules": {"allowedWindows": [{"days": [7], "startHour": 9, "endHour": 17}]}},
        {"timeRules": {"allowedWindows": [{"days": [], "startHour": 9, "endHour": 17}]}},
        {"timeRules": {"allowedWindows": [{"days": [1], "startHour": 9}]}},
        {"timeRules": {"timezone": ""}},
        {"networkRules": {"allowedNetworks": ["base"]}},
        {"merchantRules": {"whitelist": ["0xabc "]}},
        {"approvalConfig": {"timeout": 0}},
        {"approvalConfig": {"thresholds": [{"amount": {"value": "1"}, "requiredApprovers": 0,
                                            "approvers": ["a"]}]}},
        [],
    ],
)  # fmt: skip
def test_invalid_documents_do_not_validate(document: Any) -> None:
    assert not VALIDATOR.is_valid(document)
    with pytest.raises(Exception):  # noqa: B017, PT011 - load_policy refuses them too
        load_policy(document)


def test_a_field_added_to_a_class_appears_without_hand_edits() -> None:
    from agentpolicy import schema

    @attrs.frozen
    class Extended:
        """A class with one field more."""

        retries: int | None = checked(optional(int_between(1, 5)), default=None)
        label: str = "x"
        untyped_check: tuple[int, ...] = ()

    defs: dict[str, Any] = {}
    generated = schema._object(Extended, defs)
    assert generated["properties"]["retries"] == {
        "anyOf": [{"type": "integer", "minimum": 1, "maximum": 5}, {"type": "null"}],
    }
    assert generated["properties"]["label"] == {"type": "string", "default": "x"}
    assert generated["properties"]["untypedCheck"] == {
        "type": "array", "items": {"type": "integer"}, "default": [],
    }  # fmt: skip
    assert generated["additionalProperties"] is False


def test_the_cli_prints_the_schema(tmp_path: Path) -> None:
    exe = str(Path(sys.executable).with_name("agentpolicy"))
    done = subprocess.run([exe, "policy", "schema"], capture_output=True, text=True, check=True,
                          timeout=60, cwd=tmp_path)  # fmt: skip
    assert json.loads(done.stdout) == SCHEMA


def test_the_identifier_pattern_refuses_what_the_code_refuses_in_the_bmp() -> None:
    """Every assigned BMP character: the schema and ``check_identifier`` agree on it."""
    import re
    import unicodedata

    from agentpolicy._checks import check_identifier, identifier_schema

    pattern = re.compile(identifier_schema()["pattern"])
    for point in range(0x10000):
        c = chr(point)
        if unicodedata.category(c) in ("Cn", "Cs"):
            continue  # the code refuses these too; the schema cannot list them
        value = "a" + c + "b"
        assert bool(pattern.match(value)) == (check_identifier(value, "$") == []), hex(point)
