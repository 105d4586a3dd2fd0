"""A NATS user credentials file (`.creds`, as `nsc generate creds` writes it: the user's JWT
and its NKEY seed, each between BEGIN/END lines): checked, and used to sign each connect.

nats-py's own reader of such a file (`user_credentials=path`) does not check it: a file
without a JWT block makes it loop forever (the whole event loop hangs), a bad seed fails deep
inside the connect. `read_user_credentials` says what is wrong and where instead, never
putting the seed in a message, and `CredentialsSigner` gives nats-py the JWT and the nonce's
signature from the file as it is at each (re)connect: a renewed file is used from the next
reconnect, a broken one fails that connect with the same message (logged, retried).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import dataclass
from typing import Any

JWT_BEGIN = "-----BEGIN NATS USER JWT-----"
SEED_BEGIN = "-----BEGIN USER NKEY SEED-----"
_MAX_SIZE = 64 * 1024  # a .creds file is ~1 KiB


class CredentialsError(ValueError):
    """The credentials file cannot be used (the message names the file and the problem)."""


@dataclass(frozen=True, slots=True)
class UserCredentials:
    """What a checked credentials file names (public keys only: nothing secret)."""

    path: str
    user: str  # the user's public key (U...)
    account: str  # the account that signed the user's JWT (A...)
    name: str
    expires: int | None  # Unix time, None: never


def read_user_credentials(path: str) -> UserCredentials:
    """The file's user, checked: the line after each BEGIN line holds the JWT / the seed
    (as nsc writes it); the JWT is a user JWT that has not expired; the seed is a user seed
    whose public key is the JWT's subject. Raises `CredentialsError`."""
    return _read(path)[0]


class CredentialsSigner:
    """`user_jwt_cb` and `signature_cb` for `nats.connect`, reading the file at each connect;
    a file that fails the checks fails that connect with a `nats.errors.Error` naming it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def user_jwt(self) -> bytearray:
        return bytearray(self._checked()[1].encode())

    def sign(self, nonce: str) -> bytes:
        import nkeys

        keys = nkeys.from_seed(bytearray(self._checked()[2].encode()))
        try:
            return base64.b64encode(keys.sign(nonce.encode()))
        finally:
            keys.wipe()

    def _checked(self) -> tuple[UserCredentials, str, str]:
        import nats.errors

        try:
            return _read(self.path)
        except CredentialsError as err:  # nats-py logs it and tries the next server
            raise nats.errors.Error(str(err)) from None


def _read(path: str) -> tuple[UserCredentials, str, str]:
    """`(the user, its JWT, its seed)`, checked (see `read_user_credentials`)."""

    def problem(text: str) -> CredentialsError:
        return CredentialsError(f"credentials_file {path}: {text}")

    try:
        with open(path, "rb") as file:
            raw = file.read(_MAX_SIZE + 1)
    except OSError as err:
        raise problem(f"cannot be read ({err.strerror or err})") from None
    if len(raw) > _MAX_SIZE:
        raise problem(f"larger than {_MAX_SIZE} bytes: not a .creds file")
    try:
        lines = raw.decode("ascii").split("\n")
    except UnicodeDecodeError:
        raise problem("not ASCII text: not a .creds file") from None
    jwt = _line_after(lines, JWT_BEGIN, "the user JWT", problem)
    seed = _line_after(lines, SEED_BEGIN, "the user seed", problem)
    claims = _jwt_claims(jwt, problem)
    nats = claims.get("nats")
    kind = nats.get("type") if isinstance(nats, dict) else None
    if kind != "user":
        raise problem(f"the JWT is not a user JWT (its type is {kind!r})")
    user, account = str(claims.get("sub", "")), str(claims.get("iss", ""))
    expires = claims.get("exp")
    if isinstance(expires, int) and expires <= time.time():
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expires))
        raise problem(f"the user JWT of {user} expired at {when}: issue a new one")
    if not seed.startswith("SU"):
        raise problem("the NKEY seed block does not hold a user seed (one starting with SU)")
    try:
        import nkeys
    except ImportError:
        raise problem(
            "reading it needs the nkeys package (pip install 'gatewayd[cluster]')"
        ) from None
    try:
        raw = base64.b32decode(seed + "=" * (-len(seed) % 8))
        if nkeys.crc16_checksum(raw[:-2]) != raw[-2:]:  # (nkeys does not check it)
            raise ValueError("checksum")
        keys = nkeys.from_seed(bytearray(seed.encode()))
        public = keys.public_key.decode()
        keys.wipe()
    except Exception:
        raise problem("the NKEY seed block does not hold a valid seed (damaged?)") from None
    if public != user:
        raise problem(
            f"the seed is not the key of the JWT's user (the JWT is for {user}, the seed's "
            f"public key is {public}): the file mixes two users"
        )
    found = UserCredentials(path, user, account, str(claims.get("name", "")), _int(expires))
    return found, jwt, seed


def _line_after(lines: list[str], begin: str, what: str, problem: Any) -> str:
    """The line after the one containing `begin` (nats-py reads exactly that line)."""
    for index, line in enumerate(lines):
        if begin in line:
            value = lines[index + 1] if index + 1 < len(lines) else ""
            if value != value.strip():
                raise problem(
                    f"the line of {what} (line {index + 2}) has spaces or a carriage return "
                    "around it: write the file with Unix line endings"
                )
            if not value or value.startswith("-----"):
                raise problem(f"{what} is missing: line {index + 2}, after {begin!r}, is empty")
            return value
    raise problem(f"no {begin!r} line: not a NATS user credentials file")


def _jwt_claims(jwt: str, problem: Any) -> dict[str, Any]:
    parts = jwt.split(".")
    if len(parts) != 3:
        raise problem("the user JWT is not a JWT (three dot-separated parts)")
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (binascii.Error, ValueError):
        raise problem("the user JWT's claims cannot be decoded (damaged?)") from None
    if not isinstance(claims, dict):
        raise problem("the user JWT's claims are not a JSON object")
    return claims


def _int(value: object) -> int | None:
    return value if isinstance(value, int) else None
