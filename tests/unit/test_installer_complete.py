"""The installers' last step, `complete`, against a bastion that loses answers: the Fedora
kickstart's final %post and the Ubuntu late-commands retry it with the real curl until the bastion
takes it (a lost `complete` would leave the machine `installing`, and its next PXE boot would
install it again), stop at once on a 4xx answer, and never fail the install."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time

import pytest
import yaml

from bastion_app.images.sync import DEFAULT_MANIFEST
from bastion_app.installers import autoinstall_user_data, kickstart
from tests.support import MAC, TOKEN, install_params, need_binary, script


class FlakyBastion:
    """POST /api/progress: the first ``drop`` `complete` requests get the connection closed with no
    answer, the next ``unavailable`` get 503, then every one gets ``status`` (other stages: 200)."""

    def __init__(self, drop: int = 0, unavailable: int = 0, status: int = 200):
        self.plan = ["drop"] * drop + [503] * unavailable
        self.status = status
        self.completes: list[tuple[float, int | str]] = []  # (time, what it got) per `complete` request
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, body = data.split(b"\r\n\r\n", 1)
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                while len(body) < length:
                    body += conn.recv(65536)
                answer: int | str = 200
                if json.loads(body)["stage"] == "complete":
                    answer = self.plan.pop(0) if self.plan else self.status
                    self.completes.append((time.monotonic(), answer))
                if answer == "drop":
                    continue  # closed without an answer
                conn.sendall(b"HTTP/1.1 %d X\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}" % answer)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def bastion(request):
    b = FlakyBastion(**getattr(request, "param", {}))
    yield b
    b.close()


def fedora_final(base: str) -> str:
    text = kickstart(install_params("vanilla"), base=base, syslog_port=5514, manifest=DEFAULT_MANIFEST)
    return script(text, "post", chroot=False)


def ubuntu_late(base: str, tmp_path) -> str:
    """The Ubuntu late-commands with /target in tmp_path (UEFI boot entries out of the way: no
    /sys/firmware/efi in the fake sysfs)."""
    doc = yaml.safe_load(autoinstall_user_data(install_params("vanilla", os_name="ubuntu-26.04"), base=base,
                                               manifest=DEFAULT_MANIFEST))
    [cmd] = doc["autoinstall"]["late-commands"]
    target = tmp_path / "target"
    (target / "etc").mkdir(parents=True)
    (target / "etc/fstab").write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "chroot").write_text("#!/bin/sh\nexit 0\n")  # the target's commands are not run here
    (bin_dir / "chroot").chmod(0o755)
    return f"export PATH={bin_dir}:$PATH LAB_SYSFS={tmp_path}/sys\n" + cmd[2].replace(
        "LAB_ROOT=/target ", f"LAB_ROOT={target} ", 1)


def run(body: str, **env) -> subprocess.CompletedProcess:
    need_binary("bash", "curl")
    return subprocess.run(["bash", "-c", body], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "LAB_RETRY_INTERVAL_S": "0.2", **env})


@pytest.mark.parametrize("bastion", [{"drop": 2, "unavailable": 1}], indirect=True)
@pytest.mark.parametrize("installer", ["fedora", "ubuntu"])
def test_complete_is_retried_until_the_bastion_takes_it(bastion, installer, tmp_path):
    body = fedora_final(bastion.base) if installer == "fedora" else ubuntu_late(bastion.base, tmp_path)
    res = run(body)
    assert res.returncode == 0, res.stderr
    assert [got for _, got in bastion.completes] == ["drop", "drop", 503, 200]
    assert "did not take" not in res.stderr and "refused" not in res.stderr


@pytest.mark.parametrize("bastion", [{"status": 409}], indirect=True)
def test_a_4xx_answer_is_final_and_does_not_fail_the_install(bastion):
    res = run(fedora_final(bastion.base))
    assert res.returncode == 0
    assert [got for _, got in bastion.completes] == [409]
    assert "the bastion refused the complete report (HTTP 409)" in res.stderr


@pytest.mark.parametrize("bastion", [{"drop": 1000}], indirect=True)
@pytest.mark.parametrize("installer", ["fedora", "ubuntu"])
def test_complete_gives_up_after_the_retry_period_without_failing_the_install(bastion, installer, tmp_path):
    body = fedora_final(bastion.base) if installer == "fedora" else ubuntu_late(bastion.base, tmp_path)
    start = time.monotonic()
    res = run(body, LAB_FINAL_RETRY_S="2")
    assert res.returncode == 0, res.stderr
    assert "the bastion did not take the complete report" in res.stderr
    assert len(bastion.completes) >= 3 and time.monotonic() - start < 30


def test_the_retry_period_is_minutes_by_default():
    body = fedora_final("http://10.0.0.1:8080")
    assert "${LAB_FINAL_RETRY_S:-600}" in body and "${LAB_RETRY_INTERVAL_S:-10}" in body
    assert body.rstrip().endswith('lab_progress_final complete 100 "installed, rebooting" || true')
    assert MAC in body and TOKEN in body
