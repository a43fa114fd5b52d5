"""Passwords and tokens.

- Passwords: argon2id (argon2-cffi's RFC 9106 low-memory profile: 64 MiB, 3 passes), the hash
  string alone is stored; a login against an unknown user still spends one verification, so the
  answer time does not tell which users exist.
- Tokens (API, bastion and agent join tokens): ``labd_<kind>_`` + 32 random bytes (URL-safe base64);
  only their SHA-256 is stored (a random 256-bit secret needs no slow hash), with an expiry, an
  optional count of uses and a revocation time. The secret is shown once, when it is made.
"""

from __future__ import annotations

import hashlib
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_HASHER = PasswordHasher.from_parameters(__import__("argon2").profiles.RFC_9106_LOW_MEMORY)
_DUMMY = _HASHER.hash("not a password of anyone")


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def check_password(stored: str | None, password: str) -> bool:
    try:
        return _HASHER.verify(stored or _DUMMY, password) and stored is not None
    except (VerificationError, InvalidHashError):
        return False


def new_password() -> str:
    return secrets.token_urlsafe(18)


def new_token(kind: str) -> str:
    return f"labd_{kind}_{secrets.token_urlsafe(32)}"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
