"""Secrets at rest: AES-256-GCM with a key file in a data directory.

One home for sealing what must not sit in a database in clear: a bastion's BMC credentials, labd's
cluster kubeconfigs. The key is 32 random bytes in a file of mode 0600 beside the database (never in
it), so a copied database alone reveals nothing. ``aad`` binds a sealed value to where it belongs
(for example ``b"bmc:52:54:00:12:34:56"``): a value moved to another row does not open.

Sealed form: ``v1:`` + base64url(nonce(12) + ciphertext + tag(16)), ASCII, fit for a TEXT column.
"""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from labcore import private

KEY_BYTES = 32
_PREFIX = "v1:"


class SecretError(ValueError):
    """A sealed value that cannot be opened (wrong key, wrong aad, damaged), or a bad key file."""


def load_or_create_key(path: Path) -> bytes:
    """Read the key file, creating it (0600, atomically: O_EXCL) on first use; tighten a loose mode."""
    key = private.create_once(path, lambda: secrets.token_bytes(KEY_BYTES))
    if len(key) != KEY_BYTES:
        raise SecretError(f"{path}: a secret key must be {KEY_BYTES} bytes (found {len(key)}); "
                          "restore it from backup: without it the sealed secrets cannot be read")
    return key


def seal(key: bytes, plaintext: bytes, aad: bytes = b"") -> str:
    nonce = secrets.token_bytes(12)
    blob = nonce + AESGCM(key).encrypt(nonce, plaintext, aad or None)
    return _PREFIX + base64.urlsafe_b64encode(blob).decode("ascii")


def unseal(key: bytes, sealed: str, aad: bytes = b"") -> bytes:
    if not isinstance(sealed, str) or not sealed.startswith(_PREFIX):
        raise SecretError("not a sealed value")
    try:
        blob = base64.urlsafe_b64decode(sealed[len(_PREFIX):].encode("ascii"))
        if len(blob) < 12 + 16:
            raise SecretError("sealed value too short")
        return AESGCM(key).decrypt(blob[:12], blob[12:], aad or None)
    except (InvalidTag, ValueError) as e:
        raise SecretError("cannot open the sealed value (wrong key, wrong owner or damaged)") from e
