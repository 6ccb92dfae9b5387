"""A real ``agentpolicy serve`` for the tests: uvicorn in a thread on an ephemeral loopback port."""

from __future__ import annotations

import socket
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

import anyio
import httpx2
import uvicorn
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from agentpolicy import PolicyEngine
from agentpolicy.serve.app import create_app
from agentpolicy.serve.protocol import DeadlineProtocol
from agentpolicy.serve.service import ServeOptions
from agentpolicy.serve.tokens import TokenStore
from agentpolicy.storage import AsyncStorage

LINK_SECRET = "a test link secret of at least 32 characters!"


class Served:
    """The service on ``engine``, listening on 127.0.0.1 at a port the system chose.

    The socket listens before the thread starts, so a client may connect at
    once (its request waits in the backlog until uvicorn accepts it).
    Leaving stops uvicorn (its lifespan closes the MCP transport and the
    async engine); the engine stays the caller's to close.
    """

    def __init__(
        self,
        engine: PolicyEngine,
        options: ServeOptions | None = None,
        async_storage: AsyncStorage | None = None,
    ) -> None:
        self.engine = engine
        self.app = create_app(engine, options or ServeOptions(sweep_seconds=3600.0), async_storage)
        self.tokens = TokenStore(engine.storage, engine.clock)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", http=DeadlineProtocol)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self, role: str, **binding: Any) -> str:
        """A new token of that role and binding (the token itself)."""
        return self.tokens.create(role, **binding)[1]

    def __enter__(self) -> Served:
        self.thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def mcp(
    url: str, token: str | None, work: Callable[[Client], Awaitable[Any]], *, mode: str = "auto"
) -> Any:
    """Run ``work(client)`` with the official MCP client over Streamable HTTP, bearing ``token``.

    It runs in a thread of its own, so it works beside Playwright's sync API.
    """
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}

    async def run() -> Any:
        async with httpx2.AsyncClient(headers=headers) as http:
            transport = streamable_http_client(url + "/mcp", http_client=http)
            async with Client(transport, mode=mode) as client:  # type: ignore[arg-type]
                return await work(client)

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(anyio.run, run).result(timeout=60)
