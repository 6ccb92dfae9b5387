"""AgentPolicyMcpServer: the tools over a PolicyEngine, with roles and agent binding.

The governed agent must not be able to raise its own limits or approve its
own payments: the ``agent`` role (the default) serves only authorize,
budget, get, confirm, release, approvals/list, approvals/get, and delegate
and revoke (which only carve sub-budgets out of its own budget, when its
policy allows it), and may be
bound to one agent id (which then is the default ``agentId``) or an
organisation prefix. An ``admin`` server may be bound to one approver
(and that approver's key): it then votes as that approver only, signs
every vote with the key, and never changes the approver registry.

Every call returns a dict, ``{"success": True, "data": ...}`` or
``{"success": False, "error": {...}}``; no exception and no traceback ever
reaches the client. Long listings come in pages (``limit``, ``cursor``,
``nextCursor``).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from agentpolicy import _json as bounded_json
from agentpolicy._checks import (
    check_identifier,
    check_record_id,
    cut,
    person,
    quoted,
    raise_if,
    type_name,
)
from agentpolicy.codec import dump_policy, format_instant, parse_instant
from agentpolicy.config import ROLES, open_configured_storage, read_settings
from agentpolicy.durations import parse_duration, parse_since
from agentpolicy.engine import DEFAULT_RESERVATION_TTL, PolicyEngine
from agentpolicy.errors import (
    ErrorCode,
    ForbiddenError,
    NotFoundError,
    PolicyError,
    PolicyValidationError,
    Problem,
)
from agentpolicy.examples import example_policy
from agentpolicy.mcp.tools import (
    MAX_VERSION,
    REGISTRY_CHANGES,
    TOOLS,
    Tool,
    find_tool,
    parse_arguments,
)
from agentpolicy.policy import AgentPolicy
from agentpolicy.records import Approval
from agentpolicy.requests import PaymentRequest
from agentpolicy.signing import SigningKey
from agentpolicy.storage import MemoryStorage, Storage, open_storage
from agentpolicy.views import (
    approval_data,
    approver_data,
    budget_data,
    budget_seen_by,
    change_data,
    decision_data,
    delegation_data,
    reservation_data,
    shadow_data,
    shadow_report_data,
    simulation_data,
    version_data,
)
from agentpolicy.webhooks import WebhookEndpoint

_REGISTRY = REGISTRY_CHANGES | {"agent_policy_approvers_list"}

__all__ = ["DEMO_AGENT", "AgentPolicyMcpServer", "create_server_with_redis"]

log = logging.getLogger("agentpolicy.mcp")

DEMO_AGENT = "demo-agent"
"""The agent that demo mode sets the example policy for."""

DEFAULT_PAGE = 20
"""Entries in one page of a listing when the call names no ``limit``."""

T = TypeVar("T")


def _error(code: ErrorCode | str, message: str, path: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": str(code), "message": message}
    if path is not None:
        error["path"] = path
    return {"success": False, "error": error}


MAX_PROBLEMS = 20
"""The most problems of one refused input an error names (the rest are counted)."""

MAX_SHOWN = 300
"""The most characters of one problem, or of the error's path, an error shows."""


def _brief(text: str) -> str:
    return cut(text, MAX_SHOWN)


def _refusal(err: PolicyError) -> dict[str, Any]:
    """The error of a refusal, bounded: an input with 100,000 bad keys is not echoed back.

    Each problem (its path holds the caller's own key names) is cut to
    :data:`MAX_SHOWN` characters, and at most :data:`MAX_PROBLEMS` are named
    (in path order, as always); the rest are counted.
    """
    path = None if err.path is None else _brief(err.path)
    if not isinstance(err, PolicyValidationError):
        return _error(err.code, err.message, path)
    problems = err.problems
    if len(problems) <= MAX_PROBLEMS and all(len(str(p)) <= MAX_SHOWN for p in problems):
        return _error(err.code, err.message, path)
    shown = "; ".join(_brief(str(p)) for p in problems[:MAX_PROBLEMS])
    if len(problems) == 1:
        return _error(err.code, shown, path)
    more = len(problems) - MAX_PROBLEMS
    rest = f"; and {more} more" if more > 0 else ""
    return _error(err.code, f"{len(problems)} problems: {shown}{rest}", path)


