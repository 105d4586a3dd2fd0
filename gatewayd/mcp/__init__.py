"""MCP (Model Context Protocol), both ways, with the official `mcp` SDK (extra `mcp`).

- The gateway as an MCP server: `server.McpGateway` serves tools (each agent class's
  `@callable` methods marked for MCP, named `<class>_<method>`, and the built-in tool groups an
  operator enables in `[mcp] tool_groups`) and resources (agent state as `agent://{class}/{id}`,
  with change notifications). `gatewayd.api.mcp` mounts it on the API server (Streamable HTTP,
  `/mcp`); `stdio_proxy` serves it over stdio for desktop clients (`gatewayd mcp -c CONFIG`)
  by forwarding to the running daemon's `/mcp`.
- Agents as MCP clients: `client.McpClientMixin` (`add_mcp_server`, `remove_mcp_server`,
  `mcp_servers`, `mcp_tools`, `call_mcp_tool`).

Every tool call reaches agents through the runtime (`runtime.call`, `run_in_agent`): a normal
turn with its output gate, durability and validation.

This package never imports `gatewayd.daemon` or `gatewayd.cli` (the CLI imports `mcp.cli`,
which imports the SDK only when the verb runs, so `gatewayd` works without the `mcp` extra);
of the API it uses only `gatewayd.api.tokens` (`gatewayd.api.mcp` mounts it).
"""
