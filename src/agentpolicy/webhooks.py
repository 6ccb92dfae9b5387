"""Signed webhook events about approvals: endpoints, signatures, verification.

Every delivery is a POST whose body is the JSON payload, with these headers:

- ``Content-Type: application/json``
- ``X-Webhook-Event``: the event name; ``X-Webhook-Id``: the event id (for
  dropping duplicates: delivery is at least once)
- ``X-Webhook-Timestamp``: ISO 8601 UTC, equal to the payload's ``timestamp``
- ``X-Webhook-Signature: sha256=<hex HMAC-SHA256 of the body>`` (what the
  t402 agent-policy design's ``verifyWebhookSignature`` accepts)
- ``X-Webhook-Signature-Timestamped: t=<unix seconds>,sha256=<hex HMAC-SHA256
  of "<t>." + body>``, which lets receivers refuse replays: see :func:`verify`.
- The Standard Webhooks headers (https://www.standardwebhooks.com):
  ``webhook-id`` (the event id), ``webhook-timestamp`` (Unix seconds) and
  ``webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``,
  which the ``standardwebhooks`` package's ``Webhook(key).verify`` accepts.
  The key is the endpoint secret's bytes: for a ``whsec_<base64>`` secret the
  decoded base64 (pass the secret as it is to ``Webhook``), for any other
  secret its UTF-8 bytes (pass ``secret.encode()``); see :func:`signing_key`.

A receiver in Python needs three lines::

    from agentpolicy.webhooks import verify
    if not verify(body, request.headers, secret):
        return 401
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import ipaddress
import os
import re
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta

import attrs

from agentpolicy import _json as bounded_json
from agentpolicy._checks import check_int, type_name, utf8_text
from agentpolicy.codec import format_instant
from agentpolicy.durations import parse_duration
from agentpolicy.errors import PolicyValidationError, Problem
from agentpolicy.urls import redact_url

__all__ = [
    "EVENTS",
    "WebhookEndpoint",
    "endpoints_from_env",
    "sign",
    "signing_key",
    "standard_signature",
    "to_endpoints",
    "verify",
]

EVENTS = (
    "approval.created",
    "approval.decision_submitted",
    "approval.approved",
    "approval.denied",
    "approval.expired",
    "budget.threshold_reached",
)
"""Every event name: an approval's, in the order they can happen, then budget alerts."""

DEFAULT_TOLERANCE = timedelta(minutes=5)
_URL = re.compile(r"https?://[^\s/?#]+[^\s]*", re.IGNORECASE)
_WHSEC = "whsec_"


def signing_key(secret: str) -> bytes:
    """The HMAC key of the Standard Webhooks signature for an endpoint secret.

    ``whsec_<base64>`` (the Standard Webhooks secret format) gives the decoded
    bytes; any other secret gives its UTF-8 bytes. Raises
    :class:`~agentpolicy.PolicyValidationError` for a ``whsec_`` secret whose
    rest is not base64 of at least one byte.
    """
    if secret.startswith(_WHSEC):
        encoded = secret[len(_WHSEC) :]
        if re.fullmatch(r"[A-Za-z0-9+/]+={0,2}", encoded):
            with contextlib.suppress(binascii.Error):
                key = base64.b64decode(encoded + "==")  # unpadded base64 is common
                if key:
                    return key
        raise PolicyValidationError.single(
            "$.secret", "a whsec_ secret must be whsec_ followed by base64"
        )
    return secret.encode()


def _url_problems(url: str) -> list[Problem]:
    """What makes an http(s) URL unusable for sending (never quoting the URL itself)."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return [Problem("$.url", "must not contain control characters")]
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # raises for a port that is not a number from 0 to 65535
        host = parts.hostname or ""
    except ValueError:
        return [Problem("$.url", "must have a valid host and port")]
    hostport = parts.netloc.rpartition("@")[2]
    bracketed = hostport.startswith("[")
    if not host or port == 0 or not (_bracketed_ok(hostport) if bracketed else _name_ok(host)):
        return [Problem("$.url", "must have a valid host and port")]
    if not (parts.path + parts.query + parts.fragment).isascii():
        return [Problem("$.url", "must percent-encode its path and query (ASCII only)")]
    return []


_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)", re.IGNORECASE)
"""A label of a host name as looked up (IDNA-encoded): letters, digits, ``-`` not at its ends.

