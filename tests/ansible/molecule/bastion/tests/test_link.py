"""The bastion joined to labd by role lab.platform.bastion (bastion_labd_url and a one-use join
token): its link identity is its own and private, and labd sees it online with its machines
(pytest-testinfra)."""

import json

from labd_probe import LOGIN

PROBE = LOGIN + r"""
deadline = time.monotonic() + 120
while True:  # the one bastion there is: this VM's, joined at converge
    bs = call("/api/v1/bastions", token=token)["bastions"]
    if len(bs) == 1 and bs[0]["status"] == "online" and bs[0].get("last_seen_at"):
        break
    assert time.monotonic() < deadline, bs
    time.sleep(1)
b = bs[0]
print(json.dumps({"name": b["name"], "status": b["status"], "version": bool(b.get("version"))}))
"""


def test_link_identity_is_the_bastions_own(host):
    d = host.file("/var/lib/lab-bastion/link")
    assert d.is_directory and d.user == "lab-bastion" and d.mode == 0o700
    key = host.file("/var/lib/lab-bastion/link/key.pem")
    assert key.exists and key.user == "lab-bastion" and key.mode == 0o600


def test_labd_sees_the_bastion_online(host):
    r = host.run("python3 -c %s /var/lib/labd/admin-password", PROBE)
    assert r.rc == 0, r.stdout + r.stderr
    got = json.loads(r.stdout)
    assert got["name"] == "labvm-bastion" and got["status"] == "online" and got["version"], got


def test_the_bastion_serves_lab_agents_wheels(host):
    """Role bastion ran `lab-bastion images agent-wheels` (bastion_agent_wheels): lab-platform's wheel
    and pip's (from Debian's python3-pip-whl: this Python has no ensurepip copy of its own)."""
    d = host.file("/var/lib/lab-bastion/images")
    assert d.is_directory and d.user == "lab-bastion"
    names = host.run("ls /var/lib/lab-bastion/images/lab-agent").stdout.split()
    assert any(n.startswith("lab_platform-") for n in names), names
    assert any(n.startswith("pip-") and n.endswith(".whl") for n in names), names
