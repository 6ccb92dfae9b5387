"""The ``agent-policy-mcp`` command (also ``python -m agentpolicy.mcp``).

Reads its configuration from the environment (:mod:`agentpolicy.config`)
and serves the tools over stdio. ``--help`` and ``--version`` print and
exit; any other argument is refused with status 2. A bad setting prints one
line on stderr and exits with status 2; without the ``mcp`` extra the
command says which extra to install and exits with status 1. The client
going away (stdin at its end, stdin or stdout closed, stdout's reader gone)
is the normal end: status 0, no traceback (see :func:`agentpolicy.mcp.stdio.serve`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from agentpolicy import __version__
from agentpolicy.config import read_settings
from agentpolicy.errors import PolicyError

__all__ = ["MCP_EXTRA", "main"]

MCP_EXTRA = "pip install 'agentpolicy[mcp]'"
"""What to run when the MCP SDK is missing."""

_EPILOG = """\
Configuration comes from the environment: AGENT_POLICY_ROLE (agent or admin),
AGENT_POLICY_DB (SQLite file; default: agentpolicy/agentpolicy.db in the user's
state directory), AGENT_POLICY_REDIS_URL, AGENT_POLICY_KEY_PREFIX,
AGENT_POLICY_POSTGRES_URL (postgresql://user@host:5432/db?schema=NAME; wins over
Redis and the SQLite file),
AGENT_POLICY_RESERVATION_TTL (e.g. 5m), AGENT_POLICY_AGENT_ID,
AGENT_POLICY_ORG_ID, AGENT_POLICY_APPROVER and AGENT_POLICY_APPROVER_KEY_FILE
(an admin server that votes as one approver, signing with its key),
AGENT_POLICY_LINK_SECRET (one-time approval links), AGENT_POLICY_WEBHOOK_URL /
_SECRET / _EVENTS / _TIMEOUT / _RETRIES, AGENT_POLICY_WEBHOOKS and
AGENT_POLICY_DEMO_MODE.
The server speaks MCP on stdin and stdout; logs go to stderr.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"agent-policy-mcp: {message} (see --help)\n")
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="agent-policy-mcp",
        description="Serve agentpolicy's spending-limit tools to an MCP client over stdio.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"agent-policy-mcp {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``agent-policy-mcp`` and ``python -m agentpolicy.mcp``."""
    _parser().parse_args(argv)
    try:
        import anyio  # noqa: PLC0415 - the mcp extra

        from agentpolicy.mcp import stdio  # noqa: PLC0415
    except ImportError:
        sys.stderr.write(f"agent-policy-mcp: the MCP server needs the mcp extra: {MCP_EXTRA}\n")
        raise SystemExit(1) from None
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    try:
        app = stdio.make_app(read_settings())
    except PolicyError as err:
        sys.stderr.write(f"agent-policy-mcp: {err.code}: {err.message}\n")
        raise SystemExit(2 if err.code == "INVALID_INPUT" else 1) from None
    logging.getLogger("agentpolicy.mcp").info(
        "agent-policy-mcp %s serving role %s on stdio", __version__, app.role
    )
    try:
        anyio.run(stdio.serve, app)
    except KeyboardInterrupt:  # pragma: no cover - interactive stop
        pass
    finally:
        app.close()
