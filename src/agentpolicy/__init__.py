"""agentpolicy: hard, auditable limits on what an autonomous AI agent may spend.

The core is pure: :func:`evaluate` decides a :class:`PaymentRequest` against
an :class:`AgentPolicy`, the usage already counted and the time, and returns
a :class:`Decision` with a stable :class:`Code`. :class:`PolicyEngine` makes
it a stateful guard over a :class:`Storage` (reservations, approvals,
history) that no number of processes can talk past.
"""

from agentpolicy.amounts import Amount, parse_units
from agentpolicy.codec import dump_policy, load_policy
from agentpolicy.decisions import Code, Decision, Evaluation, Outcome
from agentpolicy.engine import PolicyEngine, StoredPolicy
from agentpolicy.errors import (
    ConflictError,
    ErrorCode,
    ForbiddenError,
    InternalError,
    NotFoundError,
    PolicyError,
    PolicyValidationError,
    Problem,
    StorageUnavailableError,
)
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
from agentpolicy.records import (
    Approval,
    ApprovalStatus,
    Budget,
    HistoryRecord,
    Reservation,
    ReservationStatus,
    SweepResult,
    Vote,
    WindowBudget,
)
from agentpolicy.requests import PaymentRequest
from agentpolicy.storage import Storage, open_storage
from agentpolicy.windows import Period, Window

__all__ = [
    "AgentPolicy",
    "Amount",
    "Approval",
    "ApprovalConfig",
    "ApprovalStatus",
    "ApprovalThreshold",
    "BlockedPeriod",
    "Budget",
    "CategoryRules",
    "Code",
    "ConflictError",
    "Decision",
    "ErrorCode",
    "Evaluation",
    "ForbiddenError",
    "HistoryRecord",
    "InternalError",
    "MerchantRules",
    "NetworkRules",
    "NotFoundError",
    "Outcome",
    "PaymentRequest",
    "Period",
    "PolicyEngine",
    "PolicyError",
    "PolicyValidationError",
    "Problem",
    "Reservation",
    "ReservationStatus",
    "SpendingLimits",
    "Storage",
    "StorageUnavailableError",
    "StoredPolicy",
    "SweepResult",
    "TimeRules",
    "TimeWindow",
    "Vote",
    "Window",
    "WindowBudget",
    "dump_policy",
    "evaluate",
    "load_policy",
    "open_storage",
    "parse_units",
    "windows_for",
]

__version__ = "0.1.0.dev0"
