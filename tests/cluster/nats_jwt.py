"""NATS decentralized auth for tests: an operator, a system account, an application account
with JetStream, and its users, as nkeys and signed JWTs (what `nsc` would make), plus the
server config that trusts them (`resolver: MEMORY`) and `.creds` files.

A NATS JWT is `base64url(header).base64url(claims).base64url(signature)`: the header is
`{"typ":"JWT","alg":"ed25519-nkey"}`, the claims carry `jti` (an id: a hash of the claims),
`iat`, `iss` (the signer's public key), `sub` (the subject's public key), `name` and `nats`
(`type`, `version: 2`, and the type's fields), and the signature is the issuer's ed25519
signature of the first two parts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import nkeys

UNLIMITED = -1


def new_keys(prefix: int) -> nkeys.KeyPair:
    """A fresh key pair of a role (`nkeys.PREFIX_BYTE_OPERATOR`, `_ACCOUNT`, `_USER`)."""
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def public(keys: nkeys.KeyPair) -> str:
    return str(keys.public_key.decode())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def signed_jwt(
    issuer: nkeys.KeyPair,
    subject: str,
    name: str,
    nats: dict[str, Any],
    expires: int | None = None,
) -> str:
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": public(issuer),
        "name": name,
        "sub": subject,
        "nats": {**nats, "version": 2},
    }
    if expires is not None:
        claims["exp"] = expires
    digest = hashlib.sha256(_json(claims)).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    body = f"{_b64(_json({'typ': 'JWT', 'alg': 'ed25519-nkey'}))}.{_b64(_json(claims))}"
    return f"{body}.{_b64(issuer.sign(body.encode()))}"


def account_jwt(
    operator: nkeys.KeyPair,
    account: nkeys.KeyPair,
    name: str,
    *,
    jetstream: bool,
    mappings: dict[str, str] | None = None,
) -> str:
    """An account's JWT; `jetstream`: unlimited JetStream storage (a JetStream limit other
    than 0 is what enables JetStream for the account). `mappings`: subject mappings."""
    limits: dict[str, Any] = {
        "subs": UNLIMITED, "data": UNLIMITED, "payload": UNLIMITED, "imports": UNLIMITED,
        "exports": UNLIMITED, "wildcards": True, "conn": UNLIMITED, "leaf": UNLIMITED,
    }  # fmt: skip
    if jetstream:
        limits |= {"mem_storage": UNLIMITED, "disk_storage": UNLIMITED,
                   "streams": UNLIMITED, "consumer": UNLIMITED}  # fmt: skip
    nats: dict[str, Any] = {
        "type": "account",
        "limits": limits,
        "default_permissions": {"pub": {}, "sub": {}},
    }
    if mappings:
        nats["mappings"] = {src: [{"subject": dst, "weight": 100}] for src, dst in mappings.items()}
    return signed_jwt(operator, public(account), name, nats)


def user_jwt(
    account: nkeys.KeyPair, user: nkeys.KeyPair, name: str, expires: int | None = None
) -> str:
    nats = {"type": "user", "pub": {}, "sub": {}, "subs": UNLIMITED, "data": UNLIMITED,
            "payload": UNLIMITED}  # fmt: skip
    return signed_jwt(account, public(user), name, nats, expires)


def creds_text(jwt: str, user: nkeys.KeyPair) -> str:
    """A `.creds` file as `nsc generate creds` writes it."""
    seed = user.seed.decode()
    return (
        f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


class Operator:
    """An operator with a system account, an application account with JetStream (`app`) and
    one without (`plain`); `user()` writes a `.creds` file of a new user of `app`."""

    def __init__(self, work_dir: Path, mappings: dict[str, str] | None = None) -> None:
        self.work_dir = work_dir
        self.keys = new_keys(nkeys.PREFIX_BYTE_OPERATOR)
        self.system = new_keys(nkeys.PREFIX_BYTE_ACCOUNT)
        self.app = new_keys(nkeys.PREFIX_BYTE_ACCOUNT)
        self.plain = new_keys(nkeys.PREFIX_BYTE_ACCOUNT)
        self.jwt = signed_jwt(
            self.keys, public(self.keys), "test-operator",
            {"type": "operator", "system_account": public(self.system)},
        )  # fmt: skip
        self.accounts = {
            public(self.system): account_jwt(self.keys, self.system, "SYS", jetstream=False),
            public(self.app): account_jwt(
                self.keys, self.app, "app", jetstream=True, mappings=mappings
            ),
            public(self.plain): account_jwt(self.keys, self.plain, "plain", jetstream=False),
        }

    def user(self, name: str, account: nkeys.KeyPair | None = None) -> tuple[Path, str]:
        """`(path of a new user's .creds file, the user's seed)`; `account` (default: `app`)
        signs the user's JWT."""
        keys = new_keys(nkeys.PREFIX_BYTE_USER)
        path = self.work_dir / f"{name}.creds"
        path.write_text(creds_text(user_jwt(account or self.app, keys, name), keys))
        path.chmod(0o600)
        return path, keys.seed.decode()

    def server_config(self, port: int, store_dir: Path) -> str:
        """A single nats-server trusting this operator, JetStream on."""
        operator_file = self.work_dir / "operator.jwt"
        operator_file.write_text(self.jwt)
        preload = "".join(f'  {account}: "{jwt}"\n' for account, jwt in self.accounts.items())
        return (
            f"listen: 127.0.0.1:{port}\n"
            f'operator: "{operator_file}"\n'
            f"system_account: {public(self.system)}\n"
            "resolver: MEMORY\n"
            f"resolver_preload: {{\n{preload}}}\n"
            f'jetstream {{ store_dir: "{store_dir}", max_mem: 64MB, max_file: 256MB }}\n'
        )
