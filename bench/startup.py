"""Start-up time: process start -> READY=1 on the notify socket, for the example config without
models, side by side with the bare interpreter's own start-up (the floor nothing can beat).

Prints a table and one JSON line. Target (issue #2): median under 1 s on a 2-core machine.
Usage: python bench/startup.py [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def example_without_models(directory: Path) -> Path:
    """The example config with [models.*] removed, every port set to 0 and state in `directory`."""
    text = (REPO / "config.example.toml").read_text()
    text = re.split(r"^\[models\.", text, flags=re.M)[0]
    text = re.sub(r'^bind = "([^"]+):\d+"', r'bind = "\1:0"', text, flags=re.M)
    text = text.replace('state_dir = "state"', f'state_dir = "{directory / "state"}"')
    text = text.replace('secrets_file = "', f'secrets_file = "{REPO}/')
    path = directory / "gatewayd.toml"
    path.write_text(text)
    return path


def time_to_ready(config: Path, directory: Path) -> float:
    sock_path = directory / f"notify-{time.monotonic_ns()}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path)}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gatewayd", "run", "-c", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        while True:
            message = sock.recv(65536).decode()
            if "READY=1" in message.splitlines():
                return time.perf_counter() - started
    except TimeoutError:
        proc.kill()
        raise SystemExit(f"no READY=1 within 30 s:\n{proc.stderr.read().decode()}") from None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        sock.close()


def time_bare_interpreter() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        config = example_without_models(directory)
        time_to_ready(config, directory)  # warm the page cache and .pyc files once
        ready = [time_to_ready(config, directory) for _ in range(args.runs)]
        bare = [time_bare_interpreter() for _ in range(args.runs)]
    ready_p50, bare_p50 = statistics.median(ready), statistics.median(bare)
    print(f"{'measure':<34}{'median s':>10}{'min s':>10}{'max s':>10}")
    print(
        f"{'gatewayd start -> READY=1':<34}{ready_p50:>10.3f}{min(ready):>10.3f}{max(ready):>10.3f}"
    )
    print(f"{'baseline: python -c pass':<34}{bare_p50:>10.3f}{min(bare):>10.3f}{max(bare):>10.3f}")
    result = {
        "bench": "startup",
        "runs": args.runs,
        "ready_median_s": round(ready_p50, 4),
        "bare_python_median_s": round(bare_p50, 4),
        "ratio_to_bare": round(ready_p50 / bare_p50, 2),
        "target_s": 1.0,
        "target_met": ready_p50 < 1.0,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
