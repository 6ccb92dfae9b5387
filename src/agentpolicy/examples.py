"""Example policies in the policy file's JSON shape (for demos, docs and tests).

They are the configuration examples of the t402 agent-policy design. Each
function returns a fresh ``dict`` that :func:`agentpolicy.load_policy` reads
verbatim.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["SECTIONS", "approval_example_policy", "example_policy", "seed_policy"]

_USDT = {"decimals": 6, "symbol": "USDT"}

SECTIONS: dict[str, dict[str, Any]] = {
    "limits": {
        "perTransaction": {"value": "100000000", **_USDT},
        "hourly": {"value": "500000000", **_USDT},
        "daily": {"value": "1000000000", **_USDT},
        "weekly": {"value": "5000000000", **_USDT},
        "monthly": {"value": "10000000000", **_USDT},
    },
    "timeRules": {
        "allowedWindows": [{"days": [1, 2, 3, 4, 5], "startHour": 9, "endHour": 17}],
        "blockedPeriods": [
            {
                "start": "2026-01-20T00:00:00Z",
                "end": "2026-01-21T00:00:00Z",
                "reason": "Scheduled maintenance",
            }
        ],
        "timezone": "UTC",
    },
    "merchantRules": {
        "whitelist": ["0xaddr1", "0xaddr2", "0xaddr3"],
        "requireWhitelist": True,
        "blacklist": ["0xbadaddr1"],
    },
    "networkRules": {
        "allowedNetworks": ["eip155:8453", "eip155:1"],
        "blockedNetworks": ["eip155:56"],
    },
    "categoryRules": {
        "allowedCategories": ["api_usage", "subscription", "data_storage"],
        "blockedCategories": ["gambling", "adult_content"],
    },
    "approvalConfig": {
        "thresholds": [
            {
                "amount": {"value": "100000000", **_USDT},
                "requiredApprovers": 1,
                "approvers": ["admin@example.com", "manager@example.com"],
            },
            {
                "amount": {"value": "1000000000", **_USDT},
                "requiredApprovers": 2,
                "approvers": ["admin@example.com", "manager@example.com", "cfo@example.com"],
            },
        ],
        "timeout": 3600000,
    },
}
"""Each example section, under the policy key it belongs to."""


def example_policy() -> dict[str, Any]:
    """Every example section in one enabled policy (the demo MCP server's policy).

    It allows payments Monday to Friday, 9:00 to 17:00 UTC, to three
    whitelisted addresses on Base and Ethereum, up to 100 USDT each.
    """
    return {"enabled": True, **copy.deepcopy(SECTIONS)}


def seed_policy() -> dict[str, Any]:
    """The same as :func:`example_policy` (its former name, kept for existing callers)."""
    return example_policy()


def approval_example_policy() -> dict[str, Any]:
    """A policy whose payments of 100 USDT or more need admin@company.com's approval."""
    return {
        "enabled": True,
        "limits": {"daily": {"value": "10000000000", "decimals": 6}},
        "approvalConfig": {
            "thresholds": [
                {
                    "amount": {"value": "100000000", "decimals": 6},
                    "requiredApprovers": 1,
                    "approvers": ["admin@company.com"],
                }
            ],
            "timeout": 3600000,
        },
    }
