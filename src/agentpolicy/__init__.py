"""agentpolicy: hard, auditable limits on what an autonomous AI agent may spend.

The core is pure: :func:`evaluate` decides a :class:`PaymentRequest` against
an :class:`AgentPolicy`, the usage already counted and the time, and returns
a :class:`Decision` with a stable :class:`Code`.
"""

from agentpolicy.amounts import Amount, parse_units
from agentpolicy.codec import dump_policy, load_policy
from agentpolicy.decisions import Code, Decision, Evaluation, Outcome
from agentpolicy.errors import ErrorCode, PolicyError, PolicyValidationError, Problem
from agentpolicy.evaluate import evaluate, windows_for
from agentpolicy.policy import (
    AgentPolicy,
    ApprovalConfig,
    ApprovalThreshold,
    BlockedPeriod,
    CategoryRules,
    MerchantRules,
    NetworkRules,
    SpendingLimits,
    TimeRules,
    TimeWindow,
)
from agentpolicy.requests import PaymentRequest
from agentpolicy.windows import Period, Window

__all__ = [
    "AgentPolicy",
    "Amount",
    "ApprovalConfig",
    "ApprovalThreshold",
    "BlockedPeriod",
    "CategoryRules",
    "Code",
    "Decision",
    "ErrorCode",
    "Evaluation",
    "MerchantRules",
    "NetworkRules",
    "Outcome",
    "PaymentRequest",
    "Period",
    "PolicyError",
    "PolicyValidationError",
    "Problem",
    "SpendingLimits",
    "TimeRules",
    "TimeWindow",
    "Window",
    "dump_policy",
    "evaluate",
    "load_policy",
    "parse_units",
    "windows_for",
]

__version__ = "0.1.0.dev0"
