"""The served kickstarts: every role x fresh/reprovision x disk given/auto passes the real
`ksvalidator -v F43` (with the %pre-generated partitioning spliced in, for both paths), and the
role sections, SSH, logging and the seed's known issues are checked on the parsed kickstart."""

from __future__ import annotations

import subprocess

import pytest

from bastion_app.images.sync import DEFAULT_MANIFEST
from bastion_app.installers import debug_kickstart, debug_setup_script, discovery_kickstart, kickstart
from tests.support import (
    KEY,
    MAC,
    NVME_PARTS,
    TOKEN,
    FakeMachine,
    install_params,
    script,
    sections,
    validate_f43,
)

ROLES = ["vanilla", "worker", "infra", "labcontroller"]
BASE = "http://10.0.0.1:8080"


def render(role="worker", disk=""):
    return kickstart(install_params(role, disk), base=BASE, syslog_port=5514, manifest=DEFAULT_MANIFEST)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("mode", ["fresh", "reprovision"])
@pytest.mark.parametrize("disk", ["", "/dev/nvme0n1"])
def test_ksvalidator_f43_every_combination(tmp_path, role, mode, disk):
    text = render(role, disk)
    if mode == "fresh":  # the served text is the same for both modes
        validate_f43(tmp_path, text, "served.ks")  # as served (%include not followed)
    fm = FakeMachine(tmp_path / "m")
    fm.disk("nvme0n1", tran="nvme", parts=NVME_PARTS)
    if mode == "reprovision":
        fm.labvg("/dev/nvme0n1p3", ["swap", "root", "var", "varlog", "home", "srv", "longhorn", "rancher"])
    res = fm.run(script(text, "pre"))
    assert res.returncode == 0, res.stderr
    assert f"{mode} install on /dev/nvme0n1" in fm.include
    validate_f43(tmp_path, text.replace("%include /tmp/part-include\n", fm.include), "installed.ks")


@pytest.mark.parametrize("role", ROLES)
def test_common_sections(role):
    text = render(role)
    h = sections(text)
    assert h.network.network[0].hostname == "node1" and h.network.network[0].device == "bootif"
    assert (h.logging.host, h.logging.port) == ("10.0.0.1", "5514")
    assert h.rootpw.lock
    admin = h.user.userList[0]
    assert admin.name == "admin" and "wheel" in admin.groups and admin.lock
    assert {(k.username, k.key) for k in h.sshkey.sshUserList} == {("root", KEY), ("admin", KEY)}
    assert h.selinux.selinux == 1  # enforcing
    assert h.reboot.action
    assert h.url.mirrorlist.startswith("https://mirrors.fedoraproject.org/mirrorlist?repo=fedora-43")
    assert [r.name for r in h.repo.repoList] == ["updates"]
    post = script(text, "post")
    assert "PasswordAuthentication no" in post and "PermitRootLogin prohibit-password" in post
    assert "admin ALL=(ALL) NOPASSWD: ALL" in post
    assert "kernel.sysrq = 1" in post
    assert "tmpfs /tmp tmpfs defaults,mode=1777,nosuid,nodev,size=4G 0 0" in post
    assert "efibootmgr -o" in post
    assert "%include /tmp/part-include" in text
    pkgs = h.packages.packageList
    assert {"chrony", "openssh-server", "efibootmgr", "curl"} <= set(pkgs)


@pytest.mark.parametrize("role", ["worker", "infra", "labcontroller"])
def test_k3s_roles(role):
    text = render(role)
    h = sections(text)
    post = script(text, "post")
    assert "br_netfilter\noverlay\n" in post
    for line in ("net.ipv4.ip_forward = 1", "fs.inotify.max_user_watches = 524288",
                 "fs.inotify.max_user_instances = 8192", "net.bridge.bridge-nf-call-iptables = 1"):
        assert line in post
    assert "LAB_FIREWALL_UNIT=firewalld.service" in post and "systemctl mask \"$LAB_FIREWALL_UNIT\"" in post
    assert not h.firewall.enabled
    assert "firewalld" in h.services.disabled and "chronyd" in h.services.enabled
    assert {"container-selinux", "iptables-nft"} <= set(h.packages.packageList)
    assert "/images/k3s/k3s" in post


