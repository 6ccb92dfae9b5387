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
import anyio.to_thread
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentpolicy.engine import PolicyEngine
from agentpolicy.errors import PolicyError
from agentpolicy.serve.binding import is_loopback
from agentpolicy.serve.limits import BodyLimit
from agentpolicy.serve.mcp_http import McpEndpoint, challenge
from agentpolicy.serve.metrics import Metrics
from agentpolicy.serve.service import ServeOptions, Service
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

    async def healthz(request: Request) -> Response:
        try:
            with anyio.fail_after(2.0):
                await anyio.to_thread.run_sync(s.tokens.ping, abandon_on_cancel=True)
        except (PolicyError, TimeoutError) as err:
            reason = err.message if isinstance(err, PolicyError) else "no answer within 2 s"
            return JSONResponse({"status": "unavailable", "store": reason}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        caller = await s.caller(request)
        if caller is None:
            return PlainTextResponse("a bearer token is required\n", status_code=401,
                                     headers={"WWW-Authenticate": challenge()})  # fmt: skip
        if caller.token.role not in ("admin", "metrics"):
            return PlainTextResponse(f"a {caller.token.role} token may not read metrics\n",
                                     status_code=403)  # fmt: skip
        if caller.token.org_id is not None:  # the figures are the whole store's
            return PlainTextResponse("a token bound to an organisation may not read the "
                                     "store-wide metrics\n", status_code=403)  # fmt: skip
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
            return PlainTextResponse("not found\n", status_code=404)
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
        Route("/approvals/{approval_id:path}", routed(web.approval)),
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
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.service = s
    return app


class _Guard:
    """Around every request: the Host check (loopback), security headers, the request count."""

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
        if self.options.loopback_hosts and not _loopback_host(scope):
            await PlainTextResponse("this service answers only on loopback host names\n",
                                    status_code=421)(scope, receive, send)  # fmt: skip
            self.metrics.answered(route, 421)
            return
        hsts = self.options.hsts

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                extra = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY")]
                if b"referrer-policy" not in names:  # a link's page sets its own, stricter one
                    extra.append((b"referrer-policy", b"same-origin"))
                if any(k == b"content-type" and v.startswith(b"text/html") for k, v in headers):
                    extra.append((b"content-security-policy", CSP.encode()))
                if b"cache-control" not in names:
                    extra.append((b"cache-control", b"no-store"))
                if hsts:
                    extra.append((b"strict-transport-security", b"max-age=31536000"))
                message["headers"] = headers + extra
                self.metrics.answered(route, message["status"])
            await send(message)

        await self.app(scope, receive, with_headers)


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
