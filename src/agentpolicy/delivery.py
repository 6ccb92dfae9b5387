"""Webhook delivery: a worker that empties the outbox over HTTP, at least once.

Runs on real time (monotonic waits, wall-clock timestamps), never on the
engine's clock. Never in the way: a decision only writes to the outbox;
delivery happens in a background thread, and its failures are recorded, not
raised. Retries with growing back-off and jitter on network errors,
timeouts, answers that are not HTTP (protocol errors: a status outside 100
to 599, a ``101`` nobody asked for, or a status line whose status is not
exactly three ASCII digits after one space, among them), 5xx, 408 and 429;
any other status is recorded as failed at once, redirects (3xx) included,
which are never followed; after ``max_attempts`` tries an event is
recorded as failed too. A 2xx is delivered once its status line and
headers have arrived: its body is never read, nor waited for.
Endpoint URLs are logged only as :attr:`~agentpolicy.webhooks.WebhookEndpoint.shown_url`.
An endpoint's host name is looked up on a small pool of threads, bounded by
the attempt's timeout, so a resolver that hangs never holds the worker past
it.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import functools
import heapq
import ipaddress
import itertools
import json
import logging
import os
import queue
import random
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import attrs

from agentpolicy.codec import format_instant
from agentpolicy.errors import PolicyError
from agentpolicy.records import DeliveryStatus, WebhookDelivery
from agentpolicy.webhooks import WebhookEndpoint, sign

__all__ = ["Outbox", "WebhookDispatcher"]

log = logging.getLogger("agentpolicy.webhooks")

_RETRY_STATUSES = frozenset({408, 429})
_STATUS_LINE = re.compile(rb"(HTTP/[!-~]*) ([0-9]{3})(?: ([^\r\n]*))?\r?\n?")
"""A status line as RFC 9112 (4) writes it: the version, one space, three ASCII digits, and
then nothing or one space and the reason (ignored). http.client reads the status with
``int()`` of a word split on any whitespace, so it took ``+200``, ``0200``, ``2_00``,
``HTTP/1.1  200`` and ``HTTP/1.1\\t200`` for a 200 (and ``+0101`` for a 101).
"""
_HTTP_1 = re.compile(rb"HTTP/1\.[0-9]")
"""The versions a receiver may answer with (RFC 9112: ``HTTP/`` DIGIT ``.`` DIGIT, major 1)."""
_MAX_STATUS_LINE = 65536
"""The longest status line read, as http.client's own bound (``LineTooLong`` past it)."""
_STALLED = "no answer in time"
"""How ``last_error`` begins when an attempt ran out of time (a timeout, however reached)."""


class Outbox(Protocol):
    """What delivery needs from a storage."""

    def claim_webhooks(
        self, endpoint_ids: list[str], now: float, lease: float, limit: int = 50
    ) -> list[WebhookDelivery]:
        """Claim due deliveries."""
        ...

    def finish_webhook(self, delivery: WebhookDelivery, leased_until: float | None = None) -> None:
        """Record an attempt's outcome, unless claimed again since ``leased_until``."""
        ...

    def lease_webhook(self, delivery: WebhookDelivery, leased_until: float, until: float) -> bool:
        """Move a claim's lease to ``until``, unless claimed again since ``leased_until``."""
        ...

    def pending_webhooks(self, endpoint_ids: list[str]) -> int:
        """Deliveries still pending."""
        ...


