"""Errors that are not decisions: codes, problems with JSON paths, exceptions.

A denied payment is a :class:`~agentpolicy.Decision`, never an exception.
Exceptions are for calls that could not be carried out; each one carries an
:class:`ErrorCode` that adapters (MCP, CLI) render without a traceback.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import attrs

__all__ = [
    "ConflictError",
    "ErrorCode",
    "ForbiddenError",
    "InternalError",
    "NotFoundError",
    "PolicyError",
    "PolicyValidationError",
    "Problem",
    "StorageUnavailableError",
]


class ErrorCode(enum.StrEnum):
    """Stable codes of errors (docs/semantics.md section 6); the values are public API."""

    INVALID_INPUT = "INVALID_INPUT"
    UNKNOWN_TOOL = "UNKNOWN_TOOL"
    FORBIDDEN = "FORBIDDEN"
    NO_POLICY = "NO_POLICY"
    INTERNAL = "INTERNAL"
    RESERVATION_NOT_FOUND = "RESERVATION_NOT_FOUND"
    RESERVATION_EXPIRED = "RESERVATION_EXPIRED"
    RESERVATION_RELEASED = "RESERVATION_RELEASED"
    RESERVATION_ALREADY_CONFIRMED = "RESERVATION_ALREADY_CONFIRMED"
    APPROVAL_NOT_FOUND = "APPROVAL_NOT_FOUND"
    APPROVAL_NOT_PENDING = "APPROVAL_NOT_PENDING"
    APPROVER_NOT_AUTHORIZED = "APPROVER_NOT_AUTHORIZED"
    DUPLICATE_DECISION = "DUPLICATE_DECISION"
    IDEMPOTENCY_CONFLICT = "IDEMPOTENCY_CONFLICT"
    BUDGET_CONFLICT = "BUDGET_CONFLICT"
    DELEGATION_NOT_FOUND = "DELEGATION_NOT_FOUND"
    APPROVER_NOT_FOUND = "APPROVER_NOT_FOUND"
    APPROVER_CONFLICT = "APPROVER_CONFLICT"
    POLICY_VERSION_NOT_FOUND = "POLICY_VERSION_NOT_FOUND"
    SHADOW_NOT_FOUND = "SHADOW_NOT_FOUND"
    SHADOW_OUTDATED = "SHADOW_OUTDATED"
    STORAGE_UNAVAILABLE = "STORAGE_UNAVAILABLE"
    EXTRA_NOT_INSTALLED = "EXTRA_NOT_INSTALLED"
    RESERVATION_CLAIMED = "RESERVATION_CLAIMED"
    PAYMENT_DENIED = "PAYMENT_DENIED"
    APPROVAL_REQUIRED = "APPROVAL_REQUIRED"
    APPROVAL_DENIED = "APPROVAL_DENIED"
    APPROVAL_EXPIRED = "APPROVAL_EXPIRED"


@attrs.frozen
class Problem:
    """One thing wrong with an input, at a JSON path such as ``$.limits.daily.value``."""

    path: str
    message: str

    def under(self, prefix: str) -> Problem:
        """Return this problem with its path moved below ``prefix`` (itself a ``$`` path)."""
        return Problem(prefix + self.path[1:], self.message)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class PolicyError(Exception):
    """Base of every error agentpolicy raises on purpose.

    ``code`` is an :class:`ErrorCode`; ``message`` is human text that may
    change; ``path`` locates the bad input, when there is one.
    """

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: ErrorCode | None = None, path: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.path = path

    def to_dict(self) -> dict[str, str]:
        """Render as the structured error ``{code, message, path?}``."""
        out = {"code": str(self.code), "message": self.message}
        if self.path is not None:
            out["path"] = self.path
        return out


class PolicyValidationError(PolicyError, ValueError):
    """Invalid input (code ``INVALID_INPUT``): lists every problem with its JSON path.

    Raised for a policy that does not validate, and for any other bad input
    (a payment request, an amount, a timestamp). Nothing half-valid is ever
    returned alongside it.
    """

    code = ErrorCode.INVALID_INPUT

    def __init__(self, problems: Iterable[Problem]):
        self.problems: tuple[Problem, ...] = tuple(
            sorted(set(problems), key=lambda p: (p.path, p.message))
        )
        if not self.problems:  # pragma: no cover - a bug in a caller
            raise ValueError("PolicyValidationError needs at least one problem")
        lines = "; ".join(str(p) for p in self.problems)
        if len(self.problems) > 1:
            lines = f"{len(self.problems)} problems: {lines}"
        super().__init__(lines, path=self.problems[0].path)

    @classmethod
    def single(cls, path: str, message: str) -> PolicyValidationError:
        """Build the error for one problem."""
        return cls([Problem(path, message)])

    def under(self, prefix: str) -> PolicyValidationError:
        """Return the same problems with their paths moved below ``prefix``."""
        return PolicyValidationError(p.under(prefix) for p in self.problems)


class NotFoundError(PolicyError):
    """A reservation, approval or policy that does not exist.

    Codes: ``RESERVATION_NOT_FOUND``, ``APPROVAL_NOT_FOUND``, ``NO_POLICY``,
    ``DELEGATION_NOT_FOUND`` (revoking a budget that was not delegated),
    ``APPROVER_NOT_FOUND``.
    """


class ConflictError(PolicyError):
    """A call that the current state refuses; nothing changed.

    Codes: ``RESERVATION_EXPIRED``, ``RESERVATION_RELEASED``,
    ``RESERVATION_ALREADY_CONFIRMED``, ``APPROVAL_NOT_PENDING``,
    ``DUPLICATE_DECISION``, ``IDEMPOTENCY_CONFLICT``, ``BUDGET_CONFLICT`` (a
    budget tree refuses the change: an agent moving into another tree, a
    delegated budget changing its parent, a revoked budget delegated again),
    ``APPROVER_CONFLICT``, ``RESERVATION_CLAIMED`` (another caller claimed
    the reservation to make its payment), ``SHADOW_OUTDATED`` (a shadow
    policy set beside an older version than the live one, promoted without
    ``force``).
    """


class ForbiddenError(PolicyError):
    """The caller may not do this. Codes: ``FORBIDDEN``, ``APPROVER_NOT_AUTHORIZED``."""


class StorageUnavailableError(PolicyError):
    """The storage could not be reached or did not answer in time; nothing was allowed."""

    code = ErrorCode.STORAGE_UNAVAILABLE


class InternalError(PolicyError):
    """A bug in agentpolicy: the message says so, and nothing changed."""

    code = ErrorCode.INTERNAL
