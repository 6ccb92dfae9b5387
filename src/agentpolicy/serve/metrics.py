"""What ``/metrics`` reports, in the Prometheus text format (version 0.0.4).

Two kinds of figures, and the page says which is which:

- **this process** (counters since it started): the decisions its ``/mcp``
  authorize calls returned, by code; an authorize latency histogram; the
  HTTP requests it answered, by route and status class. Sum them over the
  processes of a deployment (Prometheus does, per instance).
- **the store** (read at each scrape, the same from every process): open
  reservations (allowed payments not yet confirmed or released, and the
  amounts held for pending approvals), pending approvals, and webhook
  deliveries still pending (the backlog).
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Iterable, Mapping

__all__ = ["BUCKETS", "Metrics", "StoreFigures"]

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Upper bounds (seconds) of the authorize latency histogram; ``+Inf`` follows."""

StoreFigures = Mapping[str, int | None]
"""Figures read from the store: open_reservations, pending_approvals, webhook_backlog."""

_STORE_HELP = {
    "open_reservations": "Reservations not yet confirmed or released, and holds of pending "
    "approvals (read from the store).",
    "pending_approvals": "Approvals waiting for votes (read from the store).",
    "webhook_backlog": "Webhook deliveries still pending, at most 10000 counted (read from the "
    "store).",
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _seconds(value: float) -> str:
    return repr(float(value))


class Metrics:
    """The counters of one process; thread-safe. :meth:`render` writes the text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._decisions: Counter[str] = Counter()
        self._requests: Counter[tuple[str, str]] = Counter()
        self._buckets = [0] * (len(BUCKETS) + 1)
        self._sum = 0.0
        self._count = 0

    def decided(self, code: str, seconds: float) -> None:
        """Count one authorize answer (a decision code, or an error code) and its latency."""
        with self._lock:
            self._decisions[code] += 1
            self._buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
            self._sum += seconds
            self._count += 1

    def answered(self, route: str, status: int) -> None:
        """Count one HTTP answer by route (``/mcp``, ``/approvals``, ...) and status class."""
        with self._lock:
            self._requests[(route, f"{status // 100}xx")] += 1

    def authorize_seconds(self) -> tuple[float, int]:
        """The authorize latency histogram's sum (seconds) and count so far."""
        with self._lock:
            return self._sum, self._count

    def decisions(self) -> dict[str, int]:
        """Decisions counted so far, by code."""
        with self._lock:
            return dict(self._decisions)

    def render(self, store: StoreFigures) -> str:
        """The whole page: this process's counters, then the store's figures (``None``: unread)."""
        with self._lock:
            decisions = sorted(self._decisions.items())
            requests = sorted(self._requests.items())
            buckets, total, count = list(self._buckets), self._sum, self._count
        lines = [
            "# HELP agentpolicy_decisions_total Authorize answers of this process's /mcp, by code.",
            "# TYPE agentpolicy_decisions_total counter",
        ]
        lines += [f'agentpolicy_decisions_total{{code="{_escape(c)}"}} {n}' for c, n in decisions]
        lines += [
            "# HELP agentpolicy_authorize_seconds Time to answer an authorize call in this "
            "process (the engine call, from the tool call to its result).",
            "# TYPE agentpolicy_authorize_seconds histogram",
        ]
        running = 0
        for bound, n in zip((*map(_seconds, BUCKETS), "+Inf"), buckets, strict=True):
            running += n
            lines.append(f'agentpolicy_authorize_seconds_bucket{{le="{bound}"}} {running}')
        lines += [
            f"agentpolicy_authorize_seconds_sum {_seconds(total)}",
            f"agentpolicy_authorize_seconds_count {count}",
            "# HELP agentpolicy_http_requests_total HTTP answers of this process, by route and "
            "status class.",
            "# TYPE agentpolicy_http_requests_total counter",
        ]
        lines += [
            f'agentpolicy_http_requests_total{{route="{_escape(r)}",status="{s}"}} {n}'
            for (r, s), n in requests
        ]
        lines += _store_lines(store.items())
        return "\n".join(lines) + "\n"


def _store_lines(figures: Iterable[tuple[str, int | None]]) -> list[str]:
    lines = []
    up = 1
    for name, value in figures:
        lines += [
            f"# HELP agentpolicy_{name} {_STORE_HELP.get(name, name)}",
            f"# TYPE agentpolicy_{name} gauge",
        ]
        if value is None:
            up = 0
        else:
            lines.append(f"agentpolicy_{name} {value}")
    lines += [
        "# HELP agentpolicy_store_up Whether the store answered the reads of this scrape.",
        "# TYPE agentpolicy_store_up gauge",
        f"agentpolicy_store_up {up}",
    ]
    return lines