class AgentPolicyMcpServer:
    """The agent-policy tools, served to an MCP client (or called directly).

    ``engine`` is a ready :class:`~agentpolicy.PolicyEngine` (as
    :func:`agentpolicy.config.build_engine` makes); without one, the server
    builds its own from ``storage``, ``clock``, ``webhook_endpoints`` and
    ``reservation_ttl``. ``storage`` is a :class:`~agentpolicy.Storage`, a
    storage URL, or ``None``: ``AGENT_POLICY_REDIS_URL`` if set, else
    ``AGENT_POLICY_DB`` if set (its folder is created), else a fresh
    in-memory storage private to this server. ``role`` is ``"agent"`` or
    ``"admin"``; demo mode implies admin and always uses a fresh in-memory
    storage with the example policy for ``demo-agent``, and sends no
    webhook. ``webhook_endpoints`` are objects or dicts (see
    :func:`agentpolicy.webhooks.to_endpoints`). ``agent_id`` or ``org_id``
    bind an agent-role server to one agent (then ``agentId`` may be left
    out of every call) or to agent ids that start with ``"{org_id}:"``.

    ``approver`` binds an admin server to one approver: it votes as that
    approver only (an ``approver`` argument naming anyone else is
    ``FORBIDDEN``), payments it authorizes name it as their requester, and
    it offers no tool that changes the approver registry. ``approver_key``
    (a :class:`~agentpolicy.signing.SigningKey` or the path of its file)
    makes it sign every vote with that approver's key.
    """

    def __init__(
        self,
        demo_mode: bool = False,
        storage: Storage | str | None = None,
        role: str = "agent",
        clock: Callable[[], datetime] | None = None,
        webhook_endpoints: Iterable[WebhookEndpoint | Mapping[str, Any]] | None = None,
        reservation_ttl: timedelta | None = None,
        *,
        agent_id: str | None = None,
        org_id: str | None = None,
        engine: PolicyEngine | None = None,
        approver: str | None = None,
        approver_key: SigningKey | str | os.PathLike[str] | None = None,
    ) -> None:
        problems: list[Problem] = []
        if role not in ROLES:
            problems += PolicyValidationError.single("$.role", "must be agent or admin").problems
        for name, value in (("agentId", agent_id), ("orgId", org_id), ("approver", approver)):
            if value is not None:
                problems += check_identifier(value, f"$.{name}")
        if approver is not None and role != "admin" and not demo_mode:
            problems.append(Problem("$.approver", "binds an admin server: only it decides"))
        if approver_key is not None and approver is None:
            problems.append(Problem("$.approverKey", "needs approver: who the key signs for"))
        raise_if(problems)
        self.demo_mode = bool(demo_mode)
        self.role = "admin" if self.demo_mode else role
        self.bound_agent = agent_id
        self.bound_org = org_id
        self.bound_approver = approver
        self.approver_key = (
            approver_key
            if approver_key is None or isinstance(approver_key, SigningKey)
            else SigningKey.load(approver_key, "$.approverKey")
        )
        self._tools = [
            self._bind(t)
            for t in TOOLS
            if (self.role == "admin" or not t.admin_only)
            and not (approver is not None and t.name in REGISTRY_CHANGES)
            and not (self._scoped and t.name in _REGISTRY)
        ]
        if engine is not None and not self.demo_mode:
            self.engine = engine
            return
        if self.demo_mode:
            storage = MemoryStorage()
        elif storage is None:
            storage = open_configured_storage(read_settings(), fallback_to_file=False)
        self.engine = PolicyEngine(
            storage=storage,
            clock=clock,
            reservation_ttl=reservation_ttl or DEFAULT_RESERVATION_TTL,
            webhook_endpoints=None if self.demo_mode else webhook_endpoints,
        )
        if self.demo_mode:
            self.engine.set_policy(DEMO_AGENT, example_policy())

    # -- what this server offers -------------------------------------------------------

    def _bind(self, tool: Tool) -> Tool:
        if self.role != "admin":  # only an administrator settles a block's claimed payment
            tool = tool.without("holder")
        if self.bound_agent is not None:
            tool = tool.bound_to(self.bound_agent)
        if self.bound_approver is not None:
            tool = tool.bound_to_approver(self.bound_approver, signs=self.approver_key is not None)
        return tool

    def tools(self) -> list[Tool]:
        """The tools this server's role may call, in the table's order, as this server offers them.

        On a server bound to one agent, ``agentId`` is optional and says so.
        """
        return list(self._tools)

    def _offered(self, tool: Tool) -> Tool:
        return next((t for t in self._tools if t.name == tool.name), tool)

    # -- binding ---------------------------------------------------------------------------

    def _may_see(self, agent_id: str) -> bool:
        if self.bound_agent is not None and agent_id != self.bound_agent:
            return False
        return self.bound_org is None or agent_id.startswith(f"{self.bound_org}:")

    def _check_agent(self, agent_id: str) -> None:
        if not self._may_see(agent_id):
            raise ForbiddenError(
                f"this server is bound to {self._binding} and serves nothing of agent {agent_id}",
                code=ErrorCode.FORBIDDEN,
            )

    # -- calls -------------------------------------------------------------------------------

    async def handle_tool_call(
        self, name: str, arguments: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """Call a tool by its MCP name or its slash name; return the result dict (never raises)."""
        return self.call(name, arguments)

    def call(self, name: object, arguments: object) -> dict[str, Any]:
        """Synchronous :meth:`handle_tool_call`."""
        result = self._call(name, arguments)
        if self.demo_mode:
            result["demoMode"] = True
        return result

    def _call(self, name: object, arguments: object) -> dict[str, Any]:
        if not isinstance(name, str):  # a client's mistyped call: names no tool
            return _error(
                ErrorCode.UNKNOWN_TOOL,
                f"a tool call's name must be a string naming a tool, not {type_name(name)}",
            )
        tool = find_tool(name)
        if tool is None:
            return _error(ErrorCode.UNKNOWN_TOOL, f"unknown tool {quoted(name, MAX_SHOWN)}")
        if tool.admin_only and self.role != "admin":
            return _error(
                ErrorCode.FORBIDDEN,
                f"{tool.name} needs the admin role; this server runs as {self.role}",
            )
        if self._scoped and tool.name in _REGISTRY:
            return _error(
                ErrorCode.FORBIDDEN,
                f"{tool.name} reads or changes the approver registry, which every agent and "
                "organisation of the store shares; this server is bound and never does",
            )
        if self.bound_approver is not None and tool.name in REGISTRY_CHANGES:
            return _error(
                ErrorCode.FORBIDDEN,
                f"{tool.name} changes the approver registry; this server is bound to approver "
                f"{self.bound_approver} and never does",
            )
        try:
            args = parse_arguments(self._offered(tool), arguments)
            if self.bound_agent is not None and "agentId" in tool.input_schema["properties"]:
                args.setdefault("agentId", self.bound_agent)
            data = getattr(self, "_" + tool.name.removeprefix("agent_policy_"))(args)
        except PolicyError as err:
            return _refusal(err)
        except Exception:
            log.exception("internal error in %s", tool.name)
            return _error(
                ErrorCode.INTERNAL,
                f"internal error in {tool.name} (a bug in agentpolicy); nothing was changed",
            )
        return {"success": True, "data": data}

    # -- the tools ---------------------------------------------------------------------------

    def _authorize(self, a: dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        self._check_agent(a["agentId"])
        request = PaymentRequest(
            agent_id=a["agentId"],
            amount=a["amount"],
            recipient=a["recipient"],
            network=a["network"],
            category=a.get("category"),
            decimals=a.get("decimals", 6),
            symbol=a.get("symbol", "USDT"),
            memo=a.get("memo"),
            idempotency_key=a.get("idempotencyKey"),
        )
        decision = self.engine.authorize(request, dry_run=dry_run, requested_by=self.bound_approver)
        return decision_data(decision)

    def _check(self, a: dict[str, Any]) -> dict[str, Any]:
        return self._authorize(a, dry_run=True)

    def _budget(self, a: dict[str, Any]) -> dict[str, Any]:
        self._check_agent(a["agentId"])
        # no group of a scope above the binding: its name is what a sibling paid (check still
        # gives the group of a payment's own)
        budget = self.engine.budget(a["agentId"], a.get("period"))
        return budget_data(budget_seen_by(budget, self._may_see))

    def _get(self, a: dict[str, Any]) -> dict[str, Any]:
        self._check_agent(a["agentId"])
        if "version" in a:
            found = self.engine.get_policy_version(a["agentId"], a["version"])
            return {"agentId": found.agent_id, "policy": dump_policy(found.policy),
                    "version": found.version}  # fmt: skip
        stored = self.engine.get_policy(a["agentId"])
        if stored is None:
            raise PolicyError(
                f"no policy is set for agent {a['agentId']}", code=ErrorCode.NO_POLICY
            )
        return {
            "agentId": stored.agent_id,
            "policy": dump_policy(stored.policy),
            "version": stored.version,
        }

    @property
    def _binding(self) -> str:
        """What this bound server serves: its agent, or its organisation's agents."""
        return self.bound_agent or f"{self.bound_org}:*"

    @property
    def _scoped(self) -> bool:
        """Whether this server is bound to one agent or one organisation."""
        return self.bound_agent is not None or self.bound_org is not None

    def _check_parent(self, policy: object) -> None:
        """A bound server puts no budget below a budget outside its binding."""
        parent = policy.parent if isinstance(policy, AgentPolicy) else (
            policy.get("parent") if isinstance(policy, Mapping) else None)  # fmt: skip
        if isinstance(parent, str) and not self._may_see(parent):
            raise ForbiddenError(
                f"this server is bound to {self._binding} and may not put a budget below {parent}",
                code=ErrorCode.FORBIDDEN,
            )

    def _set(self, a: dict[str, Any]) -> dict[str, Any]:
        self._check_agent(a["agentId"])
        self._check_parent(a["policy"])
        version = self.engine.set_policy(a["agentId"], a["policy"])
        return {"agentId": a["agentId"], "version": version}

    def _list(self, a: dict[str, Any]) -> dict[str, Any]:
        policies = sorted(
            (p for p in self.engine.list_policies(a.get("orgId")) if self._may_see(p.agent_id)),
            key=lambda p: p.agent_id,
        )
        page, cursor = _page(policies, lambda p: [p.agent_id], a, _policy_cursor)
        rows = [{"agentId": p.agent_id, "enabled": p.policy.enabled, "version": p.version}
                for p in page]  # fmt: skip
        return _with_cursor({"policies": rows}, cursor)

    def _own_reservation(self, reservation_id: str) -> None:
        """On a bound server: the reservation is one of its agents', else it is not found.

        Another agent's reservation answers exactly as a missing one does, so a
        bound server tells nothing about other agents, not even that an id exists.
        """
        if not self._scoped:
            return
        try:
            agent_id = self.engine.get_reservation(reservation_id).agent_id
        except NotFoundError:
            agent_id = None
        if agent_id is None or not self._may_see(agent_id):
            raise NotFoundError(
                f"no reservation {reservation_id!r}", code=ErrorCode.RESERVATION_NOT_FOUND
            )

    def _own_approval(self, approval_id: str) -> Approval:
        """The approval, if it is one of a bound server's agents'; else it is not found.

        Another agent's approval answers exactly as a missing one does.
        """
        try:
            approval = self.engine.get_approval(approval_id)
        except NotFoundError:
            approval = None
        if approval is None or not self._may_see(approval.agent_id):
            raise NotFoundError(f"no approval {approval_id!r}", code=ErrorCode.APPROVAL_NOT_FOUND)
        return approval

    def _settle(self, reservation_id: str, action: str, holder: str | None) -> dict[str, Any]:
        self._own_reservation(reservation_id)
        if action == "confirm":
            return reservation_data(self.engine.confirm(reservation_id, holder=holder))
        if self.role == "admin":
            return reservation_data(self.engine.release(reservation_id, holder=holder))
        # the governed agent never gives back a payment that may have left (marked sent)
        flow = self.engine._settle(reservation_id, "release", holder, keep_sent=True)
        return reservation_data(self.engine._drive(flow))

    def _confirm(self, a: dict[str, Any]) -> dict[str, Any]:
        return self._settle(a["reservationId"], "confirm", a.get("holder"))

    def _release(self, a: dict[str, Any]) -> dict[str, Any]:
        return self._settle(a["reservationId"], "release", a.get("holder"))

    def _approvals_list(self, a: dict[str, Any]) -> dict[str, Any]:
        agent_id = a.get("agentId")
        if agent_id is not None:
            self._check_agent(agent_id)
        approvals = sorted(
            (x for x in self.engine.list_approvals(agent_id) if self._may_see(x.agent_id)),
            key=lambda x: (x.created_at, x.id),
        )
        page, cursor = _page(
            approvals, lambda x: [x.created_at.isoformat(), x.id], a, _approval_cursor
        )
        return _with_cursor({"approvals": [approval_data(x) for x in page]}, cursor)

    def _approvals_get(self, a: dict[str, Any]) -> dict[str, Any]:
        approval = self._own_approval(a["approvalId"])
        data = approval_data(approval)
        rid = approval.reservation_id
        if rid is not None:  # approved: how long the agent has to pay, and whether it did
            try:
                reservation = self.engine.get_reservation(rid)
            except NotFoundError:  # pruned long after it closed
                return data
            data["reservation"] = {
                "status": reservation.status.value,
                "expiresAt": format_instant(reservation.expires_at),
            }
        return data

    def _voter(self, a: dict[str, Any]) -> str:
        """Who votes: the bound approver (and no one else), or the ``approver`` argument."""
        named: str | None = a.get("approver")
        bound = self.bound_approver
        if bound is None:
            if named is None:
                raise PolicyValidationError.single("$.approver", "is required")
            return named
        if named is not None and person(named) != person(bound):
            raise ForbiddenError(
                f"this server votes as {bound} only, not as {named}", code=ErrorCode.FORBIDDEN
            )
        return bound

    def _approvals_decide(self, a: dict[str, Any]) -> dict[str, Any]:
        approver = self._voter(a)
        self._own_approval(a["approvalId"])
        approval_id, decision, comment = a["approvalId"], a["decision"], a.get("comment")
        signature, signed_at = a.get("signature"), None
        if self.approver_key is not None:  # the tool offers no signature: the server signs
            signed_at = self.engine.clock()
            message = self.engine.vote_message(approval_id, approver, decision, signed_at, comment)
            signature = self.approver_key.sign(message)
        elif "signedAt" in a:
            signed_at = parse_instant(a["signedAt"], "$.signedAt")
        approval = self.engine.decide(
            approval_id, approver, decision, comment, signature=signature, signed_at=signed_at
        )
        return approval_data(approval)

    def _approvers_list(self, a: dict[str, Any]) -> dict[str, Any]:
        return {"approvers": [approver_data(x) for x in self.engine.list_approvers()]}

    def _approvers_register(self, a: dict[str, Any]) -> dict[str, Any]:
        return approver_data(self.engine.register_approver(a["name"], a["publicKey"]))

    def _approvers_rotate(self, a: dict[str, Any]) -> dict[str, Any]:
        return approver_data(self.engine.rotate_approver(a["name"], a["publicKey"]))

    def _approvers_remove(self, a: dict[str, Any]) -> dict[str, Any]:
        return approver_data(self.engine.remove_approver(a["name"]))

    def _acting_parent(self, a: dict[str, Any]) -> str | None:
        """The budget a delegate or revoke call acts as (``None``: an administrator, for any)."""
        parent: str | None = a.get("parentId", self.bound_agent)
        if parent is not None:
            self._check_agent(parent)
        if self.role != "admin" and parent is None:
            raise PolicyValidationError.single(
                "$.parentId", "is required: the budget this agent delegates from or revokes as"
            )
        return parent

    def _check_child(self, parent: str | None, child: str, verb: str) -> None:
        """Whether a delegate or revoke call may name ``child``, decided before any read.

        A server bound to one agent names only the budgets below that agent, one
        bound to an organisation only agents of it, and an agent-role server only
        the budgets below the budget it acts as. The answer depends on the ids
        alone, never on what the store holds, so it tells nothing about other
        agents.
        """
        if self.bound_org is not None and not child.startswith(f"{self.bound_org}:"):
            raise ForbiddenError(
                f"this server is bound to {self.bound_org}:* and may not {verb} a budget "
                f"of agent {child}",
                code=ErrorCode.FORBIDDEN,
            )
        below = self.bound_agent if self.role == "admin" else parent
        if below is not None and (not child.startswith(f"{below}/") or child == f"{below}/"):
            raise ForbiddenError(
                f"this server may {verb} only the budgets below {below}, named "
                f"{below}/<name>, not {child}",
                code=ErrorCode.FORBIDDEN,
            )

    def _delegate(self, a: dict[str, Any]) -> dict[str, Any]:
        parent = self._acting_parent(a)
        self._check_child(parent, a["childId"], "delegate")
        if parent is None:
            raise PolicyValidationError.single("$.parentId", "is required")
        if "expiresAt" in a and "expiresIn" in a:
            raise PolicyValidationError.single(
                "$.expiresIn", "give expiresIn or expiresAt, not both"
            )
        expires_at = None
        if "expiresAt" in a:
            expires_at = parse_instant(a["expiresAt"], "$.expiresAt")
        elif "expiresIn" in a:
            span = parse_duration(a["expiresIn"], "$.expiresIn")
            expires_at = self.engine.clock() + span
        delegation = self.engine.delegate(
            parent, a["childId"], a["policy"], expires_at=expires_at,
            by_parent=self.role != "admin",
        )  # fmt: skip
        stored = self.engine.get_policy(a["childId"])
        return {**delegation_data(delegation), "version": stored.version if stored else 1}

    def _revoke(self, a: dict[str, Any]) -> dict[str, Any]:
        parent = self._acting_parent(a)
        self._check_child(parent, a["childId"], "revoke")
        return delegation_data(self.engine.revoke(a["childId"], by=parent))

    # -- safe rollout ---------------------------------------------------------------------------

    def _versions(self, a: dict[str, Any]) -> dict[str, Any]:
        agent = a["agentId"]
        self._check_agent(agent)
        limit: int = a.get("limit", DEFAULT_PAGE)
        before = None
        if "cursor" in a:
            before = _version_cursor(_read_cursor(a["cursor"]))
        found = self.engine.policy_versions(agent, limit + 1, before=before)
        stored = self.engine.get_policy(agent)
        data = {
            "agentId": agent,
            "currentVersion": 0 if stored is None else stored.version,
            "versions": [version_data(v) for v in found[:limit]],
        }
        cursor = _write_cursor([str(found[limit - 1].version)]) if len(found) > limit else None
        return _with_cursor(data, cursor)

    def _diff(self, a: dict[str, Any]) -> dict[str, Any]:
        self._check_agent(a["agentId"])
        changes = self.engine.diff_policy_versions(a["agentId"], a["fromVersion"], a["toVersion"])
        return {
            "agentId": a["agentId"],
            "fromVersion": a["fromVersion"],
            "toVersion": a["toVersion"],
            "changes": [change_data(c) for c in changes],
        }

    def _rollback(self, a: dict[str, Any]) -> dict[str, Any]:
        self._check_agent(a["agentId"])
        if self._scoped:
            self._check_parent(self.engine.get_policy_version(a["agentId"], a["version"]).policy)
        version = self.engine.rollback_policy(a["agentId"], a["version"])
        return {"agentId": a["agentId"], "version": version, "fromVersion": a["version"]}

    def _shadow_set(self, a: dict[str, Any]) -> dict[str, Any]:
        self._check_agent(a["agentId"])
        self._check_parent(a["policy"])
        return shadow_data(self.engine.set_shadow_policy(a["agentId"], a["policy"]))

    def _shadow_report(self, a: dict[str, Any]) -> dict[str, Any]:
        self._check_agent(a["agentId"])
        limit = a.get("limit", DEFAULT_PAGE)
        return shadow_report_data(self.engine.shadow_report(a["agentId"], limit))

    def _shadow_promote(self, a: dict[str, Any]) -> dict[str, Any]:
        self._check_agent(a["agentId"])
        set_at = None if a.get("setAt") is None else parse_instant(a["setAt"], "$.setAt")
        version = self.engine.promote_shadow_policy(
            a["agentId"], force=a.get("force", False), set_at=set_at
        )
        return {"agentId": a["agentId"], "version": version}

    def _shadow_clear(self, a: dict[str, Any]) -> dict[str, Any]:
        self._check_agent(a["agentId"])
        return shadow_report_data(self.engine.clear_shadow_policy(a["agentId"]))

    def _simulate(self, a: dict[str, Any]) -> dict[str, Any]:
        self._check_agent(a["agentId"])
        since = parse_since(a["since"], "$.since")
        return simulation_data(self.engine.simulate(a["agentId"], a["policy"], since=since))

    def flush_webhooks(self, timeout: float = 10.0) -> bool:
        """Wait until the webhook outbox is empty or ``timeout`` seconds pass."""
        return self.engine.flush_webhooks(timeout)

    def close(self) -> None:
        """Stop webhook delivery and close the engine's storage."""
        self.engine.close()


def _page(
    entries: Sequence[T],
    key: Callable[[T], list[str]],
    a: Mapping[str, Any],
    shaped: Callable[[list[str]], bool],
) -> tuple[Sequence[T], str | None]:
    """One page of ``entries`` (sorted by ``key``) after ``a["cursor"]``, and the next cursor.

    A cursor names the last entry of its page, so an entry that leaves the
    list between two pages shifts nothing. A cursor whose key is not shaped
    as ``key`` makes them (``shaped``) is ``INVALID_INPUT``: it is no cursor
    of this listing.
    """
    limit: int = a.get("limit", DEFAULT_PAGE)
    start = 0
    if "cursor" in a:
        after = _read_cursor(a["cursor"])
        if not shaped(after):
            raise PolicyValidationError.single(
                "$.cursor", "is not a cursor of this listing: pass the nextCursor of the last page"
            )
        start = next((i for i, e in enumerate(entries) if key(e) > after), len(entries))
    page = entries[start : start + limit]
    more = start + limit < len(entries)
    return page, (_write_cursor(key(page[-1])) if more and page else None)


def _write_cursor(key: list[str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode()


def _read_cursor(cursor: str) -> list[str]:
    try:
        key = bounded_json.loads(base64.urlsafe_b64decode(cursor.encode()).decode())
    except (ValueError, binascii.Error, RecursionError):  # TooDeepError, UnicodeDecodeError too
        key = None
    if not isinstance(key, list) or not all(isinstance(k, str) for k in key):
        raise PolicyValidationError.single(
            "$.cursor", "is not a cursor of this listing: pass the nextCursor of the last page"
        )
    return key


def _policy_cursor(key: list[str]) -> bool:
    """Whether ``key`` is shaped as a key of ``agent_policy_list``: one agent id."""
    return len(key) == 1 and not check_identifier(key[0], "$.cursor")


def _approval_cursor(key: list[str]) -> bool:
    """Whether ``key`` is shaped as a key of ``agent_policy_approvals_list``.

    An instant as ``datetime.isoformat`` writes it (with its offset), then an
    approval id.
    """
    if len(key) != 2 or check_record_id(key[1], "$.cursor"):
        return False
    try:
        instant = datetime.fromisoformat(key[0])
    except ValueError:
        return False
    return instant.tzinfo is not None and instant.isoformat() == key[0]


_VERSION_KEY = re.compile(r"[1-9][0-9]{0,18}")
"""A version number in a cursor: ASCII digits only (``str.isdigit`` also takes ``²``)."""


def _version_cursor(key: list[str]) -> int:
    """The version a cursor of ``agent_policy_versions`` names; ``INVALID_INPUT`` for any other.

    Only what :func:`_write_cursor` writes passes: one positive version number
    (at most ``MAX_VERSION``) in ASCII digits, without sign, space or leading zero.
    """
    if len(key) == 1 and _VERSION_KEY.fullmatch(key[0]) and int(key[0]) <= MAX_VERSION:
        return int(key[0])
    raise PolicyValidationError.single(
        "$.cursor", "is not a cursor of this listing: pass the last nextCursor"
    )


def _with_cursor(data: dict[str, Any], cursor: str | None) -> dict[str, Any]:
    if cursor is not None:
        data["nextCursor"] = cursor
    return data


def create_server_with_redis(
    url: str,
    *,
    key_prefix: str = "agent-policy:",
    demo_mode: bool = False,
    role: str = "agent",
    webhook_endpoints: Iterable[WebhookEndpoint | Mapping[str, Any]] | None = None,
) -> AgentPolicyMcpServer:
    """A server on Redis storage at ``url`` (needs ``pip install agentpolicy[redis]``).

    ``key_prefix`` separates tenants on one Redis. Demo mode ignores Redis.
    """
    if demo_mode:
        return AgentPolicyMcpServer(demo_mode=True, webhook_endpoints=webhook_endpoints)
    return AgentPolicyMcpServer(
        storage=open_storage(url, key_prefix=key_prefix),
        role=role,
        webhook_endpoints=webhook_endpoints,
    )
