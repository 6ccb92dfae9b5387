"""The MCP face of agentpolicy: ``AgentPolicyMcpServer`` and the ``agent-policy-mcp`` command.

Importing this package does not import the MCP SDK; only the stdio server
(:mod:`agentpolicy.mcp.stdio`, the ``mcp`` extra) does.
"""

from agentpolicy.mcp.server import DEMO_AGENT, AgentPolicyMcpServer, create_server_with_redis
from agentpolicy.mcp.tools import TOOLS, Tool

__all__ = ["DEMO_AGENT", "TOOLS", "AgentPolicyMcpServer", "Tool", "create_server_with_redis"]
