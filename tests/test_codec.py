from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given

from agentpolicy import (
    AgentPolicy,
    Amount,
    PolicyValidationError,
    SpendingLimits,
    dump_policy,
    load_policy,
)
from agentpolicy.codec import format_instant, parse_instant
from agentpolicy.examples import SECTIONS, approval_example_policy, example_policy, seed_policy
from tests.strategies import policies


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_example_section_loads_verbatim(section: str) -> None:
    policy = load_policy({"enabled": True, section: copy.deepcopy(SECTIONS[section])})
    assert getattr(policy, {"limits": "limits"}.get(section, _snake(section))) is not None


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)


def test_the_whole_example_policy_and_the_approval_example_load() -> None:
    policy = load_policy(example_policy())
    assert policy.limits is not None
    assert policy.limits.monthly == Amount(10_000_000_000)
    assert policy.time_rules is not None
    assert policy.time_rules.blocked_periods[0].start == datetime(2026, 1, 20, tzinfo=UTC)
    example = load_policy(approval_example_policy())
    assert example.approval_config is not None
    assert example.approval_config.thresholds[0].amount.symbol == "USDT"  # default symbol


def test_dump_of_load_is_the_normalised_input() -> None:
    raw = approval_example_policy()
    normalised = copy.deepcopy(raw)
    normalised["limits"]["daily"]["symbol"] = "USDT"
    normalised["approvalConfig"]["thresholds"][0]["amount"]["symbol"] = "USDT"
    assert dump_policy(load_policy(raw)) == normalised
    example = example_policy()
    assert dump_policy(load_policy(example)) == example  # the examples are already normal
    assert seed_policy() == example  # the former name


def test_normalisation_rules() -> None:
    raw: dict[str, Any] = {
        "limits": {"daily": {"value": 5}},
        "timeRules": {
            "allowedWindows": [{"days": [5, 1, 1], "startHour": 0, "endHour": 24}],
            "blockedPeriods": [
                {"start": "2026-01-20T02:00:00+02:00", "end": "2026-01-20T00:00:00.5Z"}
            ],
        },
        "merchantRules": None,
    }
    assert dump_policy(load_policy(raw)) == {
        "enabled": True,
        "limits": {"daily": {"value": "5", "decimals": 6, "symbol": "USDT"}},
        "timeRules": {
            "allowedWindows": [{"days": [1, 5], "startHour": 0, "endHour": 24}],
            "blockedPeriods": [
                {"start": "2026-01-20T00:00:00Z", "end": "2026-01-20T00:00:00.500000Z"}
            ],
            "timezone": "UTC",
        },
    }


@given(policies())
def test_json_round_trips_are_exact(policy: AgentPolicy) -> None:
    dumped = dump_policy(policy)
    assert load_policy(dumped) == policy
    # through real JSON text too, and dumping again is stable
    again = load_policy(json.loads(json.dumps(dumped)))
    assert again == policy
    assert dump_policy(again) == dumped


def test_forty_digit_limits_survive_the_json_form() -> None:
    value = 10**39 + 7
    policy = AgentPolicy(limits=SpendingLimits(daily=Amount(value)))
    text = json.dumps(dump_policy(policy))
    assert load_policy(json.loads(text)).limits == SpendingLimits(daily=Amount(value))
    assert str(value) in text


