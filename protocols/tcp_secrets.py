"""Device secrets for the TCP listener: a TOML file of `"device-id" = "secret"` pairs.

This module must never import `gatewayd` or `engine`.
"""

from __future__ import annotations

import logging
import os
import stat
import tomllib

from protocols.frames import FrameError, Hello

logger = logging.getLogger("protocols.tcp")


class SecretsFileError(ValueError):
    """The device secrets file is missing, unreadable or malformed."""


def load_secrets_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read device secrets from a TOML file of top-level `"device-id" = "secret"` pairs.

        # /etc/gatewayd/devices.toml  (chmod 600, owned by the gatewayd user)
        "thermo-42" = "6f1c0d...e9"
        "pump-7"    = "a93b44...01"

    Device ids follow FRAMES.md (1..128 UTF-8 bytes, no control characters); secrets are
    1..256 UTF-8 bytes. A file that other users may read is accepted with a warning.
    """
    try:
        with open(path, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            document = tomllib.load(file)
    except OSError as exc:
        raise SecretsFileError(f"tcp secrets file {path}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SecretsFileError(f"tcp secrets file {path}: not valid TOML ({exc})") from None
    if mode & stat.S_IRWXO:
        logger.warning(
            "tcp: secrets file %s is accessible by all users (mode %o); chmod 600 or 640 it",
            path,
            stat.S_IMODE(mode),
        )
    result: dict[str, str] = {}
    for device_id, secret in document.items():
        if not isinstance(secret, str):
            raise SecretsFileError(
                f"tcp secrets file {path}: value of {device_id!r} must be a string secret, "
                f"got {type(secret).__name__}"
            )
        try:
            Hello(device_id, secret)  # the same rules a HELLO frame must pass
        except FrameError as exc:
            raise SecretsFileError(f"tcp secrets file {path}: entry {device_id!r}: {exc}") from None
        result[device_id] = secret
    return result
