"""The public API: every name loads, is documented, and importing costs no extras."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest

import agentpolicy

MODULES = [
    "agentpolicy", "agentpolicy.amounts", "agentpolicy.approvals", "agentpolicy.cli",
    "agentpolicy.codec", "agentpolicy.config", "agentpolicy.decisions", "agentpolicy.delivery",
    "agentpolicy.engine", "agentpolicy.errors", "agentpolicy.rules", "agentpolicy.examples",
    "agentpolicy.mcp", "agentpolicy.mcp.server", "agentpolicy.mcp.stdio", "agentpolicy.mcp.tools",
    "agentpolicy.policy", "agentpolicy.records", "agentpolicy.requests", "agentpolicy.storage",
    "agentpolicy.storage.memory", "agentpolicy.storage.redis", "agentpolicy.storage.sqlite",
    "agentpolicy.storage.postgres", "agentpolicy.storage.redis_async",
    "agentpolicy.storage.postgres_async", "agentpolicy.ledger.arunner",
    "agentpolicy.storage.base", "agentpolicy.ledger.keys", "agentpolicy.ledger.docs",
    "agentpolicy.ledger.runner", "agentpolicy.ledger.state", "agentpolicy.ledger.operations",
    "agentpolicy.ledger.outbox", "agentpolicy.ledger.rollout", "agentpolicy.ledger.recorded",
    "agentpolicy.ledger.trees", "agentpolicy.versions", "agentpolicy.shadow",
    "agentpolicy.simulation",
    "agentpolicy.testing", "agentpolicy.views", "agentpolicy.webhooks", "agentpolicy.windows",
    "agentpolicy.cli_output", "agentpolicy.durations", "agentpolicy.urls", "agentpolicy.schema",
    "agentpolicy.mcp.command", "agentpolicy._version", "agentpolicy.aio", "agentpolicy.guard",
    "agentpolicy.x402", "agentpolicy.pydantic_ai", "agentpolicy.signing", "agentpolicy.links",
    "agentpolicy.voting", "agentpolicy.ledger.approvers", "agentpolicy.serve",
    "agentpolicy.serve.app", "agentpolicy.serve.binding", "agentpolicy.serve.command",
    "agentpolicy.serve.mcp_http", "agentpolicy.serve.metrics",
    "agentpolicy.serve.pages", "agentpolicy.serve.service", "agentpolicy.serve.tokens",
    "agentpolicy.serve.web",
]  # fmt: skip


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_name_is_documented(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert module.__doc__, module_name
    for name in getattr(module, "__all__", []):
        value = getattr(module, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert value.__doc__, f"{module_name}.{name} has no docstring"
            if inspect.isclass(value):
                for attr, member in vars(value).items():
                    if not attr.startswith("_") and inspect.isfunction(member):
                        assert member.__doc__, f"{module_name}.{name}.{attr} has no docstring"


def test_names_load_lazily_and_dir_lists_them() -> None:
    assert set(agentpolicy.__all__) <= set(dir(agentpolicy))
    with pytest.raises(AttributeError):
        agentpolicy.NoSuchThing  # noqa: B018


def test_import_agentpolicy_loads_no_extra_and_no_engine() -> None:
    code = (
        "import sys, agentpolicy; agentpolicy.evaluate; agentpolicy.PolicyEngine;"
        " agentpolicy.AsyncPolicyEngine; agentpolicy.PaymentDenied;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('mcp', 'redis', 'psycopg', 'psycopg_pool', 'x402', 'httpx', 'requests', 'pydantic_ai',"
        " 'pydantic', 'flask', 'eth_account', 'web3', 'openai', 'agents', 'anyio', 'cryptography',"
        " 'starlette', 'uvicorn', 'jinja2', 'multipart', 'python_multipart', 'sse_starlette')"
        " or m == 'urllib.request' or m.startswith('agentpolicy.serve')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_every_exported_name_is_lazy_and_listed() -> None:
    assert set(agentpolicy._EXPORTS) == set(agentpolicy.__all__)
    for name in agentpolicy.__all__:
        module = importlib.import_module(agentpolicy._EXPORTS[name])
        assert getattr(agentpolicy, name) is getattr(module, name)
    assert agentpolicy.parse_units("500.25", 6) == 500_250_000
    assert agentpolicy.parse_base_units("500250000") == 500_250_000
    assert agentpolicy.format_units(500_250_000, 6) == "500.25"
