"""`gatewayd dead-letters list|replay -c CONFIG`: MQTT messages given up on, for the operator.

A message whose turn failed `mqtt.max_attempts` times is acknowledged and kept in the
dead-letter file under the state dir. `list` shows them; `replay ID...` or `replay --all`
republishes each to its original topic on the configured broker and deletes its row once the
broker acknowledged it (the running gateway then receives it again). Exit codes are those of
`gatewayd` (0 ok, 1 some could not be replayed, 2 usage, 78 invalid configuration).
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 78  # as in gatewayd.cli
PAYLOAD_PREVIEW_BYTES = 40
ERROR_PREVIEW_CHARS = 80


def add_parser(commands: Any) -> None:
    """Add `dead-letters` to the `gatewayd` command's subparsers."""
    parser = commands.add_parser(
        "dead-letters",
        help="list or replay MQTT messages given up on after mqtt.max_attempts failed turns",
    )
    verbs = parser.add_subparsers(dest="dead_letters_verb", metavar="VERB", required=True)
    listing = verbs.add_parser("list", help="show the dead letters, oldest first")
    replay = verbs.add_parser(
        "replay", help="republish dead letters to their topics; delete each once acknowledged"
    )
    for verb in (listing, replay):
        verb.add_argument(
            "-c", "--config", type=Path, required=True, metavar="FILE", help="TOML config file"
        )
    replay.add_argument("ids", nargs="*", type=int, metavar="ID", help="dead letter ids")
    replay.add_argument("--all", action="store_true", help="replay every dead letter")


def main(args: argparse.Namespace) -> int:
    from gatewayd.config import ConfigError, load_config
    from gatewayd.wiring import mqtt_dead_letters_path
    from protocols.dead_letters import DeadLetterStore

    if args.dead_letters_verb == "replay" and bool(args.ids) == bool(args.all):
        print("gatewayd dead-letters replay: give dead letter ids or --all", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load_config(args.config)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return EXIT_CONFIG
    store = DeadLetterStore(mqtt_dead_letters_path(config))
    try:
        if args.dead_letters_verb == "list":
            return _list(store)
        return _replay(config, args.config, store, None if args.all else list(args.ids))
    except (sqlite3.Error, OSError) as err:
        print(
            f"{store.path}: {err} (run this as the daemon's user, e.g. sudo -u gatewayd)",
            file=sys.stderr,
        )
        return EXIT_FAILURE


def _list(store: Any) -> int:
    letters = store.list()
    if not letters:
        print(f"no dead letters in {store.path}")
        return EXIT_OK
    print(f"{len(letters)} dead letters in {store.path}:")
    for letter in letters:
        print(
            f"#{letter.id}  {letter.topic}  attempts={letter.attempts}  "
            f"first={_utc(letter.first_failed_at)}  last={_utc(letter.last_failed_at)}\n"
            f"    error: {_clip(letter.error, ERROR_PREVIEW_CHARS)}\n"
            f"    payload ({len(letter.payload)} bytes): "
            f"{letter.payload[:PAYLOAD_PREVIEW_BYTES]!r}"
            f"{'...' if len(letter.payload) > PAYLOAD_PREVIEW_BYTES else ''}"
        )
    return EXIT_OK


def _replay(config: Any, config_path: Path, store: Any, ids: list[int] | None) -> int:
    from gatewayd.wiring import mqtt_settings
    from protocols.mqtt_replay import replay_dead_letters

    try:
        settings = mqtt_settings(config.mqtt)
    except (ValueError, OSError) as err:
        print(f"{config_path}: mqtt: {err}", file=sys.stderr)
        return EXIT_CONFIG
    result = asyncio.run(replay_dead_letters(settings, store, ids))
    for row_id in result.replayed:
        print(f"replayed dead letter #{row_id}")
    for row_id in result.missing:
        print(f"no dead letter #{row_id} in {store.path}", file=sys.stderr)
    if result.error is not None:
        print(
            f"replay stopped: {result.error}; {len(result.left)} dead letters left in "
            f"{store.path} (run the command again once the broker is reachable)",
            file=sys.stderr,
        )
    if not (result.replayed or result.missing or result.error):
        print(f"no dead letters in {store.path}")
    return EXIT_FAILURE if result.error is not None or result.missing else EXIT_OK


def _utc(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