class _Deadline:
    """Ends an attempt when its time is up, however slowly the receiver drips bytes.

    A socket timeout bounds each read, not the attempt: a receiver that sends
    a byte a second would hold an attempt for as long as it liked. Every
    socket an attempt opens is registered here (a duplicate of it, so that
    TLS wrapping it later does not hide it) and shut down when the time is
    up, which ends any read or write blocked on it at once. The time counts
    from the first connection made. Before it, the host-name lookup
    (:class:`_Resolver`) and connecting share twice the timeout, from the
    attempt's start: each address is tried within what is left of that (and
    within the socket timeout), so a host whose first address does not
    answer is still reached at the next, and an attempt never takes more
    than three times the timeout, however many addresses do not answer
    (:meth:`remaining`), which its lease allows for.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self.done = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._started = False
        self._ends = time.monotonic() + 2 * seconds  # to reach the host (see above)

    def remaining(self) -> float:
        """The time a step of the attempt may still take.

        Before the first connection, of the lookup and connecting; after it,
        of the exchange.
        """
        with self._lock:
            return max(0.0, self._ends - time.monotonic())

    def __enter__(self) -> _Deadline:
        _attempt_deadline.current = self
        return self

    def __exit__(self, *exc: object) -> None:
        _attempt_deadline.current = None
        with self._lock:
            self.done = True  # the watchdog's entry for it, if any, is skipped when due
            for sock in self._socks:
                sock.close()
            self._socks.clear()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            if self.expired:
                sock.close()
                raise TimeoutError("the attempt's time was up")
            self._socks.append(sock.dup())
            if not self._started:  # the first connection: the time starts now
                self._started = True
                self._ends = time.monotonic() + self.seconds
                _WATCHDOG.add(self._ends, self)

    def expire(self) -> None:
        """The time is up: shut down every socket of the attempt (unless it ended)."""
        with self._lock:
            if self.done:
                return
            self.expired = True
            for sock in self._socks:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class _Watchdog:
    """One daemon thread that expires every attempt's deadline when it is due.

    A thread per attempt (a ``threading.Timer``) cost about a fifth of the
    worker's throughput; this one starts with the first deadline (again in a
    forked child, where the parent's thread does not run).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: list[tuple[float, int, _Deadline]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def reset(self) -> None:
        """Start afresh in a forked child (its parent's lock may have been held at the fork)."""
        self._cond = threading.Condition()
        self._due = []
        self._thread = None

    def add(self, when: float, deadline: _Deadline) -> None:
        """Expire ``deadline`` at ``when`` (``time.monotonic()``)."""
        with self._cond:
            heapq.heappush(self._due, (when, next(self._order), deadline))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="agentpolicy-webhook-deadlines", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due: list[_Deadline] = []
                while self._due and self._due[0][0] <= now:
                    due.append(heapq.heappop(self._due)[2])
                if not due:
                    self._cond.wait(self._due[0][0] - now if self._due else None)
                    continue
            for deadline in due:  # outside the lock: a shutdown may take a moment
                deadline.expire()


_WATCHDOG = _Watchdog()
os.register_at_fork(after_in_child=_WATCHDOG.reset)


_attempt_deadline = threading.local()
"""The :class:`_Deadline` of the attempt this thread is making (``current``), if any."""


