"""End to end: the image deploy of debian-12 on real QEMU machines (TCG), BIOS and UEFI, from
power-on to SSH and Ansible, then a reset, a reprovision that keeps /home and /srv, and the
failures that must stop before anything is written.

Two machines are installed at once (one CPU each: the host has two), and every later check uses
them: the install, the local boot after a reset, the inventory, a role applied twice and the
reprovision share one installed disk per firmware.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
import requests

from bastion_app.images.osimage import MANIFEST, ROOTFS
from labcore import enroll
from labctl.init_cmd import build_wheelhouse
from tests.e2e.lab import BASTION_IP, Lab, Machine
from tests.support import BIN, E2E_TIMES, REPO, console_login, free_port, join_token, start_labd, wait_for

# the first test also builds the images when the cache is cold (debootstrap: several minutes)
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(3600)]

INSTALL_TIMEOUT = 1500
BOOT_TIMEOUT = 600
GIB = 1 << 30
labd_stopped: list[float] = []  # when the deployed fixture stopped labd


def q(mac: str) -> str:
    return mac.replace(":", "%3A")


def labctl(lab: Lab, *args: str, timeout: float = 120, inside: bool = False) -> subprocess.CompletedProcess:
    """`labctl ...` against the lab's bastion: from the host (through the forwarder), or from
    inside the lab's network (``inside``: where the machines' addresses answer)."""
    env = {**os.environ, **lab.labctl_env(), "PYTHONPATH": str(REPO)}
    if inside:
        env["LABCTL_BASTION_URL"] = lab.machine_url
        return lab.ns_exec(str(BIN / "labctl"), *args, timeout=timeout, env=env)
    return subprocess.run([str(BIN / "labctl"), *args], capture_output=True, text=True, timeout=timeout, env=env)


def discover_by_api(lab: Lab, mac: str, firmware: str) -> None:
    r = requests.post(lab.api_url + "/api/discover", json={"mac": mac, "hardware": {"firmware": firmware}}, timeout=10)
    assert r.status_code in (200, 201), r.text


def queue(lab: Lab, mac: str, hostname: str, pubkey: Path, role: str = "worker", os_name: str = "debian-12") -> None:
    r = labctl(lab, "provision", "install", mac, "--hostname", hostname, "--role", role, "--os", os_name,
               "--ssh-key", str(pubkey))
    assert r.returncode == 0, r.stdout + r.stderr


def events(lab: Lab, mac: str) -> list[dict]:
    return lab.machine_state(mac)["events"]


def installs_started(lab: Lab, mac: str) -> int:
    return sum(1 for e in events(lab, mac) if e["to_state"] == "installing" and e["from_state"] != "installing")


@pytest.fixture(scope="module")
def key(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ssh") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "e2e@lab", "-f", str(path)], check=True)
    return path


def disk_untouched(path: str) -> bool:
    """True when the sparse disk image holds no data at all (nothing was ever written to it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 0, os.SEEK_DATA)
    except OSError:
        return True  # ENXIO: no data after offset 0
    finally:
        os.close(fd)
    return False


# --------------------------------------------------------------------------------------------------
# failures that stop before the disk is written


def _fail_once(lab: Lab, m: Machine, mark: int, timeout: float = 420) -> str:
    """Power-cycle ``m`` through its BMC into its queued install (start it when its QEMU is not
    running); wait for `failed`; the failure's message."""
    if m.running():
        _cycle(lab, m)
    else:
        lab.start(m)
    got = lab.wait_state(m.mac, "failed", timeout, m)
    # (busybox wget leaves the MAC's colons as they are)
    assert lab.access_lines("/install.sh?mac=" + m.mac, since=mark), "the installer did not fetch its script"
    return got.get("failure") or ""


