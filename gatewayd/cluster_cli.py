"""`gatewayd cluster status -c FILE`: the group's members and partitions, read from NATS."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_UNAVAILABLE = 69
EXIT_CONFIG = 78


def add_parser(commands: Any) -> None:
    """Add `cluster` to the `gatewayd` command's subparsers."""
    parser = commands.add_parser("cluster", help="a group of gateways on NATS JetStream")
    verbs = parser.add_subparsers(dest="cluster_verb", metavar="VERB", required=True)
    status = verbs.add_parser(
        "status", help="members, partitions (owner, epoch, lag), changelog positions"
    )
    status.add_argument(
        "-c", "--config", type=Path, required=True, metavar="FILE", help="TOML config file"
    )
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="for each read from NATS (one that times out is tried 3 times; default 5)",
    )


def main(args: argparse.Namespace) -> int:
    from gatewayd.cluster.status import format_status, group_status
    from gatewayd.config import ConfigError, load_config
    from gatewayd.wiring import cluster_settings

    try:
        config = load_config(args.config)
        settings = cluster_settings(config)
    except (ConfigError, ValueError) as err:
        print(err, file=sys.stderr)
        return EXIT_CONFIG
    if not config.cluster.enabled:
        print(f"{args.config}: cluster.enabled is false (single-box mode)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        status = asyncio.run(group_status(settings, timeout_s=args.timeout))
    except Exception as err:
        print(f"gatewayd cluster status: cannot reach NATS at {settings.servers}: {err}",
              file=sys.stderr)  # fmt: skip
        return EXIT_UNAVAILABLE
    print(json.dumps(status) if args.json else format_status(status))
    if status.get("errors"):
        # Printed above too (under "errors" / NOT READ); a script checking the exit status
        # must not take a partial read for the whole picture.
        print(
            f"gatewayd cluster status: {len(status['errors'])} of the group's records could "
            "not be read (see above); the status is incomplete",
            file=sys.stderr,
        )
        return EXIT_UNAVAILABLE
    return EXIT_OK
