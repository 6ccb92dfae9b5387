"""agentpolicy: hard, auditable limits on what an autonomous AI agent may spend.

The core is pure: :func:`evaluate` decides a :class:`PaymentRequest` against
an :class:`AgentPolicy`, the usage already counted and the time, and returns
a :class:`Decision` with a stable :class:`Code`. :class:`PolicyEngine` makes
it a stateful guard over a :class:`Storage` (reservations, approvals,
history) that no number of processes can talk past.
"""

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "AgentPolicy",
    "Alert",
    "Amount",
    "Approval",
    "ApprovalConfig",
    "ApprovalGroup",
    "AsyncPolicyEngine",
    "AsyncStorage",
    "ApprovalRequired",
    "ApprovalStatus",
    "ApprovalThreshold",
    "Approver",
    "ApproverGroup",
    "AssetLimits",
    "BlockedPeriod",
    "Budget",
    "CategoryRules",
    "Code",
    "ConflictError",
    "CountLimit",
    "Decision",
    "Delegation",
    "DelegationRules",
    "ErrorCode",
    "Evaluation",
    "ForbiddenError",
    "Headroom",
    "HistoryRecord",
    "InternalError",
    "LimitBudget",
    "MerchantRules",
    "NetworkRules",
    "NotFoundError",
    "Outcome",
    "PaymentDenied",
    "PaymentRequest",
    "Period",
    "PolicyEngine",
    "PolicyChange",
    "PolicyError",
    "PolicyValidationError",
    "PolicyVersion",
    "Problem",
    "Reservation",
    "ReservationStatus",
    "RollingLimit",
    "ScopeMatch",
    "ScopedLimit",
    "ShadowPolicy",
    "ShadowReport",
    "SimulationReport",
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
    "diff_policies",
    "dump_policy",
    "evaluate",
    "load_policy",
    "format_units",
    "open_async_storage",
    "open_storage",
    "parse_base_units",
    "parse_units",
    "windows_for",
]

# Names load on first use (PEP 562), so `import agentpolicy` costs next to nothing and
# a program that only evaluates never imports the engine, the storages or the codec.
_EXPORTS: dict[str, str] = {
    "AgentPolicy": "agentpolicy.policy",
    "ScopedLimit": "agentpolicy.policy",
    "ScopeMatch": "agentpolicy.policy",
    "RollingLimit": "agentpolicy.policy",
    "DelegationRules": "agentpolicy.policy",
    "CountLimit": "agentpolicy.policy",
    "AssetLimits": "agentpolicy.policy",
    "Alert": "agentpolicy.policy",
    "AsyncPolicyEngine": "agentpolicy.aio",
    "AsyncStorage": "agentpolicy.storage",
    "Amount": "agentpolicy.amounts",
    "Approval": "agentpolicy.records",
    "LimitBudget": "agentpolicy.records",
    "Delegation": "agentpolicy.records",
    "ApprovalGroup": "agentpolicy.records",
    "ApprovalConfig": "agentpolicy.policy",
    "ApprovalRequired": "agentpolicy.guard",
    "ApprovalStatus": "agentpolicy.records",
    "ApprovalThreshold": "agentpolicy.policy",
    "Approver": "agentpolicy.records",
    "ApproverGroup": "agentpolicy.policy",
    "BlockedPeriod": "agentpolicy.policy",
    "Budget": "agentpolicy.records",
    "CategoryRules": "agentpolicy.policy",
    "Code": "agentpolicy.decisions",
    "ConflictError": "agentpolicy.errors",
    "Decision": "agentpolicy.decisions",
    "ErrorCode": "agentpolicy.errors",
    "Evaluation": "agentpolicy.decisions",
    "ForbiddenError": "agentpolicy.errors",
    "Headroom": "agentpolicy.decisions",
    "HistoryRecord": "agentpolicy.records",
    "InternalError": "agentpolicy.errors",
    "MerchantRules": "agentpolicy.policy",
    "NetworkRules": "agentpolicy.policy",
    "NotFoundError": "agentpolicy.errors",
    "Outcome": "agentpolicy.decisions",
    "PaymentDenied": "agentpolicy.guard",
    "PaymentRequest": "agentpolicy.requests",
    "Period": "agentpolicy.windows",
    "PolicyEngine": "agentpolicy.engine",
    "PolicyChange": "agentpolicy.versions",
    "PolicyError": "agentpolicy.errors",
    "PolicyValidationError": "agentpolicy.errors",
    "PolicyVersion": "agentpolicy.versions",
    "Problem": "agentpolicy.errors",
    "Reservation": "agentpolicy.records",
    "ReservationStatus": "agentpolicy.records",
    "ShadowPolicy": "agentpolicy.shadow",
    "ShadowReport": "agentpolicy.shadow",
    "SimulationReport": "agentpolicy.simulation",
    "SpendingLimits": "agentpolicy.policy",
    "Storage": "agentpolicy.storage",
    "StorageUnavailableError": "agentpolicy.errors",
    "StoredPolicy": "agentpolicy.engine",
    "SweepResult": "agentpolicy.records",
    "TimeRules": "agentpolicy.policy",
    "TimeWindow": "agentpolicy.policy",
    "Vote": "agentpolicy.records",
    "Window": "agentpolicy.windows",
    "WindowBudget": "agentpolicy.records",
    "diff_policies": "agentpolicy.versions",
    "dump_policy": "agentpolicy.codec",
    "evaluate": "agentpolicy.rules",
    "load_policy": "agentpolicy.codec",
    "format_units": "agentpolicy.amounts",
    "open_async_storage": "agentpolicy.storage",
    "open_storage": "agentpolicy.storage",
    "parse_base_units": "agentpolicy.amounts",
    "parse_units": "agentpolicy.amounts",
    "windows_for": "agentpolicy.rules",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":  # from the package metadata, read once (agentpolicy._version)
        from agentpolicy._version import package_version  # noqa: PLC0415

        return package_version()
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'agentpolicy' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:
    __version__: str
    from agentpolicy.aio import AsyncPolicyEngine
    from agentpolicy.amounts import Amount, format_units, parse_base_units, parse_units
    from agentpolicy.codec import dump_policy, load_policy
    from agentpolicy.decisions import Code, Decision, Evaluation, Headroom, Outcome
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
    from agentpolicy.guard import ApprovalRequired, PaymentDenied
    from agentpolicy.policy import (
        AgentPolicy,
        Alert,
        ApprovalConfig,
        ApprovalThreshold,
        ApproverGroup,
        AssetLimits,
        BlockedPeriod,
        CategoryRules,
        CountLimit,
        DelegationRules,
        MerchantRules,
        NetworkRules,
        RollingLimit,
        ScopedLimit,
        ScopeMatch,
        SpendingLimits,
        TimeRules,
        TimeWindow,
    )
    from agentpolicy.records import (
        Approval,
        ApprovalGroup,
        ApprovalStatus,
        Approver,
        Budget,
        Delegation,
        HistoryRecord,
        LimitBudget,
        Reservation,
        ReservationStatus,
        SweepResult,
        Vote,
        WindowBudget,
    )
    from agentpolicy.requests import PaymentRequest
    from agentpolicy.rules import evaluate, windows_for
    from agentpolicy.shadow import ShadowPolicy, ShadowReport
    from agentpolicy.simulation import SimulationReport
    from agentpolicy.storage import AsyncStorage, Storage, open_async_storage, open_storage
    from agentpolicy.versions import PolicyChange, PolicyVersion, diff_policies
    from agentpolicy.windows import Period, Window
