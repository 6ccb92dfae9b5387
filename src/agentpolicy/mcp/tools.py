"""The ten tools: names, descriptions, argument schemas, and the JSON their data takes.

Pure and SDK-free: the stdio server and :class:`AgentPolicyMcpServer` share
this table. Amounts travel as strings of base units; keys are the seed's
camelCase.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from agentpolicy._checks import check_identifier, check_int, check_text, type_name
from agentpolicy.amounts import MAX_DECIMALS
from agentpolicy.errors import PolicyValidationError, Problem

__all__ = ["TOOLS", "Tool", "find_tool", "parse_arguments"]

_ID = {"type": "string", "minLength": 1, "maxLength": 256}
_AMOUNT = {
    "type": "string",
    "pattern": "^[0-9]{1,96}$",
    "description": "Amount in the token's smallest unit, as a string of digits "
    "('500000000' is 500 USDT with 6 decimals).",
}


def _schema(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


@attrs.frozen
class Tool:
    """One tool: its MCP name, the seed's name, what it does, its argument schema, its role."""

    name: str
    seed_name: str
    description: str
    input_schema: dict[str, Any]
    admin_only: bool = False


TOOLS: tuple[Tool, ...] = (
    Tool(
        "agent_policy_authorize",
        "agent-policy/authorize",
        "Ask whether this agent may make a payment now, BEFORE sending it. Returns allowed "
        "(true/false), a stable code (ALLOWED, DAILY_LIMIT, RECIPIENT_BLOCKED, "
        "APPROVAL_REQUIRED, ...) and a reason. When allowed, the amount is reserved: send the "
        "payment, then call agent_policy_confirm with the reservationId (or "
        "agent_policy_release if you did not pay); unconfirmed reservations expire after a "
        "few minutes. When requiresApproval is true, do not pay: humans must approve "
        "approvalId first; poll agent_policy_approvals_get until it is approved and then "
        "use its reservationId. Reuse the same idempotencyKey when retrying the same payment.",
        _schema(
            {
                "agentId": {**_ID, "description": "The agent that wants to pay."},
                "amount": _AMOUNT,
                "recipient": {**_ID, "description": "The recipient's address."},
                "network": {
                    "type": "string",
                    "description": "CAIP-2 chain id, such as eip155:8453 (Base).",
                },
                "category": {"type": "string", "description": "What the payment is for."},
                "decimals": {"type": "integer", "minimum": 0, "maximum": MAX_DECIMALS},
                "symbol": {"type": "string", "description": "Token symbol (default USDT)."},
                "memo": {"type": "string"},
                "idempotencyKey": {**_ID, "description": "Same key, same payment: counted once."},
            },
            ["agentId", "amount", "recipient", "network"],
        ),
    ),
    Tool(
        "agent_policy_budget",
        "agent-policy/budget",
        "Show what the agent has spent, has reserved and has left in each limited window "
        "(hourly, daily, weekly, monthly) right now, in base units of the limit's token. "
        "Use it to plan payments that will pass.",
        _schema(
            {
                "agentId": _ID,
                "period": {"type": "string", "enum": ["hourly", "daily", "weekly", "monthly"]},
            },
            ["agentId"],
        ),
    ),
    Tool(
        "agent_policy_get",
        "agent-policy/get",
        "Read the agent's current spending policy (limits, time, merchant, network, category "
        "and approval rules) and its version.",
        _schema({"agentId": _ID}, ["agentId"]),
    ),
    Tool(
        "agent_policy_set",
        "agent-policy/set",
        "Administrators only: replace an agent's spending policy. The policy is the seed's "
        "JSON shape; it is validated strictly and every problem is reported with its path. "
        "Returns the new version.",
        _schema({"agentId": _ID, "policy": {"type": "object"}}, ["agentId", "policy"]),
        admin_only=True,
    ),
    Tool(
        "agent_policy_list",
        "agent-policy/list",
        "Administrators only: list the agents that have a policy, optionally those of one "
        "organisation (agent ids that start with 'orgId:').",
        _schema({"orgId": _ID}, []),
        admin_only=True,
    ),
    Tool(
        "agent_policy_confirm",
        "agent-policy/confirm",
        "Confirm that an authorized payment was sent: its reserved amount becomes spending. "
        "Call it once the payment went through; calling it again is harmless.",
        _schema({"reservationId": _ID}, ["reservationId"]),
    ),
    Tool(
        "agent_policy_release",
        "agent-policy/release",
        "Give back the budget of an authorized payment that was NOT sent. Calling it again "
        "is harmless; a confirmed payment cannot be released.",
        _schema({"reservationId": _ID}, ["reservationId"]),
    ),
    Tool(
        "agent_policy_approvals_list",
        "agent-policy/approvals/list",
        "List the approvals still waiting for human decisions, optionally of one agent.",
        _schema({"agentId": _ID}, []),
    ),
    Tool(
        "agent_policy_approvals_get",
        "agent-policy/approvals/get",
        "Read one approval: its status (pending, approved, denied, expired), the decisions so "
        "far, and once approved the reservationId to confirm after paying.",
        _schema({"approvalId": _ID}, ["approvalId"]),
    ),
    Tool(
        "agent_policy_approvals_decide",
        "agent-policy/approvals/decide",
        "Approvers only (administrator role): approve or deny a pending approval as a named "
        "approver. One deny denies the payment; enough approvals approve it.",
        _schema(
            {
                "approvalId": _ID,
                "decision": {"type": "string", "enum": ["approve", "deny"]},
                "approver": _ID,
                "comment": {"type": "string", "maxLength": 1024},
            },
            ["approvalId", "decision", "approver"],
        ),
        admin_only=True,
    ),
)

_BY_NAME = {name: t for t in TOOLS for name in (t.name, t.seed_name)}


def find_tool(name: object) -> Tool | None:
    """The tool called ``name`` (its MCP name or the seed's), if any."""
    return _BY_NAME.get(name) if isinstance(name, str) else None


def parse_arguments(tool: Tool, arguments: object) -> dict[str, Any]:
    """Check ``arguments`` against the tool's schema; raise ``INVALID_INPUT`` with paths.

    Unknown keys and wrong types are refused; values are range-checked by
    the classes that receive them.
    """
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, Mapping):
        raise PolicyValidationError.single(
            "$", f"arguments must be an object, not {type_name(arguments)}"
        )
    schema = tool.input_schema
    problems: list[Problem] = []
    for key in arguments:
        if key not in schema["properties"]:
            problems.append(Problem(f"$.{key}", "is not a known argument"))
    for key in schema["required"]:
        if key not in arguments:
            problems.append(Problem(f"$.{key}", "is required"))
    for key, value in arguments.items():
        spec = schema["properties"].get(key)
        if spec is None:
            continue
        kind = spec.get("type")
        if kind == "string" and not isinstance(value, str):
            problems.append(Problem(f"$.{key}", f"must be a string, not {type_name(value)}"))
        elif kind == "integer":
            problems += check_int(value, f"$.{key}", spec["minimum"], spec["maximum"])
        elif kind == "object" and not isinstance(value, Mapping):
            problems.append(Problem(f"$.{key}", f"must be an object, not {type_name(value)}"))
        elif "enum" in spec and value not in spec["enum"]:
            allowed = ", ".join(spec["enum"])
            problems.append(Problem(f"$.{key}", f"must be one of {allowed}"))
        elif spec.get("minLength") == 1:  # an identifier (see _ID)
            problems += check_identifier(value, f"$.{key}")
        elif key == "comment":
            problems += check_text(value, f"$.{key}")
    if problems:
        raise PolicyValidationError(problems)
    return dict(arguments)
