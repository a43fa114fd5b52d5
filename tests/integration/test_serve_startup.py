"""`lab-bastion serve` fails fast and loudly on an operator's mistake (issue 15 finding 5, issue 19
item 6): a taken HTTP or syslog port and an unusable data directory end the command at once with a
non-zero exit (EX_CONFIG, 78, which the systemd unit does not restart), a message that says what to
change and no port left held; a bastion that listens on loopback but tells machines another address
warns; `lab-bastion token` on a directory that holds no bastion says so and creates nothing."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import requests

from tests.support import REPO, free_port, free_syslog_port, send_udp, start_bastion, udp_port, wait_for

EX_CONFIG = 78


def serve(data_dir, *args, timeout=30) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "bastion_app.cli", "serve", "--data-dir", str(data_dir), "--no-dnsmasq", "--workers", "1", *args]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout)
    return r, time.monotonic() - t0


def port_is_free(port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_taken_http_port_fails_at_once_and_frees_the_syslog_port(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        syslog = free_syslog_port()
        r, seconds = serve(tmp_path / "data", "--listen", f"127.0.0.1:{port}", "--syslog-port", str(syslog))
    assert r.returncode == EX_CONFIG, r.stderr[-2000:]
    assert seconds < 10, f"gave up only after {seconds:.0f} s"
    assert f"127.0.0.1:{port}" in r.stderr and "in use" in r.stderr and "--listen" in r.stderr
    assert "Traceback" not in r.stderr
    assert port_is_free(syslog, socket.SOCK_DGRAM) and port_is_free(syslog, socket.SOCK_STREAM)


def test_second_serve_on_the_same_syslog_port_fails_and_steals_nothing(tmp_path):
    first = start_bastion(tmp_path / "a", workers=1)
    try:
        port = udp_port(first)
        r, seconds = serve(tmp_path / "b", "--listen", f"127.0.0.1:{free_port()}", "--syslog-port", str(port))
        assert r.returncode == EX_CONFIG, r.stderr[-2000:]
        assert seconds < 10
        assert f"syslog port {port}" in r.stderr and "--syslog-port" in r.stderr and "Traceback" not in r.stderr
        # every line still reaches the first bastion
        send_udp(port, *(f"<30>Nov 26 12:00:00 h app: still mine {i}".encode() for i in range(20)))

        def stored():
            lines = first.session().get(first.url + "/api/logs/unattributed", params={"limit": 100}).json()["lines"]
            return sum(1 for ln in lines if "still mine" in ln["text"]) == 20

        wait_for(stored, timeout=10, what="the 20 lines in the first bastion")
    finally:
        first.stop()


def test_unusable_data_directory_fails_at_once(tmp_path):
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    r, seconds = serve(a_file, "--listen", f"127.0.0.1:{free_port()}", "--syslog-port", str(free_syslog_port()))
    assert r.returncode != 0 and seconds < 10
    assert str(a_file) in r.stderr and "Traceback" not in r.stderr

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "state.db").write_bytes(b"this is not an SQLite database" * 100)
    r, seconds = serve(garbage, "--listen", f"127.0.0.1:{free_port()}", "--syslog-port", str(free_syslog_port()))
    assert r.returncode == EX_CONFIG, r.stderr[-2000:]
    assert seconds < 10
    assert "state.db" in r.stderr and "unusable" in r.stderr and "Traceback" not in r.stderr


def test_loopback_listener_that_tells_machines_another_address_warns(tmp_path):
    port = free_port()
    b = start_bastion(tmp_path / "data", "--public-url", f"http://192.0.2.10:{port}", workers=1, port=port)
    try:
        assert requests.get(b.url + "/healthz", timeout=5).status_code == 200
        log = b.log()
    finally:
        b.stop()
    assert "listens on 127.0.0.1 only" in log and "http://192.0.2.10" in log and "--listen 0.0.0.0" in log


def lab_bastion(*args):
    return subprocess.run([sys.executable, "-m", "bastion_app.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=60)


def test_token_on_a_directory_without_a_bastion_says_so(tmp_path):
    typo = tmp_path / "var-lib-lab-bastoin"
    r = lab_bastion("token", "--data-dir", str(typo))
    assert r.returncode != 0 and "holds no bastion" in r.stderr and "lab-bastion serve" in r.stderr
    assert not typo.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    r = lab_bastion("token", "--data-dir", str(empty))
    assert r.returncode != 0 and "holds no bastion" in r.stderr
    assert list(empty.iterdir()) == []
    # a configured bastion that has not run yet (the bastion role writes bastion.yaml first) gets its token
    configured = tmp_path / "configured"
    configured.mkdir()
    (configured / "bastion.yaml").write_text("workers: 2\n")
    r = lab_bastion("token", "--data-dir", str(configured))
    assert r.returncode == 0 and r.stdout.strip() == (configured / "token").read_text().strip()
