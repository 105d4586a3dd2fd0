"""`gatewayd agent call|state|watch|set-state`: poke an agent from a shell, over WebSocket.

    gatewayd agent call thermostat thermo-1 set_target 22     # prints 22.0
    gatewayd agent call thermostat thermo-1 history 3         # one JSON line per chunk, then the result
    gatewayd agent state thermostat thermo-1                  # the state as JSON
    gatewayd agent watch thermostat thermo-1                  # one JSON line per state change
    gatewayd agent set-state thermostat thermo-1 '{"target": 20}'

Arguments are JSON when they parse as JSON (`22`, `true`, `"22"`, `{"a": 1}`), else strings.
The gateway is `--url` (default `$GATEWAYD_URL`, else ws://127.0.0.1:8765; a group's members:
several URLs, comma-separated, tried in turn); `--token` (default
`$GATEWAYD_TOKEN`) is sent as a bearer token. Exit codes: 0 ok, 1 the call failed or the
gateway is unreachable, 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from gatewayd.client.agent import AgentClient
from gatewayd.client.errors import ClientError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
DEFAULT_URL = "ws://127.0.0.1:8765"


def add_parser(commands: Any) -> None:
    """Add `agent` to the `gatewayd` command's subparsers."""
    parser = commands.add_parser(
        "agent", help="call an agent's methods, read, set or watch its state (over WebSocket)"
    )
    verbs = parser.add_subparsers(dest="agent_verb", metavar="VERB", required=True)
    call = verbs.add_parser("call", help="call a @callable method; print chunks and the result")
    state = verbs.add_parser("state", help="print the agent's state as JSON")
    watch = verbs.add_parser("watch", help="print the state, then one JSON line per change")
    set_state = verbs.add_parser("set-state", help="replace the agent's state (JSON)")
    for verb in (call, state, watch, set_state):
        verb.add_argument("agent_class", metavar="CLASS")
        verb.add_argument("agent_id", metavar="ID")
        verb.add_argument(
            "--url",
            default=os.environ.get("GATEWAYD_URL", DEFAULT_URL),
            help=f"the gateway's WebSocket listener (default $GATEWAYD_URL or {DEFAULT_URL}); "
            "a group's members: several, comma-separated",
        )
        verb.add_argument(
            "--token", default=os.environ.get("GATEWAYD_TOKEN"), help="bearer token to send"
        )
        verb.add_argument("--timeout", type=float, default=30.0, metavar="S", help="seconds")
    call.add_argument("method", metavar="METHOD")
    call.add_argument("args", nargs="*", metavar="ARG", help="JSON value, or a plain string")
    watch.add_argument("--count", type=int, default=0, metavar="N", help="stop after N changes")
    set_state.add_argument("state", metavar="JSON")


def parse_arg(text: str) -> Any:
    """`22` -> 22, `true` -> True, `{"a":1}` -> dict; anything that is not JSON stays a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def main(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_main(args))
    except KeyboardInterrupt:
        return EXIT_OK


async def _main(args: argparse.Namespace) -> int:
    where = f"gatewayd agent {args.agent_verb} {args.agent_class}/{args.agent_id}"
    if args.agent_verb == "set-state":
        try:
            new_state = json.loads(args.state)
        except ValueError as err:
            print(f"{where}: the state is not valid JSON: {err}", file=sys.stderr)
            return EXIT_USAGE
    urls = [url.strip() for url in args.url.split(",") if url.strip()]
    client = AgentClient(
        urls,
        args.agent_class,
        args.agent_id,
        token=args.token,
        reconnect=args.agent_verb == "watch",
        connect_timeout_s=args.timeout,
    )
    refused: list[ClientError] = []
    client.on_error(refused.append)
    try:
        async with asyncio.timeout(None if args.agent_verb == "watch" else args.timeout):
            await client.connect()
            if args.agent_verb == "state":
                _print(client.state)
            elif args.agent_verb == "call":
                call = client.stream(args.method, *map(parse_arg, args.args))
                async for chunk in call:
                    _print(chunk)
                _print(await call.result())
            elif args.agent_verb == "set-state":
                await client.set_state(new_state)
                # The protocol only answers a refusal: read the state back to confirm.
                await client.close()
                async with AgentClient(
                    urls, args.agent_class, args.agent_id, token=args.token
                ) as check:
                    if check.state != new_state:
                        print(
                            f"{where}: refused; the state is {json.dumps(check.state)}",
                            file=sys.stderr,
                        )
                        return EXIT_FAILURE
            else:
                _print(client.state)
                seen = 0
                async for changed in client.changes():
                    _print(changed)
                    seen += 1
                    if args.count and seen >= args.count:
                        break
    except TimeoutError:
        print(f"{where}: no answer within {args.timeout} s ({args.url})", file=sys.stderr)
        return EXIT_FAILURE
    except (ClientError, OSError) as err:
        print(f"{where}: {err}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        await client.close()
    return EXIT_OK


def _print(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False), flush=True)
