"""The Starlette app of ``agentpolicy serve``: MCP, the approvals and budget pages, health, metrics.

:func:`create_app` builds it on a :class:`~agentpolicy.PolicyEngine` (which
stays the caller's to close): ``/mcp`` (:mod:`agentpolicy.serve.mcp_http`),
``/approvals`` and ``/approvals/{id}`` (pending approvals, one-time links,
votes), ``/agents`` and ``/agents/{id}`` (budgets), ``/signin`` and
``/signout`` (browser sessions; :mod:`agentpolicy.serve.web`), ``/healthz``
and ``/metrics``. Every page is server-rendered HTML; the only script
(``/static/app.js``) refreshes the approvals list. Who may do what is in
``docs/serve.md``. No request body is read past a small bound, and none
is multipart (:mod:`agentpolicy.serve.limits`), before a route sees it.

Every engine call of a page runs through an
:class:`~agentpolicy.AsyncPolicyEngine` (off the event loop); token checks
and MCP tool calls run on worker threads.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentpolicy.engine import PolicyEngine
from agentpolicy.errors import PolicyError
from agentpolicy.serve import health
from agentpolicy.serve.binding import is_loopback
from agentpolicy.serve.errors import error_response
from agentpolicy.serve.limits import BodyLimit
from agentpolicy.serve.mcp_http import McpEndpoint
from agentpolicy.serve.metrics import Metrics
from agentpolicy.serve.service import Denied, ServeOptions, Service, loggable
from agentpolicy.serve.web import Pages
from agentpolicy.storage import AsyncStorage

__all__ = ["CSP", "ServeOptions", "create_app"]

log = logging.getLogger("agentpolicy.serve")

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
"""The Content-Security-Policy of every page: no inline script or style, nothing from elsewhere."""

_STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


def create_app(
    engine: PolicyEngine,
    options: ServeOptions | None = None,
    async_storage: AsyncStorage | None = None,
) -> Starlette:
    """The service on ``engine`` (see the module docs); ``engine`` stays the caller's to close.

    ``async_storage``, an async client of the engine's own store (see
    :func:`~agentpolicy.storage.open_async_storage`), makes the pages' calls
    native; the service closes it when it stops.
    """
    options = options or ServeOptions()
    s = Service(engine, options, async_storage)

    def ping() -> None:  # the tokens' ping, looked up at each check
        s.tokens.ping()

    store_check = health.StoreCheck(ping)

    async def healthz(request: Request) -> Response:
        err = await store_check.check()
        if isinstance(err, PolicyError | TimeoutError):
            return JSONResponse({"status": "unavailable", "store": _unhealthy(err)}, 503)
        if err is not None:
            raise err  # a bug, not the store: as any route's
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        await _metrics_reader(s, request)
        figures: dict[str, int | None] = {}
        for name, read in (
            ("open_reservations", engine.open_reservations),
            ("pending_approvals", lambda: len(engine.list_approvals(expire=False))),
            ("webhook_backlog", lambda: len(engine.webhook_deliveries("pending", 10_000))),
        ):
            try:
                figures[name] = await s.sync(read)
            except PolicyError as err:
                log.warning("metrics: %s not read: %s", name, err.message)
                figures[name] = None
        return PlainTextResponse(s.metrics.render(figures),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")  # fmt: skip

    async def home(request: Request) -> Response:
        return RedirectResponse("/approvals", status_code=303)

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in _STATIC:
            raise HTTPException(404)
        body = resources.files("agentpolicy.serve").joinpath("static", name).read_bytes()
        return Response(body, media_type=_STATIC[name],
                        headers={"Cache-Control": "public, max-age=300"})  # fmt: skip

    # -- the app ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async def sweep_forever() -> None:
            while True:
                await anyio.sleep(options.sweep_seconds)
                try:
                    await s.aengine.sweep()
                except PolicyError as err:
                    log.warning("sweep failed: %s", err.message)

        async with s.manager.run(), anyio.create_task_group() as tasks:
            tasks.start_soon(sweep_forever)
            try:
                yield
            finally:
                tasks.cancel_scope.cancel()
        await s.aengine.close()
        if async_storage is not None:
            await async_storage.aclose()

    web = Pages(s)

    def routed(
        handler: Callable[[Request], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return await web.wrap(request, handler)

        return endpoint

    routes = [
        Route("/", home),
        Route("/mcp", McpEndpoint(s.tokens, lambda: s.manager)),
        Route("/approvals", routed(web.approvals)),
        Route("/approvals/vote", routed(web.vote), methods=["POST"]),
        Route("/approvals/link", routed(web.link)),
        _Beside("/approvals/{approval_id:path}", routed(web.approval), taken=("vote", "link")),
        Route("/agents", routed(web.agents)),
        Route("/agents/{agent_id:path}", routed(web.agent)),
        Route("/signin", routed(web.signin), methods=["GET", "POST"]),
        Route("/signout", routed(web.signout), methods=["POST"]),
        Route("/healthz", healthz),
        Route("/metrics", routed(metrics)),
        Route("/static/{name}", static),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
    ]
    middleware = [Middleware(_Guard, options=options, metrics=s.metrics), Middleware(BodyLimit)]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error})  # fmt: skip
    app.state.service = s
    return app


async def _metrics_reader(s: Service, request: Request) -> None:
    """Refuse (as JSON, by ``web.wrap``: ``/metrics`` is an API path) who may not read metrics."""
    caller = await s.caller(request)
    if caller is None:
        raise Denied(401, "Sign in", "a bearer token is required")
    if caller.token.role not in ("admin", "metrics"):
        raise Denied(403, "Refused", f"{_a(caller.token.role)} token may not read metrics")
    if caller.token.org_id is not None:  # the figures are the whole store's
        raise Denied(403, "Refused", "a token bound to an organisation may not read the "
                     "store-wide metrics")  # fmt: skip


class _Beside(Route):
    """A route whose one path parameter never takes a path of the routes beside it.

    ``/approvals/{approval_id:path}`` would otherwise match ``GET
    /approvals/vote`` in full (an approval called ``vote``, answered 404),
    before Starlette could tell that ``/approvals/vote`` takes POST only: now
    the vote route's partial match answers, a 405 with ``Allow: POST``. No
    approval id is ever ``vote`` or ``link`` (the store makes them).
    """

    def __init__(
        self,
        path: str,
        endpoint: Callable[[Request], Awaitable[Response]],
        *,
        taken: tuple[str, ...],
    ) -> None:
        super().__init__(path, endpoint)
        self.taken = frozenset(taken)

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        """No match for a parameter the routes beside take; else :class:`Route`'s."""
        match, child = super().matches(scope)
        if match is not Match.NONE and set(child.get("path_params", {}).values()) & self.taken:
            return Match.NONE, {}
        return match, child


