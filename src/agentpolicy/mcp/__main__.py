"""``python -m agentpolicy.mcp``: the stdio MCP server."""

from agentpolicy.mcp.stdio import main

main()