def _problems(raw: Any) -> dict[str, str]:
    with pytest.raises(PolicyValidationError) as err:
        load_policy(raw)
    assert err.value.code == "INVALID_INPUT"
    return {p.path: p.message for p in err.value.problems}


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ({"unknown": 1}, "$.unknown"),
        ({"limits": {"daily": {"value": "1", "cents": 2}}}, "$.limits.daily.cents"),
        ({"limits": {"quarterly": {"value": "1"}}}, "$.limits.quarterly"),
        ({"enabled": "true"}, "$.enabled"),
        ({"enabled": 1}, "$.enabled"),
        ({"limits": {"daily": {"value": True}}}, "$.limits.daily.value"),
        ({"limits": {"daily": {"value": "-5"}}}, "$.limits.daily.value"),
        ({"limits": {"daily": {"value": -5}}}, "$.limits.daily.value"),
        ({"limits": {"daily": {"value": 1.5}}}, "$.limits.daily.value"),
        ({"limits": {"daily": {"value": "1.5"}}}, "$.limits.daily.value"),
        ({"limits": {"daily": {"value": "1e6"}}}, "$.limits.daily.value"),
        ({"limits": {"daily": {"value": ""}}}, "$.limits.daily.value"),
        ({"limits": {"daily": {}}}, "$.limits.daily.value"),
        ({"limits": {"daily": {"value": "1", "decimals": "3"}}}, "$.limits.daily.decimals"),
        ({"limits": {"daily": {"value": "1", "decimals": True}}}, "$.limits.daily.decimals"),
        ({"limits": {"daily": {"value": "1", "decimals": 6.0}}}, "$.limits.daily.decimals"),
        ({"limits": {"daily": {"value": "1", "symbol": 5}}}, "$.limits.daily.symbol"),
        ({"limits": []}, "$.limits"),
        (
            {"timeRules": {"allowedWindows": [{"days": [7], "startHour": 1, "endHour": 2}]}},
            "$.timeRules.allowedWindows[0].days",
        ),
        (
            {"timeRules": {"allowedWindows": [{"days": [-1], "startHour": 1, "endHour": 2}]}},
            "$.timeRules.allowedWindows[0].days",
        ),
        (
            {"timeRules": {"allowedWindows": [{"days": [], "startHour": 1, "endHour": 2}]}},
            "$.timeRules.allowedWindows[0].days",
        ),
        (
            {"timeRules": {"allowedWindows": [{"days": "12", "startHour": 1, "endHour": 2}]}},
            "$.timeRules.allowedWindows[0].days",
        ),
        (
            {"timeRules": {"allowedWindows": [{"days": [1], "startHour": -1, "endHour": 2}]}},
            "$.timeRules.allowedWindows[0].startHour",
        ),
        (
            {"timeRules": {"allowedWindows": [{"days": [1], "startHour": 1, "endHour": 25}]}},
            "$.timeRules.allowedWindows[0].endHour",
        ),
        (
            {"timeRules": {"allowedWindows": [{"days": [1], "startHour": 9, "endHour": 9}]}},
            "$.timeRules.allowedWindows[0].endHour",
        ),
        (
            {"timeRules": {"allowedWindows": [{"days": [1], "startHour": 17, "endHour": 9}]}},
            "$.timeRules.allowedWindows[0].endHour",
        ),
        (
            {"timeRules": {"allowedWindows": [{"days": [1], "startHour": "9", "endHour": 10}]}},
            "$.timeRules.allowedWindows[0].startHour",
        ),
        ({"timeRules": {"timezone": "Mars/Olympus"}}, "$.timeRules.timezone"),
        ({"timeRules": {"timezone": "../../etc/passwd"}}, "$.timeRules.timezone"),
        ({"timeRules": {"timezone": ""}}, "$.timeRules.timezone"),
        (
            {
                "timeRules": {
                    "blockedPeriods": [
                        {"start": "2026-01-21T00:00:00Z", "end": "2026-01-20T00:00:00Z"}
                    ]
                }
            },
            "$.timeRules.blockedPeriods[0].end",
        ),
        (
            {
                "timeRules": {
                    "blockedPeriods": [
                        {"start": "2026-01-21T00:00:00", "end": "2026-01-22T00:00:00Z"}
                    ]
                }
            },
            "$.timeRules.blockedPeriods[0].start",
        ),
        (
            {
                "timeRules": {
                    "blockedPeriods": [{"start": "yesterday", "end": "2026-01-22T00:00:00Z"}]
                }
            },
            "$.timeRules.blockedPeriods[0].start",
        ),
        ({"merchantRules": {"whitelist": "0xabc"}}, "$.merchantRules.whitelist"),
        ({"merchantRules": {"whitelist": ["0xabc", 5]}}, "$.merchantRules.whitelist[1]"),
        ({"merchantRules": {"blacklist": [" 0xabc"]}}, "$.merchantRules.blacklist[0]"),
        ({"merchantRules": {"requireWhitelist": "yes"}}, "$.merchantRules.requireWhitelist"),
        ({"networkRules": {"allowedNetworks": ["base"]}}, "$.networkRules.allowedNetworks[0]"),
        ({"categoryRules": {"blockedCategories": [""]}}, "$.categoryRules.blockedCategories[0]"),
        (
            {
                "approvalConfig": {
                    "thresholds": [
                        {"amount": {"value": "1"}, "requiredApprovers": 0, "approvers": ["a"]}
                    ]
                }
            },
            "$.approvalConfig.thresholds[0].requiredApprovers",
        ),
        (
            {
                "approvalConfig": {
                    "thresholds": [
                        {"amount": {"value": "1"}, "requiredApprovers": 2, "approvers": ["a"]}
                    ]
                }
            },
            "$.approvalConfig.thresholds[0].requiredApprovers",
        ),
        (
            {
                "approvalConfig": {
                    "thresholds": [
                        {"amount": {"value": "1"}, "requiredApprovers": 1, "approvers": []}
                    ]
                }
            },
            "$.approvalConfig.thresholds[0].approvers",
        ),
        (
            {
                "approvalConfig": {
                    "thresholds": [
                        {"amount": {"value": "1"}, "requiredApprovers": 1, "approvers": ["a", "A"]}
                    ]
                }
            },
            "$.approvalConfig.thresholds[0].approvers",
        ),
        ({"approvalConfig": {"timeout": 0}}, "$.approvalConfig.timeout"),
        ({"approvalConfig": {"timeout": "3600000"}}, "$.approvalConfig.timeout"),
        (
            {
                "limits": {
                    "daily": {"value": "1", "symbol": "USDC"},
                    "monthly": {"value": "1", "symbol": "USDT"},
                }
            },
            "$.limits.monthly.symbol",
        ),
    ],
)
def test_strict_refusals_name_the_json_path(raw: dict[str, Any], path: str) -> None:
    problems = _problems(raw)
    assert path in problems, problems


