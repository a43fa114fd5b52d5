"""Shared fixtures.

- ``app`` / ``client``: the Flask app on a temporary data dir (unit tests of routes).
- ``bastion``: a real ``lab-bastion serve --no-dnsmasq`` (gunicorn, several workers) on a free
  loopback port, stopped at the end of the test module.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from tests.support import free_port, wait_for

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def data_dir(tmp_path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def app(data_dir):
    from bastion_app import create_app
    from labcore import bastion_config as configmod

    cfg = configmod.load(data_dir, overrides={"listen": "127.0.0.1:8080", "server_ip": "192.0.2.1",
                                              "subnet": "192.0.2.0/24", "dnsmasq": False}, env={}, detect=False)
    app = create_app(cfg, {"TESTING": True})
    yield app
    app.extensions["lab_store"].close()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def auth(app) -> dict[str, str]:
    return {"Authorization": f"Bearer {app.config['LAB_TOKEN']}"}


@dataclass
class Bastion:
    """A running `lab-bastion serve` subprocess."""

    url: str
    data_dir: Path
    token: str
    proc: subprocess.Popen
    log_path: Path
    extra_args: list[str] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def session(self) -> requests.Session:
        s = requests.Session()
        s.headers.update(self.headers)
        return s

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def start_bastion(data_dir: Path, *args: str, env: dict | None = None, workers: int = 4, port: int | None = None,
                  timeout: float = 30.0, log_dir: Path | None = None) -> Bastion:
    """Start `lab-bastion serve` and wait for /healthz. Extra CLI args pass through."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = (log_dir or data_dir.parent) / f"bastion-{port}.log"
    if "--syslog-port" not in args:  # never the shared default 5514: tests run side by side
        args = ("--syslog-port", str(free_port(kind=socket.SOCK_DGRAM)), *args)
    cmd = [sys.executable, "-m", "bastion_app.cli", "serve", "--data-dir", str(data_dir),
           "--listen", f"127.0.0.1:{port}", "--workers", str(workers), "--no-dnsmasq", *args]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    with open(log_path, "ab") as logf:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=full_env, cwd=REPO, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def healthy():
        if proc.poll() is not None:
            raise RuntimeError(f"lab-bastion serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        return requests.get(url + "/healthz", timeout=1).status_code == 200

    try:
        wait_for(healthy, timeout=timeout, interval=0.1, what="lab-bastion serve /healthz")
    except BaseException:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    token = (data_dir / "token").read_text().strip()
    return Bastion(url, data_dir, token, proc, log_path, list(args))


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    b = start_bastion(tmp_path_factory.mktemp("bastion") / "data")
    yield b
    b.stop()
