"""A real 3-node NATS JetStream cluster for tests and benchmarks, on free loopback ports.

Pytest-independent, like tests/brokers.py: `NatsCluster` writes one config per node (client
port, cluster port, MQTT port, JetStream store), starts `nats-server -c` for each, waits until
every node answers and JetStream has a meta leader, and can SIGKILL/restart a node.

    cluster = NatsCluster(tmp_dir, nodes=3)
    cluster.start()
    ...  # connect to cluster.urls
    cluster.stop()
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.brokers import free_port

NATS_BIN = shutil.which("nats-server") or "/usr/sbin/nats-server"


class NatsClusterError(RuntimeError):
    """The cluster could not be started (the message includes the tail of a node's log)."""


class NatsNode:
    def __init__(self, work_dir: Path, name: str) -> None:
        self.name = name
        self.work_dir = work_dir / name
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.cluster_port = free_port()
        self.mqtt_port = free_port()
        self.http_port = free_port()
        self.config_path = self.work_dir / "nats.conf"
        self.log_path = self.work_dir / "nats.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [NATS_BIN, "-c", str(self.config_path)], stdout=log, stderr=log
            )

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def varz(self, path: str = "jsz") -> dict[str, object]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/{path}", timeout=1) as r:
            return dict(json.loads(r.read()))


def _dicts(value: object) -> list[dict[str, object]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


class NatsCluster:
    """`nodes` nats-server processes clustered together, JetStream on, an MQTT listener each.

    `mappings` are subject mappings for the global account (`{"from": "to"}`), e.g. the
    partitioning of device subjects.
    """

    def __init__(
        self,
        work_dir: str | os.PathLike[str],
        *,
        nodes: int = 3,
        mappings: dict[str, str] | None = None,
        cluster_name: str = "gw-test",
    ) -> None:
        self.work_dir = Path(work_dir)
        self.nodes = [NatsNode(self.work_dir, f"n{i + 1}") for i in range(nodes)]
        self.mappings = dict(mappings or {})
        self.cluster_name = cluster_name

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def _write_configs(self) -> None:
        routes = ", ".join(f'"nats-route://127.0.0.1:{n.cluster_port}"' for n in self.nodes)
        mappings = "".join(f'  "{src}": "{dst}"\n' for src, dst in self.mappings.items())
        for node in self.nodes:
            node.config_path.write_text(
                f'server_name: "{node.name}"\n'
                f"listen: 127.0.0.1:{node.port}\n"
                f"http: 127.0.0.1:{node.http_port}\n"
                f'jetstream {{ store_dir: "{node.work_dir}/js", max_mem: 64MB, max_file: 1GB }}\n'
                f'cluster {{ name: "{self.cluster_name}", listen: 127.0.0.1:{node.cluster_port}, '
                f"routes: [{routes}] }}\n"
                f"mqtt {{ listen: 127.0.0.1:{node.mqtt_port} }}\n"
                + (f"mappings {{\n{mappings}}}\n" if mappings else "")
            )

    def start(self, timeout_s: float = 20.0) -> None:
        """Start every node and wait until each serves clients and JetStream has a leader."""
        self._write_configs()
        for node in self.nodes:
            node.start()
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        for node in self.nodes:
            if not node.running and node.process is not None:
                continue
            while True:
                if node.process is not None and node.process.poll() is not None:
                    raise NatsClusterError(
                        f"nats-server {node.name} exited with {node.process.returncode}:\n"
                        f"{node.log_tail()}"
                    )
                if self._node_ready(node):
                    break
                if time.monotonic() > deadline:
                    self.stop()
                    raise NatsClusterError(
                        f"nats-server {node.name} not ready in {timeout_s}s:\n{node.log_tail()}"
                    )
                time.sleep(0.05)

    @staticmethod
    def _node_ready(node: NatsNode) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", node.port), timeout=0.2):
                pass
            jsz = node.varz("jsz")
        except OSError:
            return False
        meta = jsz.get("meta_cluster")
        return isinstance(meta, dict) and bool(meta.get("leader"))

    def kill(self, index: int) -> None:
        self.nodes[index].kill()

    def leaders(self) -> dict[str, str]:
        """Who leads JetStream's meta group (key `META`) and each stream, as the running nodes
        see it (their monitoring endpoint, not the JetStream API, which needs the leaders).
        A leader counts only if a running node names it and it is running itself: after a
        node's loss, its peers name it until they notice (missed Raft heartbeats)."""
        running = {node.name for node in self.nodes if node.running}
        found: dict[str, str] = {}
        for node in self.nodes:
            if node.name not in running:
                continue
            try:
                jsz = node.varz("jsz?accounts=true&streams=true")
            except OSError:
                continue
            views = [("META", jsz.get("meta_cluster"))]
            for account in _dicts(jsz.get("account_details")):
                views += [
                    (str(s.get("name")), s.get("cluster"))
                    for s in _dicts(account.get("stream_detail"))
                ]
            for name, cluster in views:
                leader = cluster.get("leader") if isinstance(cluster, dict) else None
                if isinstance(leader, str) and leader in running:
                    found[name] = leader
        return found

    def restart(self, index: int, timeout_s: float = 20.0) -> None:
        self.nodes[index].start()
        self.wait_ready(timeout_s)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
