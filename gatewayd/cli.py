"""The `gatewayd` command: a thin layer that builds a config and hands it to the daemon.

Exit codes (also in `gatewayd --help` and the README):
  0   clean exit (after SIGTERM/SIGINT and a graceful drain), or a valid config
  1   runtime or start-up failure (a port in use, a model that will not load, ...)
  2   usage error (unknown command or option)
  78  invalid configuration (EX_CONFIG); the unit file does not restart on it
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gatewayd import __version__, cluster_cli, deadletters_cli
from gatewayd.client import cli as client_cli
from gatewayd.generation import cli as generation_cli
from gatewayd.mcp import cli as mcp_cli

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78

_EPILOG = """\
commands:
  gatewayd run -c /etc/gatewayd/gatewayd.toml     run the daemon in the foreground
  gatewayd check-config /etc/gatewayd/gatewayd.toml validate a config file and exit
  gatewayd dead-letters list -c FILE               MQTT messages given up on (replay ID|--all)
  gatewayd agent call thermostat t1 set_target 22  call an agent (also: state, watch, set-state)
  gatewayd mcp -c FILE --token-file TOKEN          MCP over stdio, through the daemon's /mcp
  gatewayd model build -c FILE                     fetch and convert the [generators] models
  gatewayd cluster status -c FILE                  a group's members and partitions (--json)

signals (under systemd: systemctl reload/stop):
  SIGHUP   re-read the config; apply what can change live, keep the old config if invalid
  SIGTERM  stop accepting work, drain in-flight turns, exit 0

exit codes:
  0 ok   1 runtime/start-up failure   2 usage error   78 invalid configuration

The commented example config (config.example.toml) documents every key.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gatewayd",
        description="Edge gateway daemon: IoT devices (MQTT, binary TCP frames, WebSocket) "
        "to stateful agents with batched local inference.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"gatewayd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run the daemon in the foreground (systemd Type=notify)")
    run.add_argument(
        "-c", "--config", type=Path, required=True, metavar="FILE", help="TOML config file"
    )
    run.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="override gateway.log_level from the config",
    )

    check = commands.add_parser(
        "check-config", help="validate a config file; exit 0 when valid, 78 when not"
    )
    check.add_argument("config", type=Path, metavar="FILE")
    deadletters_cli.add_parser(commands)
    client_cli.add_parser(commands)
    mcp_cli.add_parser(commands)
    generation_cli.add_parser(commands)
    cluster_cli.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(args.config)
    if args.command == "run":
        return _run(args.config, args.log_level)
    if args.command == "dead-letters":
        return deadletters_cli.main(args)
    if args.command == "agent":
        return client_cli.main(args)
    if args.command == "mcp":
        return mcp_cli.main(args)
    if args.command == "model":
        return generation_cli.main(args)
    if args.command == "cluster":
        return cluster_cli.main(args)
    build_parser().print_help()
    return EXIT_USAGE


def _check_config(path: Path) -> int:
    from gatewayd.config import ConfigError, load_config
    from gatewayd.wiring import check_references

    try:
        config = load_config(path)
        check_references(config, path)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return EXIT_CONFIG
    print(f"{path}: ok")
    return EXIT_OK


def _run(path: Path, log_level: str | None) -> int:
    from gatewayd import eventloop
    from gatewayd.config import ConfigError, load_config
    from gatewayd.daemon import Daemon
    from gatewayd.logs import setup_logging
    from gatewayd.wiring import check_references

    setup_logging(log_level or "info")
    try:
        config = load_config(path)
        check_references(config, path)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(log_level or config.gateway.log_level)
    return eventloop.run(Daemon(path, config).run())


if __name__ == "__main__":
    sys.exit(main())
