"""agentpolicy serve under load: client processes authorizing over HTTP against one budget.

Run (after ``pip install -e '.[dev]'``)::

    .venv/bin/python benchmarks/serve.py                  # 4 processes x 500, SQLite file
    .venv/bin/python benchmarks/serve.py --per 100 --store memory

The service runs in this process (uvicorn in a thread, one event loop, on
127.0.0.1 at a port the system chose) on the store named; each client
process opens the official MCP client over Streamable HTTP with its own
agent token and calls ``agent_policy_authorize`` one call after another.
The daily limit is half of all requests, and the counts are checked
exactly: allowed == limit, every other answer ``DAILY_LIMIT``, and the
budget's spent + reserved equal to the limit. Beside it, in the same run,
the anchor: the same client processes POSTing JSON to a bare Starlette
endpoint (``/anchor``) on the same server, and MCP ``tools/list`` (the
bearer token checked in the store, the agent role's 10 tools listed, no
engine call). Latencies are per call, seen by the client.
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import httpx2
import uvicorn
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from agentpolicy import PolicyEngine
from agentpolicy.serve.app import create_app
from agentpolicy.serve.service import ServeOptions
from agentpolicy.serve.tokens import TokenStore

UNIT = 1_000_000
PAY = {"amount": str(UNIT), "recipient": "0xvendor", "network": "eip155:8453"}


def _client(args: tuple[str, str, str, int, Any]) -> tuple[list[str], list[float]]:
    """One client process: ``count`` calls of ``kind`` (authorize, list, anchor), each timed."""
    url, token, kind, count, start = args

    async def run() -> tuple[list[str], list[float]]:
        codes: list[str] = []
        took: list[float] = []
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx2.AsyncClient(headers=headers, timeout=60) as http:
            if kind == "anchor":
                await http.post(url + "/anchor", json={"warm": True})
                start.wait(timeout=120)
                for _ in range(count):
                    began = time.perf_counter()
                    r = await http.post(url + "/anchor", json=PAY)
                    took.append(time.perf_counter() - began)
                    codes.append(str(r.json()["code"]))
                return codes, took
            transport = streamable_http_client(url + "/mcp", http_client=http)
            async with Client(transport) as client:  # type: ignore[arg-type]
                await client.list_tools()
                start.wait(timeout=120)
                for _ in range(count):
                    began = time.perf_counter()
                    if kind == "list":
                        await client.list_tools()
                        code = "LISTED"
                    else:
                        result = await client.call_tool("agent_policy_authorize", PAY)
                        data = result.structured_content or {}
                        code = data["data"]["code"] if data.get("success") else "ERROR"
                    took.append(time.perf_counter() - began)
                    codes.append(code)
        return codes, took

    return anyio.run(run)


class Service:
    """The service on ``engine`` with the anchor endpoint, on an ephemeral loopback port."""

    def __init__(self, engine: PolicyEngine) -> None:
        app = create_app(engine, ServeOptions(sweep_seconds=3600.0))
        self.metrics = app.state.service.metrics

        async def anchor(request: Request) -> JSONResponse:
            await request.json()
            return JSONResponse({"code": "ANCHOR"})

        app.router.routes.insert(0, Route("/anchor", anchor, methods=["POST"]))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})

    def __enter__(self) -> Service:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()


def load(
    url: str, tokens: list[str], kind: str, per: int
) -> tuple[Counter[str], list[float], float]:
    """``len(tokens)`` client processes, ``per`` calls each, started together.

    Returns the answers by code, every call's latency, and the wall time of
    the calls (from the common start, once every client has connected, to
    the last answer).
    """
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(len(tokens)) as pool:
        start = manager.Barrier(len(tokens) + 1)  # every client connected, then all at once
        pending = pool.map_async(_client, [(url, t, kind, per, start) for t in tokens])
        start.wait(timeout=120)
        began = time.perf_counter()
        results = pending.get(timeout=600)
        wall = time.perf_counter() - began
    codes: Counter[str] = Counter(c for cs, _ in results for c in cs)
    return codes, [t for _, ts in results for t in ts], wall


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def one_budget(url: str, engine: PolicyEngine, processes: int, per: int) -> dict[str, Any]:
    """``processes`` x ``per`` authorize calls on one budget whose limit is half of them."""
    total = processes * per
    limit = total // 2
    engine.set_policy("bench-agent", {"limits": {"daily": {"value": str(limit * UNIT)}}})
    store = TokenStore(engine.storage, engine.clock)
    tokens = [store.create("agent", agent_id="bench-agent")[1] for _ in range(processes)]
    codes, took, wall = load(url, tokens, "authorize", per)
    daily = engine.budget("bench-agent").periods["daily"]
    return {"codes": codes, "took": took, "wall": wall, "limit": limit, "total": total,
            "used": daily.spent.value + daily.reserved.value}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--per", type=int, default=500, help="calls per process")
    parser.add_argument("--store", choices=["sqlite", "memory"], default="sqlite")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        where = f"sqlite:///{Path(tmp) / 'serve.db'}" if args.store == "sqlite" else "memory://"
        engine = PolicyEngine(storage=where)
        try:
            with Service(engine) as service:
                result = one_budget(service.url, engine, args.processes, args.per)
                engine_sum, engine_count = service.metrics.authorize_seconds()
                admin = TokenStore(engine.storage, engine.clock).create("admin")[1]
                anchor_codes, anchor, anchor_wall = load(
                    service.url, [admin] * args.processes, "anchor", args.per
                )
                lister = TokenStore(engine.storage, engine.clock).create("agent", agent_id="x")[1]
                _, listed, _ = load(service.url, [lister] * args.processes, "list", args.per)
        finally:
            engine.close()
    codes, took = result["codes"], result["took"]
    allowed = codes["ALLOWED"]
    assert allowed == result["limit"], f"{allowed} allowed, expected exactly {result['limit']}"
    assert codes["DAILY_LIMIT"] == result["total"] - result["limit"], dict(codes)
    assert result["used"] == result["limit"] * UNIT
    assert anchor_codes["ANCHOR"] == result["total"]

    def ms(v: float) -> str:
        return f"{v * 1000:.2f} ms"

    print(f"agentpolicy serve: {args.processes} processes x {args.per} authorize over HTTP, "
          f"one budget, {args.store} store, Python {sys.version.split()[0]}")  # fmt: skip
    print(f"  answers: {dict(codes)} (allowed exactly {allowed} of {result['total']}; "
          f"spent + reserved exactly the limit)")  # fmt: skip
    rows = [
        ("authorize (MCP tools/call)", took, result["wall"]),
        ("anchor: bare Starlette JSON POST", anchor, anchor_wall),
        ("anchor: MCP tools/list (the token checked, no engine call)", listed, None),
    ]
    print("| calls | p50 | p99 | mean | throughput |")
    print("|---|---|---|---|---|")
    for name, values, wall in rows:
        rate = "-" if wall is None else f"{len(values) / wall:,.0f}/s"
        print(f"| {name} | {ms(statistics.median(values))} | {ms(percentile(values, 99))} | "
              f"{ms(statistics.fmean(values))} | {rate} |")  # fmt: skip
    p50, a50 = statistics.median(took), statistics.median(anchor)
    print(f"  authorize p50 is {p50 / a50:.2f}x the bare endpoint's")
    print(f"  inside the server, the tool call itself (the engine, on a worker thread) took "
          f"{ms(engine_sum / engine_count)} on average (the /metrics histogram)")  # fmt: skip


if __name__ == "__main__":
    main()
