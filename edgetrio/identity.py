"""Who is who, shared by the gateway and the relay: device ids, fresh secrets, and how secrets are stored (hashed)."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

ADMIN_USER = "edgetrio-admin"  # the gateway's admin credential; never a device id
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
INTEGRATION_PREFIX = "integration:"  # an integration's MQTT user (Home Assistant); ':' is never in a device id


def integration_user(name: str) -> str:
    return INTEGRATION_PREFIX + name


def is_device_user(username: str | None) -> bool:
    """Whether an MQTT user name is a device's (not the admin's, not an integration's)."""
    return bool(username) and username != ADMIN_USER and not str(username).startswith(INTEGRATION_PREFIX)


class RegistryError(ValueError):
    """A device id, credential or model that cannot be accepted; the message says why."""


def check_device_id(device_id: str, kind: str = "device id") -> str:
    """Return the id if it can name a device (or a node, a model: `kind`) and an MQTT topic level, else raise
    RegistryError."""
    if device_id == ADMIN_USER or not DEVICE_ID.fullmatch(device_id):
        raise RegistryError(
            f"invalid {kind} {device_id!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return device_id


def new_secret() -> str:
    """A fresh random credential (144 bits), printed once and stored only hashed.

    Never starts with '-': a token like '-I4l...' after `--token` reads as an option to argparse and to shells' tools.
    """
    while True:
        secret = secrets.token_urlsafe(18)
        if not secret.startswith("-"):
            return secret


def hash_secret(secret: str) -> str:
    # A salted SHA-256 is enough for random 144-bit secrets (nothing to brute-force), and it keeps
    # a reconnect storm of hundreds of devices from costing seconds of CPU as a slow KDF would.
    salt = secrets.token_hex(8)
    digest = hashlib.sha256((salt + secret).encode()).hexdigest()
    return f"sha256${salt}${digest}"


def verify_secret(secret: str | bytes | None, stored: str) -> bool:
    if secret is None:
        return False
    if isinstance(secret, bytes):
        secret = secret.decode("utf-8", "replace")
    try:
        scheme, salt, digest = stored.split("$")
    except ValueError:
        return False
    if scheme != "sha256":
        return False
    candidate = hashlib.sha256((salt + secret).encode()).hexdigest()
    return hmac.compare_digest(candidate, digest)


# Passwords people choose get a slow KDF (scrypt, from the standard library); machine-made secrets above do not need one.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1  # about 50-100 ms and 32 MiB per check


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=64 << 20)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str | None) -> bool:
    """Check a password; with no stored hash (an unknown user) it costs the same and fails."""
    try:
        scheme, n, r, p, salt, digest = (stored or f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${'00' * 16}$").split("$")
        if scheme != "scrypt":
            return False
        candidate = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p),
                                   maxmem=64 << 20)
    except ValueError:
        return False
    return stored is not None and hmac.compare_digest(candidate.hex(), digest)


def token_digest(token: str) -> str:
    """How random tokens (API tokens, session keys) are stored: looked up by their SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()

