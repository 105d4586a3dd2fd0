"""`gatewayd model build [-c CONFIG] [NAME ...]`: prepare local language models ahead of time.

With a config: fetch and convert the model of each `[generators.NAME]` (or only the named
ones) as the daemon would at start-up, printing progress, so a service starts in seconds.
Without one: each NAME is a built-in recipe (`smollm2`) prepared into the model cache.
Exit codes are those of `gatewayd` (0 ok, 1 a model could not be prepared, 2 usage, 78
invalid configuration).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 78  # as in gatewayd.cli


def add_parser(commands: Any) -> None:
    """Add `model` to the `gatewayd` command's subparsers."""
    parser = commands.add_parser("model", help="prepare local language models ([generators])")
    verbs = parser.add_subparsers(dest="model_verb", metavar="VERB", required=True)
    build = verbs.add_parser(
        "build", help="fetch and convert models once (the daemon then loads them in seconds)"
    )
    build.add_argument(
        "-c", "--config", type=Path, metavar="FILE", help="prepare this config's [generators]"
    )
    build.add_argument(
        "names", nargs="*", metavar="NAME", help="generators of the config, or built-in models"
    )


def main(args: argparse.Namespace) -> int:
    from gatewayd.config import ConfigError, GeneratorSection, load_config
    from gatewayd.generation.prepare import PrepareError, model_dir

    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    state_dir = Path("state")
    if args.config is not None:
        try:
            config = load_config(args.config)
        except ConfigError as err:
            print(err, file=sys.stderr)
            return EXIT_CONFIG
        state_dir = config.gateway.state_dir
        sections = dict(config.generators)
        unknown = [name for name in args.names if name not in sections]
        if unknown:
            print(
                f"{args.config}: no [generators.{unknown[0]}] (it has: "
                f"{', '.join(sections) or 'none'})",
                file=sys.stderr,
            )
            return EXIT_CONFIG
        if args.names:
            sections = {name: sections[name] for name in args.names}
    elif args.names:
        sections = {name: GeneratorSection(model=name) for name in args.names}
    else:
        print("gatewayd model build: give -c CONFIG or a model name (smollm2)", file=sys.stderr)
        return EXIT_USAGE
    status = EXIT_OK
    for name, section in sections.items():
        progress(f"{name}: preparing")
        try:
            directory = model_dir(name, section, state_dir, progress)
        except PrepareError as err:
            print(f"error: {err}", file=sys.stderr)
            status = EXIT_FAILURE
            continue
        print(f"{name}: {directory}")
    return status
