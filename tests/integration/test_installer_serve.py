"""The installer content from a real `lab-bastion serve` (gunicorn gthread workers):

- a Fedora install driven by the served kickstart's own scripts, run for real with the real
  curl: %pre-install reports "packages", the final %post reports "complete" and the machine is
  installed; %onerror on another machine marks it failed;
- the same for Ubuntu through the autoinstall's late-commands;
- boot artefacts: full download (sendfile), Range, ETag/304, HEAD, and what is never served.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess

import pytest
import requests
import yaml

from tests.support import KEY, need_binary, script, start_bastion

MAC_F = "52:54:00:ee:00:01"
MAC_U = "52:54:00:ee:00:02"
MAC_X = "52:54:00:ee:00:03"


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    data = tmp_path_factory.mktemp("installer") / "data"
    (data / "images" / "fedora-43" / "tree" / "images").mkdir(parents=True)
    blob = os.urandom(8 * 1024 * 1024 + 123)
    (data / "images" / "fedora-43" / "vmlinuz").write_bytes(blob)
    (data / "images" / "fedora-43" / "vmlinuz.part").write_bytes(b"partial")
    (data / "images" / "fedora-43" / "tree" / "images" / "install.img").write_bytes(blob[:4096])
    b = start_bastion(data)
    b.blob = blob
    yield b
    b.stop()


def queue(b, mac, os_name, hostname):
    s = b.session()
    assert s.post(b.url + "/api/discover", json={"mac": mac}).status_code == 200
    r = s.post(b.url + "/api/install", json={"mac": mac, "hostname": hostname, "role": "worker", "os": os_name,
                                             "disk": "", "ssh_keys": [KEY]})
    assert r.status_code == 202, r.text
    ipxe = requests.get(f"{b.url}/dispatch?mac={mac}", timeout=10).text
    return re.search(r"token=([A-Za-z0-9_-]+)", ipxe).group(1)


def state(b, mac):
    return b.session().get(f"{b.url}/api/machines/{mac}").json()


def run(body: str) -> subprocess.CompletedProcess:
    need_binary("bash", "curl")
    return subprocess.run(["bash", "-c", body], capture_output=True, text=True, timeout=60)


def test_fedora_install_reports_through_its_own_scripts(bastion):
    token = queue(bastion, MAC_F, "fedora-43", "ks-node")
    r = requests.get(f"{bastion.url}/ks", params={"mac": MAC_F, "token": token}, timeout=10)
    assert r.status_code == 200
    ks = r.text
    assert state(bastion, MAC_F)["state"] == "installing"
    assert run(script(ks, "pre-install")).returncode == 0
    m = state(bastion, MAC_F)
    assert (m["state"], m["stage"], m["message"]) == ("installing", "packages", "installing packages")
    assert run(script(ks, "post", chroot=False)).returncode == 0
    m = state(bastion, MAC_F)
    assert m["state"] == "installed" and m["percent"] == 100
    # the token is spent: the kickstart is no longer served
    assert requests.get(f"{bastion.url}/ks", params={"mac": MAC_F, "token": token}, timeout=10).status_code == 403


def test_fedora_onerror_marks_the_install_failed(bastion):
    token = queue(bastion, MAC_X, "fedora-43", "ks-fail")
    ks = requests.get(f"{bastion.url}/ks", params={"mac": MAC_X, "token": token}, timeout=10).text
    assert run(script(ks, "onerror")).returncode == 0
    m = state(bastion, MAC_X)
    assert m["state"] == "failed" and "installer error" in m["failure"]


def test_ubuntu_late_commands_complete_the_install(bastion, tmp_path):
    token = queue(bastion, MAC_U, "ubuntu-26.04", "ai-node")
    base = f"{bastion.url}/autoinstall/{MAC_U}/{token}/"
    doc = yaml.safe_load(requests.get(base + "user-data", timeout=10).text)
    assert yaml.safe_load(requests.get(base + "meta-data", timeout=10).text)["local-hostname"] == "ai-node"
    late = doc["autoinstall"]["late-commands"][0][2]
    # run only the reporting part against the live bastion: the progress helper + the last line
    helper = late[: late.index("LAB_ROOT=/target")]
    assert run(helper + 'lab_progress post-install 90 "post-install: test"\nlab_progress complete 100 "done"\n').returncode == 0
    assert state(bastion, MAC_U)["state"] == "installed"


def test_artefact_full_download_range_and_etag(bastion):
    url = f"{bastion.url}/images/fedora-43/vmlinuz"
    r = requests.get(url + "?token=ignored", timeout=30)
    assert r.status_code == 200 and r.content == bastion.blob
    assert r.headers["Accept-Ranges"] == "bytes" and r.headers["Content-Length"] == str(len(bastion.blob))
    etag = r.headers["ETag"]
    assert requests.get(url, headers={"If-None-Match": etag}, timeout=10).status_code == 304
    part = requests.get(url, headers={"Range": "bytes=1000-1999"}, timeout=10)
    assert part.status_code == 206 and part.content == bastion.blob[1000:2000]
    assert part.headers["Content-Range"] == f"bytes 1000-1999/{len(bastion.blob)}"
    tail = requests.get(url, headers={"Range": f"bytes={len(bastion.blob) - 10}-"}, timeout=10)
    assert tail.status_code == 206 and tail.content == bastion.blob[-10:]
    assert requests.get(url, headers={"Range": f"bytes={len(bastion.blob) + 5}-"}, timeout=10).status_code == 416
    head = requests.head(url, timeout=10)
    assert head.status_code == 200 and head.headers["Content-Length"] == str(len(bastion.blob))
    stage2 = requests.get(f"{bastion.url}/images/fedora-43/tree/images/install.img", timeout=10)
    assert hashlib.sha256(stage2.content).digest() == hashlib.sha256(bastion.blob[:4096]).digest()


@pytest.mark.parametrize("path", ["fedora-43/vmlinuz.part", "fedora-43", "nothing/here", "../token", "..%2ftoken",
                                  "fedora-43/../../state.db", ".hidden"])
def test_artefacts_never_served(bastion, path):
    r = requests.get(f"{bastion.url}/images/{path}", timeout=10)
    assert r.status_code == 404
    assert r.headers["Content-Type"].startswith("application/json")
