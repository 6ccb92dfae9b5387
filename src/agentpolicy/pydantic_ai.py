"""pydantic-ai: tools that spend money run only when the policy allows them.

Needs ``pip install 'agentpolicy[pydantic-ai]'``.

``GuardedTools`` is a pydantic-ai capability. For each tool it guards, its
``wrap_tool_execute`` hook turns the call's validated arguments into a
:class:`~agentpolicy.PaymentRequest` (with a function you give) and runs the
tool inside ``async with aengine.payment(request)``: a denied payment never
runs the tool and the model reads why (``ToolFailed``, which spends none of
the tool's retries); a tool that returns confirms; a tool that raises, or
is cancelled, releases. Tools it does not guard run as before.

A tool that pays marks its payment sent just before it pays, with
``await current_payment().mark_sent()``: from then on an exception in the
tool does not release the reservation (the payee may have been paid), it
stays held and counts as spent when it expires, so a tool that pays and
then fails cannot be retried past the limit with nothing counted.

The model chooses a tool's arguments, so the function that builds the
request must take the agent id (and anything else the model must not
choose) from your code, never from the arguments.

Other capabilities may change a tool call's arguments after the payment was
authorized (a ``before_tool_execute`` hook, or a ``wrap_tool_execute`` inside
this one, runs after it): ``GuardedTools`` also wraps the agent's toolset,
and when a guarded tool is finally called it builds the request again from
the arguments the tool gets. A payment that differs from the one authorized
(any field but ``memo`` and ``idempotency_key``) never runs the tool: the
model reads why, and the reservation is released.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import attrs

try:
    from pydantic_ai import RunContext
    from pydantic_ai.capabilities import AbstractCapability
    from pydantic_ai.capabilities.abstract import ValidatedToolArgs, WrapToolExecuteHandler
    from pydantic_ai.exceptions import ToolFailed
    from pydantic_ai.messages import ToolCallPart
    from pydantic_ai.tools import ToolDefinition
    from pydantic_ai.toolsets import AbstractToolset, WrapperToolset
    from pydantic_ai.toolsets.abstract import ToolsetTool
except ImportError:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "agentpolicy.pydantic_ai needs the pydantic-ai extra: "
        "pip install 'agentpolicy[pydantic-ai]'"
    ) from None

from agentpolicy.aio import AsyncPolicyEngine
from agentpolicy.errors import ErrorCode, PolicyValidationError
from agentpolicy.guard import ApprovalRequired, AsyncPaymentGuard, PaymentDenied
from agentpolicy.requests import PaymentRequest

try:  # the run a tool runs in: pydantic-ai sets it around every run, nested ones included
    from pydantic_ai._run_context import get_current_run_context
except ImportError:  # pragma: no cover - a pydantic-ai without it: every run looks alike
    _current_run: Callable[[], Any] | None = None
else:
    _current_run = get_current_run_context

__all__ = ["GuardedTools", "RequestBuilder", "current_payment"]

_MAX_WAITING = 1024
"""Pending approvals a GuardedTools remembers (the newest), each for the request that asked."""

RequestBuilder = Callable[[dict[str, Any]], PaymentRequest]
"""Builds the payment a tool call makes from the call's validated arguments."""

_current: ContextVar[tuple[AsyncPaymentGuard, str | None, str, object] | None] = ContextVar(
    "agentpolicy_pydantic_ai_payment", default=None
)
"""The guard of the guarded tool call running in this context (set around the call), the id
of the agent run that called the tool, the tool's name, and the GuardedTools that guards it."""


def _money(request: PaymentRequest) -> PaymentRequest:
    """What a request pays: all of it but what decides nothing (memo, idempotency key)."""
    return attrs.evolve(request, memo=None, idempotency_key=None)


def _run_id() -> str | None:
    """The id of the pydantic-ai run whose code is running now, when it is known."""
    if _current_run is None:  # pragma: no cover - depends on the pydantic-ai installed
        return None
    run = _current_run()
    return None if run is None else run.run_id


def current_payment() -> AsyncPaymentGuard:
    """The payment guard of the guarded tool call that is running now.

    Inside a tool that :class:`GuardedTools` guards, this is the
    :class:`~agentpolicy.guard.AsyncPaymentGuard` its payment runs in
    (``reservation_id``, ``decision``, ``holder``, ``request``), each
    call its own, also when the model calls tools in parallel. A tool
    that pays calls ``await current_payment().mark_sent()`` just before
    the payment leaves: an exception after that holds the reservation
    (it counts as spent when it expires) instead of releasing it.

    Outside a guarded tool (an unguarded tool, also one of another agent,
    with :class:`GuardedTools` or without, that runs inside a guarded tool;
    code outside any tool) it raises :class:`~agentpolicy.errors.PolicyValidationError`
    (``INVALID_INPUT``), since there is no payment to mark.
    """
    current = _current.get()
    # a tool of another agent run inside the guarded tool (one without GuardedTools, whose
    # tools nothing resets this for) is not making this payment: it would pay uncounted
    if current is None or (current[1] is not None and _run_id() not in (None, current[1])):
        raise PolicyValidationError.single(
            "$",
            "current_payment() is called outside a guarded tool: only a tool that "
            "GuardedTools guards (named in its payments) is making a payment",
        )
    return current[0]