class _Resolver:
    """Host-name lookups on at most :attr:`most` threads, each waited for a bounded time.

    ``socket.getaddrinfo`` blocks for as long as the system resolver takes
    and cannot be interrupted. Here it runs on ``most`` daemon threads (they
    never hold up the interpreter's exit), and a lookup starts only when one
    of them is free, so a resolver that hangs holds at most ``most``
    threads and ``most`` lookups, never more, however many attempts are
    made meanwhile; the attempt waits (for a free thread, then for the
    answer) no longer than it is given and fails as a timeout. A lookup
    that answers after its attempt gave up frees its thread then; its
    answer is dropped. Attempts that need a name already being looked up
    wait for that lookup rather than start another, so a host name whose
    resolver hangs holds one thread, not all of them: the other endpoints'
    lookups still run.
    """

    def __init__(self, most: int = 4) -> None:
        self.most = most
        self.reset()

    def reset(self) -> None:
        """Start afresh (in a forked child: the parent's lookup threads do not run there)."""
        self._slots = threading.BoundedSemaphore(self.most)
        self._jobs: queue.SimpleQueue[tuple[concurrent.futures.Future[list[Any]], str, int]] = (
            queue.SimpleQueue()
        )
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, int], concurrent.futures.Future[list[Any]]] = {}
        """The lookups under way, by host and port: an attempt needing one waits for it."""

    def _work(
        self,
        jobs: queue.SimpleQueue[Any],
        slots: threading.BoundedSemaphore,
        pending: dict[tuple[str, int], concurrent.futures.Future[list[Any]]],
        lock: threading.Lock,
    ) -> None:
        while True:
            future, host, port = jobs.get()
            try:
                future.set_result(socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))
            except Exception as err:  # the attempt's thread raises it
                future.set_exception(err)
            finally:
                with lock:
                    if pending.get((host, port)) is future:
                        del pending[(host, port)]
                slots.release()

    def lookup(self, host: str, port: int, seconds: float) -> list[Any]:
        """``getaddrinfo(host, port, 0, SOCK_STREAM)`` within ``seconds``, else ``TimeoutError``."""
        ends = time.monotonic() + seconds
        key = (host, port)
        with self._lock:
            future = self._pending.get(key)  # being looked up already: wait for that lookup
        if future is None:
            future = self._start(key, seconds)
        try:
            return future.result(timeout=max(0.0, ends - time.monotonic()))
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"no answer from the name lookup within {seconds:g} s") from None

    def _start(self, key: tuple[str, int], seconds: float) -> concurrent.futures.Future[list[Any]]:
        """Start looking ``key`` up once a thread is free (within ``seconds``)."""
        if not self._slots.acquire(timeout=seconds):
            raise TimeoutError(f"no lookup thread free within {seconds:g} s")
        with self._lock:
            future = self._pending.get(key)
            if future is not None:  # another attempt started it meanwhile
                self._slots.release()
                return future
            if len(self._threads) < self.most:  # a thread per slot, started when first needed
                thread = threading.Thread(
                    target=self._work,
                    args=(self._jobs, self._slots, self._pending, self._lock),
                    name="agentpolicy-webhook-lookup",
                    daemon=True,
                )
                thread.start()
                self._threads.append(thread)
            future = self._pending[key] = concurrent.futures.Future()
            self._jobs.put((future, *key))
        return future


_RESOLVER = _Resolver()
os.register_at_fork(after_in_child=_RESOLVER.reset)


def _numeric(host: str) -> bool:
    """Whether ``host`` is an IP address (no lookup: ``getaddrinfo`` answers it at once)."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _addresses(host: str, port: int, timeout: object) -> list[Any]:
    """The addresses of ``host``: looked up within the attempt's time (see :class:`_Resolver`)."""
    deadline: _Deadline | None = getattr(_attempt_deadline, "current", None)
    if _numeric(host):
        return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    if deadline is not None:
        seconds = deadline.remaining()
    elif isinstance(timeout, int | float):
        seconds = float(timeout)
    else:  # not in an attempt, no timeout: as the system does
        return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    return _RESOLVER.lookup(host, port, seconds)


def _connect(
    address: tuple[str, int],
    timeout: object = None,
    source_address: tuple[str, int] | None = None,
) -> socket.socket:
    """``socket.create_connection``, its name lookup bounded, its socket under the deadline.

    Each address is tried in turn, each connection bounded by ``timeout``
    (a number; anything else, such as http.client's default, leaves the
    socket's default), as ``socket.create_connection`` does; the attempt's
    deadline starts once one is connected.
    """
    host, port = address
    error: OSError | None = None
    for family, kind, proto, _, where in _addresses(host, port, timeout):
        sock = None
        try:
            sock = socket.socket(family, kind, proto)
            reaching: _Deadline | None = getattr(_attempt_deadline, "current", None)
            if reaching is not None:  # every address within what is left of reaching the host
                left = reaching.remaining()
                if left <= 0:
                    raise TimeoutError("no address answered within the timeout")
                sock.settimeout(min(left, timeout) if isinstance(timeout, int | float) else left)
            elif isinstance(timeout, int | float):
                sock.settimeout(timeout)
            if source_address is not None:
                sock.bind(source_address)
            sock.connect(where)
        except OSError as err:
            error = err
            if sock is not None:
                sock.close()
            continue
        deadline: _Deadline | None = getattr(_attempt_deadline, "current", None)
        if deadline is not None:
            deadline.watch(sock)
        return sock
    raise error if error is not None else OSError("getaddrinfo returned no address")


