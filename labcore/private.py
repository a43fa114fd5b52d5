"""Private files (mode 0600): keys, tokens, certificates' keys and state with secrets in it.

One home for the two ways the platform puts a secret on disk: :func:`write` replaces a file
atomically (a reader sees the old content or the new, never half; a crash leaves no partial file),
:func:`create_once` makes a file the first time and reads it every time after (two processes
starting at once agree on one content, and neither reads it half written). Both write with mode
0600 from the first byte and sync to disk; a file found with a looser mode is tightened."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def _bytes(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else data


def _fill(fd: int, data: bytes) -> None:
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # whatever the umask
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write(path: Path | str, data: bytes | str) -> None:
    """Replace ``path`` with ``data`` (mode 0600), atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _fill(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), _bytes(data))
    os.replace(tmp, path)


def create_once(path: Path | str, make: Callable[[], bytes | str]) -> bytes:
    """The content of ``path``, made with ``make()`` (mode 0600) if the file does not exist yet.

    The content is written to a file of its own first and linked into place, so a process that
    starts at the same moment reads the whole content, never an empty file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        _fill(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), _bytes(make()))
        try:
            os.link(tmp, path)  # fails if another process linked its content first
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
    return path.read_bytes()
