"""Bearer tokens for the HTTP API, from a TOML file the operator writes.

    [tokens.operator]                 # the name, logged with every call it makes
    token_file = "/etc/gatewayd/operator.token"   # or: token = "..." (at least 16 characters)
    scopes = ["*"]                    # features it may use: openai, mcp, messages, dashboard ...
    classes = ["*"]                   # agent classes it may reach
    read_only = false                 # true: no call that changes anything

Secrets are compared in constant time; the file is read at start-up (and by `reload()`).
"""

from __future__ import annotations

import hmac
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.requests import HTTPConnection

from gatewayd.api.errors import ApiError

MIN_SECRET_LENGTH = 16


class _TokenEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    token: str | None = None
    token_file: str | None = None
    scopes: Annotated[list[str], Field(min_length=1)] = ["*"]
    classes: Annotated[list[str], Field(min_length=1)] = ["*"]
    read_only: bool = False

    @model_validator(mode="after")
    def _one_secret(self) -> _TokenEntry:
        if (self.token is None) == (self.token_file is None):
            raise ValueError("give exactly one of token or token_file")
        return self


class _TokenFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    tokens: dict[str, _TokenEntry] = {}


class TokenFileError(Exception):
    """The tokens file cannot be used; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class ApiToken:
    name: str
    secret: str = ""
    scopes: frozenset[str] = frozenset({"*"})
    classes: frozenset[str] = frozenset({"*"})
    read_only: bool = False

    def allows_scope(self, scope: str) -> bool:
        return "*" in self.scopes or scope in self.scopes

    def allows_class(self, agent_class: str) -> bool:
        return "*" in self.classes or agent_class in self.classes


class Tokens:
    """The tokens of one file (or none: then every request is refused, with a message that
    says how to add one)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._tokens: tuple[ApiToken, ...] = ()
        self.reload()

    def reload(self) -> None:
        self._tokens = () if self.path is None else tuple(_load(self.path))

    @classmethod
    def of(cls, *tokens: ApiToken) -> Tokens:
        """Tokens given directly (tests, embedding)."""
        made = cls(None)
        made._tokens = tokens
        return made

    def __len__(self) -> int:
        return len(self._tokens)

    def authenticate(self, header: str | None) -> ApiToken:
        """The token named by an `Authorization: Bearer ...` header, or ApiError 401."""
        if not self._tokens:
            raise ApiError(
                401,
                "no API tokens are configured: set api.tokens_file in the gateway's config",
                type="authentication_error",
                code="no_tokens_configured",
            )
        scheme, _, presented = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise ApiError(
                401,
                "missing bearer token: send 'Authorization: Bearer <token>'",
                type="authentication_error",
                code="missing_token",
            )
        presented_bytes = presented.strip().encode()
        found = None
        for candidate in self._tokens:  # no early exit: timing does not say which one matched
            if hmac.compare_digest(candidate.secret.encode(), presented_bytes):
                found = candidate
        if found is None:
            raise ApiError(401, "invalid token", type="authentication_error", code="invalid_token")
        return found


def require_token(
    connection: HTTPConnection,
    scope: str,
    *,
    agent_class: str | None = None,
    write: bool = False,
) -> ApiToken:
    """Authenticate the request and check that its token may use `scope` (and reach
    `agent_class`, and change things when `write`); raises ApiError 401/403."""
    tokens: Tokens = connection.app.state.tokens
    token = tokens.authenticate(connection.headers.get("authorization"))
    if not token.allows_scope(scope):
        raise ApiError(
            403,
            f"token {token.name!r} may not use {scope} (its scopes: {', '.join(sorted(token.scopes))})",
            type="permission_error",
            code="scope_not_allowed",
        )
    if agent_class is not None and not token.allows_class(agent_class):
        raise ApiError(
            403,
            f"token {token.name!r} may not reach agent class {agent_class!r}",
            type="permission_error",
            code="class_not_allowed",
        )
    if write and token.read_only:
        raise ApiError(
            403,
            f"token {token.name!r} is read-only",
            type="permission_error",
            code="read_only_token",
        )
    return token


def _load(path: Path) -> list[ApiToken]:
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as err:
        raise TokenFileError(f"{path}: cannot read the API tokens file: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise TokenFileError(f"{path}: not valid TOML: {err}") from None
    try:
        parsed = _TokenFile.model_validate(raw)
    except ValidationError as err:
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise TokenFileError(f"{path}: " + "; ".join(problems)) from None
    tokens = []
    seen: Mapping[str, str] = {}
    for name, entry in parsed.tokens.items():
        secret = entry.token if entry.token is not None else _read_secret(path, name, entry)
        if len(secret) < MIN_SECRET_LENGTH:
            raise TokenFileError(
                f"{path}: tokens.{name}: the secret is {len(secret)} characters; use at least "
                f"{MIN_SECRET_LENGTH} (e.g. `python -c 'import secrets; print(secrets.token_urlsafe())'`)"
            )
        if secret in seen:
            raise TokenFileError(
                f"{path}: tokens.{name} has the same secret as tokens.{seen[secret]}"
            )
        seen = {**seen, secret: name}
        tokens.append(
            ApiToken(
                name=name,
                secret=secret,
                scopes=frozenset(entry.scopes),
                classes=frozenset(entry.classes),
                read_only=entry.read_only,
            )
        )
    return tokens


def _read_secret(path: Path, name: str, entry: _TokenEntry) -> str:
    assert entry.token_file is not None
    secret_path = Path(entry.token_file).expanduser()
    if not secret_path.is_absolute():
        secret_path = path.parent / secret_path
    try:
        return secret_path.read_text().strip()
    except OSError as err:
        raise TokenFileError(
            f"{path}: tokens.{name}: cannot read token_file {secret_path}: {err.strerror}"
        ) from None