def test_vanilla_is_chronyd_only():
    text = render("vanilla")
    h = sections(text)
    post = script(text, "post")
    assert "LAB_TIME_UNIT=chronyd.service" in post and "systemctl enable \"$LAB_TIME_UNIT\"" in post
    for k3s_only in ("br_netfilter", "ip_forward", "inotify", "systemctl mask", "k3s"):
        assert k3s_only not in post, k3s_only
    assert h.firewall.enabled and "container-selinux" not in h.packages.packageList


def test_stages_and_onerror():
    text = render()
    assert "lab_progress partitioning" in script(text, "pre")
    assert "lab_progress packages" in script(text, "pre-install")
    post = script(text, "post")
    assert post.count("lab_progress post-install") >= 3
    assert "lab_progress_final complete 100" in script(text, "post", chroot=False)
    assert "lab_progress failed" in script(text, "onerror")


def test_no_known_issue_regressions():
    """Seed "What is NOT in the kickstart": no console=ttyS0, no background tail -f."""
    served = [render(r, d) for r in ROLES for d in ("", "/dev/sda")]
    served += [debug_kickstart(base=BASE, ssh_keys=[KEY]), discovery_kickstart(base=BASE, action="poweroff"),
               debug_setup_script(base=BASE, port=4444)]
    from bastion_app.render import TEMPLATES

    served += [p.read_text() for p in (TEMPLATES / "ipxe").glob("*.j2")]
    served += [p.read_text() for p in (TEMPLATES / "image").glob("*.j2")]
    for text in served:
        assert "ttyS" not in text
        assert "tail -f" not in text and "tail -F" not in text


def test_debug_ks_is_rescue_with_ssh_keys(tmp_path):
    text = debug_kickstart(base=BASE, ssh_keys=[KEY])
    validate_f43(tmp_path, text)
    h = sections(text)
    assert h.rescue.rescue
    assert [(u.username, u.password, u.sshkey) for u in h.sshpw.sshUserList] == [("root", KEY, True)]
    assert not h.scripts  # %pre and %post do not run in rescue mode: none are served
    assert f"curl -sf {BASE}/debug-setup.sh | bash" in text
    locked = sections(debug_kickstart(base=BASE, ssh_keys=[]))
    assert locked.sshpw.sshUserList[0].lock


def test_debug_setup_script_listens_for_the_bastion_only(tmp_path):
    text = debug_setup_script(base=BASE, port=4444)
    assert "--allow \"$LAB_BASTION\"" in text and "LAB_BASTION=10.0.0.1" in text and "LAB_PORT=4444" in text
    res = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("action", ["poweroff", "reboot"])
def test_discover_ks(tmp_path, action):
    text = discovery_kickstart(base=BASE, action=action)
    validate_f43(tmp_path, text)
    pre = script(text, "pre")
    assert "discover_json" in pre and "/api/discover" in pre
    assert f"LAB_ACTION={action}" in pre
    res = subprocess.run(["bash", "-n"], input=pre, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_discover_ks_inventory_matches_api_schema(tmp_path):
    """Run the discovery %pre's inventory for real on this host (curl/poweroff shimmed) and check
    the body against the /api/discover request model."""
    from labcore.schemas import DiscoverRequest

    text = discovery_kickstart(base=BASE, action="poweroff")
    pre = script(text, "pre")
    fm = FakeMachine(tmp_path)
    fm.shim("curl", "#!/bin/bash\nfor a; do case $a in @*) cp \"${a#@}\" \"$FAKE/body.json\";; esac; done\n")
    for name in ("poweroff", "reboot", "sleep"):
        fm.shim(name, "#!/bin/bash\necho \"$0 $*\" >> \"$FAKE/power.log\"\nexit 0\n")
    res = fm.run(pre.replace("$(cat /proc/cmdline)", "BOOTIF=01-52-54-00-12-34-56"))
    assert res.returncode == 0, res.stderr
    body = DiscoverRequest.model_validate_json((tmp_path / "body.json").read_text())
    assert body.mac == MAC and body.hardware.memory_mb > 0
    assert "poweroff -f" in (tmp_path / "power.log").read_text()


def test_token_and_mac_in_every_callback():
    text = render()
    assert f'LAB_ID_JSON=\'"mac":"{MAC}","token":"{TOKEN}"\'' in text
