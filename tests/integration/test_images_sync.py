"""`lab-bastion images sync` against a local HTTP server started by the test (Range support and
a switch that cuts a transfer half way): downloads with checksums, resume, checksum mismatch,
and never a half-written file under its final name."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from bastion_app.images.sync import ImageError, sync

REPO = Path(__file__).resolve().parents[2]
KERNEL = os.urandom(300_000)
ISO = os.urandom(3_000_000)


class Origin:
    """A tiny HTTP origin: files by path, Range requests, optional cut-off per path."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}  # path -> bytes to send before dropping the connection (once)
        self.requests: list[tuple[str, str | None]] = []
        origin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path
                origin.requests.append((path, self.headers.get("Range")))
                body = origin.files.get(path)
                if body is None:
                    self.send_error(404)
                    return
                start, status = 0, 200
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[6:-1])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.end_headers()
                        return
                    status = 206
                chunk = body[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(chunk)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                limit = origin.cut.pop(path, None)
                if limit is not None:
                    self.wfile.write(chunk[:limit])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(chunk)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def origin():
    o = Origin()
    o.files["/f43/vmlinuz"] = KERNEL
    o.files["/f43/initrd.img"] = KERNEL[::-1]
    o.files["/u/netboot/amd64/linux"] = KERNEL[:1000]
    o.files["/u/ubuntu.iso"] = ISO
    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    # both checksum-list formats: sha256sum's and Fedora's CHECKSUM
    o.files["/u/SHA256SUMS"] = (f"{sha(ISO)} *ubuntu.iso\n{sha(KERNEL[:1000])}  netboot/amd64/linux\n").encode()
    o.files["/f43/CHECKSUM"] = f"# comment\nSHA256 (initrd.img) = {sha(KERNEL[::-1])}\n".encode()
    yield o
    o.close()


def manifest(origin, **over) -> dict:
    sha = hashlib.sha256(KERNEL).hexdigest()
    doc = {
        "fedora-43": {"files": {
            "vmlinuz": {"url": f"{origin.url}/f43/vmlinuz", "sha256": sha},
            "initrd.img": {"url": f"{origin.url}/f43/initrd.img", "sha256sums": f"{origin.url}/f43/CHECKSUM"},
        }},
        "ubuntu-26.04": {"files": {
            "vmlinuz": {"url": f"{origin.url}/u/netboot/amd64/linux", "sha256sums": f"{origin.url}/u/SHA256SUMS"},
            "installer.iso": {"url": f"{origin.url}/u/ubuntu.iso", "sha256sums": f"{origin.url}/u/SHA256SUMS"},
        }},
    }
    for k, v in over.items():
        doc[k] = v
    return doc


def write_manifest(data: Path, doc: dict) -> None:
    data.mkdir(parents=True, exist_ok=True)
    (data / "images.yaml").write_text(yaml.safe_dump(doc))


def no_part_files(data: Path) -> bool:
    return not list((data / "images").rglob("*.part"))


def test_sync_downloads_and_verifies(tmp_path, origin):
    data = tmp_path / "data"
    write_manifest(data, manifest(origin))
    seen = []
    results = sync(data, progress=lambda label, done, total: seen.append((label, done, total)))
    assert {r.label: r.action for r in results} == {
        "fedora-43/vmlinuz": "downloaded", "fedora-43/initrd.img": "downloaded",
        "ubuntu-26.04/vmlinuz": "downloaded", "ubuntu-26.04/installer.iso": "downloaded"}
    assert all(r.verified for r in results)
    assert (data / "images/fedora-43/vmlinuz").read_bytes() == KERNEL
    assert (data / "images/fedora-43/initrd.img").read_bytes() == KERNEL[::-1]
    assert (data / "images/ubuntu-26.04/installer.iso").read_bytes() == ISO
    assert no_part_files(data)
    assert seen and seen[-1][1] == seen[-1][2]  # progress reached the total
    # a second run downloads nothing
    before = len([r for r in origin.requests if "SUMS" not in r[0] and "CHECKSUM" not in r[0]])
    again = sync(data)
    assert {r.action for r in again} == {"up to date"}
    assert len([r for r in origin.requests if "SUMS" not in r[0] and "CHECKSUM" not in r[0]]) == before


def test_interrupted_download_resumes(tmp_path, origin):
    data = tmp_path / "data"
    write_manifest(data, manifest(origin))
    origin.cut["/u/ubuntu.iso"] = 1_200_000
    with pytest.raises(ImageError, match="run images sync again to resume"):
        sync(data, ["ubuntu-26.04"])
    iso = data / "images/ubuntu-26.04/installer.iso"
    part = iso.with_name("installer.iso.part")
    assert not iso.exists()  # never a partial file under its final name
    kept = part.stat().st_size
    assert 0 < kept <= 1_200_000  # what arrived whole is kept
    results = {r.label: r for r in sync(data, ["ubuntu-26.04"])}
    assert results["ubuntu-26.04/installer.iso"].action == "resumed"
    assert ("/u/ubuntu.iso", f"bytes={kept}-") in origin.requests
    assert iso.read_bytes() == ISO and no_part_files(data)


def test_checksum_mismatch_is_a_clear_error_and_leaves_nothing(tmp_path, origin):
    data = tmp_path / "data"
    doc = manifest(origin)
    doc["fedora-43"]["files"]["vmlinuz"]["sha256"] = "0" * 64
    write_manifest(data, doc)
    with pytest.raises(ImageError) as exc:
        sync(data, ["fedora-43"])
    msg = str(exc.value)
    assert "fedora-43/vmlinuz: checksum mismatch" in msg and "0" * 64 in msg
    assert hashlib.sha256(KERNEL).hexdigest() in msg
    assert not (data / "images/fedora-43/vmlinuz").exists() and no_part_files(data)


def test_mismatch_keeps_the_previous_good_file(tmp_path, origin):
    data = tmp_path / "data"
    write_manifest(data, manifest(origin))
    sync(data, ["fedora-43"])
    origin.files["/f43/vmlinuz"] = b"tampered" + KERNEL[8:]
    (data / "images/fedora-43/vmlinuz").write_bytes(b"stale")  # differs from the pinned checksum
    with pytest.raises(ImageError, match="checksum mismatch"):
        sync(data, ["fedora-43"])
    assert (data / "images/fedora-43/vmlinuz").read_bytes() == b"stale"
    assert no_part_files(data)


def test_sums_file_without_the_entry(tmp_path, origin):
    data = tmp_path / "data"
    doc = manifest(origin)
    doc["ubuntu-26.04"]["files"]["installer.iso"]["url"] = f"{origin.url}/u/other.iso"
    write_manifest(data, doc)
    with pytest.raises(ImageError, match="does not list other.iso"):
        sync(data, ["ubuntu-26.04"])


def test_without_checksum_the_file_is_kept_and_reported(tmp_path, origin):
    data = tmp_path / "data"
    write_manifest(data, {"fedora-43": {"files": {"vmlinuz": {"url": f"{origin.url}/f43/vmlinuz"}}}})
    [r] = [r for r in sync(data, ["fedora-43"]) if r.label == "fedora-43/vmlinuz"]
    assert r.action == "downloaded" and not r.verified and r.sha256 == hashlib.sha256(KERNEL).hexdigest()


@pytest.mark.parametrize("bad, msg", [
    ({"fedora-43": {"files": {"vmlinuz": {"url": "http://x/a b"}}}}, "not an http"),
    ({"fedora-43": {"files": {"vmlinuz": {"url": "http://x/a\nkernel evil"}}}}, "not an http"),
    ({"fedora-43": {"files": {"../../token": {"url": "http://x/a"}}}}, "safe relative file name"),
    ({"fedora-43": {"files": {"vmlinuz": {"url": "http://x/a", "sha256": "xyz"}}}}, "64 hex"),
    ({"fedora-43": {"repos": [{"name": "a b", "url": "http://x/"}]}}, "needs a name"),
    ({"fedora-43": {"bogus": 1}}, "unknown key"),
])
def test_invalid_manifest_is_refused(tmp_path, bad, msg):
    data = tmp_path / "data"
    write_manifest(data, bad)
    with pytest.raises(ImageError, match=msg):
        sync(data)


def run_cli(data: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bastion_app.cli", "images", "sync", "--data-dir", str(data), *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_cli(tmp_path, origin):
    data = tmp_path / "data"
    write_manifest(data, manifest(origin))
    res = run_cli(data, "--os", "fedora-43")
    assert res.returncode == 0, res.stderr
    assert f"fedora-43/vmlinuz: downloaded sha256:{hashlib.sha256(KERNEL).hexdigest()}" in res.stdout
    assert "ubuntu" not in res.stdout
    doc = manifest(origin)
    doc["ubuntu-26.04"]["files"]["installer.iso"]["sha256sums"] = None
    doc["ubuntu-26.04"]["files"]["installer.iso"]["sha256"] = "1" * 64
    write_manifest(data, doc)
    bad = run_cli(data, "--os", "ubuntu-26.04")
    assert bad.returncode == 1
    assert "Error: ubuntu-26.04/installer.iso: checksum mismatch" in bad.stderr
    assert run_cli(data, "--os", "nope").returncode == 1