@functools.cache
def _opener() -> Any:
    """A urllib opener that never follows a redirect and registers its sockets' deadline.

    A 3xx answer is an ``HTTPError``; proxies from the environment are used
    as urllib uses them.
    """
    import http.client  # noqa: PLC0415 - heavy (http, email, ssl): only when sending
    import urllib.request  # noqa: PLC0415

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None  # urllib then raises HTTPError with the 3xx status

    class Final(http.client.HTTPResponse):
        """Reads past interim answers (102 Processing, 103 Early Hints, ...) to the final one.

        http.client skips only ``100 Continue``; any other 1xx was taken for
        the final answer, so an event the receiver then answered 200 was
        recorded as failed (``HTTP 103``). A client must read one or more
        1xx answers before the final one (RFC 9110, 15.2); the attempt's
        deadline bounds a receiver that sends them without end. ``101``
        (never asked for: no ``Upgrade`` is sent) stays the answer, and
        what follows it is not HTTP: it is a protocol error
        (:func:`_status_error`), as is a status line whose status is not
        exactly three ASCII digits (:meth:`_status_line`).
        """

        def _read_status(self) -> tuple[str, int, str]:
            while True:
                version, status, reason = self._status_line()
                if not 100 < status < 200 or status == 101:
                    return version, status, reason
                http.client.parse_headers(self.fp)  # the interim answer's headers, dropped

        def _status_line(self) -> tuple[str, int, str]:
            """The next status line, refused (``BadStatusLine``) unless it is one.

            Its status is exactly three ASCII digits after exactly one space
            (:data:`_STATUS_LINE`): ``HTTP/1.1 +200 OK``, ``0200`` or
            ``HTTP/1.1  200`` answers no valid status, and http.client read
            each as 200, so the event was recorded delivered.
            """
            line = self.fp.readline(_MAX_STATUS_LINE + 1)
            if len(line) > _MAX_STATUS_LINE:
                raise http.client.LineTooLong("status line")
            if not line:
                raise http.client.RemoteDisconnected("closed without an answer")
            match = _STATUS_LINE.fullmatch(line)
            if match is None:
                raise http.client.BadStatusLine(str(line, "iso-8859-1"))
            version, status, reason = match.groups()
            if not _HTTP_1.fullmatch(version):  # http.client took HTTP/0.9, HTTP/1. or HTTP/1.1x
                raise http.client.UnknownProtocol(version.decode("ascii"))
            return version.decode("ascii"), int(status), str(reason or b"", "iso-8859-1")

    class Plain(http.client.HTTPConnection):
        response_class = Final

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._create_connection = _connect

    class Secure(http.client.HTTPSConnection):
        response_class = Final

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._create_connection = _connect

    class PlainHandler(urllib.request.HTTPHandler):
        def http_open(self, req: Any) -> Any:
            return self.do_open(Plain, req)

    class SecureHandler(urllib.request.HTTPSHandler):
        def https_open(self, req: Any) -> Any:
            return self.do_open(Secure, req)

    return urllib.request.build_opener(NoRedirect, PlainHandler, SecureHandler)


def _split_credentials(url: str) -> tuple[str, str | None]:
    """``https://user:pass@host/h`` -> (``https://host/h``, the Basic ``Authorization`` value)."""
    parts = urllib.parse.urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return url, None
    user, _, password = userinfo.partition(":")
    pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()
    bare = urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return bare, "Basic " + base64.b64encode(pair).decode()


class _RetryableError(Exception):
    pass


class _FinalError(Exception):
    pass