def _a(role: str) -> str:
    """``role`` with its article: "an agent", "an admin", "a metrics"."""
    return f"an {role}" if role[:1] in "aeiou" else f"a {role}"


_REASONS = {
    404: "There is nothing at this address.",
    405: "This address does not answer that method.",
}


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, a method the route does not take, ...).

    JSON for a JSON client, the error page for a browser; never Starlette's
    plain-text default. ``Allow`` (a 405) and any other header are kept.
    """
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    headers = exc.headers if isinstance(exc, HTTPException) else None
    message = _REASONS.get(status) or (
        exc.detail if isinstance(exc, HTTPException) and status < 500 else "The service failed."
    )
    if status == 405:
        allowed = (headers or {}).get("Allow")
        if allowed:
            message = f"{message} It answers {allowed}."
    return error_response(request.scope, status, message, headers=headers)


class _Guard:
    """Around every request: the Host check (loopback), security headers, the request count.

    It is also the last resort: an exception no route turned into an answer is
    logged (with its traceback, in the service's log only) and answered
    ``500`` with the structured error (or the error page): never a traceback,
    never Starlette's plain-text default.
    """

    def __init__(self, app: ASGIApp, options: ServeOptions, metrics: Metrics) -> None:
        self.app = app
        self.options = options
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        route = "/" + path.strip("/").split("/")[0]
        if route not in _ROUTES:  # a fixed set of labels, whatever paths callers send
            route = "other"
        hsts = self.options.hsts
        # a URL with a query may hold a link token (``?t=``, or inside ``next=``): its page's
        # fetches (style, script, the form) carry no path or query in their Referer
        referrer = b"origin" if scope.get("query_string") else b"same-origin"
        started = False

        async def with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                extra = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY")]
                if b"referrer-policy" not in names:  # a link's page sets its own
                    extra.append((b"referrer-policy", referrer))
                if any(k == b"content-type" and v.startswith(b"text/html") for k, v in headers):
                    extra.append((b"content-security-policy", CSP.encode()))
                if b"cache-control" not in names:
                    extra.append((b"cache-control", b"no-store"))
                if hsts:
                    extra.append((b"strict-transport-security", b"max-age=31536000"))
                message["headers"] = headers + extra
                self.metrics.answered(route, message["status"])
            await send(message)

        if self.options.loopback_hosts and not _loopback_host(scope):
            misdirected = error_response(scope, 421, "This service answers only on loopback "
                                         "host names.")  # fmt: skip
            await misdirected(scope, receive, with_headers)
            return
        try:
            await self.app(scope, receive, with_headers)
        except ClientDisconnect:  # the caller went away: nobody to answer
            log.info("%s %s: the client disconnected", scope.get("method"), loggable(path))
        except Exception:
            # the log, not the caller
            log.exception("%s %s failed", scope.get("method"), loggable(path))
            if started:  # part of an answer went out: all that is left is to end it
                return
            failed = error_response(scope, 500, "The service failed to answer this request; "
                                    "the failure is in its log.")  # fmt: skip
            await failed(scope, receive, with_headers)


_ROUTES = frozenset(
    ("/", "/mcp", "/approvals", "/agents", "/signin", "/signout", "/healthz", "/metrics",
     "/static", "/favicon.ico")
)  # fmt: skip
"""The first path segments that count as routes in the request metrics."""


def _loopback_host(scope: Scope) -> bool:
    for key, value in scope.get("headers", []):
        if key == b"host":
            host = value.decode("latin-1")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            return is_loopback(name)
    return False


def _unhealthy(err: Exception) -> str:
    """What ``/healthz`` tells anyone of a failed store; the store's own words go to the log.

    They may name a file or a host, and ``/healthz`` needs no token.
    """
    if isinstance(err, PolicyError):
        log.warning("healthz: the store is unavailable: %s", err.message)
        return "the store failed (the reason is in the service's log)"
    return f"no answer within {health.WAIT_SECONDS:g} s"
