"""pydantic-ai: tools that spend money run only when the policy allows them.

Needs ``pip install 'agentpolicy[pydantic-ai]'``.

``GuardedTools`` is a pydantic-ai capability. For each tool it guards, its
``wrap_tool_execute`` hook turns the call's validated arguments into a
:class:`~agentpolicy.PaymentRequest` (with a function you give) and runs the
tool inside ``async with aengine.payment(request)``: a denied payment never
runs the tool and the model reads why (``ToolFailed``, which spends none of
the tool's retries); a tool that returns confirms; a tool that raises, or
is cancelled, releases. Tools it does not guard run as before.

The model chooses a tool's arguments, so the function that builds the
request must take the agent id (and anything else the model must not
choose) from your code, never from the arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

try:
    from pydantic_ai import RunContext
    from pydantic_ai.capabilities import AbstractCapability
    from pydantic_ai.capabilities.abstract import ValidatedToolArgs, WrapToolExecuteHandler
    from pydantic_ai.exceptions import ToolFailed
    from pydantic_ai.messages import ToolCallPart
    from pydantic_ai.tools import ToolDefinition
except ImportError:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "agentpolicy.pydantic_ai needs the pydantic-ai extra: "
        "pip install 'agentpolicy[pydantic-ai]'"
    ) from None

from agentpolicy.aio import AsyncPolicyEngine
from agentpolicy.errors import PolicyValidationError
from agentpolicy.guard import ApprovalRequired, PaymentDenied
from agentpolicy.requests import PaymentRequest

__all__ = ["GuardedTools", "RequestBuilder"]

RequestBuilder = Callable[[dict[str, Any]], PaymentRequest]
"""Builds the payment a tool call makes from the call's validated arguments."""


@dataclass
class GuardedTools(AbstractCapability[Any]):
    """A capability: the tools named in ``payments`` pay through ``engine``'s policy.

    ``payments`` maps a tool's name to a function from the call's validated
    arguments to the :class:`~agentpolicy.PaymentRequest` it makes.
    ``agent = Agent(model, tools=[...], capabilities=[GuardedTools(aengine, {...})])``.
    A payment that needs approval does not run either: the model reads the
    approval id, and the amount stays held while humans decide.
    """

    engine: AsyncPolicyEngine
    payments: Mapping[str, RequestBuilder] = field(default_factory=dict)

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
        """Run a guarded tool inside ``async with engine.payment(request)``."""
        build = self.payments.get(tool_def.name)
        if build is None:
            return await handler(args)
        try:
            request = build(dict(args))
            if not isinstance(request, PaymentRequest):
                raise PolicyValidationError.single("$", "the builder must return a PaymentRequest")
        except PolicyValidationError as err:
            raise ToolFailed(f"INVALID_INPUT: {err}") from None
        try:
            async with self.engine.payment(request):
                return await handler(args)
        except PaymentDenied as err:
            decision = err.decision
            raise ToolFailed(f"payment denied ({decision.code}): {decision.reason}") from None
        except ApprovalRequired as err:
            raise ToolFailed(
                f"payment needs human approval {err.approval_id}; it has not been made"
            ) from None