def test_bad_input_fails_before_anything_is_written(lab, machines, key, tmp_path, request):
    """A disk too small for the layout, an image whose checksum does not match, no image at all:
    each gives the machine `failed` with the reason, and its disk stays untouched. (The image
    faults are made on debian-13, which this lab does not build: debian-12's image stays intact.)"""
    mac = "52:54:00:e2:d0:09"
    discover_by_api(lab, mac, "bios")
    pub = key.with_suffix(".pub")
    # 11 GiB: below a worker's minimum (11.4 GiB), above vanilla's (10.4 GiB)
    queue(lab, mac, "e2e-small", pub, role="worker")
    mark = lab.access_mark()
    m = machines("small", mac=mac, memory_mb=1024, disk_bytes=11 * GIB)
    # _fail_once power-cycles through it (its QEMU starts with the first attempt: no status yet)
    request.addfinalizer(_ipmi_bmc(lab, m, tmp_path / "bmc", wait=False).stop)
    reason = _fail_once(lab, m, mark)
    assert "step disk" in reason and "too small for role worker" in reason, reason
    assert disk_untouched(m.disk)
    good = lab.data / "images" / "debian-12"
    bad = lab.data / "images" / "debian-13"
    bad.mkdir(exist_ok=True)
    try:
        os.link(good / ROOTFS, bad / ROOTFS)  # debian-12's bytes under a manifest that says otherwise
        doc = {**json.loads((good / MANIFEST).read_text()), "os": "debian-13", "sha256": "0" * 64}
        (bad / MANIFEST).write_text(json.dumps(doc))
        queue(lab, mac, "e2e-small", pub, role="vanilla", os_name="debian-13")
        reason = _fail_once(lab, m, lab.access_mark())
        assert "step image" in reason and "image checksum mismatch" in reason and "nothing was written" in reason, reason
        assert disk_untouched(m.disk)
        (bad / MANIFEST).unlink()
        queue(lab, mac, "e2e-small", pub, role="vanilla", os_name="debian-13")
        reason = _fail_once(lab, m, lab.access_mark())
        assert "the bastion has no image for debian-13" in reason, reason
        assert disk_untouched(m.disk)
    finally:
        shutil.rmtree(bad, ignore_errors=True)
    # the installer's output reached the bastion's syslog listener: labctl provision logs shows it
    logs = labctl(lab, "provision", "logs", mac)
    assert "FAILED in step image" in logs.stdout, logs.stdout[-2000:]


# --------------------------------------------------------------------------------------------------
# labd: the lab's bastion joined to it; stopped while the machines install (issues 17 and 18)

LABD_LISTEN = f"{BASTION_IP}:8443"  # inside the lab's namespace: the bastion and the machines reach it there


