"""``agentpolicy serve``: check where it may listen, build the engine, run uvicorn.

A non-loopback ``--host`` without TLS (here or at a declared proxy) or
``--insecure-bind`` is refused with one line and status 2, before anything
is opened. The line ``agentpolicy serve: listening on URL`` goes to stderr
once the socket is bound (with ``--port 0``, the port the system chose).
Access logs never show a one-time link: the ``t`` query value (its name
percent-decoded, as the service reads it) is written ``***``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import socket
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from urllib.parse import unquote_plus

import attrs
import uvicorn

from agentpolicy.config import Settings, build_engine
from agentpolicy.errors import PolicyValidationError, StorageUnavailableError
from agentpolicy.links import TOKEN_PREFIX
from agentpolicy.serve.app import ServeOptions, create_app
from agentpolicy.serve.binding import bind_problem, is_loopback
from agentpolicy.serve.protocol import DeadlineProtocol
from agentpolicy.storage import open_async_storage

__all__ = ["ServeArgs", "bind_socket", "redact_links", "serve"]

_QUERY_PAIR = re.compile(r"(?P<key>[?&][^=&\s]*=)(?P<value>[^&\s]*)")


@attrs.frozen
class ServeArgs:
    """The flags of ``agentpolicy serve``."""

    host: str = "127.0.0.1"
    port: int = 8402
    tls_cert: str | None = None
    tls_key: str | None = None
    behind_tls_proxy: bool = False
    forwarded_allow_ips: str = "127.0.0.1"
    insecure_bind: bool = False
    session_ttl: timedelta = timedelta(hours=12)


def redact_links(text: str) -> str:
    """``text`` with every ``t`` query value (a one-time link token) replaced by ``***``.

    The name is compared as the service reads it, percent-decoded (``%74=``
    is ``t=`` to Starlette); so is a value that holds a link token under
    any other name.
    """

    def redacted(match: re.Match[str]) -> str:
        key = unquote_plus(match["key"][1:-1])
        value = unquote_plus(match["value"])
        if key == "t" or TOKEN_PREFIX + "." in value:
            return match["key"] + "***"
        return match[0]

    return _QUERY_PAIR.sub(redacted, text)


class _RedactLinks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_links(a) if isinstance(a, str) else a for a in record.args)
        return True


def _stderr(line: str) -> None:
    sys.stderr.write(line + "\n")


def _check(args: ServeArgs) -> None:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise PolicyValidationError.single("$.tlsCert", "give both --tls-cert and --tls-key")
    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path is not None and not Path(path).is_file():
            raise PolicyValidationError.single(f"$.{flag[2:]}", f"{flag} {path}: no such file")
    if not 0 <= args.port <= 65535:
        raise PolicyValidationError.single("$.port", "must be a port number from 0 to 65535")
    problem = bind_problem(args.host, tls=args.tls_cert is not None,
                           behind_tls_proxy=args.behind_tls_proxy,
                           insecure_bind=args.insecure_bind)  # fmt: skip
    if problem is not None:
        raise PolicyValidationError.single("$.host", problem)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (made as IPPROTO_TCP: see the comment)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it every answer on a kept-alive connection waits about 40 ms (delayed ACKs)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
    return sock


def serve(args: ServeArgs, settings: Settings, say: Callable[[str], None] | None = None) -> int:
    """Run the service until interrupted; return the exit status.

    Raises :class:`~agentpolicy.PolicyValidationError` (status 2, one line)
    for flags it refuses, a port it cannot listen on, a certificate or key
    it cannot use; the store's errors come from
    :func:`~agentpolicy.config.build_engine` (an OSError opening its file is
    :class:`~agentpolicy.StorageUnavailableError`).
    """
    if say is None:
        say = _stderr
    _check(args)
    tls = args.tls_cert is not None
    loopback = is_loopback(args.host)
    if not loopback and not tls and not args.behind_tls_proxy:
        say(f"agentpolicy serve: WARNING: plain HTTP on {args.host} (--insecure-bind): tokens "
            "and cookies cross the network unencrypted")  # fmt: skip
    options = ServeOptions(
        secure_cookies=tls or args.behind_tls_proxy,
        hsts=tls,
        loopback_hosts=loopback and not args.behind_tls_proxy,
        session_ttl=args.session_ttl,
    )
    logging.getLogger("uvicorn.access").addFilter(_RedactLinks())
    logging.getLogger("agentpolicy").setLevel(logging.INFO)  # votes and sign-ins are logged
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:  # in use, not an address of this host, a port it may not use
        raise PolicyValidationError.single(
            "$.port", f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}"
        ) from None
    try:
        engine = build_engine(settings)
    except OSError as exc:  # the SQLite file's name or folder: too long, not allowed
        sock.close()
        raise StorageUnavailableError(
            f"cannot open the store: {exc.strerror or exc}: {str(exc.filename)[:100]}"
        ) from None
    try:
        url = settings.storage_url(fallback_to_file=True)
        native = None if url is None else open_async_storage(url, key_prefix=settings.key_prefix)
        app = create_app(engine, options, native)  # native on Redis and PostgreSQL
        config = uvicorn.Config(
            app, ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key,
            proxy_headers=args.behind_tls_proxy, forwarded_allow_ips=args.forwarded_allow_ips,
            server_header=False, log_level="info", lifespan="on", http=DeadlineProtocol, ws="none",
        )  # fmt: skip
        try:
            config.load()  # reads the certificate and key now, not after "listening on"
        except OSError as exc:  # ssl.SSLError too
            raise PolicyValidationError.single(
                "$.tls-cert", f"cannot use --tls-cert {args.tls_cert} with --tls-key "
                f"{args.tls_key} (both PEM, the key the certificate's): {exc.strerror or exc}",
            ) from None  # fmt: skip
        server = uvicorn.Server(config)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        store = settings.shown_storage_url(fallback_to_file=True)
        say(f"agentpolicy serve: listening on {'https' if tls else 'http'}://{shown}:{port} "
            f"(store {store}); approvals at /approvals, MCP at /mcp")  # fmt: skip
        # uvicorn stops gracefully on SIGINT and SIGTERM, then raises the signal again: both
        # end here as KeyboardInterrupt, and the command exits 0
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        with contextlib.suppress(KeyboardInterrupt):
            server.run(sockets=[sock])
    finally:
        sock.close()
        engine.close()
    return 0
