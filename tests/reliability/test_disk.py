"""The data directory's disk full, then read-only: a clear error, nothing corrupted, and the
bastion recovers by itself when the disk is usable again. A real tmpfs mount (root)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import time

import pytest
import requests

from tests.support import SMALL_HW, need_root, session_from, start_bastion, synthetic_mac


@pytest.fixture
def small_disk(tmp_path):
    need_root()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0755", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True, capture_output=True)
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path) -> None:
    """Fill the filesystem to the last byte."""
    with open(path, "wb", buffering=0) as f:
        chunk = b"\0" * 65536
        try:
            while True:
                f.write(chunk)
        except OSError:
            pass
        try:
            while True:
                f.write(b"\0")
        except OSError:
            pass


def discover(b, i):
    """Machine i reports in, from its own address."""
    return session_from(f"127.0.10.{i % 250 + 1}").post(b.url + "/api/discover", timeout=10,
                                                       json={"mac": synthetic_mac(i, "52:54:0a"), "hardware": SMALL_HW})


def test_disk_full_then_read_only_then_recovered(small_disk, tmp_path, record):
    b = start_bastion(small_disk / "data", log_dir=tmp_path)
    try:
        s = b.session()
        for i in range(20):
            assert discover(b, i).status_code == 200
        before = {m["mac"] for m in s.get(b.url + "/api/machines").json()["machines"]}

        # -- disk full -----------------------------------------------------------------------
        fill(small_disk / "filler")
        refused = 0
        for i in range(20, 220):
            r = discover(b, i)
            assert r.status_code in (200, 503), r.text
            if r.status_code == 503:
                refused += 1
                assert r.json()["error"].startswith("storage unavailable") and r.headers.get("Retry-After")
        assert refused > 0, "the disk never filled up"
        assert requests.get(f"{b.url}/dispatch", params={"mac": synthetic_mac(1, "52:54:0a")}).status_code == 200
        listed = s.get(b.url + "/api/machines")
        assert listed.status_code == 200
        accepted_while_full = {m["mac"] for m in listed.json()["machines"]} - before

        # -- space returns: it recovers by itself --------------------------------------------
        os.unlink(small_disk / "filler")
        assert discover(b, 500).status_code == 200

        # -- read-only: a filesystem that went read-only (errors=remount-ro) and a bastion that
        # is restarted onto it: it starts, reads and boots machines, refuses changes clearly, and
        # takes changes again as soon as the filesystem is writable, without a restart.
        b.stop()
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
        b = start_bastion(small_disk / "data", log_dir=tmp_path)
        s = b.session()
        reads = s.get(b.url + "/api/machines")
        assert reads.status_code == 200 and len(reads.json()["machines"]) == len(before | accepted_while_full) + 1
        assert "#!ipxe" in requests.get(f"{b.url}/dispatch", params={"mac": synthetic_mac(1, "52:54:0a")}).text
        r = discover(b, 501)
        assert r.status_code == 503 and r.json()["error"].startswith("storage unavailable"), r.text
        r = s.post(b.url + "/api/debug", json={"mac": synthetic_mac(1, "52:54:0a")})
        assert r.status_code == 503
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
        t0 = time.monotonic()
        while discover(b, 502).status_code != 200:
            assert time.monotonic() - t0 < 10, "did not recover after the remount"
            time.sleep(0.2)
        final = {m["mac"] for m in s.get(b.url + "/api/machines").json()["machines"]}
    finally:
        b.stop()
    assert before <= final and accepted_while_full <= final
    assert synthetic_mac(501, "52:54:0a") not in final  # refused means not stored
    conn = sqlite3.connect(small_disk / "data" / "state.db")
    integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    conn.close()
    assert integrity == "ok"
    record(refused_while_full=refused, accepted_while_full=len(accepted_while_full),
           reads_while_read_only=reads.status_code, integrity_check=integrity, lost=0)
