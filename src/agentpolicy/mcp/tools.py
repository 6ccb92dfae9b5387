"""The tools: names, descriptions, argument and result schemas, and annotations.

Pure and SDK-free: the stdio server and :class:`AgentPolicyMcpServer` share
this table. Amounts travel as strings of base units; keys are camelCase.
Every tool declares the JSON Schema of its arguments (``input_schema``) and
of its result (:meth:`Tool.output_schema`: ``{"success": true, "data":
...}`` or ``{"success": false, "error": {...}}``), and annotations that tell
a client whether it reads or changes anything.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import attrs

from agentpolicy._checks import (
    MAX_ID,
    MAX_RECORD_ID,
    MAX_TEXT,
    check_identifier,
    check_int,
    check_text,
    type_name,
)
from agentpolicy.amounts import MAX_DECIMALS, MAX_DIGITS
from agentpolicy.decisions import Code, Outcome
from agentpolicy.errors import ErrorCode, PolicyValidationError, Problem
from agentpolicy.windows import Period

__all__ = [
    "MAX_PAGE",
    "MAX_VERSION",
    "REGISTRY_CHANGES",
    "TOOLS",
    "Tool",
    "find_tool",
    "parse_arguments",
]

MAX_PAGE = 100
"""The most entries one page of a listing holds."""

_ID = {"type": "string", "minLength": 1, "maxLength": MAX_ID}
_RECORD_ID = {"type": "string", "minLength": 1, "maxLength": MAX_RECORD_ID}
_HOLDER = {
    **_ID,
    "description": "Administrators only: the claim of the payment block that holds the "
    "reservation (its holder), for settling by hand a payment whose block could not.",
}
_AMOUNT = {
    "type": "string",
    "pattern": f"^[0-9]{{1,{MAX_DIGITS}}}$",
    "description": "Amount in the token's smallest unit, as a string of digits: with 6 "
    "decimals, '500000000' is 500 USDT and '500250000' is 500.25 USDT.",
}
_AGENT = {**_ID, "description": "The agent the payment or budget belongs to."}
_PAGE = {
    "limit": {
        "type": "integer",
        "minimum": 1,
        "maximum": MAX_PAGE,
        "description": f"At most this many entries (1 to {MAX_PAGE}, default 20).",
    },
    "cursor": {
        "type": "string",
        "minLength": 1,
        "maxLength": 512,
        "description": "The nextCursor of the previous page, to read the next one.",
    },
}


def _schema(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


@attrs.frozen
class Annotations:
    """What a tool does to the world, for clients that ask before calling (MCP annotations)."""

    title: str
    read_only: bool
    destructive: bool = False
    idempotent: bool = True


@attrs.frozen
class Tool:
    """One tool: its MCP name, its slash name, what it does, its schemas, its role.

    ``slash_name`` is the tool's name in the t402 agent-policy design
    (``agent-policy/authorize``), accepted as well. ``data_schema`` is the
    JSON Schema of the data of a successful call.
    """

    name: str
    slash_name: str
    description: str
    input_schema: dict[str, Any]
    data_schema: dict[str, Any]
    annotations: Annotations
    admin_only: bool = False

    def without(self, *names: str) -> Tool:
        """The tool with these arguments left out (a role that may not pass them)."""
        props = self.input_schema["properties"]
        if not any(n in props for n in names):
            return self
        kept = {k: v for k, v in props.items() if k not in names}
        required = [r for r in self.input_schema["required"] if r not in names]
        return attrs.evolve(
            self, input_schema={**self.input_schema, "properties": kept, "required": required}
        )

    def bound_to_approver(self, approver: str, *, signs: bool) -> Tool:
        """The decide tool as a server bound to one approver offers it.

        ``approver`` defaults to the bound one (any other is refused); a
        server that holds the approver's key signs itself, so it takes no
        ``signature`` or ``signedAt``.
        """
        props = dict(self.input_schema["properties"])
        if "approver" not in props:
            return self
        only = f"Defaults to {approver}, the only approver this server votes as; no other."
        props["approver"] = {**props["approver"], "description": only}
        note = f" This server votes as {approver} only"
        if signs:
            props.pop("signature", None)
            props.pop("signedAt", None)
            note += ", and signs each vote with that approver's key"
        schema = {
            **self.input_schema,
            "properties": props,
            "required": [r for r in self.input_schema["required"] if r != "approver"],
        }
        return attrs.evolve(self, input_schema=schema, description=self.description + note + ".")

    @property
    def output_schema(self) -> dict[str, Any]:
        """The JSON Schema of the whole result (``structuredContent``): success or error."""
        return _output_schema(self.name)

    def bound_to(self, agent_id: str) -> Tool:
        """The tool as a server bound to ``agent_id`` offers it: ``agentId`` defaults to it."""
        props = self.input_schema["properties"]
        if "agentId" not in props:
            return self
        agent = {**props["agentId"], "description": f"Defaults to {agent_id}, the only agent "
                 "this server serves; any other agent is refused."}  # fmt: skip
        schema = {
            **self.input_schema,
            "properties": {**props, "agentId": agent},
            "required": [r for r in self.input_schema["required"] if r != "agentId"],
        }
        note = f" This server serves agent {agent_id} only; agentId may be left out."
        return attrs.evolve(self, input_schema=schema, description=self.description + note)


# -- result schemas ------------------------------------------------------------------------------

_TEXT = {"type": "string"}
_INSTANT = {"type": "string", "format": "date-time"}
_DIGITS = {"type": "string", "pattern": "^[0-9]+$"}


def _object(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


_COUNT = {"type": "integer", "minimum": 0}
_HEADROOM = _object(
    {
        "budgetId": _TEXT,
        "kind": {"enum": ["amount", "count"]},
        "window": _TEXT,
        "scope": _TEXT,
        "group": _TEXT,
        "limit": _DIGITS,
        "used": _DIGITS,
        "remaining": {"anyOf": [_DIGITS, _COUNT]},
        "decimals": _COUNT,
        "symbol": _TEXT,
        "max": _COUNT,
        "count": _COUNT,
        "fits": {"type": "boolean"},
        "windowStart": _INSTANT,
        "windowEnd": _INSTANT,
    },
    ["budgetId", "kind", "window", "remaining", "fits"],
)
_DECISION = _object(
    {
        "allowed": {"type": "boolean"},
        "code": {"type": "string", "enum": [c.value for c in Code]},
        "reason": _TEXT,
        "reservationId": _TEXT,
        "requiresApproval": {"type": "boolean"},
        "approvalId": _TEXT,
        "expiresAt": _INSTANT,
        "policyVersion": {"type": "integer", "minimum": 1},
        "budgetId": {
            **_TEXT,
            "description": "The budget whose rule decided: the agent's own id or an ancestor's.",
        },
        "evaluations": {
            "type": "array",
            "items": _object(
                {
                    "name": _TEXT,
                    "outcome": {"type": "string", "enum": [o.value for o in Outcome]},
                    "code": {"type": ["string", "null"]},
                    "detail": _TEXT,
                }
            ),
        },
        "dryRun": {"const": True, "description": "A dry run: nothing was reserved or recorded."},
        "headroom": {
            "type": "array",
            "description": "A dry run's limits, with what the payment would leave in each.",
            "items": _HEADROOM,
        },
    },
    ["allowed", "code", "reason", "requiresApproval", "evaluations"],
)
_WINDOW = _object(
    {
        "limit": {"type": ["string", "null"], "pattern": "^[0-9]+$"},
        "spent": _DIGITS,
        "reserved": _DIGITS,
        "remaining": {"type": ["string", "null"], "pattern": "^[0-9]+$"},
        "decimals": {"type": "integer", "minimum": 0},
        "symbol": _TEXT,
        "windowStart": _INSTANT,
        "windowEnd": _INSTANT,
    }
)
_LIMIT = _object(
    {
        "kind": {"enum": ["amount", "count"]},
        "window": _TEXT,
        "scope": _TEXT,
        "group": _TEXT,
        "limit": _DIGITS,
        "spent": _DIGITS,
        "reserved": _DIGITS,
        "remaining": {"anyOf": [_DIGITS, _COUNT]},
        "decimals": _COUNT,
        "symbol": _TEXT,
        "max": _COUNT,
        "count": _COUNT,
        "windowStart": _INSTANT,
        "windowEnd": _INSTANT,
        "freesAt": _INSTANT,
    },
    ["kind", "window", "remaining"],
)
_DELEGATION = _object(
    {
        "agentId": _TEXT,
        "parentId": _TEXT,
        "createdAt": _INSTANT,
        "expiresAt": _INSTANT,
        "revokedAt": _INSTANT,
    },
    ["agentId", "parentId", "createdAt"],
)
_BUDGET_CORE = {
    "agentId": _TEXT,
    "at": _INSTANT,
    "periods": {
        "type": "object",
        "propertyNames": {"enum": [p.value for p in Period]},
        "additionalProperties": _WINDOW,
    },
    "limits": {"type": "array", "items": _LIMIT},
    "delegation": _DELEGATION,
    "moreGroups": {
        "type": "array",
        "description": "The scopes with groups that limits leaves out (at most 200 are listed).",
        "items": _TEXT,
    },
}
_BUDGET = _object(
    {
        **_BUDGET_CORE,
        "ancestors": {
            "type": "array",
            "description": "The budgets above this one, its parent first.",
            "items": _object(_BUDGET_CORE, ["agentId", "at", "periods", "limits"]),
        },
    },
    ["agentId", "at", "periods", "limits"],
)
_RESERVATION = _object(
    {
        "reservationId": _TEXT,
        "status": {"enum": ["held", "reserved", "confirmed", "released", "expired"]},
        "agentId": _TEXT,
        "amount": _DIGITS,
        "expiresAt": _INSTANT,
    }
)
_VOTE = _object(
    {
        "approver": _TEXT,
        "decision": {"enum": ["approve", "deny"]},
        "comment": _TEXT,
        "timestamp": _INSTANT,
        "via": {
            "enum": ["signature", "link"],
            "description": "What proved the approver: a signature by their registered key, or a "
            "one-time link. Absent: an unsigned call.",
        },
        "keyVersion": {"type": "integer", "minimum": 1},
        "signature": {**_TEXT, "description": "The approver's signature, kept for audits."},
        "signedAt": _INSTANT,
    },
    ["approver", "decision", "timestamp"],
)
_APPROVAL = _object(
    {
        "id": _TEXT,
        "agentId": _TEXT,
        "status": {"enum": ["pending", "approved", "denied", "expired"]},
        "amount": {**_TEXT, "description": "human form with the symbol, such as '500 USDT'"},
        "amountRaw": _DIGITS,
        "decimals": {"type": "integer", "minimum": 0},
        "symbol": _TEXT,
        "recipient": _TEXT,
        "network": _TEXT,
        "category": _TEXT,
        "memo": _TEXT,
        "requiredApprovers": {"type": "integer", "minimum": 1},
        "approvers": {"type": "array", "items": _TEXT},
        "groups": {
            "type": "array",
            "items": _object(
                {
                    "name": _TEXT,
                    "required": {"type": "integer", "minimum": 1},
                    "approvers": {"type": "array", "items": _TEXT},
                    "budget": _TEXT,
                },
                ["name", "required", "approvers"],
            ),
        },
        "requestedBy": {**_TEXT, "description": "Who asked on the agent's behalf."},
        "requireSignedVotes": {"const": True},
        "decisions": {"type": "array", "items": _VOTE},
        "createdAt": _INSTANT,
        "expiresAt": _INSTANT,
        "reservationId": _TEXT,
        "reservation": {
            **_object(
                {"status": {"enum": ["reserved", "confirmed", "released", "expired"]},
                 "expiresAt": _INSTANT},
                ["status", "expiresAt"],
            ),
            "description": "Approved (approvals_get only): the reservation to pay with, and by "
            "when the payment must be confirmed.",
        },
    },
    ["id", "agentId", "status", "amount", "amountRaw", "decimals", "symbol", "recipient",
     "network", "requiredApprovers", "approvers", "decisions", "createdAt", "expiresAt"],
)  # fmt: skip
_NEXT = {"nextCursor": {**_TEXT, "description": "Pass as cursor to read the next page."}}
_VERSION = {"type": "integer", "minimum": 1}
_POLICY_ROW = _object({"agentId": _TEXT, "enabled": {"type": "boolean"}, "version": _VERSION})


@functools.cache
def _policy_defs() -> dict[str, Any]:
    from agentpolicy.schema import policy_schema  # noqa: PLC0415 - built on first use

    schema = policy_schema()
    root = {k: v for k, v in schema.items() if k not in ("$schema", "$defs", "title")}
    return {**schema["$defs"], "AgentPolicy": root}


@functools.cache
def _output_schema(name: str) -> dict[str, Any]:
    tool = next(t for t in TOOLS if t.name == name)
    success = _object({"success": {"const": True}, "data": tool.data_schema,
                       "demoMode": {"const": True}}, ["success", "data"])  # fmt: skip
    error = _object(
        {
            "success": {"const": False},
            "error": _object(
                {"code": {"enum": [c.value for c in ErrorCode]}, "message": _TEXT, "path": _TEXT},
                ["code", "message"],
            ),
            "demoMode": {"const": True},
        },
        ["success", "error"],
    )
    schema: dict[str, Any] = {"type": "object", "oneOf": [success, error]}
    if "#/$defs/AgentPolicy" in json.dumps(tool.data_schema):
        schema["$defs"] = _policy_defs()
    return schema


# -- the table -------------------------------------------------------------------------------------

TOOLS: tuple[Tool, ...] = (
    Tool(
        "agent_policy_authorize",
        "agent-policy/authorize",
        "Ask whether the agent may make a payment now, BEFORE sending it. Returns allowed "
        "(true/false), a stable code (ALLOWED, DAILY_LIMIT, RECIPIENT_BLOCKED, "
        "APPROVAL_REQUIRED, ...) and a reason. When allowed, the amount is reserved for a few "
        "minutes (expiresAt): send the payment, then call agent_policy_confirm with the "
        "reservationId, or agent_policy_release if you did not pay. When requiresApproval is "
        "true, do not pay yet: people must approve approvalId first; poll "
        "agent_policy_approvals_get until its status is approved, then pay and confirm its "
        "reservationId. Denied: do not pay. Amounts are strings of the token's smallest unit. "
        "When retrying the same payment, send the same idempotencyKey so it counts once.",
        _schema(
            {
                "agentId": _AGENT,
                "amount": _AMOUNT,
                "recipient": {**_ID, "description": "The address to pay."},
                "network": {
                    "type": "string",
                    "maxLength": 64,
                    "description": "CAIP-2 chain id, such as eip155:8453 (Base) or eip155:1.",
                },
                "category": {**_ID, "description": "What the payment is for, e.g. api_usage."},
                "decimals": {
                    "type": "integer",
                    "minimum": 0,
                    "maximum": MAX_DECIMALS,
                    "description": "The token's decimals (default 6, as USDT).",
                },
                "symbol": {
                    **_ID,
                    "maxLength": 32,
                    "description": "The token's symbol (default USDT).",
                },
                "memo": {
                    "type": "string",
                    "maxLength": MAX_TEXT,
                    "description": "A note kept with the payment; it decides nothing.",
                },
                "idempotencyKey": {
                    **_ID,
                    "description": "Same key and same payment within 24 hours: the first "
                    "answer again, counted once.",
                },
            },
            ["agentId", "amount", "recipient", "network"],
        ),
        _DECISION,
        Annotations("Authorize a payment", read_only=False, idempotent=False),
    ),
    Tool(
        "agent_policy_budget",
        "agent-policy/budget",
        "Show what the agent has spent, has reserved and has left under every limit right "
        "now: calendar windows (hourly to yearly, and lifetime), rolling windows (such as "
        "24h), payment counts, and scoped limits per group (such as per vendor). Amounts are "
        "in the smallest unit of the limit's token (see decimals and symbol); freesAt says "
        "when the next payment stops counting. Use it to plan payments that will pass.",
        _schema(
            {
                "agentId": _AGENT,
                "period": {
                    "type": "string",
                    "enum": [p.value for p in Period],
                    "description": "Only this window (shown even without a limit).",
                },
            },
            ["agentId"],
        ),
        _BUDGET,
        Annotations("Show the budget", read_only=True),
    ),
    Tool(
        "agent_policy_get",
        "agent-policy/get",
        "Read the agent's current spending policy (limits, time, merchant, network, category "
        "and approval rules) and its version, or an earlier version.",
        _schema(
            {
                "agentId": _AGENT,
                "version": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": 2**62,
                    "description": "An earlier version (default: the live one).",
                },
            },
            ["agentId"],
        ),
        _object({"agentId": _TEXT, "policy": {"$ref": "#/$defs/AgentPolicy"}, "version": _VERSION}),
        Annotations("Read the policy", read_only=True),
    ),
    Tool(
        "agent_policy_set",
        "agent-policy/set",
        "Administrators only: replace an agent's spending policy. The policy is a JSON object "
        "(limits, timeRules, merchantRules, networkRules, categoryRules, approvalConfig; see "
        "agent_policy_get for the shape); it is checked strictly and every problem is reported "
        "with its path. Returns the new version.",
        _schema(
            {"agentId": _AGENT, "policy": {"type": "object", "description": "The new policy."}},
            ["agentId", "policy"],
        ),
        _object({"agentId": _TEXT, "version": _VERSION}),
        Annotations("Set a policy", read_only=False, destructive=True, idempotent=False),
        admin_only=True,
    ),
    Tool(
        "agent_policy_list",
        "agent-policy/list",
        "Administrators only: list the agents that have a policy, in order of agent id, "
        "optionally only those of one organisation (agent ids that start with 'orgId:'). "
        "Long lists come in pages: pass nextCursor back as cursor.",
        _schema({"orgId": _ID, **_PAGE}, []),
        _object({"policies": {"type": "array", "items": _POLICY_ROW}, **_NEXT}, ["policies"]),
        Annotations("List policies", read_only=True),
        admin_only=True,
    ),
    Tool(
        "agent_policy_confirm",
        "agent-policy/confirm",
        "Confirm that an authorized payment was sent: its reserved amount becomes spending. "
        "Call it once the payment went through; calling it again is harmless.",
        _schema({"reservationId": _RECORD_ID, "holder": _HOLDER}, ["reservationId"]),
        _RESERVATION,
        Annotations("Confirm a payment", read_only=False),
    ),
    Tool(
        "agent_policy_release",
        "agent-policy/release",
        "Give back the budget of an authorized payment that was NOT sent. Calling it again "
        "is harmless; a confirmed payment cannot be released, and on the agent role neither "
        "can one its framework marked sent (FORBIDDEN: it may have been paid).",
        _schema({"reservationId": _RECORD_ID, "holder": _HOLDER}, ["reservationId"]),
        _RESERVATION,
        Annotations("Release a reservation", read_only=False),
    ),
    Tool(
        "agent_policy_approvals_list",
        "agent-policy/approvals/list",
        "List the approvals still waiting for people to decide, oldest first, optionally of "
        "one agent. Long lists come in pages: pass nextCursor back as cursor.",
        _schema({"agentId": {**_ID, "description": "Only this agent's approvals."}, **_PAGE}, []),
        _object({"approvals": {"type": "array", "items": _APPROVAL}, **_NEXT}, ["approvals"]),
        Annotations("List pending approvals", read_only=True),
    ),
    Tool(
        "agent_policy_approvals_get",
        "agent-policy/approvals/get",
        "Read one approval: its status (pending, approved, denied, expired), the decisions so "
        "far, and once approved the reservationId to confirm after paying and the "
        "reservation's expiresAt, by when to pay.",
        _schema({"approvalId": _RECORD_ID}, ["approvalId"]),
        _APPROVAL,
        Annotations("Read an approval", read_only=True),
    ),
    Tool(
        "agent_policy_approvals_decide",
        "agent-policy/approvals/decide",
        "Administrators only: approve or deny a pending approval as a named approver. One "
        "deny denies the payment; enough approvals approve it. A registered approver's vote "
        "needs their signature (signature and signedAt).",
        _schema(
            {
                "approvalId": _RECORD_ID,
                "decision": {"type": "string", "enum": ["approve", "deny"]},
                "approver": {**_ID, "description": "Who decides: one of the approval's approvers."},
                "comment": {"type": "string", "maxLength": MAX_TEXT},
                "signature": {
                    "type": "string",
                    "maxLength": 128,
                    "description": "The approver's Ed25519 signature (base64url) of the vote "
                    "message (see docs/approvals.md).",
                },
                "signedAt": {
                    **_INSTANT,
                    "maxLength": 64,
                    "description": "When the vote was signed (ISO 8601 with offset).",
                },
            },
            ["approvalId", "decision", "approver"],
        ),
        _APPROVAL,
        Annotations("Decide an approval", read_only=False, idempotent=False),
        admin_only=True,
    ),
)

_CHILD = {**_ID, "description": "The sub-agent whose budget this is."}
_PARENT = {**_ID, "description": "The budget it is carved from (defaults to this server's agent)."}

TOOLS += (
    Tool(
        "agent_policy_delegate",
        "agent-policy/delegate",
        "Hand a sub-agent a budget carved from a parent budget (by default this server's own "
        "agent), for a while: every payment of the sub-agent must also fit the parent's "
        "limits and counts in them, so it can never spend more than the parent has left. "
        "The policy is a JSON object like agent_policy_get's (its limits may not exceed the "
        "parent's). Give expiresIn (such as '1h', '30m') or expiresAt; the parent's policy "
        "must allow delegation ('delegation': {'allowed': true}) unless an administrator "
        "calls, and an agent names the sub-agent below its own id ('<parent>/<name>'). "
        "Calling again for the same sub-agent updates its policy.",
        _schema(
            {
                "childId": _CHILD,
                "parentId": _PARENT,
                "policy": {"type": "object", "description": "The sub-agent's policy."},
                "expiresAt": {
                    **_INSTANT,
                    "maxLength": 64,
                    "description": "When the budget ends (ISO 8601 with offset).",
                },
                "expiresIn": {
                    "type": "string",
                    "maxLength": 32,
                    "description": "How long from now the budget lasts: '90s', '15m', '1h', '7d'.",
                },
            },
            ["childId", "policy"],
        ),
        _object(
            {**_DELEGATION["properties"], "version": _VERSION},
            ["agentId", "parentId", "createdAt", "version"],
        ),
        Annotations("Delegate a budget", read_only=False, idempotent=False),
    ),
    Tool(
        "agent_policy_revoke",
        "agent-policy/revoke",
        "Revoke a sub-agent's delegated budget now: it (and every budget below it) stops "
        "allowing payments and its pending approvals expire (payments already allowed count "
        "until confirmed or expired). Only a budget above it "
        "(by default this server's agent) or an administrator may revoke it. Revoking again "
        "is harmless.",
        _schema(
            {
                "childId": _CHILD,
                "parentId": {
                    **_PARENT,
                    "description": "Revoke as this budget (defaults to this server's agent).",
                },
            },
            ["childId"],
        ),
        _DELEGATION,
        Annotations("Revoke a delegated budget", read_only=False, destructive=True),
    ),
)

# -- safe rollout: dry runs, versions, shadow policies, what-if ----------------------------------

MAX_VERSION = 2**62
"""The highest policy version a tool takes (as argument or in a cursor)."""
_VERSION_ARG = {"type": "integer", "minimum": 1, "maximum": MAX_VERSION}
_CHANGE = _object(
    {
        "path": {**_TEXT, "description": "Where the field is: limits.daily.value"},
        "kind": {"enum": ["added", "removed", "changed"]},
        "before": {"description": "The JSON value before (absent when added)."},
        "after": {"description": "The JSON value after (absent when removed)."},
        "text": {**_TEXT, "description": "limits.daily.value: 1000000000 -> 500000000"},
    },
    ["path", "kind", "text"],
)
_VERSION_ROW = _object(
    {
        "version": _VERSION,
        "setAt": _INSTANT,
        "origin": {"enum": ["set", "delegate", "rollback", "promote"]},
        "fromVersion": _VERSION,
        "current": {"type": "boolean"},
        "changes": {"type": "array", "items": _CHANGE},
    },
    ["version", "setAt", "origin", "current", "changes"],
)
_CODES = {"type": "object", "additionalProperties": _COUNT}
_OUTCOMES = _object({"allowed": _COUNT, "approval": _COUNT, "denied": _COUNT})
_FLIPS = {
    "type": "object",
    "description": "Payments whose outcome would change, such as allowed->denied.",
    "additionalProperties": _COUNT,
}
_PAYMENT_CORE = {
    "at": _INSTANT,
    "agentId": _TEXT,
    "amount": _DIGITS,
    "decimals": _COUNT,
    "symbol": _TEXT,
    "recipient": _TEXT,
    "network": _TEXT,
    "category": _TEXT,
    "flip": {"type": ["string", "null"]},
}
_PAYMENT_REQUIRED = ["at", "agentId", "amount", "decimals", "symbol", "recipient", "network",
                     "flip"]  # fmt: skip
_SHADOW = _object(
    {
        "agentId": _TEXT,
        "policy": {"$ref": "#/$defs/AgentPolicy"},
        "setAt": _INSTANT,
        "liveVersion": _VERSION,
    }
)
_SHADOW_REPORT = _object(
    {
        "agentId": _TEXT,
        "setAt": _INSTANT,
        "liveVersion": _VERSION,
        "payments": _COUNT,
        "live": _OUTCOMES,
        "shadow": _OUTCOMES,
        "liveCodes": _CODES,
        "shadowCodes": _CODES,
        "flips": _FLIPS,
        "differences": {
            "type": "array",
            "description": "Payments the shadow would have decided differently, newest first.",
            "items": _object(
                {**_PAYMENT_CORE, "liveCode": _TEXT, "shadowCode": _TEXT,
                 "policyVersion": _VERSION},
                [*_PAYMENT_REQUIRED, "liveCode", "shadowCode"],
            ),
        },
    }
)  # fmt: skip
_SPEND = _object(
    {
        "window": _TEXT,
        "windowStart": _INSTANT,
        "windowEnd": _INSTANT,
        "scope": _TEXT,
        "group": _TEXT,
        "live": _DIGITS,
        "candidate": _DIGITS,
        "decimals": _COUNT,
        "symbol": _TEXT,
        "liveCount": _COUNT,
        "candidateCount": _COUNT,
        "limit": _DIGITS,
        "limitDecimals": _COUNT,
        "max": _COUNT,
    },
    ["window", "windowStart", "windowEnd", "live", "candidate", "decimals", "symbol",
     "liveCount", "candidateCount"],
)  # fmt: skip
_SIMULATION = _object(
    {
        "agentId": _TEXT,
        "since": _INSTANT,
        "until": _INSTANT,
        "payments": _COUNT,
        "live": _OUTCOMES,
        "candidate": _OUTCOMES,
        "liveCodes": _CODES,
        "candidateCodes": _CODES,
        "flips": _FLIPS,
        "changedTotal": _COUNT,
        "changed": {
            "type": "array",
            "description": "The first 100 payments the candidate would decide differently.",
            "items": _object(
                {**_PAYMENT_CORE, "liveCode": _TEXT, "candidateCode": _TEXT},
                [*_PAYMENT_REQUIRED, "liveCode", "candidateCode"],
            ),
        },
        "windows": {"type": "array", "items": _SPEND},
        "notes": {"type": "array", "items": _TEXT},
    }
)
_ADMIN_AGENT = _schema({"agentId": _AGENT}, ["agentId"])

TOOLS += (
    Tool(
        "agent_policy_check",
        "agent-policy/check",
        "Ask whether a payment WOULD be allowed right now, without reserving or recording "
        "anything (a dry run): the same answer agent_policy_authorize would give (code, "
        "reason, every check), plus headroom: for every limit (daily, rolling 24h, counts, "
        "scopes, and the budgets above this one) what is used and what would be left after "
        "this payment, and whether it fits. Use it to plan; call agent_policy_authorize to "
        "actually reserve before paying.",
        TOOLS[0].input_schema,
        _DECISION,
        Annotations("Check a payment (dry run)", read_only=True),
    ),
    Tool(
        "agent_policy_versions",
        "agent-policy/versions",
        "Administrators only: the versions of an agent's policy, newest first: when each was "
        "set, how (set, delegate, rollback, promote), whether it is live, and what changed "
        "from the version before (field by field). Long lists come in pages.",
        _schema({"agentId": _AGENT, **_PAGE}, ["agentId"]),
        _object(
            {
                "agentId": _TEXT,
                "currentVersion": _VERSION,
                "versions": {"type": "array", "items": _VERSION_ROW},
                **_NEXT,
            },
            ["agentId", "currentVersion", "versions"],
        ),
        Annotations("List policy versions", read_only=True),
        admin_only=True,
    ),
    Tool(
        "agent_policy_diff",
        "agent-policy/diff",
        "Administrators only: what differs between two versions of an agent's policy, field "
        "by field (limits.daily.value: 1000000000 -> 500000000).",
        _schema(
            {"agentId": _AGENT, "fromVersion": _VERSION_ARG, "toVersion": _VERSION_ARG},
            ["agentId", "fromVersion", "toVersion"],
        ),
        _object(
            {
                "agentId": _TEXT,
                "fromVersion": _VERSION,
                "toVersion": _VERSION,
                "changes": {"type": "array", "items": _CHANGE},
            }
        ),
        Annotations("Compare two policy versions", read_only=True),
        admin_only=True,
    ),
    Tool(
        "agent_policy_rollback",
        "agent-policy/rollback",
        "Administrators only: make an earlier version of an agent's policy live again, as a "
        "new version equal to it (checked like agent_policy_set). Returns the new version.",
        _schema({"agentId": _AGENT, "version": _VERSION_ARG}, ["agentId", "version"]),
        _object({"agentId": _TEXT, "version": _VERSION, "fromVersion": _VERSION}),
        Annotations("Roll back a policy", read_only=False, destructive=True, idempotent=False),
        admin_only=True,
    ),
    Tool(
        "agent_policy_shadow_set",
        "agent-policy/shadow/set",
        "Administrators only: judge every payment of an agent (and of the budgets below it) "
        "by a candidate policy too, without enforcing it: the live policy still decides. "
        "agent_policy_shadow_report then says what the candidate would have allowed, denied "
        "or sent for approval. Setting it again replaces it and starts counting afresh.",
        _schema(
            {"agentId": _AGENT, "policy": {"type": "object", "description": "The candidate."}},
            ["agentId", "policy"],
        ),
        _SHADOW,
        Annotations("Set a shadow policy", read_only=False, idempotent=False),
        admin_only=True,
    ),
    Tool(
        "agent_policy_shadow_report",
        "agent-policy/shadow/report",
        "Administrators only: what the agent's shadow policy would have decided since it was "
        "set: payments by outcome and by code, live and shadow, how many would flip "
        "(allowed->denied, denied->allowed, ->approval), and the newest payments it would "
        "have decided differently.",
        _schema({"agentId": _AGENT, "limit": _PAGE["limit"]}, ["agentId"]),
        _SHADOW_REPORT,
        Annotations("Report on a shadow policy", read_only=True),
        admin_only=True,
    ),
    Tool(
        "agent_policy_shadow_promote",
        "agent-policy/shadow/promote",
        "Administrators only: make the agent's shadow policy its live policy (a new version) "
        "and remove the shadow, in one step. Returns the new version. Refused with "
        "SHADOW_OUTDATED when the live policy changed after the shadow was set (it would undo "
        "that change, an emergency stop say); force: true promotes anyway. setAt (the setAt "
        "of the shadow you reviewed) promotes only that shadow: one set since is "
        "SHADOW_OUTDATED.",
        _schema({"agentId": _AGENT, "force": {"type": "boolean"}, "setAt": _INSTANT}, ["agentId"]),
        _object({"agentId": _TEXT, "version": _VERSION}),
        Annotations("Promote a shadow policy", read_only=False, destructive=True, idempotent=False),
        admin_only=True,
    ),
    Tool(
        "agent_policy_shadow_clear",
        "agent-policy/shadow/clear",
        "Administrators only: remove the agent's shadow policy (the live policy is "
        "untouched). Returns its last report.",
        _ADMIN_AGENT,
        _SHADOW_REPORT,
        Annotations("Clear a shadow policy", read_only=False, destructive=True, idempotent=False),
        admin_only=True,
    ),
    Tool(
        "agent_policy_simulate",
        "agent-policy/simulate",
        "Administrators only: what-if. Replay the agent's recorded payments since a moment "
        "(since: a duration back from now such as '30d', or an ISO 8601 instant) against a "
        "candidate policy, in time order with its own counters, touching nothing live. "
        "Reports what it would have allowed, denied or sent for approval, the flips versus "
        "what happened, and the spend per window.",
        _schema(
            {
                "agentId": _AGENT,
                "policy": {"type": "object", "description": "The candidate policy."},
                "since": {
                    "type": "string",
                    "maxLength": 64,
                    "description": "'30d', '12h', or an instant such as 2026-01-01T00:00:00Z.",
                },
            },
            ["agentId", "policy", "since"],
        ),
        _SIMULATION,
        Annotations("Simulate a policy", read_only=True),
        admin_only=True,
    ),
)

_KEY_VERSION = _object(
    {
        "version": {"type": "integer", "minimum": 1},
        "publicKey": _TEXT,
        "addedAt": _INSTANT,
        "retiredAt": _INSTANT,
        "retiredBy": {"enum": ["rotation", "removal"]},
    },
    ["version", "publicKey", "addedAt"],
)
_APPROVER = _object(
    {
        "name": _TEXT,
        "publicKey": _TEXT,
        "version": {"type": "integer", "minimum": 1},
        "registered": {"type": "boolean"},
        "keys": {"type": "array", "items": _KEY_VERSION},
    },
    ["name", "registered", "keys"],
)
_NAME = {**_ID, "description": "The approver's name, as the policies' approver lists name it."}
_PUBLIC_KEY = {
    "type": "string",
    "maxLength": 128,
    "description": "The approver's Ed25519 public key, 'ed25519:' and base64url (as "
    "`agentpolicy approver keygen` prints it).",
}

TOOLS += (
    Tool(
        "agent_policy_approvers_list",
        "agent-policy/approvers/list",
        "Administrators only: list the registered approvers (removed ones too) with their "
        "public keys and every key version.",
        _schema({}, []),
        _object({"approvers": {"type": "array", "items": _APPROVER}}),
        Annotations("List approvers", read_only=True),
        admin_only=True,
    ),
    Tool(
        "agent_policy_approvers_register",
        "agent-policy/approvers/register",
        "Administrators only: register an approver's public key. From then on their votes "
        "count only when signed with the matching private key, which never leaves them.",
        _schema({"name": _NAME, "publicKey": _PUBLIC_KEY}, ["name", "publicKey"]),
        _APPROVER,
        Annotations("Register an approver", read_only=False),
        admin_only=True,
    ),
    Tool(
        "agent_policy_approvers_rotate",
        "agent-policy/approvers/rotate",
        "Administrators only: give a registered approver a new public key; the old one stops "
        "verifying votes at once and never comes back.",
        _schema({"name": _NAME, "publicKey": _PUBLIC_KEY}, ["name", "publicKey"]),
        _APPROVER,
        Annotations("Rotate an approver's key", read_only=False, destructive=True),
        admin_only=True,
    ),
    Tool(
        "agent_policy_approvers_remove",
        "agent-policy/approvers/remove",
        "Administrators only: retire an approver's key: none of their signed votes verifies "
        "from now on. The approver stays listed with every key version.",
        _schema({"name": _NAME}, ["name"]),
        _APPROVER,
        Annotations("Remove an approver", read_only=False, destructive=True),
        admin_only=True,
    ),
)

REGISTRY_CHANGES = frozenset(
    {"agent_policy_approvers_register", "agent_policy_approvers_rotate",
     "agent_policy_approvers_remove"}
)  # fmt: skip
"""Tools that change the approver registry: never offered by a server bound to an approver."""

_BY_NAME = {name: t for t in TOOLS for name in (t.name, t.slash_name)}


def find_tool(name: object) -> Tool | None:
    """The tool called ``name`` (its MCP name or its slash name), if any."""
    return _BY_NAME.get(name) if isinstance(name, str) else None


def parse_arguments(tool: Tool, arguments: object) -> dict[str, Any]:
    """Check ``arguments`` against the tool's schema; raise ``INVALID_INPUT`` with paths.

    Unknown keys and wrong types are refused, and so are strings longer than
    the schema's ``maxLength``; values are range-checked by the classes that
    receive them.
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
        if spec is not None:
            problems += _value_problems(spec, value, f"$.{key}")
    if problems:
        raise PolicyValidationError(problems)
    return dict(arguments)


def _value_problems(spec: dict[str, Any], value: object, path: str) -> list[Problem]:
    kind = spec.get("type")
    if kind == "integer":
        return check_int(value, path, spec["minimum"], spec["maximum"])
    if kind == "object":
        return [] if isinstance(value, Mapping) else [
            Problem(path, f"must be an object, not {type_name(value)}")
        ]  # fmt: skip
    if kind == "boolean":
        return [] if type(value) is bool else [
            Problem(path, f"must be true or false, not {type_name(value)}")
        ]  # fmt: skip
    if not isinstance(value, str):
        return [Problem(path, f"must be a string, not {type_name(value)}")]
    if "enum" in spec and value not in spec["enum"]:
        return [Problem(path, "must be one of " + ", ".join(spec["enum"]))]
    if spec.get("minLength") == 1:  # an identifier (see _ID)
        return check_identifier(value, path, spec["maxLength"])
    return check_text(value, path, spec.get("maxLength", MAX_TEXT))
