"""labctl as kubectl users expect it, against two real `lab-bastion serve` processes: named contexts
(`config set-context`, `use-context`, `--context`, LABCTL_CONTEXT), "No machines found.",
`--ignore-not-found`, `-l key=value` selectors, and a URL that is not a bastion said to be one.

Every command is typed as a user would (the real click command tree, its stdout, stderr and exit
code); the console script itself runs where its exit status matters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import requests
import yaml
from click.testing import CliRunner

from labctl.main import cli
from tests.support import Machines, start_bastion

MAC_A, MAC_B, MAC_C = "52:54:00:c7:00:01", "52:54:00:c7:00:02", "52:54:00:c7:00:03"


@pytest.fixture(scope="module")
def second(tmp_path_factory):
    b = start_bastion(tmp_path_factory.mktemp("bastion2") / "data", workers=1)
    yield b
    b.stop()


@pytest.fixture
def home(tmp_path):
    """A user with no labctl settings at all: no LABCTL_* variable, an empty ~/.labctl."""
    return {"LABCTL_HOME": str(tmp_path), "LABCTL_CONFIG": str(tmp_path / "config.yaml"), "LABCTL_BASTION_URL": "",
            "LABCTL_TOKEN": "", "LABCTL_OUTPUT": "", "LABCTL_CONTEXT": "", "LABCTL_LABD_URL": ""}


def labctl(env: dict, *args: str):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def macs(result) -> set[str]:
    assert result.exit_code == 0, result.stderr
    return {m["mac"] for m in json.loads(result.stdout)["machines"]}


@pytest.fixture(scope="module")
def fleet(bastion):
    """On the first bastion: A worker/fedora (queued), B infra/ubuntu (queued), C discovered."""
    m = Machines(bastion)
    for mac in (MAC_A, MAC_B, MAC_C):
        m.discover(mac)
    for mac, host, role, os_name in ((MAC_A, "ctx-a", "worker", "fedora-43"), (MAC_B, "ctx-b", "infra", "ubuntu-26.04")):
        r = m.http.post(bastion.url + "/api/install", json={"mac": mac, "hostname": host, "role": role, "os": os_name},
                        timeout=10)
        assert r.status_code == 202, r.text
    return m


def test_contexts_name_several_bastions_and_switch_between_them(home, bastion, second, fleet):
    r = labctl(home, "config", "set-context", "lab1", "--bastion", bastion.url, "--token", bastion.token)
    assert r.exit_code == 0 and r.stdout.startswith('Context "lab1" created in '), r.stderr
    r = labctl(home, "config", "set-context", "lab2", "--bastion", second.url, "--token", second.token, "--use")
    assert r.exit_code == 0 and "and made current" in r.stdout
    cfg = home["LABCTL_CONFIG"]
    assert os.stat(cfg).st_mode & 0o777 == 0o600
    assert yaml.safe_load(open(cfg))["current-context"] == "lab2"

    assert macs(labctl(home, "get", "machines", "-o", "json")) == set()  # lab2: nothing discovered there
    assert {MAC_A, MAC_B, MAC_C} <= macs(labctl(home, "--context", "lab1", "get", "machines", "-o", "json"))
    r = labctl(home, "config", "use-context", "lab1")
    assert r.exit_code == 0 and r.stdout == 'Switched to context "lab1".\n'
    assert labctl(home, "config", "current-context").stdout == "lab1\n"
    assert {MAC_A, MAC_B} <= macs(labctl(home, "get", "machines", "-o", "json"))
    assert macs(labctl({**home, "LABCTL_CONTEXT": "lab2"}, "get", "machines", "-o", "json")) == set()
    # a flag still beats the context
    assert macs(labctl(home, "--bastion", second.url, "--token", second.token, "get", "machines", "-o", "json")) == set()

    r = labctl(home, "config", "get-contexts")
    rows = [ln.split() for ln in r.stdout.splitlines()]
    assert rows[0] == ["CURRENT", "NAME", "BASTION", "LABD", "TOKEN"]
    assert rows[1] == ["*", "lab1", bastion.url, "-", "set"] and rows[2] == ["-", "lab2", second.url, "-", "set"]
    assert second.token not in r.stdout
    doc = json.loads(labctl(home, "config", "get-contexts", "-o", "json").stdout)
    assert doc["current-context"] == "lab1" and [c["name"] for c in doc["contexts"]] == ["lab1", "lab2"]

    # `config set` changes the current context; `config list` says which context applies
    assert labctl(home, "config", "set", "output", "yaml").stdout.startswith("output set in context lab1 in ")
    r = labctl(home, "config", "list", "-o", "json")
    listing = json.loads(r.stdout)
    assert listing["context"] == "lab1" and listing["bastionUrl"] == bastion.url
    assert yaml.safe_load(labctl(home, "config", "list").stdout)["output"] == "yaml"  # the context's output applies
    r = labctl(home, "--context", "lab2", "config", "list", "-o", "table")
    rows = {ln.split()[0]: ln.split()[1:] for ln in r.stdout.splitlines()}
    assert rows["context"] == ["lab2", "--context"]
    assert rows["bastionUrl"][0] == second.url and rows["bastionUrl"][1:3] == ["context", "lab2"]


def test_unknown_context_and_labd_only_context_are_clear_errors(home, bastion):
    assert labctl(home, "config", "set-context", "lab1", "--bastion", bastion.url, "--token", bastion.token).exit_code == 0
    for args in (["--context", "nope", "get", "machines"], ["config", "use-context", "nope"]):
        r = labctl(home, *args)
        assert r.exit_code == 2, (args, r.stderr)
        assert "no context named 'nope'" in r.stderr and "(known: lab1)" in r.stderr
        assert "hint: create it: labctl config set-context nope --bastion URL --token TOKEN" in r.stderr
    r = labctl(home, "--context", "bad\nname", "get", "machines")
    assert r.exit_code == 2 and "invalid context name" in r.stderr
    assert labctl(home, "config", "current-context").exit_code == 2
    # a context that names only a labd says so for machines (a bastion's) instead of trying 127.0.0.1
    assert labctl(home, "config", "set-context", "central", "--labd", "https://labd.example:8443", "--use").exit_code == 0
    r = labctl(home, "get", "machines")
    assert r.exit_code == 2 and "context central names a labd (https://labd.example:8443)" in r.stderr
    r = labctl(home, "config", "delete-context", "central")
    assert r.exit_code == 0 and labctl(home, "config", "current-context").exit_code == 2
    assert labctl(home, "--context", "lab1", "get", "machines", "-o", "json").exit_code == 0


def test_empty_list_says_no_machines_found(home, second):
    env = {**home, "LABCTL_BASTION_URL": second.url, "LABCTL_TOKEN": second.token}
    for args in (["get", "machines"], ["provision", "list"], ["get", "machines", "-o", "wide"]):
        r = labctl(env, *args)
        assert r.exit_code == 0 and r.stdout == "" and r.stderr == "No machines found.\n", args
    assert json.loads(labctl(env, "get", "machines", "-o", "json").stdout) == {"machines": []}


def test_selectors_on_get(home, bastion, fleet):
    env = {**home, "LABCTL_BASTION_URL": bastion.url, "LABCTL_TOKEN": bastion.token}
    mine = {MAC_A, MAC_B, MAC_C}
    assert macs(labctl(env, "get", "machines", "-l", "role=worker", "-o", "json")) & mine == {MAC_A}
    assert macs(labctl(env, "get", "machines", "-l", "role=infra,os=ubuntu-26.04", "-o", "json")) & mine == {MAC_B}
    assert macs(labctl(env, "get", "machines", "-l", "state=install_queued", "-l", "os!=ubuntu-26.04",
                       "-o", "json")) & mine == {MAC_A}
    assert macs(labctl(env, "get", "machines", "-l", "hostname==ctx-b", "-o", "json")) == {MAC_B}
    assert macs(labctl(env, "provision", "list", "-l", f"mac={MAC_C}", "-o", "json")) == {MAC_C}
    assert mine <= macs(labctl(env, "get", "machines", "-l", "firmware=uefi", "-o", "json"))
    r = labctl(env, "get", "machines", "-l", "role=nobody")
    assert r.exit_code == 0 and r.stderr == "No machines found.\n"
    table = labctl(env, "get", "machines", "-l", "role=worker,hostname=ctx-a").stdout.splitlines()
    assert len(table) == 2 and table[1].split()[0] == "ctx-a"
    for bad, needle in (("colour=blue", "cannot select on 'colour'"), ("role", "invalid selector 'role'"),
                        ("role=", "invalid selector 'role='")):
        r = labctl(env, "get", "machines", "-l", bad)
        assert r.exit_code == 2 and needle in r.stderr, (bad, r.stderr)
    r = labctl(env, "get", "machines", "ctx-a", "-l", "role=worker")
    assert r.exit_code == 2 and "not both" in r.stderr


def test_delete_and_forget_ignore_not_found(home, bastion, fleet):
    env = {**home, "LABCTL_BASTION_URL": bastion.url, "LABCTL_TOKEN": bastion.token}
    r = labctl(env, "delete", "machine", "no-such-host")
    assert r.exit_code == 5 and "no machine matches 'no-such-host'" in r.stderr
    for args in (["delete", "machine", "no-such-host"], ["provision", "forget", "52:54:00:ff:ff:fe"]):
        r = labctl(env, *args, "--ignore-not-found")
        assert r.exit_code == 0 and r.stdout == "" and r.stderr == "", args
    fleet.discover("52:54:00:c7:00:09")
    r = labctl(env, "delete", "machine", "52:54:00:c7:00:09", "--ignore-not-found")
    assert r.exit_code == 0 and "deleted" in r.stdout
    assert labctl(env, "delete", "machine", "52:54:00:c7:00:09", "--ignore-not-found").exit_code == 0
    assert requests.get(f"{bastion.url}/api/machines/52:54:00:c7:00:09", headers=bastion.headers, timeout=10).status_code == 404


class _NotABastion(BaseHTTPRequestHandler):
    """A web server that is something else: HTML at /, another JSON API under /api."""

    def do_GET(self):  # noqa: N802 - http.server API
        if self.path.startswith("/api/"):
            body, ctype, code = b'{"message": "no such route", "status": 404}', "application/json", 404
        elif self.path.startswith("/healthz"):
            body, ctype, code = b'{"ok": true}', "application/json", 200
        else:
            body, ctype, code = b"<html>welcome</html>", "text/html", 200
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_DELETE = do_GET

    def log_message(self, *args):
        pass


class _ListsSomethingElse(_NotABastion):
    def do_GET(self):  # noqa: N802 - http.server API
        body = b'{"items": []}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.parametrize("handler", [_NotABastion, _ListsSomethingElse])
def test_a_url_that_is_not_a_bastion_is_called_that(home, handler):
    srv = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    env = {**home, "LABCTL_BASTION_URL": url, "LABCTL_TOKEN": "some-token-0123456789"}
    try:
        for args in (["get", "machines"], ["delete", "machine", "node1", "--ignore-not-found"],
                     ["describe", "machine", "node1"]):
            p = subprocess.run([sys.executable, "-m", "labctl.main", *args], env={**os.environ, **env},
                               capture_output=True, text=True, timeout=60)
            assert p.returncode == 3, (args, p.returncode, p.stderr)
            assert f"labctl: error: {url} is not a lab-platform bastion: GET /api/machines" in p.stderr, p.stderr
            assert " answered " in p.stderr, p.stderr
            assert "hint: check the URL: labctl config get bastionUrl" in p.stderr and "Traceback" not in p.stderr
    finally:
        srv.shutdown()
        srv.server_close()


def test_context_names_complete_in_the_shell(home, bastion, second):
    for name, b in (("lab1", bastion), ("lab2", second), ("other", bastion)):
        assert labctl(home, "config", "set-context", name, "--bastion", b.url).exit_code == 0
    for words, cword in (("labctl config use-context la", "3"), ("labctl --context la", "2")):
        p = subprocess.run([sys.executable, "-m", "labctl.main"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, **home, "COMP_WORDS": words, "COMP_CWORD": cword,
                                "_LABCTL_COMPLETE": "bash_complete"})
        assert p.stdout.split() == ["plain,lab1", "plain,lab2"], (words, p.stdout, p.stderr)
