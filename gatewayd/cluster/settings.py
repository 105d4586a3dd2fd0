"""Settings of one cluster member (a frozen dataclass the config layer builds)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from gatewayd.cluster.credentials import CredentialsSigner, read_user_credentials


def default_member_name() -> str:
    """`<host>-<pid>`: a restarted member is a new member (its old name's lease runs out)."""
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return f"{host[:40] or 'host'}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """Where the NATS cluster is, how the group is named and partitioned, and how fast a silent
    member loses its partitions (`lease_s`; members heartbeat every `heartbeat_s`)."""

    agent_class: str
    group: str = "gatewayd"
    member: str = ""
    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    credentials_file: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    ingest_subject: str = "gw.in"
    reply_subject: str = "gw.out"
    partitions: int = 16
    replicas: int = 3
    lease_s: float = 8.0
    heartbeat_s: float = 2.0
    snapshot_every: int = 1000
    fetch_batch: int = 256
    # Replies to devices as outbox rows sent through JetStream (at least once, deduplicated:
    # outputs.py); False: published live on core NATS after the commit (at most once).
    durable_replies: bool = True

    def __post_init__(self) -> None:
        if self.credentials_file:
            # Checked here, where the config layer builds the settings: `check-config` and
            # start-up name a bad file at once (nats-py would hang or fail deep in connect).
            read_user_credentials(self.credentials_file)

    @property
    def member_name(self) -> str:
        return self.member or default_member_name()

    def nats_credentials(self) -> dict[str, Any]:
        """The `nats.connect` options that authenticate to the servers: the credentials file
        (a user JWT and its seed, checked when the settings were built and read again at
        each connect: `CredentialsSigner`) and the TLS context (CA, client certificate), each
        where set."""
        options: dict[str, Any] = {}
        if self.credentials_file:
            signer = CredentialsSigner(self.credentials_file)
            options["user_jwt_cb"] = signer.user_jwt
            options["signature_cb"] = signer.sign
        if self.ca_file or self.cert_file:
            import ssl

            context = ssl.create_default_context(cafile=self.ca_file)
            if self.cert_file:
                context.load_cert_chain(self.cert_file, self.key_file)
            options["tls"] = context
        return options