def test_every_problem_is_listed_at_once() -> None:
    problems = _problems(
        {
            "enabled": "no",
            "limits": {"daily": {"value": "x"}, "weekly": {"value": "1", "decimals": -1}},
            "timeRules": {"timezone": "Nowhere/City", "allowedWindows": [{"days": [9]}]},
            "extra": True,
        }
    )
    assert set(problems) == {
        "$.enabled",
        "$.limits.daily.value",
        "$.limits.weekly.decimals",
        "$.timeRules.timezone",
        "$.timeRules.allowedWindows[0].days",
        "$.timeRules.allowedWindows[0].startHour",
        "$.timeRules.allowedWindows[0].endHour",
        "$.extra",
    }


def test_the_error_message_lists_paths_and_the_structured_form_has_the_first() -> None:
    with pytest.raises(PolicyValidationError) as err:
        load_policy({"limits": {"daily": {"value": "-1"}}})
    assert "$.limits.daily.value" in str(err.value)
    assert err.value.to_dict()["code"] == "INVALID_INPUT"
    assert err.value.to_dict()["path"] == "$.limits.daily.value"


@pytest.mark.parametrize("raw", [None, 5, "policy", [], [{"enabled": True}]])
def test_non_objects_are_refused(raw: Any) -> None:
    assert "$" in _problems(raw)


def test_duplicate_threshold_amounts_are_refused_even_in_other_decimals() -> None:
    problems = _problems(
        {
            "approvalConfig": {
                "thresholds": [
                    {"amount": {"value": "1000000"}, "requiredApprovers": 1, "approvers": ["a"]},
                    {
                        "amount": {"value": "1000000000000000000", "decimals": 18},
                        "requiredApprovers": 1,
                        "approvers": ["b"],
                    },
                ]
            }
        }
    )
    assert "$.approvalConfig.thresholds[1].amount" in problems


def test_instants_parse_only_with_an_offset_and_format_in_utc() -> None:
    assert parse_instant("2026-01-20T01:00:00+01:00") == datetime(2026, 1, 20, tzinfo=UTC)
    assert format_instant(datetime(2026, 1, 20, tzinfo=UTC)) == "2026-01-20T00:00:00Z"
    for bad in ("2026-01-20", "2026-01-20T00:00:00", 5, "x" * 100, "2026-13-01T00:00:00Z"):
        with pytest.raises(PolicyValidationError):
            parse_instant(bad)
    for edge, words in (("9999-12-31T23:59:00-01:00", "past the end"),
                        ("0001-01-01T00:00:00+01:00", "before the start")):  # fmt: skip
        with pytest.raises(PolicyValidationError) as err:
            parse_instant(edge)
        assert f"is {words} of the calendar in UTC" in str(err.value)


@pytest.mark.parametrize(
    ("section", "field", "item", "limit"),
    [
        ("timeRules", "blockedPeriods", {"start": "x", "end": "y"}, 10_000),
        ("limits", "rolling", {"window": "x", "amount": "y"}, 16),
        ("limits", "counts", {"window": "x", "max": "y"}, 16),
    ],
)
def test_an_array_longer_than_its_field_allows_is_refused_before_its_elements_are_read(
    section: str, field: str, item: dict[str, str], limit: int
) -> None:
    # 30,000 bad blocked periods were each parsed, and their 60,000 problems listed and
    # printed, before the list's length refused them all (9.5 s for one 840 KB policy file)
    raw = example_policy()
    raw.setdefault(section, {})[field] = [item] * (limit + 1)
    with pytest.raises(PolicyValidationError) as err:
        load_policy(raw)
    assert [(p.path, p.message) for p in err.value.problems] == [
        (f"$.{section}.{field}", f"must have at most {limit} entries")
    ]
    raw[section][field] = [item] * 2  # within the limit: each element's problems, as before
    with pytest.raises(PolicyValidationError) as err:
        load_policy(raw)
    assert len(err.value.problems) >= 2
    assert all(p.path.startswith(f"$.{section}.{field}[") for p in err.value.problems)
