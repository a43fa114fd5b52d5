"""labcore.private: secrets on disk are 0600 from the first byte, replaced atomically, made once."""

from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor

from labcore import private


def mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_write_is_private_whatever_the_umask_and_replaces_atomically(tmp_path):
    old = os.umask(0)
    try:
        p = tmp_path / "key.pem"
        private.write(p, "one")
        assert p.read_text() == "one" and mode(p) == 0o600
        p.chmod(0o644)
        private.write(p, b"two")
        assert p.read_bytes() == b"two" and mode(p) == 0o600
        assert sorted(os.listdir(tmp_path)) == ["key.pem"]  # no temporary file left behind
    finally:
        os.umask(old)


def test_create_once_makes_one_content_and_tightens_a_loose_mode(tmp_path):
    p = tmp_path / "sub" / "token"
    calls = []

    def make():
        calls.append(1)
        return os.urandom(16)

    with ThreadPoolExecutor(8) as pool:  # starting at once, they agree on one content
        seen = set(pool.map(lambda _: private.create_once(p, make), range(16)))
    assert len(seen) == 1 and len(next(iter(seen))) == 16 and mode(p) == 0o600
    assert sorted(os.listdir(p.parent)) == ["token"]
    p.chmod(0o640)
    made = len(calls)
    assert private.create_once(p, make) in seen and mode(p) == 0o600 and len(calls) == made