@dataclass
class GuardedTools(AbstractCapability[Any]):
    """A capability: the tools named in ``payments`` pay through ``engine``'s policy.

    ``payments`` maps a tool's name to a function from the call's validated
    arguments to the :class:`~agentpolicy.PaymentRequest` it makes.
    ``agent = Agent(model, tools=[...], capabilities=[GuardedTools(aengine, {...})])``.
    A payment that needs approval does not run either: the model reads the
    approval id, and the amount stays held while humans decide. The same
    call again (a request equal in every field) resumes that approval
    instead of asking for another: still pending, the model reads that it
    still waits; approved, the tool runs and pays with the approval's
    reservation; denied or lapsed, the model reads why, and a call after
    that asks anew. Pending approvals are remembered in this object (the
    newest 1,024), so after a restart the same call asks anew.
    """

    engine: AsyncPolicyEngine
    payments: Mapping[str, RequestBuilder] = field(default_factory=dict)
    _waiting: dict[PaymentRequest, str] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        """Check the engine and the table of guarded tools."""
        if not isinstance(self.engine, AsyncPolicyEngine):
            raise PolicyValidationError.single("$.engine", "must be an AsyncPolicyEngine")
        if not isinstance(self.payments, Mapping) or not all(
            isinstance(k, str) and callable(v) for k, v in self.payments.items()
        ):
            raise PolicyValidationError.single(
                "$.payments", "must map tool names to functions that build a PaymentRequest"
            )

    async def wrap_tool_execute(
        self,
        ctx: RunContext[Any],
        *,
        call: ToolCallPart,
        tool_def: ToolDefinition,
        args: ValidatedToolArgs,
        handler: WrapToolExecuteHandler,
    ) -> Any:
        """Run a guarded tool inside ``async with engine.payment(request)``.

        While the tool runs, :func:`current_payment` returns that payment's guard.
        """
        build = self.payments.get(tool_def.name)
        if build is None:  # no payment, even when its agent runs inside a guarded tool
            unguarded = _current.set(None)
            try:
                return await handler(args)
            finally:
                _current.reset(unguarded)
        try:
            request = build(dict(args))
            if not isinstance(request, PaymentRequest):
                raise PolicyValidationError.single("$", "the builder must return a PaymentRequest")
        except PolicyValidationError as err:
            raise ToolFailed(f"INVALID_INPUT: {err}") from None
        waiting = self._waiting.get(request)  # this very payment asked for an approval
        try:
            async with self.engine.payment(request, waiting) as payment:
                self._waiting.pop(request, None)  # approved (or never asked): resumed once
                token = _current.set((payment, ctx.run_id, tool_def.name, self))
                try:
                    return await handler(args)
                finally:
                    _current.reset(token)
        except PaymentDenied as err:
            if waiting is not None:  # denied, lapsed, or taken by another call: ask anew next
                self._waiting.pop(request, None)
            decision = err.decision
            if err.code is not ErrorCode.PAYMENT_DENIED:  # not the policy's: the decision allowed
                # an idempotency key answered an earlier payment again (made, or being made),
                # or a resumed approval cannot go ahead; its decision may read ALLOWED
                raise ToolFailed(f"payment not made: {err.message}") from None
            raise ToolFailed(f"payment denied ({decision.code}): {decision.reason}") from None
        except ApprovalRequired as err:
            if waiting is not None:
                raise ToolFailed(
                    f"payment still waits for human approval {err.approval_id}; it has not "
                    "been made (calling again asks no one else)"
                ) from None
            self._remember(request, err.approval_id)
            raise ToolFailed(
                f"payment needs human approval {err.approval_id}; it has not been made"
            ) from None

    def _remember(self, request: PaymentRequest, approval_id: str) -> None:
        """Keep the approval a request asked for, so that the same call resumes it."""
        if len(self._waiting) >= _MAX_WAITING:
            del self._waiting[next(iter(self._waiting))]  # the oldest
        self._waiting[request] = approval_id

    def get_wrapper_toolset(self, toolset: AbstractToolset[Any]) -> AbstractToolset[Any] | None:
        """Wrap the agent's toolset: a guarded tool runs only with the arguments authorized.

        See :class:`_AuthorizedArgs`.
        """
        return _AuthorizedArgs(toolset, guard=self)

    def check_call(self, name: str, args: dict[str, Any]) -> None:
        """Refuse (``ToolFailed``) a guarded tool about to run with other terms than authorized.

        ``args`` are the arguments the tool is called with, after every
        capability's hooks: the request built from them must be the one
        authorized for this call (any field but ``memo`` and
        ``idempotency_key``). A guarded tool called with no payment of this
        capability running for it is refused too.
        """
        build = self.payments.get(name)
        if build is None:
            return
        current = _current.get()
        if current is None or current[2] != name or current[3] is not self:
            raise ToolFailed(
                f"INVALID_INPUT: the tool {name!r} makes a payment but none was authorized for "
                "this call; it did not run"
            )
        authorized = current[0].request
        try:
            request = build(dict(args))
            same = isinstance(request, PaymentRequest) and _money(request) == _money(authorized)
        except PolicyValidationError:
            same = False
        if not same:
            raise ToolFailed(
                "INVALID_INPUT: the tool's arguments were changed after its payment was "
                "authorized (by another capability's hook); the payment they ask for is not "
                "the one authorized, so the tool did not run and nothing was paid"
            )


@dataclass
class _AuthorizedArgs(WrapperToolset[Any]):
    """The agent's toolset, whose guarded tools run only with the arguments authorized.

    A ``before_tool_execute`` hook of any capability, or a
    ``wrap_tool_execute`` of one inside :class:`GuardedTools`, runs after
    the payment was authorized and may change the arguments; the tool is
    called here with the final ones, so here they are checked
    (:meth:`GuardedTools.check_call`).
    """

    guard: GuardedTools | None = None

    async def call_tool(
        self, name: str, tool_args: dict[str, Any], ctx: RunContext[Any], tool: ToolsetTool[Any]
    ) -> Any:
        """Check a guarded tool's final arguments, then call it."""
        if self.guard is not None:
            self.guard.check_call(name, tool_args)
        return await self.wrapped.call_tool(name, tool_args, ctx, tool)
