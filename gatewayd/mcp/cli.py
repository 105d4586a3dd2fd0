"""`gatewayd mcp -c CONFIG [--token-file FILE]`: the MCP server over stdio (see
`stdio_proxy`). Exit codes are those of `gatewayd`: 0 when the client closed stdin, 1 when the
daemon cannot be reached, 2 without a token, 78 for an invalid configuration."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 78  # as in gatewayd.cli


def add_parser(commands: Any) -> None:
    """Add `mcp` to the `gatewayd` command's subparsers."""
    parser = commands.add_parser(
        "mcp",
        help="serve MCP over stdio for desktop clients, through the running daemon's /mcp",
    )
    parser.add_argument(
        "-c", "--config", type=Path, required=True, metavar="FILE", help="TOML config file"
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="file holding an API token with the mcp scope (default: $GATEWAYD_MCP_TOKEN)",
    )
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default="warning"
    )


def main(args: argparse.Namespace) -> int:
    from gatewayd.config import ConfigError, load_config
    from gatewayd.logs import setup_logging

    setup_logging(args.log_level)
    try:
        config = load_config(args.config)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return EXIT_CONFIG
    try:
        from gatewayd.mcp import stdio_proxy
    except ImportError as err:
        print(
            f"gatewayd mcp: the MCP SDK is not installed ({err}); "
            "install it with pip install 'gatewayd[mcp]'",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    if not config.api.enabled or not config.mcp.enabled:
        print(
            f"{args.config}: the daemon does not serve MCP (set [api] enabled = true and "
            "[mcp] enabled = true)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        token = stdio_proxy.read_token(args.token_file)
    except stdio_proxy.ProxyError as err:
        print(f"gatewayd mcp: {err}", file=sys.stderr)
        return EXIT_USAGE
    url = stdio_proxy.daemon_url(config)
    import anyio

    try:
        anyio.run(stdio_proxy.serve_stdio, url, token)
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as err:
        print(f"gatewayd mcp: cannot serve through {url}: {_describe(err)}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _describe(err: BaseException) -> str:
    while isinstance(err, BaseExceptionGroup) and err.exceptions:
        err = err.exceptions[0]
    return f"{type(err).__name__}: {err}"