@pytest.fixture(scope="module")
def labd(lab, postgres, tmp_path_factory):
    """`labd serve` inside the lab's namespace (its API at 10.77.0.1:8443, its hub at :8444) on the
    session's PostgreSQL (its unix socket works from inside a namespace), reached from this host
    through a loopback forwarder (as the bastion's API is); the lab's bastion joined to it and
    restarted (its link starts), and serving lab-agent's wheels (`lab-bastion images agent-wheels`)."""
    started = time.monotonic()
    root = tmp_path_factory.mktemp("labd-e2e")
    postgres.sql("CREATE DATABASE labd_e2e TEMPLATE labd_template")
    port = free_port()
    fwd = subprocess.Popen([sys.executable, "-m", "tests.e2e.lab", "forward", lab.ns, f"127.0.0.1:{port}", LABD_LISTEN],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)},
                           cwd=REPO, start_new_session=True)
    server = None
    try:
        server = start_labd(root / "data", postgres.url("labd_e2e"), url=f"https://127.0.0.1:{port}", listen=LABD_LISTEN,
                            prefix=("ip", "netns", "exec", lab.ns))
        admin = server.session(server.login())
        token = join_token(server, admin)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        r = lab.ns_exec(str(BIN / "lab-bastion"), "join", "--data-dir", str(lab.data), "--labd", f"https://{LABD_LISTEN}",
                        "--token", token, "--name", "e2e-bastion", "--cloud", "lab", "--environment", "e2e", env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        wheels = build_wheelhouse(root / "wheelhouse")
        r = subprocess.run([str(BIN / "lab-bastion"), "images", "agent-wheels", "--data-dir", str(lab.data), str(wheels)],
                           capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        lab.restart_bastion()
        E2E_TIMES.append(("labd in the lab: start, bastion join, agent wheels, bastion restart", time.monotonic() - started,
                          "added by the labd scenario"))
        yield server
    finally:
        if server is not None and server.proc.poll() is None:
            server.stop()
        fwd.kill()
        fwd.wait(10)


def _agent_token_given(lab: Lab, mac: str) -> bool:
    with sqlite3.connect(lab.data / "state.db") as c:
        row = c.execute("SELECT token FROM agent_tokens WHERE mac = ?", (mac,)).fetchone()
    return bool(row and row[0])


def labctl_labd(home: Path, *args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real `labctl` with a context of its own (``home``): after `labctl login`, labd's."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "LABCTL_HOME": str(home), "LABCTL_CONFIG": str(home / "config.yaml"),
           "LABCTL_BASTION_URL": "", "LABCTL_TOKEN": "", "LABCTL_CONTEXT": "", "LABCTL_LABD_URL": "", "LABCTL_OUTPUT": ""}
    return subprocess.run([str(BIN / "labctl"), *args], capture_output=True, text=True, timeout=timeout, env=env, input=stdin)


# --------------------------------------------------------------------------------------------------
# the install, BIOS and UEFI at once


@pytest.fixture(scope="module")
def deployed(lab, key, labd, tmp_path_factory):
    """A BIOS machine (discovered for real, then queued with labctl) and a UEFI machine (queued
    through the API) installing debian-12 at the same time; both installed and answering SSH.
    The bastion is joined to labd: once labd gave each install its agent's join token, labd is
    STOPPED, and stays stopped while both machines install (the bastion dispatches and installs
    on its own); `test_labd_catches_up_and_the_agent_enrolls_by_itself` starts it again."""
    pub = key.with_suffix(".pub")
    made: dict[str, Machine] = {}
    times: dict[str, dict[str, float]] = {}
    try:
        bios = lab.machine("img-bios", mac="52:54:00:e2:d0:01", cpus=1, memory_mb=1024, disk_bytes=20 * GIB)
        made["bios"] = bios
        uefi_mac = "52:54:00:e2:d0:02"
        discover_by_api(lab, uefi_mac, "uefi")
        queue(lab, uefi_mac, "e2e-img-uefi", pub, role="infra")
        uefi = lab.machine("img-uefi", mac=uefi_mac, firmware="uefi", cpus=1, memory_mb=1024, disk_bytes=20 * GIB)
        made["uefi"] = uefi
        lab.wait_state(bios.mac, "discovered", 300, bios)
        deadline = time.monotonic() + 60
        while bios.running() and time.monotonic() < deadline:
            time.sleep(0.5)
        queue(lab, bios.mac, "e2e-img-bios", pub, role="worker")
        for m in made.values():
            wait_for(lambda m=m: _agent_token_given(lab, m.mac), timeout=60, what=f"labd's agent join token for {m.name}")
        labd.stop()
        labd_stopped.append(time.monotonic())
        lab.start(bios)
        for name, m in made.items():
            got = lab.wait_state(m.mac, "installed", INSTALL_TIMEOUT, m)
            installed_at = time.monotonic() - m.started
            ssh_s = lab.wait_ssh(got["ip"], key, BOOT_TIMEOUT, m)
            times[name] = {"installed": installed_at, "ssh": installed_at + ssh_s}
            E2E_TIMES.append((f"image deploy {name}: power-on to installed / SSH", installed_at + ssh_s,
                              f"installed after {installed_at:.0f} s"))
        yield made, times
    finally:
        for m in made.values():
            lab.stop_machine(m)


def _sh(lab: Lab, m: Machine, key: Path, command: str) -> str:
    ip = lab.machine_state(m.mac)["ip"]
    r = lab.ssh(ip, key, command)
    assert r.returncode == 0, f"{command}: {r.stdout}{r.stderr}"
    return r.stdout


def test_labd_catches_up_and_the_agent_enrolls_by_itself(lab, deployed, labd, key, tmp_path):
    """Issue 17 (labd stopped, bastions keep installing, then catch up) and issue 18 (the agent of
    an installed machine enrolls by itself; `labctl exec` runs there), through the real labctl."""
    made, _ = deployed
    m = made["bios"]
    assert labd.proc.poll() is not None, "labd should have been stopped during the installs"
    down_s = time.monotonic() - labd_stopped[0]
    started = time.monotonic()
    labd.start()
    home = tmp_path / "labctl"
    fp = enroll.fingerprint(Path(labd.ca).read_text())
    r = labctl_labd(home, "login", labd.url, "--username", "admin", "--password-stdin", "--ca-fingerprint", fp,
                    stdin=labd.admin_password + "\n")
    assert r.returncode == 0, r.stdout + r.stderr

    def servers() -> dict:
        r = labctl_labd(home, "get", "servers", "-o", "json")
        assert r.returncode == 0, r.stdout + r.stderr
        doc = json.loads(r.stdout)
        return {s["hostname"]: s for s in (doc["servers"] if isinstance(doc, dict) else doc)}

    # everything the bastion did while labd was down arrives: both machines installed, their events
    wait_for(lambda: all(servers().get(f"e2e-img-{f}", {}).get("state") == "installed" for f in made),
             timeout=120, interval=1, what="the installs in labd after its restart")
    caught_up_s = time.monotonic() - started
    row = servers()["e2e-img-bios"]
    assert row["bastion"] == "e2e-bastion" and row["mac"] == m.mac, row
    # the install's events: each of the bastion's, stored once by labd (with their ids)
    def event_ids() -> tuple[list[int], list[int]]:
        with sqlite3.connect(lab.data / "state.db") as c:
            on_bastion = [r[0] for r in c.execute("SELECT id FROM events WHERE mac = ? ORDER BY id", (m.mac,))]
        with psycopg.connect(labd.database_url, autocommit=True) as conn:
            in_labd = [r[0] for r in conn.execute("SELECT event_id FROM bastion_events WHERE bastion = 'e2e-bastion' "
                                                  "AND mac = %s ORDER BY event_id", (m.mac,))]
        return on_bastion, in_labd

    wait_for(lambda: event_ids()[0] == event_ids()[1], timeout=30, interval=0.5, what="the install's events in labd")
    assert len(event_ids()[1]) >= 3 and "installed" in [r for r in servers()["e2e-img-bios"].values()]
    for name in made:
        assert servers()[f"e2e-img-{name}"]["state"] == "installed"

    # the machines' agents (their join retried every 5 s while labd was down) enroll by themselves
    def online() -> bool:
        r = labctl_labd(home, "get", "agents", "-o", "json")
        assert r.returncode == 0, r.stdout + r.stderr
        doc = json.loads(r.stdout)
        return any(a["hostname"] == "e2e-img-bios" and a["status"] == "active" and a["last_seen_at"]
                   for a in (doc["agents"] if isinstance(doc, dict) else doc))

    wait_for(online, timeout=240, interval=2, what="e2e-img-bios's agent online in labd")
    enrolled_s = time.monotonic() - started
    r = labctl_labd(home, "exec", "e2e-img-bios", "--", "uname", "-a")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("Linux e2e-img-bios ") and "x86_64" in r.stdout, r.stdout
    kernel = _sh(lab, m, key, "uname -a").strip()
    assert r.stdout.strip() == kernel
    # the agent runs under roles/lab_agent's hardened unit; its join token is gone from the machine
    unit = _sh(lab, m, key, "systemctl show lab-agent -p NoNewPrivileges -p ProtectSystem -p ActiveState")
    assert "NoNewPrivileges=yes" in unit and "ProtectSystem=strict" in unit and "ActiveState=active" in unit, unit
    assert _sh(lab, m, key, "sudo -n test -e /var/lib/lab-agent/join.env && echo left || echo gone").strip() == "gone"
    E2E_TIMES.append(("labd stopped during the installs, then started: catch-up / agent enrolled + labctl exec",
                      caught_up_s + (time.monotonic() - started - caught_up_s),
                      f"labd down {down_s:.0f} s; servers caught up {caught_up_s:.1f} s after its start; agent online "
                      f"{enrolled_s:.1f} s after; `uname -a` through labctl exec: {r.stdout.strip()[:60]}"))


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_installed_machine_answers_ssh_with_the_layout(lab, deployed, key, firmware):
    made, _ = deployed
    m = made[firmware]
    hostname = f"e2e-img-{firmware}"
    state = lab.machine_state(m.mac)
    assert state["state"] == "installed" and state["os"] == "debian-12"
    if firmware == "bios":  # the web console shows the same install (one page, no browser: cheap)
        page = console_login(lab.api_url, lab.token).get(f"{lab.api_url}/console/machines/{m.mac}", timeout=30)
        assert page.status_code == 200 and 'data-state="installed"' in page.text and hostname in page.text
    # after the install the machine rebooted, asked /dispatch and was sent to its local disk
    assert f"booting {hostname} from its local disk" in m.console_text()
    assert _sh(lab, m, key, "hostname").strip() == hostname
    assert 'VERSION_ID="12"' in _sh(lab, m, key, "cat /etc/os-release")
    mounts = {line.split()[0]: line.split()[1:] for line in _sh(lab, m, key, "findmnt -rno TARGET,SOURCE,FSTYPE").splitlines()}
    assert mounts["/"] == ["/dev/mapper/labvg-root", "xfs"], mounts
    assert mounts["/boot"][1] == "ext4" and mounts["/boot/efi"][1] == "vfat", mounts
    for mount, lv in (("/var", "var"), ("/var/log", "varlog"), ("/home", "home"), ("/srv", "srv")):
        assert mounts[mount] == [f"/dev/mapper/labvg-{lv}", "xfs"], mounts
    data = "/var/lib/longhorn" if firmware == "bios" else "/var/lib/rancher"
    assert mounts[data][1] == "xfs", mounts
    lvs = set(_sh(lab, m, key, "sudo -n lvs --noheadings -o lv_name labvg").split())
    assert {"swap", "root", "var", "varlog", "home", "srv"} <= lvs, lvs
    swaps = _sh(lab, m, key, "cat /proc/swaps").splitlines()[1:]
    assert len(swaps) == 1 and "partition" in swaps[0], swaps  # labvg/swap (/dev/dm-N)
    sshd = _sh(lab, m, key, "sudo -n sshd -T")
    assert re.search(r"^passwordauthentication no$", sshd, re.M), sshd
    assert re.search(r"^kbdinteractiveauthentication no$", sshd, re.M), sshd
    ip = lab.machine_state(m.mac)["ip"]
    refused = lab.ssh(ip, key, "true", options=("-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password,keyboard-interactive"))
    assert refused.returncode != 0 and "publickey" in refused.stderr and "password" not in refused.stderr.split("(")[-1], refused.stderr
    assert _sh(lab, m, key, "id -u admin").strip() == "1000"
    assert _sh(lab, m, key, "cat /proc/sys/kernel/sysrq").strip() == "1"
    if firmware == "uefi":
        efi = _sh(lab, m, key, "sudo -n efibootmgr -v")
        order = re.search(r"^BootOrder: (\S+)", efi, re.M).group(1).split(",")
        first = re.search(rf"^Boot{order[0]}\*? (.*)$", efi, re.M).group(1)
        assert "mac(" + m.mac.replace(":", "") in first.lower() and "IPv4(" in first, efi
        assert re.search(r"^Boot[0-9A-F]{4}\*? debian\s.*File\(\\EFI\\debian\\", efi, re.M | re.I), efi
        assert "br_netfilter" in _sh(lab, m, key, "cat /etc/modules-load.d/90-lab-k3s.conf")


def test_a_reset_boots_the_disk_again_without_reinstalling(lab, deployed, bmcs, key):
    """`labctl power cycle` through each machine's BMC (Redfish for BIOS, IPMI for UEFI)."""
    made, _ = deployed
    for m in made.values():
        mark = lab.access_mark()
        _cycle(lab, m)
        lab.wait_access(f"/dispatch?mac={q(m.mac)}", BOOT_TIMEOUT, m, since=mark)
        lab.wait_ssh(lab.machine_state(m.mac)["ip"], key, BOOT_TIMEOUT, m)
        assert not lab.access_lines("/images/installer/", since=mark), "an installed machine fetched the installer"
        assert lab.machine_state(m.mac)["state"] == "installed"
        assert installs_started(lab, m.mac) == 1


def test_inventory_and_a_role_through_labctls_runner(lab, deployed, key, tmp_path):
    """The lab.platform.lab inventory lists the machine as installed with its address, and a
    playbook run through labctl's runner reaches it: facts, then k3s_host_prep applied for real
    (its second run changes nothing)."""
    made, _ = deployed
    m = made["bios"]
    ip = lab.machine_state(m.mac)["ip"]
    from tests.vm.ansible import collections_path

    coll = collections_path(tmp_path / "collections")
    env = {**os.environ, "LAB_BASTION_URL": lab.machine_url, "LAB_BASTION_TOKEN": lab.token,
           "ANSIBLE_COLLECTIONS_PATH": str(coll), "PYTHONPATH": str(REPO), "LABCTL_HOME": str(tmp_path / "labctl"),
           "ANSIBLE_HOST_KEY_CHECKING": "False", "PATH": f"{BIN}:{os.environ['PATH']}"}
    inv = lab.ns_exec(str(BIN / "ansible-inventory"), "-i", str(REPO / "inventory" / "lab.yml"), "--list",
                      env=env, timeout=120)
    assert inv.returncode == 0, inv.stderr
    hostvars = json.loads(inv.stdout)["_meta"]["hostvars"]
    host = hostvars["e2e-img-bios"]
    plain = lambda v: v.get("__ansible_unsafe", v) if isinstance(v, dict) else v  # noqa: E731
    assert plain(host["ansible_host"]) == ip and plain(host["lab_state"]) == "installed", host
    book = tmp_path / "prep.yml"
    book.write_text("- name: k3s host preparation on a freshly deployed machine\n  hosts: all\n"
                    "  become: true\n  roles:\n    - role: lab.platform.k3s_host_prep\n")
    # the inventory plugin's answer, as labctl's commands pass it to the runner (a host and its
    # variables); the runner keeps the bastion token out of the run's environment
    hosts = {"e2e-img-bios": {"ansible_host": plain(host["ansible_host"]), "ansible_user": "admin",
                              "ansible_ssh_private_key_file": str(key), "ansible_python_interpreter": "/usr/bin/python3"}}
    code = ("import sys, json; from labctl import runner; "
            "r = runner.run_playbook(sys.argv[1], inventory=runner.inventory(json.loads(sys.argv[2])), "
            "name='e2e-prep', timeout=900); "
            "print('RESULT ' + json.dumps({'status': r.status, 'rc': r.rc, 'stats': r.stats}))")
    stats = []
    for _ in range(2):
        run = lab.ns_exec(sys.executable, "-c", code, str(book), json.dumps(hosts), env=env, timeout=1200)
        found = re.search(r"^RESULT (.*)$", run.stdout, re.M)
        assert run.returncode == 0 and found, run.stdout[-3000:] + run.stderr[-2000:]
        result = json.loads(found.group(1))
        assert result["status"] == "successful" and result["rc"] == 0, run.stdout[-3000:]
        stats.append(result["stats"])
    assert stats[0]["ok"] > 5 and stats[0]["unreachable"] == 0, stats
    assert stats[0]["changed"] > 0, stats
    assert stats[1]["changed"] == 0, stats
    assert "br_netfilter" in _sh(lab, m, key, "lsmod")


def test_reprovision_keeps_home_and_srv(lab, deployed, key):
    """`labctl provision reprovision` on the UEFI machine (SSH, efibootmgr BootNext to the network,
    reboot): /home, /srv and /var/lib/rancher keep their files and their logical volumes' UUIDs;
    / is recreated."""
    made, _ = deployed
    m = made["uefi"]
    before_uuid = _sh(lab, m, key, "sudo -n lvs --noheadings -o lv_name,lv_uuid labvg")
    _sh(lab, m, key, "echo kept | sudo -n tee /home/admin/marker /srv/marker /var/lib/rancher/marker >/dev/null && "
                     "echo gone | sudo -n tee /root-marker >/dev/null && sync")
    mark = lab.access_mark()
    started = time.monotonic()
    r = labctl(lab, "provision", "reprovision", m.mac, "--ssh-user", "root", "--ssh-private-key", str(key),
               "--reason", "e2e reprovision", timeout=600, inside=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lab.wait_access(f"/install.sh?mac={m.mac}", BOOT_TIMEOUT, m, since=mark)
    got = lab.wait_state(m.mac, "installed", INSTALL_TIMEOUT, m)
    lab.wait_ssh(got["ip"], key, BOOT_TIMEOUT, m)
    E2E_TIMES.append(("image deploy: reprovision to SSH (UEFI)", time.monotonic() - started, "kept /home /srv /var/lib/rancher"))
    assert _sh(lab, m, key, "cat /home/admin/marker /srv/marker /var/lib/rancher/marker").split() == ["kept"] * 3
    assert _sh(lab, m, key, "test -e /root-marker && echo present || echo absent").strip() == "absent"
    after_uuid = _sh(lab, m, key, "sudo -n lvs --noheadings -o lv_name,lv_uuid labvg")
    uuid = lambda text: dict(line.split() for line in text.splitlines() if line.strip())  # noqa: E731
    for lv in ("home", "srv", "rancher"):
        assert uuid(before_uuid)[lv] == uuid(after_uuid)[lv], (before_uuid, after_uuid)
    assert installs_started(lab, m.mac) == 2
    ready = [e["reason"] for e in lab.machine_state(m.mac)["events"] if "labvg ready" in (e.get("reason") or "")]
    assert ready and "kept: /home /srv /var/lib/rancher" in ready[-1], ready


# --------------------------------------------------------------------------------------------------
# reprovision through the BMC (issue 20): no SSH, the bastion drives emulated BMCs in front of QEMU


def _power(lab: Lab, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **lab.labctl_env(), "PYTHONPATH": str(REPO)}
    return subprocess.run([str(BIN / "labctl"), *args], capture_output=True, text=True, timeout=120, env=env, input=stdin)


BMC_USER, BMC_PASSWORD = "lab-bmc", "e2e-BMC-secret"
REDFISH_SYSTEM = "e2e00000-0000-0000-0000-000000000001"


def _record_bmc(lab: Lab, mac: str, args: tuple[str, ...], logs, wait: bool = True) -> None:
    """`labctl power set` for one machine; with ``wait``, until its BMC answers (the emulators start
    inside the lab's namespace; a BMC whose QEMU is not running yet does not answer)."""
    r = _power(lab, "power", "set", mac, *args, "--username", BMC_USER, "--password-stdin", stdin=BMC_PASSWORD + "\n")
    assert r.returncode == 0, r.stdout + r.stderr
    deadline = time.monotonic() + 30
    while wait:
        r = _power(lab, "-o", "json", "power", "status", mac)
        if r.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert r.returncode == 0, r.stdout + r.stderr + logs()


def _ipmi_bmc(lab: Lab, m: Machine, work: Path, wait: bool = True):
    """pyghmi's IPMI BMC (tests/bmc.py) in front of ``m``'s QEMU monitor, recorded on the bastion."""
    from tests.e2e.lab import BASTION_IP
    from tests.support import free_port, start_ipmi_bmc

    bmc = start_ipmi_bmc(work, BMC_USER, BMC_PASSWORD, monitor=str(m.monitor), prefix=("ip", "netns", "exec", lab.ns),
                         host=BASTION_IP, port=free_port(kind=socket.SOCK_DGRAM))
    try:
        _record_bmc(lab, m.mac, ("--driver", "ipmi", "--address", bmc.address), lambda: bmc.log()[-2000:], wait)
    except BaseException:
        bmc.stop()
        raise
    return bmc


def _cycle(lab: Lab, *machines: Machine) -> None:
    """`labctl power cycle` through the machines' BMCs (a hard reset: QEMU's system_reset)."""
    for m in machines:
        m.started = time.monotonic()
    r = _power(lab, "power", "cycle", *(m.mac for m in machines))
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def bmcs(lab, deployed, tmp_path_factory):
    """The deployed machines behind emulated BMCs, started once and recorded on the bastion: the
    BIOS machine behind sushy-tools' Redfish emulator, the UEFI one behind pyghmi's IPMI BMC
    (tests/bmc.py: power and reset become QEMU monitor commands), both on the lab's network where
    the bastion makes its calls."""
    from tests.e2e.lab import BASTION_IP
    from tests.support import free_port, start_redfish_bmc

    made, _ = deployed
    bios, uefi = made["bios"], made["uefi"]
    work = tmp_path_factory.mktemp("bmcs")
    redfish = start_redfish_bmc(work / "redfish", [{"uuid": REDFISH_SYSTEM, "name": "img-bios", "power_state": "On",
                                                    "monitor": str(bios.monitor), "nics": []}],
                                BMC_USER, BMC_PASSWORD, prefix=("ip", "netns", "exec", lab.ns), host=BASTION_IP,
                                port=free_port())
    ipmi = None
    try:
        _record_bmc(lab, bios.mac, ("--driver", "redfish", "--address", redfish.address, "--system-id", REDFISH_SYSTEM),
                    lambda: redfish.log()[-2000:])
        ipmi = _ipmi_bmc(lab, uefi, work / "ipmi")
        yield {"redfish": redfish, "ipmi": ipmi}
    finally:
        redfish.stop()
        if ipmi is not None:
            ipmi.stop()


def test_reprovision_through_the_bmc_redfish_and_ipmi(lab, deployed, bmcs):
    """`labctl provision reprovision --power` sets the next boot to the network and power-cycles
    each machine through its BMC (the `bmcs` fixture: Redfish for BIOS, IPMI for UEFI): it
    PXE-boots into its install script, with no SSH. The power state is right before (the BIOS
    machine is switched off first) and after."""
    made, _ = deployed
    bios, uefi = made["bios"], made["uefi"]
    password = BMC_PASSWORD
    r = _power(lab, "-o", "json", "power", "status", bios.mac, uefi.mac)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [x["power"] for x in json.loads(r.stdout)] == ["on", "on"]
    r = _power(lab, "-o", "json", "power", "off", bios.mac)
    assert r.returncode == 0 and json.loads(r.stdout)["changed"] is True, r.stdout + r.stderr
    assert "paused" in bios.hmp("info status")  # "off": the VM does nothing
    assert json.loads(_power(lab, "-o", "json", "power", "status", bios.mac).stdout)["power"] == "off"

    mark = lab.access_mark()
    started = time.monotonic()
    for m in (bios, uefi):
        m.started = time.monotonic()
        r = _power(lab, "provision", "reprovision", m.mac, "--power", "--reason", "e2e reprovision through the BMC")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "power-cycled through its" in r.stdout
    for m in (bios, uefi):
        lab.wait_access(f"/install.sh?mac={m.mac}", BOOT_TIMEOUT, m, since=mark)
        assert lab.wait_state(m.mac, "installing", 120, m)["state"] == "installing"
    E2E_TIMES.append(("reprovision --power (Redfish BIOS + IPMI UEFI) to the install script", time.monotonic() - started,
                      "no SSH"))
    r = _power(lab, "-o", "json", "power", "status", bios.mac, uefi.mac)
    assert [x["power"] for x in json.loads(r.stdout)] == ["on", "on"], r.stdout + r.stderr
    for m, driver, before in ((bios, "redfish", "off"), (uefi, "ipmi", "on")):
        cycle = [e["data"] for e in events(lab, m.mac) if e["kind"] == "power" and e["data"].get("action") == "cycle"]
        assert cycle and (cycle[-1]["driver"], cycle[-1]["boot"], cycle[-1]["before"]) == (driver, "network", before)
    everything = json.dumps([lab.machine_state(m.mac) for m in (bios, uefi)]) + lab.bastion_log.read_text(errors="replace")
    assert password not in everything