def _status_error(code: int) -> _RetryableError | _FinalError:
    """What a final answer other than 2xx makes of an attempt: retried or failed at once.

    A status HTTP does not allow here is a protocol error, retried like an
    answer that is not HTTP at all (``HTTP/1.1 1000`` or ``HTTP/1.1 +200``
    is a bad status line, see ``_status_line`` in :func:`_opener`): one
    outside 100 to 599 (invalid, RFC 9110, 15; it was
    recorded as ``HTTP 600``, as if a server error) and a ``101`` to a POST
    that asked for no upgrade (RFC 9110, 15.2.2; it failed the event at
    once). 5xx, 408 and 429 are retried; a 3xx is a redirect, never
    followed, and like any other 4xx fails the event at once.
    """
    if code == 101:
        return _RetryableError("protocol error: HTTP 101 (no upgrade was asked for)")
    if not 100 <= code <= 599:
        return _RetryableError(f"protocol error: HTTP {code} (not an HTTP status)")
    if code >= 500 or code in _RETRY_STATUSES:
        return _RetryableError(f"HTTP {code}")
    if 300 <= code < 400:
        return _FinalError(f"HTTP {code} (redirect not followed)")
    return _FinalError(f"HTTP {code}")


class WebhookDispatcher:
    """Delivers the outbox to ``endpoints``; one daemon thread per engine.

    ``backoff`` is the first retry's delay in seconds; each retry doubles it
    up to ``backoff_cap``, with jitter. ``lease`` is how long an attempt
    may take (default: three times the longest endpoint timeout plus 5
    seconds: reaching the host has two, the exchange one): every
    attempt starts with at least that much of its delivery's lease ahead.
    Deliveries are claimed in batches leased for twice that, so a worker
    that dies holds up what it claimed no longer than ``2 * lease``.
    ``enrich`` (when given) makes the payload sent from a delivery's stored
    payload: the engine adds one-time approval links there, so they never
    rest in the store's outbox (not for an endpoint with ``links=False``).
    """

    def __init__(
        self,
        outbox: Outbox,
        endpoints: Sequence[WebhookEndpoint],
        *,
        backoff: float = 1.0,
        backoff_cap: float = 3600.0,
        lease: float | None = None,
        poll_interval: float = 1.0,
        housekeeping: Callable[[], object] | None = None,
        housekeeping_interval: float = 30.0,
        enrich: Callable[[WebhookDelivery], dict[str, Any]] | None = None,
    ) -> None:
        self.enrich = enrich
        self.outbox = outbox
        self.endpoints = {e.id: e for e in endpoints}
        self.backoff = backoff
        self.backoff_cap = backoff_cap
        longest = max((e.timeout.total_seconds() for e in endpoints), default=0.0)
        self.lease = lease if lease is not None else 3 * longest + 5.0
        self.poll_interval = poll_interval
        self.housekeeping = housekeeping
        self.housekeeping_interval = housekeeping_interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._slow_left = False
        """Whether the last run left an endpoint for the others because it answered slowly."""

    # -- running -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="agentpolicy-webhooks", daemon=True
            )
            self._thread.start()

    def wake(self) -> None:
        """Look at the outbox now rather than at the next poll."""
        self._wake.set()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread; what is still pending stays in the outbox for the next process.

        The thread starts no attempt once asked to stop: it ends after the
        one under way (waited for up to ``timeout`` seconds) and gives back
        at once what it claimed and did not attempt.
        """
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        last_housekeeping = time.monotonic()
        while not self._stop.is_set():
            try:
                due = time.monotonic() - last_housekeeping >= self.housekeeping_interval
                if self.housekeeping is not None and due:
                    last_housekeeping = time.monotonic()
                    self.housekeeping()
                self.run_once(stop=self._stop)
            except PolicyError as err:  # the storage is down: try again later
                log.warning("webhook delivery paused: %s", err.message)
            except Exception:  # pragma: no cover - never let the thread die
                log.exception("webhook worker error")
            if self._slow_left:  # a slow endpoint was left for the others: its turn again
                continue
            self._wake.wait(self.poll_interval)
            self._wake.clear()

    def run_once(
        self,
        limit: int = 50,
        deadline: float | None = None,
        *,
        stop: threading.Event | None = None,
    ) -> int:
        """Try what is due, each once; return how many were attempted (at most ``limit``).

        Deliveries are claimed in batches, leased for twice :attr:`lease`;
        an attempt starts only with at least :attr:`lease` of its lease
        ahead, renewed first if the batch took that long, so a lease never
        runs out while its delivery waits behind others (a delivery another
        worker took meanwhile is left to it). An endpoint that did not
        answer in time, or whose attempts in this run took its timeout in
        all (a receiver that answers, slowly), is left alone for the rest
        of the run, so that one slow or stalled receiver costs the others
        at most about two timeouts a run. With ``deadline``
        (``time.monotonic()``), no attempt starts after it; once ``stop`` is
        set, none starts either. What a run claimed and did not attempt is
        given back at once.
        """
        wanted = list(self.endpoints)
        spent = dict.fromkeys(wanted, 0.0)
        attempted = 0

        def over() -> bool:
            if stop is not None and stop.is_set():
                return True
            return deadline is not None and time.monotonic() >= deadline

        with self._lock:
            self._slow_left = False
            while attempted < limit and wanted:
                if over():
                    break
                batch = self.outbox.claim_webhooks(
                    wanted, time.time(), 2 * self.lease, limit - attempted
                )
                if not batch:
                    break
                for at, claimed in enumerate(batch):
                    if over():
                        for left in batch[at:]:
                            self._give_back(left)
                        break
                    if claimed.endpoint_id not in wanted:  # stalled or slow in this run
                        self._give_back(claimed)
                        continue
                    delivery = self._held(claimed)
                    if delivery is None:  # another worker took it over: it is theirs
                        continue
                    started = time.monotonic()
                    outcome = self._attempt(delivery)
                    self.outbox.finish_webhook(outcome, leased_until=delivery.next_attempt_at)
                    attempted += 1
                    endpoint = delivery.endpoint_id
                    spent[endpoint] += time.monotonic() - started
                    error = outcome.last_error
                    if error is not None and error.startswith(_STALLED):
                        wanted.remove(endpoint)
                    elif spent[endpoint] >= self.endpoints[endpoint].timeout.total_seconds():
                        wanted.remove(endpoint)  # its turn again in the next run
                        self._slow_left = True
        return attempted

    def _held(self, delivery: WebhookDelivery) -> WebhookDelivery | None:
        """``delivery`` with at least :attr:`lease` of its lease ahead, or ``None`` if lost.

        The lease is renewed when less is left; a delivery claimed or
        finished by another worker since (its lease ran out) is not.
        """
        now = time.time()
        if delivery.next_attempt_at - now >= self.lease:
            return delivery
        until = now + self.lease
        if not self.outbox.lease_webhook(delivery, delivery.next_attempt_at, until):
            return None
        return attrs.evolve(delivery, next_attempt_at=until)

    def _give_back(self, delivery: WebhookDelivery) -> None:
        """End this worker's claim of a delivery it will not attempt now: it is due again."""
        self.outbox.lease_webhook(delivery, delivery.next_attempt_at, time.time())

    def flush(self, timeout: float = 10.0) -> bool:
        """Deliver until the outbox is empty for these endpoints or ``timeout`` seconds pass.

        Returns whether it is empty. Failed deliveries count as done. It
        returns within ``timeout`` plus at most one attempt's timeout.
        """
        deadline = time.monotonic() + timeout
        while True:
            attempted = self.run_once(deadline=deadline)
            if self.outbox.pending_webhooks(list(self.endpoints)) == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            if attempted == 0:
                time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))

    # -- one attempt ------------------------------------------------------------------------

    def _delay(self, attempts: int) -> float:
        ceiling = min(self.backoff_cap, self.backoff * 2 ** (attempts - 1))
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not security

    def _attempt(self, delivery: WebhookDelivery) -> WebhookDelivery:
        endpoint = self.endpoints[delivery.endpoint_id]
        attempts = delivery.attempts + 1
        try:
            self._post(endpoint, delivery)
        except _FinalError as refused:
            where = endpoint.shown_url
            log.warning("webhook %s to %s refused: %s", delivery.id, where, refused)
            return attrs.evolve(
                delivery, status=DeliveryStatus.FAILED, attempts=attempts, last_error=str(refused)
            )
        except Exception as exc:  # retryable; anything unforeseen too: never stop the batch
            error = str(exc) if isinstance(exc, _RetryableError) else f"error: {type(exc).__name__}"
            if attempts >= endpoint.max_attempts:
                where = endpoint.shown_url
                log.warning("webhook %s to %s failed for good: %s", delivery.id, where, error)
                return attrs.evolve(
                    delivery, status=DeliveryStatus.FAILED, attempts=attempts, last_error=error
                )
            return attrs.evolve(
                delivery,
                attempts=attempts,
                next_attempt_at=time.time() + self._delay(attempts),
                last_error=error,
            )
        return attrs.evolve(
            delivery, status=DeliveryStatus.DELIVERED, attempts=attempts, last_error=None
        )

    @staticmethod
    def payload(delivery: WebhookDelivery, timestamp: int) -> bytes:
        """The exact body of a delivery sent at ``timestamp`` (Unix seconds, real time)."""
        stamp = format_instant(datetime.fromtimestamp(timestamp, UTC))
        body: dict[str, Any] = {**delivery.payload, "timestamp": stamp}
        return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()

    def _post(self, endpoint: WebhookEndpoint, delivery: WebhookDelivery) -> None:
        import http.client  # noqa: PLC0415 - heavy (http, email, ssl): only when sending
        import ssl  # noqa: PLC0415
        import urllib.error  # noqa: PLC0415
        import urllib.request  # noqa: PLC0415

        timestamp = int(time.time())
        if self.enrich is not None and endpoint.links:
            try:
                delivery = attrs.evolve(delivery, payload=self.enrich(delivery))
            except PolicyError as err:  # the store is down: try again later
                raise _RetryableError(f"payload not ready: {err.message}") from None
        body = self.payload(delivery, timestamp)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "agentpolicy-webhooks",
            "X-Webhook-Event": delivery.event,
            "X-Webhook-Id": delivery.event_id,
            **sign(body, endpoint.secret, timestamp, delivery.event_id),
        }
        url, authorization = _split_credentials(endpoint.url)
        if authorization is not None:
            headers["Authorization"] = authorization
        request = urllib.request.Request(  # noqa: S310 - http(s) URLs only, checked
            url, data=body, headers=headers, method="POST"
        )
        seconds = endpoint.timeout.total_seconds()
        with _Deadline(seconds) as deadline:
            try:
                with _opener().open(request, timeout=seconds):
                    pass  # a 2xx status line and its headers: delivered; the body is not read
            except urllib.error.HTTPError as exc:
                exc.close()
                raise _status_error(exc.code) from None
            except Exception as exc:  # the message may hold the URL: only the kind is kept
                reason = getattr(exc, "reason", exc)
                if deadline.expired or isinstance(reason, TimeoutError):
                    raise _RetryableError(f"{_STALLED} ({seconds:g} s)") from None
                if isinstance(reason, ssl.SSLError):  # a ValueError too when the certificate
                    # fails: not the URL's fault, and an expired certificate gets renewed
                    why = getattr(reason, "verify_message", None)
                    kind = type(reason).__name__ + (f" ({why})" if why else "")
                    raise _RetryableError(f"network error: {kind}") from None
                if isinstance(reason, http.client.InvalidURL | ValueError):  # never usable
                    raise _FinalError(f"invalid URL: {type(reason).__name__}") from None
                if isinstance(reason, http.client.HTTPException):  # not HTTP: a broken answer
                    raise _RetryableError(f"protocol error: {type(reason).__name__}") from None
                raise _RetryableError(f"network error: {type(reason).__name__}") from None
