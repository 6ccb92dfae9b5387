"""``python -m agentpolicy.mcp``: the stdio MCP server (see :mod:`agentpolicy.mcp.command`)."""

from agentpolicy.mcp.command import main

main()
