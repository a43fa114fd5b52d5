"""labctl against a real `lab-bastion serve --no-dnsmasq` (gunicorn, SQLite) on a loopback port.

Commands run through click's CliRunner (the real command tree, in-process) or, where a separate
process matters (watch, follow, exit status of the console script), as `labctl` subprocesses.
Machines are simulated the way real ones talk to the bastion: POST /api/discover, then
GET /dispatch?mac= (whose install script carries the install token), then /api/progress and
/api/log with that token.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from click.testing import CliRunner

from labctl.main import cli
from tests.support import Machines, ed25519_key, labctl_env, start_bastion, wait_for

LABCTL = [sys.executable, "-m", "labctl.main"]


@pytest.fixture(scope="module")
def env(bastion, tmp_path_factory):
    return labctl_env(bastion, tmp_path_factory.mktemp("labctl-home"))


@pytest.fixture
def labctl(env):
    """Run labctl in-process; returns the click Result (exit_code, stdout, stderr)."""

    def run(*args: str, extra_env: dict | None = None, input: str | None = None):
        return CliRunner().invoke(cli, list(args), env={**env, **(extra_env or {})}, input=input,
                                  catch_exceptions=False)

    return run


def run_sub(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*LABCTL, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def machines(bastion):
    return Machines(bastion)


def mac_of(n: int) -> str:
    return f"52:54:00:5c:00:{n:02x}"


# -- config --------------------------------------------------------------------------------------
def test_config_set_get_list_path_and_file_mode(labctl, env):
    cfg = Path(env["LABCTL_CONFIG"])
    r = labctl("config", "path")
    assert r.exit_code == 0 and r.stdout.strip() == str(cfg)
    # a token may begin with '-' (older bastions drew them so): it is the value, not an option
    r = labctl("config", "set", "token", "-dash-token-123456")
    assert r.exit_code == 0, r.stderr
    assert yaml.safe_load(cfg.read_text()) == {"token": "-dash-token-123456"}
    assert labctl("config", "set", "token", "file-token-123456").exit_code == 0
    assert labctl("config", "set", "output", "yaml").exit_code == 0
    assert cfg.stat().st_mode & 0o777 == 0o600
    assert yaml.safe_load(cfg.read_text()) == {"token": "file-token-123456", "output": "yaml"}
    # env beats file, flag beats env
    assert labctl("config", "get", "token", extra_env={"LABCTL_TOKEN": ""}).stdout.strip() == "file-token-123456"
    assert labctl("config", "get", "token").stdout.strip() == env["LABCTL_TOKEN"]
    assert labctl("--token", "flag-token-123456", "config", "get", "token").stdout.strip() == "flag-token-123456"
    r = labctl("config", "list", "-o", "json")
    doc = json.loads(r.stdout)
    assert doc["bastionUrl"] == env["LABCTL_BASTION_URL"] and doc["output"] == "json"
    assert env["LABCTL_TOKEN"] not in doc["token"]  # masked without --show-token
    r = labctl("config", "list", extra_env={"LABCTL_OUTPUT": "", "LABCTL_TOKEN": ""})
    assert yaml.safe_load(r.stdout)["output"] == "yaml"  # the file's output setting applies
    r = labctl("config", "list", "-o", "table", extra_env={"LABCTL_TOKEN": ""})
    assert re.search(r"^output\s+table\s+flag$", r.stdout, re.M), r.stdout
    assert re.search(r"^token\s+file….*\s+file .*config.yaml$", r.stdout, re.M), r.stdout
    assert re.search(r"^bastionUrl\s+http://127.0.0.1:\d+\s+env LABCTL_BASTION_URL$", r.stdout, re.M), r.stdout
    r = labctl("config", "list", "--show-token", "-o", "yaml")
    assert yaml.safe_load(r.stdout)["token"] == env["LABCTL_TOKEN"]
    # bad values: exit 2, file unchanged
    before = cfg.read_text()
    r = labctl("config", "set", "bastionUrl", "ftp://x\nevil: 1")
    assert r.exit_code == 2 and "not an http(s) URL" in r.stderr
    r = labctl("config", "set", "output", "xml")
    assert r.exit_code == 2
    r = labctl("config", "set", "token", "-h")  # the value, too short to be a token; not the help option
    assert r.exit_code == 2 and "16-512 characters" in r.stderr
    assert cfg.read_text() == before
    # removing a key
    assert labctl("config", "set", "output", "").exit_code == 0
    assert labctl("config", "set", "token", "").exit_code == 0
    assert yaml.safe_load(cfg.read_text()) in (None, {})


def test_config_file_used_when_no_env(labctl, env, bastion, tmp_path):
    cfg = tmp_path / "c.yaml"
    e = {"LABCTL_CONFIG": str(cfg), "LABCTL_BASTION_URL": "", "LABCTL_TOKEN": ""}
    assert labctl("config", "set", "bastionUrl", bastion.url + "/", extra_env=e).exit_code == 0
    assert labctl("config", "set", "token", bastion.token, extra_env=e).exit_code == 0
    r = labctl("get", "machines", "-o", "json", extra_env=e)
    assert r.exit_code == 0, r.stderr
    assert "machines" in json.loads(r.stdout)
    cfg.write_text("bastionUrl: http://x\nsurprise: 1\n")
    r = labctl("get", "machines", extra_env=e)
    assert r.exit_code == 2 and "unknown setting(s) surprise" in r.stderr


# -- listing, formats, targets ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def fleet(machines, bastion):
    """node1 (queued, fedora), node2.lab and node2.other (short name `node2` is ambiguous), n4 discovered."""
    for n in (1, 2, 3, 4):
        machines.discover(mac_of(n))
    http = machines.http
    for n, host in ((1, "node1"), (2, "node2.lab"), (3, "node2.other")):
        r = http.post(bastion.url + "/api/install", json={"mac": mac_of(n), "hostname": host, "role": "worker",
                                                          "os": "fedora-43"}, timeout=10)
        assert r.status_code == 202, r.text
    return {n: mac_of(n) for n in (1, 2, 3, 4)}


def test_get_machines_every_format(labctl, fleet, machines):
    api = machines.api("/api/machines")[1]["machines"]
    r = labctl("get", "machines")
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "MAC", "STATE", "ROLE", "OS", "IP", "PROGRESS", "AGE"]
    assert any(line.split()[:3] == ["node1", fleet[1], "install_queued"] for line in lines)
    assert any(line.split()[:3] == ["-", fleet[4], "discovered"] for line in lines)
    wide = labctl("get", "machines", "-o", "wide").stdout
    assert "HARDWARE" in wide and "4c/8G/1d" in wide and "uefi" in wide
    assert json.loads(labctl("get", "machines", "-o", "json").stdout)["machines"] == api
    assert yaml.safe_load(labctl("get", "machines", "-o", "yaml").stdout)["machines"] == api
    assert json.loads(labctl("-o", "json", "provision", "list").stdout)["machines"] == api
    # filters go to the API
    doc = json.loads(labctl("get", "machines", "--state", "discovered", "-o", "json").stdout)
    assert fleet[4] in [m["mac"] for m in doc["machines"]] and {m["state"] for m in doc["machines"]} == {"discovered"}
    r = labctl("get", "machines", "--state", "nonsense")
    assert r.exit_code == 2


@pytest.mark.parametrize("target,expect", [
    ("node1", 1), ("NODE1", 1), ("52-54-00-5C-00-01", 1), ("5254.005c.0001", 1),
    ("node2.lab", 2), ("node2.other.", 3), (mac_of(4), 4),
])
def test_target_resolution(labctl, fleet, target, expect):
    r = labctl("get", "machine", target, "-o", "json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["mac"] == fleet[expect]


def test_target_ambiguous_and_unknown(labctl, fleet):
    r = labctl("get", "machine", "node2")
    assert r.exit_code == 2
    assert "ambiguous" in r.stderr and fleet[2] in r.stderr and fleet[3] in r.stderr
    r = labctl("get", "machine", "127.0.0.1")  # every simulated machine reported from loopback
    assert r.exit_code == 2 and re.search(r"ambiguous: it matches \d+ machines", r.stderr)
    r = labctl("describe", "machine", "nod1")
    assert r.exit_code == 5 and "no machine matches 'nod1'" in r.stderr and "did you mean: node1" in r.stderr
    r = labctl("get", "machine", "10.9.9.9")
    assert r.exit_code == 5 and "known machines:" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_describe_every_format(labctl, fleet):
    r = labctl("describe", "machine", "node1")
    assert r.exit_code == 0
    for needle in ("Name:             node1", f"MAC:              {fleet[1]}", "State:            install_queued",
                   "Role:           worker", "Disk:           auto-detect", "CPU:            QEMU (4 cores, 8 threads)",
                   "Memory:         8192 MiB", "Disk nvme0n1", "Events:"):
        assert needle in r.stdout, (needle, r.stdout)
    assert re.search(r"\bdiscover\s+unknown\s+discovered\b", r.stdout)
    assert re.search(r"\binstall\s+discovered\s+install_queued\b", r.stdout)
    doc = json.loads(labctl("describe", "machine", "node1", "-o", "json").stdout)
    assert doc["hostname"] == "node1" and [e["kind"] for e in doc["events"]][:2] == ["discover", "install"]
    assert yaml.safe_load(labctl("describe", "machine", "node1", "-o", "yaml").stdout) == doc
    assert "install_token" not in json.dumps(doc)


def test_roles_and_completion(labctl):
    r = labctl("roles")
    assert [line.split()[0] for line in r.stdout.splitlines()[1:]] == ["vanilla", "worker", "infra", "labcontroller"]
    doc = json.loads(labctl("roles", "-o", "json").stdout)
    assert {x["role"] for x in doc["roles"]} == {"vanilla", "worker", "infra", "labcontroller"}
    assert "k3s binary (server)" in labctl("roles", "-o", "wide").stdout
    assert yaml.safe_load(labctl("roles", "-o", "yaml").stdout) == doc
    for shell, marker in (("bash", "complete -o nosort -F"), ("zsh", "#compdef labctl"), ("fish", "complete --no-files --command labctl")):
        r = labctl("completion", shell)
        assert r.exit_code == 0 and marker in r.stdout and "_LABCTL_COMPLETE" in r.stdout


def test_completion_really_completes(env, fleet):
    """The generated completion answers with the real command tree, and with the bastion's machines."""

    def complete(words: str, extra: dict | None = None) -> list[str]:
        return subprocess.run([*LABCTL], env={**os.environ, **env, **(extra or {}), "_LABCTL_COMPLETE": "bash_complete",
                                              "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1)},
                              capture_output=True, text=True, timeout=30).stdout.split()

    assert "plain,reprovision" in complete("labctl provision re")
    assert {"plain,node2.lab", "plain,node2.other"} <= set(complete("labctl describe machine node2"))
    assert complete("labctl provision logs 52:54:00:5c:00:0") == [f"plain,{fleet[n]}" for n in (1, 2, 3, 4)]
    # the root's --bastion/--token count; an unreachable bastion completes nothing, silently
    assert complete("labctl --token wrong-token-0123456789 get machine node") == []
    assert complete("labctl get machine node", {"LABCTL_BASTION_URL": "http://127.0.0.1:1"}) == []


# -- install ---------------------------------------------------------------------------------------
def test_install_validates_before_sending(labctl, fleet, machines, tmp_path):
    bad_key = tmp_path / "bad.pub"
    bad_key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\nssh-rsa notbase64!!\n")
    before = machines.events(fleet[4])
    cases = [
        (["--hostname", "bad_name"], "invalid --hostname"),
        (["--hostname", "ok", "--disk", "/dev/sda; reboot"], "invalid --disk"),
        (["--hostname", "ok", "--ssh-key", str(bad_key)], "--ssh-key"),
        (["--hostname", "ok", "--ssh-key", str(tmp_path / "missing.pub")], "missing.pub"),
        (["--hostname", "ok", "--os", "windows"], "'windows' is not one of"),
    ]
    for extra, needle in cases:
        args = ["provision", "install", fleet[4], "--role", "vanilla"]
        if "--os" not in extra:
            args += ["--os", "ubuntu-26.04"]
        r = labctl(*args, *extra)
        assert r.exit_code == 2, (extra, r.stdout, r.stderr)
        assert needle in r.stderr, (needle, r.stderr)
    assert machines.events(fleet[4]) == before  # nothing reached the bastion


def test_install_conflict_and_success(labctl, fleet, machines, tmp_path):
    key = tmp_path / "id.pub"
    key.write_text(f"# my keys\n{ed25519_key(7)}\n\n{ed25519_key(8, 'second')}\n")
    r = labctl("provision", "install", fleet[4], "--hostname", "node1", "--role", "vanilla", "--os", "ubuntu-26.04")
    assert r.exit_code == 6 and "already used" in r.stderr and "Traceback" not in r.stderr
    r = labctl("provision", "install", fleet[4], "--hostname", "n4", "--role", "infra", "--os", "ubuntu-26.04",
               "--disk", "/dev/nvme0n1", "--ssh-key", str(key), "-o", "json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert (doc["state"], doc["hostname"], doc["role"], doc["disk"]) == ("install_queued", "n4", "infra", "/dev/nvme0n1")
    assert doc["ssh_keys"] == [ed25519_key(7), ed25519_key(8, "second")]
    r = labctl("provision", "install", "n4", "--hostname", "n4", "--role", "infra", "--os", "fedora-43")
    assert r.exit_code == 0, r.stderr
    assert ("n4 (52:54:00:5c:00:04) re-queued: fedora-43 as infra (changed: os ubuntu-26.04 -> fedora-43, "
            "disk /dev/nvme0n1 -> (auto))") in r.stdout
    event = machines.api("/api/machines/52:54:00:5c:00:04")[1]["events"][-1]
    assert event["data"]["changed"] == {"os": ["ubuntu-26.04", "fedora-43"], "disk": ["/dev/nvme0n1", ""]}


# -- debug, forget/delete ----------------------------------------------------------------------------
def test_debug_then_forget_and_delete(labctl, machines):
    for n in (0x21, 0x22):
        machines.discover(mac_of(n))
    r = labctl("provision", "debug", mac_of(0x21), "--mode", "pxe")
    assert r.exit_code == 0 and "boots into pxe debug once" in r.stdout
    assert machines.api(f"/api/machines/{mac_of(0x21)}")[1]["debug"] == "pxe"
    assert "(debug)" in labctl("get", "machine", mac_of(0x21)).stdout
    assert json.loads(labctl("provision", "debug", mac_of(0x22), "-o", "json").stdout)["debug"] == "rescue"
    r = labctl("provision", "forget", mac_of(0x21))
    assert r.exit_code == 0 and "deleted" in r.stdout
    assert json.loads(labctl("delete", "machine", mac_of(0x22), "-o", "json").stdout) == {"mac": mac_of(0x22), "state": "removed"}
    for mac in (mac_of(0x21), mac_of(0x22)):
        assert machines.api(f"/api/machines/{mac}")[0] == 404
        r = labctl("delete", "machine", mac)
        assert r.exit_code == 5


# -- errors ------------------------------------------------------------------------------------------
def test_error_paths_exit_codes_and_no_traceback(env, bastion, fleet):
    from tests.support import free_port

    cases = [
        ({"LABCTL_BASTION_URL": f"http://127.0.0.1:{free_port()}"}, ["get", "machines"], 3, "cannot reach the bastion"),
        ({"LABCTL_TOKEN": "wrong-token-0123456789"}, ["get", "machines"], 4, "refused the token (401"),
        ({"LABCTL_TOKEN": ""}, ["provision", "list"], 4, "labctl config set token"),
        ({}, ["describe", "machine", "nowhere"], 5, "no machine matches"),
        ({}, ["provision", "reprovision", mac_of(1), "--no-reboot"], 6, "cannot reprovision a machine that is"),
        ({}, ["get", "machines", "-o", "xml"], 2, "Invalid value"),
    ]
    for extra, args, code, needle in cases:
        p = run_sub({**env, **extra}, *args)
        assert p.returncode == code, (args, p.returncode, p.stderr)
        assert needle in p.stderr, (needle, p.stderr)
        assert "Traceback" not in p.stderr
        if code != 2:
            assert len([ln for ln in p.stderr.splitlines() if ln.startswith("labctl: error:")]) == 1
    # a web server that is not a bastion: one clear line, exit 1
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Html(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>hello</html>")

        def log_message(self, *args):
            pass

    srv = HTTPServer(("127.0.0.1", 0), Html)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        p = run_sub({**env, "LABCTL_BASTION_URL": f"http://127.0.0.1:{srv.server_address[1]}"}, "get", "machines")
    finally:
        srv.shutdown()
        srv.server_close()
    assert p.returncode == 3 and "is not a lab-platform bastion" in p.stderr and "Traceback" not in p.stderr
    p = run_sub({**env, "LABCTL_TOKEN": "wrong-token-0123456789"}, "--debug", "get", "machines")
    assert p.returncode == 4 and "Traceback" in p.stderr and "Unauthorized" in p.stderr


# -- watch -------------------------------------------------------------------------------------------
class Live:
    """A labctl subprocess whose stdout lines are collected as they come (unbuffered)."""

    def __init__(self, env: dict, *args: str):
        import threading

        self.proc = subprocess.Popen([*LABCTL, *args], env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")), daemon=True)
        self.reader.start()

    def wait_line(self, predicate, what: str) -> None:
        wait_for(lambda: any(predicate(ln) for ln in list(self.lines)) or self.proc.poll() is not None,
                 timeout=60, what=what)
        assert self.proc.poll() is None, self.proc.stderr.read()

    def finish(self, timeout: float = 30) -> tuple[int, str, str]:
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self.reader.join(10)
        return rc, "".join(self.lines), self.proc.stderr.read()


def test_get_watch_prints_changes_and_stops(env, machines):
    mac = mac_of(0x30)
    live = Live(env, "get", "machines", "--watch", "--watch-timeout", "5", "--interval", "0.2", "-o", "json")
    live.wait_line(lambda ln: ln.rstrip() == "}", "the first listing")  # its cursor is taken before it
    machines.discover(mac)
    rc, out, err = live.finish()
    assert rc == 0, err
    dec, docs, i = json.JSONDecoder(), [], 0
    while out[i:].strip():
        i += len(out[i:]) - len(out[i:].lstrip())
        doc, i = dec.raw_decode(out, i)
        docs.append(doc)
    assert "machines" in docs[0]  # the listing, then one compact line per changed machine
    assert [m["mac"] for m in docs[1:]] == [mac] and docs[1]["state"] == "discovered"
    assert all(ln.startswith('{"mac"') for ln in out.splitlines() if '"state":"discovered"' in ln)


def test_get_one_watch_table_and_interrupt(env, machines):
    """Watching one machine in a table; Ctrl-C ends it cleanly (exit 0, no traceback)."""
    import signal

    mac = mac_of(0x31)
    machines.discover(mac)
    live = Live(env, "get", "machine", mac, "-w", "--interval", "0.2")
    live.wait_line(lambda ln: mac in ln, "the first listing")
    machines.discover(mac)  # a hardware refresh is an event for this machine
    machines.discover(mac_of(0x32))  # another machine: not shown
    live.wait_line(lambda ln: mac in ln and ln is not next(x for x in live.lines if mac in x), "the change")
    live.proc.send_signal(signal.SIGINT)
    rc, out, err = live.finish(20)
    assert rc == 0, err
    assert "Traceback" not in err
    rows = [ln for ln in out.splitlines() if mac in ln]
    assert len(rows) == 2 and mac_of(0x32) not in out
    assert out.splitlines()[0].split()[:3] == ["NAME", "MAC", "STATE"] and "NAME" not in out.splitlines()[2]


# -- follow a simulated install ------------------------------------------------------------------------
def _queue(machines, bastion, mac: str, host: str) -> None:
    machines.discover(mac)
    r = machines.http.post(bastion.url + "/api/install", json={"mac": mac, "hostname": host, "role": "vanilla",
                                                               "os": "fedora-43"}, timeout=10)
    assert r.status_code == 202, r.text


def test_logs_follow_simulated_install_complete(env, machines, bastion, labctl):
    mac = mac_of(0x40)
    _queue(machines, bastion, mac, "follow-ok")
    token = machines.boot(mac)
    proc = subprocess.Popen([*LABCTL, "provision", "logs", "follow-ok", "-f"], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        for stage, pct in (("partitioning", 10), ("packages", 40), ("packages", 75), ("post-install", 90)):
            machines.progress(mac, token, stage, pct, f"{stage} going")
            machines.log(mac, token, f"anaconda: {stage} line {pct}")
            time.sleep(0.2)
        machines.progress(mac, token, "complete", 100, "all done")
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    order = ["==> pxe", "==> partitioning", "anaconda: partitioning line 10", "==> packages", "anaconda: packages line 75",
             "==> post-install", "==> complete", "installing -> installed", "follow-ok installed"]
    pos = [out.find(s) for s in order]
    assert all(p >= 0 for p in pos) and pos == sorted(pos), (pos, out)
    assert "100%" in out
    # without -f: the stored lines, all formats
    r = labctl("provision", "logs", "follow-ok", "--tail", "2")
    assert r.stdout.splitlines()[-1].endswith("anaconda: post-install line 90")
    doc = json.loads(labctl("provision", "logs", "follow-ok", "-o", "json").stdout)
    assert doc["state"] == "installed" and len(doc["lines"]) == 4
    assert yaml.safe_load(labctl("provision", "logs", "follow-ok", "-o", "yaml").stdout)["lines"] == doc["lines"]


def test_logs_follow_failed_install_exits_7(env, machines, bastion):
    mac = mac_of(0x41)
    _queue(machines, bastion, mac, "follow-bad")
    token = machines.boot(mac)
    proc = subprocess.Popen([*LABCTL, "provision", "logs", mac, "-f"], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        machines.progress(mac, token, "partitioning", 5)
        machines.progress(mac, token, "failed", None, "no disk found")
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 7, (out, err)
    assert "install ended failed" in err and "failure: no disk found" in out and "Traceback" not in err


def test_logs_follow_stall_marked_by_bastion_exits_7(env, tmp_path):
    """A bastion whose stall timeout is 2 s marks the silent install failed (stalled): the follower exits 7."""
    b = start_bastion(tmp_path / "data", workers=1, env={"LAB_BASTION_STALL_TIMEOUT": "2"})
    try:
        m = Machines(b)
        mac = mac_of(0x42)
        _queue(m, b, mac, "stalls")
        m.boot(mac)
        e = {**env, "LABCTL_BASTION_URL": b.url, "LABCTL_TOKEN": b.token}
        p = run_sub(e, "provision", "logs", "stalls", "-f", "--stall-timeout", "30", timeout=60)
        assert p.returncode == 7, (p.stdout, p.stderr)
        assert "install ended stalled" in p.stderr
    finally:
        b.stop()


def test_logs_follow_silent_stream_is_a_stall(env, machines, bastion, tmp_path):
    """A server that opens the stream and then says nothing (no heartbeat) is a stall: exit 7."""
    import socket
    import threading

    mac = mac_of(0x43)
    machines.discover(mac)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    stop = threading.Event()
    held = []

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            req = c.recv(65536).decode()
            if "/follow" in req:
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n: hello\n\n")
                held.append(c)  # then silence
            else:  # the machine list: proxy to the real bastion
                body = requests.get(bastion.url + "/api/machines", headers=bastion.headers, timeout=10).content
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
                c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        start = time.monotonic()
        p = run_sub({**env, "LABCTL_BASTION_URL": f"http://127.0.0.1:{port}"}, "provision", "logs", mac, "-f",
                    "--stall-timeout", "2", timeout=60)
        assert p.returncode == 7, (p.stdout, p.stderr)
        assert "stalled" in p.stderr and time.monotonic() - start < 30
    finally:
        stop.set()
        t.join(5)
        for c in held:
            c.close()
        srv.close()


def _install_wait(env, machines, mac: str, host: str):
    """Start `provision install --wait` for a discovered machine; return (process, install token)."""
    machines.discover(mac)
    proc = subprocess.Popen([*LABCTL, "provision", "install", mac, "--hostname", host, "--role", "worker",
                             "--os", "fedora-43", "--wait", "--timeout", "60"], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: machines.api(f"/api/machines/{mac}")[1].get("state") == "install_queued", timeout=20)
        return proc, machines.boot(mac)
    except BaseException:
        proc.kill()
        raise


def test_install_wait_shows_progress_until_installed(env, machines, bastion):
    mac = mac_of(0x44)
    proc, token = _install_wait(env, machines, mac, "waits")
    try:
        for stage, pct in (("partitioning", 10), ("packages", 50)):
            machines.progress(mac, token, stage, pct)
        machines.progress(mac, token, "complete", 100)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "queued: fedora-43 as worker" in out and "==> partitioning" in out and "==> packages" in out
    assert out.index("==> partitioning") < out.index("==> packages") < out.index("waits installed")


def test_install_wait_failure_exits_7(env, machines, bastion):
    mac = mac_of(0x45)
    proc, token = _install_wait(env, machines, mac, "waitfail")
    try:
        machines.progress(mac, token, "failed", None, "kickstart error")
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 7 and "install ended failed" in err


# -- reprovision: the API for real, the playbook through ansible-runner with a harmless local play -------
HARMLESS = """\
- name: Stand-in for reprovision.yml (runs locally, changes nothing but a file in the test dir)
  hosts: all
  connection: local
  gather_facts: false
  vars:
    ansible_python_interpreter: "{{ ansible_playbook_python }}"
  tasks:
    - name: Record what labctl passed
      ansible.builtin.copy:
        dest: "{{ out }}"
        content: "{{ {'host': inventory_hostname, 'ansible_host': ansible_host, 'mac': lab_mac, 'url': lab_bastion_url} | to_json }}"
        mode: "0600"
    - name: The collection's own module is found (check mode, changes nothing)
      lab.platform.efi_bootnext:
        mac: "{{ lab_mac }}"
      check_mode: true
    - name: An ok task
      ansible.builtin.debug:
        msg: hello
"""


def _installed(machines, bastion, mac: str, host: str) -> None:
    _queue(machines, bastion, mac, host)
    token = machines.boot(mac)
    machines.progress(mac, token, "complete", 100)


def test_reprovision_runs_the_playbook(env, machines, bastion, tmp_path):
    mac = mac_of(0x50)
    _installed(machines, bastion, mac, "repro")
    out = tmp_path / "played.json"
    book = tmp_path / "play.yml"
    book.write_text(HARMLESS.replace("{{ out }}", str(out)))
    home = tmp_path / "home"
    p = run_sub({**env, "LABCTL_HOME": str(home)}, "provision", "reprovision", "repro", "--playbook", str(book),
                "--reason", "disk swap", timeout=180)
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert json.loads(out.read_text()) == {"host": "repro", "ansible_host": "127.0.0.1", "mac": mac, "url": bastion.url}
    assert "TASK [Record what labctl passed]" in p.stdout and "changed: repro" in p.stdout and "ok: repro" in p.stdout
    assert re.search(r"ok=3 changed=1 failed=0 unreachable=0 skipped=0", p.stdout), p.stdout
    runs = sorted((home / "runs").iterdir(), key=lambda p: "-check-" not in p.name)  # the --check run first
    assert len(runs) == 2 and "-reprovision-repro-check-" in runs[0].name and "-reprovision-repro-" in runs[1].name
    assert all(list(r.glob("artifacts/*/stdout")) for r in runs)
    detail = machines.api(f"/api/machines/{mac}")[1]
    assert detail["state"] == "install_queued"
    assert detail["events"][-1]["kind"] == "reprovision" and detail["events"][-1]["reason"] == "disk swap"


def test_reprovision_failed_playbook_sets_exit_code(env, machines, bastion, tmp_path):
    mac = mac_of(0x51)
    _installed(machines, bastion, mac, "repro-fail")
    book = tmp_path / "fail.yml"
    book.write_text("- hosts: all\n  connection: local\n  gather_facts: false\n  tasks:\n"
                    "    - name: Fail on purpose\n      ansible.builtin.fail:\n        msg: efibootmgr said no\n")
    p = run_sub({**env, "LABCTL_HOME": str(tmp_path / "h")}, "provision", "reprovision", "repro-fail",
                "--playbook", str(book), timeout=180)
    assert p.returncode == 12, (p.stdout, p.stderr)  # 10 + ansible-playbook rc 2 (a host failed)
    assert "the check run of the reprovision playbook on repro-fail ended failed (ansible rc 2; failed=1" in p.stderr
    assert "failed: repro-fail: efibootmgr said no; nothing was queued" in p.stderr and "artifacts" in p.stderr
    assert machines.api(f"/api/machines/{mac}")[1]["state"] == "installed"  # the check failed: nothing was queued


def test_reprovision_no_reboot_only_queues(labctl, machines, bastion):
    mac = mac_of(0x52)
    _installed(machines, bastion, mac, "repro-q")
    r = labctl("provision", "reprovision", "repro-q", "--no-reboot", "--os", "ubuntu-26.04", "-o", "yaml")
    assert r.exit_code == 0, r.stderr
    doc = yaml.safe_load(r.stdout)
    assert doc["state"] == "install_queued" and doc["os"] == "ubuntu-26.04"


# -- makeiso -----------------------------------------------------------------------------------------
def test_makeiso_is_hybrid_el_torito_bios_and_uefi(labctl, tmp_path):
    from tests.support import need_binary

    need_binary("xorriso", "mformat", "grub-mkimage")
    iso = tmp_path / "boot.iso"
    r = labctl("provision", "makeiso", "--bastion", "http://10.1.2.3:8080", "-O", str(iso))
    assert r.exit_code == 0, r.stderr
    assert "boot entries: BIOS, UEFI" in r.stdout
    report = subprocess.run(["xorriso", "-indev", str(iso), "-report_el_torito", "plain"], capture_output=True,
                            text=True, timeout=60).stdout
    entries = re.findall(r"^El Torito boot img\s*:\s*(\d+)\s+(BIOS|UEFI)\s+y", report, re.M)
    assert sorted(p for _, p in entries) == ["BIOS", "UEFI"], report
    assert re.search(r"^El Torito img path :\s+\d+\s+/boot/grub/eltorito.img$", report, re.M)
    # the script the machine runs chains to the bastion's /dispatch with its MAC
    out = tmp_path / "x"
    subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", "/lab", str(out)],
                   capture_output=True, check=True, timeout=60)
    script = (out / "boot.ipxe").read_text()
    assert script.startswith("#!ipxe\n") and "chain --replace http://10.1.2.3:8080/dispatch?mac=${netX/mac}" in script
    assert (out / "ipxe.lkrn").read_bytes() == Path("/usr/lib/ipxe/ipxe.lkrn").read_bytes()
    # the EFI image: ipxe.efi as the removable-media loader, the script as autoexec.ipxe
    subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", "/efi.img", str(tmp_path / "efi.img")],
                   capture_output=True, check=True, timeout=60)
    listing = subprocess.run(["mdir", "-i", str(tmp_path / "efi.img"), "-/", "-b", "::/"], capture_output=True,
                             text=True, check=True).stdout
    assert "::/EFI/BOOT/BOOTX64.EFI" in listing and "::/autoexec.ipxe" in listing
    doc = json.loads(labctl("provision", "makeiso", "--bastion", "http://10.1.2.3:8080/", "-O", str(iso), "-o", "json").stdout)
    assert doc == {"file": str(iso), "bytes": iso.stat().st_size, "boot_entries": ["BIOS", "UEFI"],
                   "dispatch": "http://10.1.2.3:8080/dispatch"}
    # a URL that could inject into the script is refused before anything is built
    r = labctl("provision", "makeiso", "--bastion", "http://x/\n#!ipxe", "-O", str(tmp_path / "bad.iso"))
    assert r.exit_code == 2 and not (tmp_path / "bad.iso").exists()


# -- doctor -----------------------------------------------------------------------------------------
def test_serve_records_how_it_was_started(bastion):
    """`lab-bastion serve --no-dnsmasq --syslog-port N` writes its effective settings to serve.json."""
    path = bastion.data_dir / "serve.json"
    assert path.stat().st_mode & 0o777 == 0o644
    doc = json.loads(path.read_text())
    port = int(bastion.extra_args[bastion.extra_args.index("--syslog-port") + 1])
    assert doc["pid"] == bastion.proc.pid
    assert doc["settings"]["dnsmasq"] is False and doc["settings"]["syslog_port"] == port
    assert doc["settings"]["listen"] == "127.0.0.1:" + bastion.url.rsplit(":", 1)[1]
    assert doc["base_url"] and "extra" not in doc["settings"] and bastion.token not in path.read_text()


def test_doctor_follows_how_serve_was_started(labctl, bastion, env):
    """serve runs without dnsmasq and with its own syslog port; nothing in bastion.yaml says so,
    and doctor reports no false failure: it reads serve.json."""
    assert not (bastion.data_dir / "bastion.yaml").exists()
    port = bastion.extra_args[bastion.extra_args.index("--syslog-port") + 1]
    r = labctl("doctor", "--data-dir", str(bastion.data_dir), "--skip", "dhcp", "-o", "json")
    assert r.exit_code == 8, r.stderr  # no TFTP root and no discovery image in a bare data dir
    doc = json.loads(r.stdout)
    status = {c["name"]: c["status"] for c in doc["checks"]}
    http_port = bastion.url.rsplit(":", 1)[1]
    # serve listens on 127.0.0.1; if it tells machines another address, doctor warns that they cannot reach it
    told = json.loads((bastion.data_dir / "serve.json").read_text())["base_url"]
    loopback = told.startswith("http://127.")
    assert status == {
        "bastion": "pass", "token": "pass", "serve": "pass" if loopback else "warn", "dnsmasq": "skip",
        "port 67/udp": "skip" if status["port 67/udp"] == "skip" else "pass",
        "port 69/udp": "skip" if status["port 69/udp"] == "skip" else "pass",
        f"port {http_port}/tcp": "pass", f"port {port}/udp": "pass",
        "tftp files": "fail", "secure boot": "skip", "artefacts discovery": "fail", "artefacts fedora-43": "warn",
        "artefacts ubuntu-26.04": "warn", "artefacts local-boot": "warn", "artefacts installer": "warn",
        "artefacts debian-12": "warn", "artefacts debian-13": "warn",
        "install binding": "warn",  # no dnsmasq here: the first address binds an install
    }
    serve = next(c for c in doc["checks"] if c["name"] == "serve")
    assert f"syslog {port}/udp+tcp, dnsmasq off, machines use {told}" in serve["detail"] and doc["not_checked"] == []
    assert loopback or "listens on 127.0.0.1 only, but machines are told" in serve["hint"]
    assert "2 check(s) failed: tftp files, artefacts discovery" in r.stderr
    r = labctl("doctor", "--data-dir", str(bastion.data_dir), "--skip", "dhcp")
    assert "..." not in r.stdout and "hint: lab-bastion images build-discovery --data-dir " in r.stdout
    r = labctl("doctor", "--only", "bastion", "--only", "token", extra_env={"LABCTL_TOKEN": "bad-token-0123456789"})
    assert r.exit_code == 8
    assert "PASS  bastion" in r.stdout and "FAIL  token" in r.stdout and "hint: set the operator token" in r.stdout


def test_doctor_without_a_data_dir_says_what_it_did_not_check(labctl, bastion, tmp_path, monkeypatch):
    from labctl import doctor

    monkeypatch.setattr(doctor, "DEFAULT_DATA_DIR", str(tmp_path / "nothing-here"))
    r = labctl("doctor", "--skip", "dhcp", extra_env={"LAB_BASTION_DATA_DIR": ""})
    assert r.exit_code == 0, r.stderr  # nothing failed ...
    lines = r.stdout.splitlines()
    assert [ln.split()[0] for ln in lines[:2]] == ["PASS", "PASS"]  # bastion and token, which it did check
    for name in ("serve", "dnsmasq", "ports", "tftp", "artefacts", "binding"):  # ... but nothing local passed either
        assert f"SKIP  {name}: not checked" in r.stdout
        assert f"PASS  {name}" not in r.stdout
    assert f"no --data-dir given and the default {tmp_path / 'nothing-here'} is not a bastion data directory" in r.stdout
    assert "hint: pass --data-dir DIR" in r.stdout
    assert lines[-1] == ("2 passed, 0 warning(s), 0 failed, 6 skipped; "
                         "NOT checked: serve, dnsmasq, ports, tftp, artefacts, binding")
    doc = json.loads(labctl("doctor", "--skip", "dhcp", "-o", "json", extra_env={"LAB_BASTION_DATA_DIR": ""}).stdout)
    assert doc["not_checked"] == ["serve", "dnsmasq", "ports", "tftp", "artefacts", "binding"]


def test_doctor_knows_a_stopped_serve_and_a_data_dir_from_before_serve_json(labctl, tmp_path):
    b = start_bastion(tmp_path / "data", "--syslog-port", "5599", workers=1)
    b.stop()
    r = labctl("doctor", "--data-dir", str(b.data_dir), "--only", "serve", "-o", "json")
    assert r.exit_code == 8
    (serve,) = json.loads(r.stdout)["checks"]
    assert serve["status"] == "fail" and "lab-bastion serve is not running on" in serve["detail"]
    assert "syslog 5599/udp+tcp, dnsmasq off" in serve["detail"]
    assert serve["hint"] == f"start it: systemctl start lab-bastion, or lab-bastion serve --data-dir {b.data_dir}"
    (b.data_dir / "serve.json").unlink()  # as a bastion that last started before serve wrote it
    r = labctl("doctor", "--data-dir", str(b.data_dir), "--only", "serve", "-o", "json")
    (serve,) = json.loads(r.stdout)["checks"]
    assert r.exit_code == 0 and serve["status"] == "warn" and "checking against bastion.yaml" in serve["detail"]


def test_logs_follow_resumes_after_a_dropped_connection(env, machines, bastion):
    """A proxy cuts the first follow connection after the first log line; labctl reconnects with
    Last-Event-ID and shows every line exactly once."""
    import socket
    import threading

    mac = mac_of(0x46)
    _queue(machines, bastion, mac, "resumes")
    token = machines.boot(mac)
    machines.log(mac, token, "line-A")
    upstream = int(bastion.url.rsplit(":", 1)[1])
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    requests_seen: list[str] = []
    state = {"cut": False}

    def pump(src, dst, conn: dict, upward: bool):
        """Copy src to dst; requests going up are recorded; the answer to the first follow request
        is cut right after its first log event."""
        try:
            while data := src.recv(65536):
                if upward and data[:4] in (b"GET ", b"POST"):
                    requests_seen.append(data.decode(errors="replace"))
                    conn["follow"] = b"/follow" in data.split(b"\r\n", 1)[0]
                dst.sendall(data)
                if not upward and conn.get("follow") and b"event: log" in data and not state["cut"]:
                    state["cut"] = True
                    break
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def serve():
        while True:
            try:
                c, _ = lsock.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", upstream))
            conn: dict = {}
            threading.Thread(target=pump, args=(c, u, conn, True), daemon=True).start()
            threading.Thread(target=pump, args=(u, c, conn, False), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    proc = subprocess.Popen([*LABCTL, "provision", "logs", mac, "-f"],
                            env={**os.environ, **env, "LABCTL_BASTION_URL": f"http://127.0.0.1:{lsock.getsockname()[1]}"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: state["cut"], timeout=30, what="the proxy to cut the stream")
        machines.log(mac, token, "line-B")
        machines.progress(mac, token, "complete", 100, "done")
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        lsock.close()
    assert proc.returncode == 0, (out, err)
    follows = [r for r in requests_seen if "/follow" in r.split("\r\n", 1)[0]]
    assert len(follows) >= 2 and "last-event-id:" not in follows[0].lower()
    assert re.search(r"(?im)^last-event-id: \d+-\d+\r?$", follows[1]), follows[1]
    assert out.count("line-A") == 1 and out.count("line-B") == 1 and "resumes installed" in out
