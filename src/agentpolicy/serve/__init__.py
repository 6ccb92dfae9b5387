"""``agentpolicy serve``: one HTTP service for remote agents, approvers and operators.

MCP over Streamable HTTP (``/mcp``) with bearer tokens, the approvals and
budget pages, ``/healthz`` and ``/metrics``; see ``docs/serve.md``. Needs
the ``serve`` extra (``pip install 'agentpolicy[serve]'``) for the app;
:mod:`agentpolicy.serve.tokens` (the token store, used by ``agentpolicy
token``) needs nothing beyond the core. ``import agentpolicy`` never
imports this package.
"""

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from agentpolicy.serve.app import create_app  # noqa: PLC0415 - the serve extra

        return create_app
    raise AttributeError(f"module 'agentpolicy.serve' has no attribute {name!r}")