``_`` is allowed too: not in a host name by RFC 1123, but in names that
resolve (a Docker Compose service ``hook_receiver``), and sent as they are.
"""
_LABEL_EDGE_HYPHEN = re.compile(r"(?:^|[.\u3002\uff0e\uff61])-|-(?:$|[.\u3002\uff0e\uff61])")
"""A ``-`` at either end of a label (IDNA separates labels by these four dots)."""


def _name_ok(host: str) -> bool:
    """Whether ``host`` (an IPv4 address or a name, not in brackets) can be looked up.

    IDNA names are encoded first (``bücher.example`` is
    ``xn--bcher-kva.example``); then every label is 1 to 63 letters, digits,
    ``-`` (neither first nor last) or ``_``, and the name at most 253
    characters (one final ``.``, of a fully qualified name, not counted).
    ``urlsplit`` and the IDNA codec let ``-a.com``, ``a!b.com`` and
    ``ex%61mple.com`` through: every attempt then failed as a network error
    until the endpoint was given up.
    """
    if _LABEL_EDGE_HYPHEN.search(host):
        return False
    try:
        name = host.encode("idna").decode("ascii")  # raises for an empty or too long label
    except UnicodeError:
        return False
    name = name.removesuffix(".")
    return len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


def _bracketed_ok(hostport: str) -> bool:
    """Whether a ``[...]`` host is an IPv6 address followed by nothing but a port.

    ``urlsplit`` reads ``[::1]x`` as host ``::1`` and accepts ``[v1.x]``
    (IPvFuture), but no connection can be made to either: every attempt
    failed as a network error until the endpoint was given up.
    """
    if not hostport.startswith("["):
        return True
    bracketed = re.fullmatch(r"\[([^\]]*)\](?::[0-9]*)?", hostport)
    if bracketed is None:
        return False
    try:
        ipaddress.IPv6Address(bracketed.group(1).split("%", 1)[0])
    except ValueError:
        return False
    return True


def _shown(url: str) -> str:
    return redact_url(url, hide_path=True)


def _endpoint_id(url: str) -> str:
    return "wh_" + hashlib.sha256(url.encode()).hexdigest()[:16]


@attrs.frozen
class WebhookEndpoint:
    """Where to send events: ``url``, its ``secret``, which ``events`` (empty means all).

    ``timeout`` bounds each step of one HTTP attempt: the host-name lookup,
    connecting to each address, and the exchange once connected (see
    ``docs/webhooks.md``); ``max_attempts`` bounds the tries of one event
    before it is recorded as failed. ``links=False`` sends this endpoint
    ``approval.created`` events without their one-time approval links (an
    audit log, say, that must not hold credentials to vote); by default the
    endpoint relays them to the approvers. The secret never appears in a
    repr, a log line or an error message, and the URL is shown only as
    :attr:`shown_url`: without its credentials, query values and path.
    """

    url: str = attrs.field(repr=_shown)
    secret: str = attrs.field(repr=False)
    events: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    timeout: timedelta = timedelta(seconds=5)
    max_attempts: int = 15
    links: bool = True

    def __attrs_post_init__(self) -> None:
        problems: list[Problem] = []
        if not isinstance(self.url, str) or not _URL.fullmatch(self.url):
            problems.append(Problem("$.url", "must be an http:// or https:// URL"))
        elif not utf8_text(self.url):  # a byte an environment variable could not decode
            problems.append(Problem("$.url", "must be text UTF-8 can carry (no lone surrogate)"))
        else:
            problems += _url_problems(self.url)
        if not isinstance(self.secret, str) or not self.secret:
            problems.append(Problem("$.secret", "must be a non-empty string"))
        elif not utf8_text(self.secret):
            problems.append(Problem("$.secret", "must be text UTF-8 can carry (no lone surrogate)"))
        else:
            try:
                signing_key(self.secret)
            except PolicyValidationError as err:
                problems += err.problems
        unknown = sorted(e for e in self.events if e not in EVENTS)
        if unknown:
            problems.append(Problem("$.events", f"unknown events {unknown}; known: {EVENTS}"))
        if not isinstance(self.timeout, timedelta) or self.timeout <= timedelta(0):
            problems.append(Problem("$.timeout", "must be a positive duration"))
        problems += check_int(self.max_attempts, "$.maxAttempts", 1, 100)
        if type(self.links) is not bool:
            problems.append(Problem("$.links", "must be true or false"))
        if problems:
            raise PolicyValidationError(problems)

    @property
    def id(self) -> str:
        """A stable id for the endpoint (derived from its URL), under which deliveries are kept."""
        return _endpoint_id(self.url)

    @property
    def shown_url(self) -> str:
        """The URL as logs, listings and the CLI show it: credentials, query values and path hidden.

        ``https://u:p@hooks.example/services/T0/B0/tok?k=v`` is shown as
        ``https://u:***@hooks.example/***?k=***``: a webhook URL's path often
        is its secret (Slack's, Discord's). :attr:`id` tells endpoints apart.
        """
        return _shown(self.url)

    def wants(self, event: str) -> bool:
        """Whether this endpoint subscribes to ``event``."""
        return not self.events or event in self.events


def _timeout(raw: object, path: str) -> timedelta:
    # A bare number is milliseconds, as in the t402 agent-policy design.
    return parse_duration(raw, path, bare="ms")


def _endpoint(raw: object, path: str) -> WebhookEndpoint:
    if isinstance(raw, WebhookEndpoint):
        return raw
    if not isinstance(raw, Mapping):
        raise PolicyValidationError.single(path, f"must be an object, not {type_name(raw)}")
    known = {"url", "secret", "events", "timeout", "retries", "maxAttempts", "links"}
    extra = sorted(set(raw) - known)
    if extra:
        raise PolicyValidationError.single(f"{path}.{extra[0]}", "is not a known key")
    events = raw.get("events") or ()
    if isinstance(events, str):
        events = [e.strip() for e in events.split(",") if e.strip()]
    if not isinstance(events, list | tuple | frozenset | set) or not all(
        isinstance(e, str) for e in events
    ):
        raise PolicyValidationError.single(f"{path}.events", "must be a list of event names")
    attempts = raw.get("maxAttempts", 15)
    if "retries" in raw:
        retries = raw["retries"]
        digits = (isinstance(retries, int) and not isinstance(retries, bool)) or (
            isinstance(retries, str) and re.fullmatch(r"[0-9]{1,3}", retries)
        )
        if not digits or not 0 <= int(retries) <= 99:
            raise PolicyValidationError.single(
                f"{path}.retries", "must be a whole number of retries after the first try, 0 to 99"
            )
        attempts = int(retries) + 1
    try:
        return WebhookEndpoint(
            url=raw.get("url"),  # type: ignore[arg-type]
            secret=raw.get("secret"),  # type: ignore[arg-type]
            events=frozenset(events),
            timeout=_timeout(raw.get("timeout", 5000), "$.timeout"),
            max_attempts=attempts,
            links=raw.get("links", True),
        )
    except PolicyValidationError as err:
        raise err.under(path) from None


def to_endpoints(raw: Iterable[object] | None) -> tuple[WebhookEndpoint, ...]:
    """Endpoints from :class:`WebhookEndpoint` objects or plain dicts (``url``, ``secret``, ...).

    Raises :class:`~agentpolicy.PolicyValidationError` (never showing a
    secret) for anything invalid, or for two endpoints with the same URL.
    """
    endpoints = tuple(_endpoint(e, f"$.webhookEndpoints[{i}]") for i, e in enumerate(raw or ()))
    urls = [_same_place(e.url) for e in endpoints]
    if len(set(urls)) != len(urls):
        raise PolicyValidationError.single(
            "$.webhookEndpoints", "lists one URL twice (scheme and host compared in any case)"
        )
    return endpoints


def _same_place(url: str) -> str:
    """``url`` with its scheme and host in lower case: two spellings of one receiver.

    ``https://Hooks.Example/h`` and ``https://hooks.example/h`` reach the same
    receiver, which got every event twice as two endpoints. The path and
    query are compared as written (a server may tell their cases apart).
    """
    parts = urllib.parse.urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")  # credentials keep their case
    netloc = f"{userinfo}{at}{host.lower()}"
    return urllib.parse.urlunsplit(
        (parts.scheme.lower(), netloc, parts.path, parts.query, parts.fragment)
    )


def endpoints_from_env(env: Mapping[str, str] | None = None) -> tuple[WebhookEndpoint, ...]:
    """Endpoints from the environment (the variables of the t402 agent-policy design).

    ``AGENT_POLICY_WEBHOOKS`` (a JSON list of endpoint objects) and the single
    endpoint of ``AGENT_POLICY_WEBHOOK_URL``, ``_SECRET``, ``_EVENTS``
    (comma-separated), ``_TIMEOUT`` (a duration; a bare number is
    milliseconds) and ``_RETRIES``.
    """
    env = os.environ if env is None else env
    endpoints: list[WebhookEndpoint] = []
    listed = env.get("AGENT_POLICY_WEBHOOKS", "").strip()
    if listed:
        try:
            parsed = bounded_json.loads(listed)
        except (bounded_json.TooDeepError, RecursionError):
            raise PolicyValidationError.single(
                "$AGENT_POLICY_WEBHOOKS", "is nested too deeply (a list of endpoint objects)"
            ) from None
        except ValueError:
            raise PolicyValidationError.single("$AGENT_POLICY_WEBHOOKS", "is not JSON") from None
        if not isinstance(parsed, list):
            raise PolicyValidationError.single("$AGENT_POLICY_WEBHOOKS", "must be a JSON list")
        try:
            endpoints += to_endpoints(parsed)
        except PolicyValidationError as err:
            raise PolicyValidationError(
                Problem(
                    p.path.replace("$.webhookEndpoints", "$AGENT_POLICY_WEBHOOKS", 1), p.message
                )
                for p in err.problems
            ) from None
    url = env.get("AGENT_POLICY_WEBHOOK_URL", "").strip()
    if url:
        single: dict[str, object] = {"url": url, "secret": env.get("AGENT_POLICY_WEBHOOK_SECRET")}
        for name, key in (("EVENTS", "events"), ("TIMEOUT", "timeout"), ("RETRIES", "retries")):
            value = env.get(f"AGENT_POLICY_WEBHOOK_{name}", "").strip()
            if value:
                single[key] = value
        try:
            endpoints.append(_endpoint(single, "$"))
        except PolicyValidationError as err:
            raise PolicyValidationError(
                Problem(_SINGLE_VARIABLES.get(p.path, "$AGENT_POLICY_WEBHOOK_URL"), p.message)
                for p in err.problems
            ) from None
    return to_endpoints(endpoints)


_SINGLE_VARIABLES = {
    "$.url": "$AGENT_POLICY_WEBHOOK_URL",
    "$.secret": "$AGENT_POLICY_WEBHOOK_SECRET",
    "$.events": "$AGENT_POLICY_WEBHOOK_EVENTS",
    "$.timeout": "$AGENT_POLICY_WEBHOOK_TIMEOUT",
    "$.maxAttempts": "$AGENT_POLICY_WEBHOOK_RETRIES",
    "$.retries": "$AGENT_POLICY_WEBHOOK_RETRIES",
}


def _hmac(secret: str, message: bytes) -> str:
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def standard_signature(event_id: str, timestamp: int, body: bytes, secret: str) -> str:
    """The Standard Webhooks ``webhook-signature`` value: ``v1,<base64 HMAC-SHA256>``.

    The HMAC covers ``"{event_id}.{timestamp}.{body}"`` with
    :func:`signing_key` of ``secret``.
    """
    message = f"{event_id}.{timestamp}.".encode() + body
    digest = hmac.new(signing_key(secret), message, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def sign(
    body: bytes, secret: str, timestamp: float | None = None, event_id: str | None = None
) -> dict[str, str]:
    """The signature headers for ``body``.

    ``X-Webhook-Signature`` (as in the t402 agent-policy design),
    ``X-Webhook-Signature-Timestamped`` and ``X-Webhook-Timestamp``; with
    ``event_id`` also the Standard Webhooks ``webhook-id``,
    ``webhook-timestamp`` and ``webhook-signature``. ``timestamp`` is Unix
    seconds of real time (default: now).
    """
    t = int(time.time() if timestamp is None else timestamp)
    headers = {
        "X-Webhook-Signature": "sha256=" + _hmac(secret, body),
        "X-Webhook-Signature-Timestamped": f"t={t},sha256={_hmac(secret, f'{t}.'.encode() + body)}",
        "X-Webhook-Timestamp": format_instant(datetime.fromtimestamp(t, UTC)),
    }
    if event_id is not None:
        headers["webhook-id"] = event_id
        headers["webhook-timestamp"] = str(t)
        headers["webhook-signature"] = standard_signature(event_id, t, body, secret)
    return headers


def verify(
    body: bytes,
    headers: Mapping[str, str],
    secret: str,
    *,
    tolerance: timedelta = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> bool:
    """Whether ``body`` was signed with ``secret`` within ``tolerance`` of ``now`` (real time).

    Checks ``X-Webhook-Signature-Timestamped`` in constant time and refuses a
    timestamp further than ``tolerance`` from now, so a captured delivery
    cannot be replayed later. Header names are matched ignoring case.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    value = lowered.get("x-webhook-signature-timestamped", "")
    match = re.fullmatch(r"t=(\d{1,12}),sha256=([0-9a-f]{64})", value.strip())
    if match is None:
        return False
    t = int(match.group(1))
    current = time.time() if now is None else now
    if abs(current - t) > tolerance.total_seconds():
        return False
    expected = _hmac(secret, f"{t}.".encode() + body)
    return hmac.compare_digest(expected, match.group(2))
