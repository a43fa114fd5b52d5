"""The tests' and benchmarks' one support module: prerequisites, ports, waiting and processes;
shared test data (MACs, SSH keys, hardware reports, install parameters); a real `lab-bastion serve`
and the machine side of its protocol; the fake machine that runs the installers' shell for real;
helpers for the ansible CLIs; the end-to-end lab's start and timings.

conftest files wrap these in fixtures; test modules and bench/*.py import them from here (never
from a conftest or another test module: tests/unit/test_test_layout.py checks that).

A missing prerequisite skips the test with a reason on a developer machine, and fails it under
CI=true (CI runs as root with every package installed by the project's own files).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the virtualenv's console scripts (ansible-*, lab-bastion, labctl)


# -- prerequisites ---------------------------------------------------------------------------------
def need(condition: bool, reason: str) -> None:
    """Skip (laptop) or fail (CI) when a prerequisite is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"missing prerequisite in CI: {reason}")
    pytest.skip(reason)


def need_root() -> None:
    need(os.geteuid() == 0, "needs root (network namespaces, dnsmasq, QEMU taps)")


def need_binary(*names: str) -> None:
    for name in names:
        need(shutil.which(name) is not None, f"needs `{name}` on PATH (make deps-system installs it)")


# -- ports, waiting, processes ---------------------------------------------------------------------
def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_syslog_port(host: str = "127.0.0.1") -> int:
    """A port free for UDP and for TCP: the syslog listener binds both, and `serve` refuses to
    start when either is taken."""
    while True:
        port = free_port(host, socket.SOCK_DGRAM)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - report the last failure on timeout
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}" + (f": {last_exc!r}" if last_exc else ""))


def stop_process(proc: subprocess.Popen, timeout: float = 20.0, *, group: bool = False) -> None:
    """SIGTERM a child (its whole process group with ``group=True``), then SIGKILL what is left after
    ``timeout`` seconds: its process group when it leads one (``start_new_session=True``), so nothing
    it started outlives it."""
    if proc.poll() is not None:
        return
    if group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            leads_group = os.getpgid(proc.pid) == proc.pid
        except ProcessLookupError:
            leads_group = False
        if leads_group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait()


# -- test data -------------------------------------------------------------------------------------
MAC = "52:54:00:12:34:56"
TOKEN = "tok_0123456789abcdefXYZ"
TOKEN_RE = re.compile(r"token=([A-Za-z0-9_-]+)")  # the install token in a served iPXE script
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl lab@test"


def ed25519_key(seed: int, comment: str = "op@lab") -> str:
    """A well-formed ed25519 public key whose 32 key bytes are all ``seed``."""
    blob = b"\0\0\0\x0bssh-ed25519" + b"\0\0\0\x20" + bytes([seed]) * 32
    return " ".join(part for part in ("ssh-ed25519", base64.b64encode(blob).decode(), comment) if part)


ED25519 = ed25519_key(0, comment="")  # no comment
HW = {"cpu": {"model": "QEMU", "cores": 2, "threads": 2, "arch": "x86_64"}, "memory_mb": 2048,
      "disks": [{"name": "vda", "size_bytes": 10 * 2**30, "model": "", "serial": "d1", "rotational": False,
                 "removable": False, "transport": "virtio"}],
      "nics": [{"name": "eth0", "mac": MAC, "driver": "virtio_net", "link": True, "speed_mbps": None}],
      "dmi": {"vendor": "QEMU", "product": "Standard PC", "serial": "", "uuid": "", "bios_vendor": "SeaBIOS", "bios_version": "1.16"},
      "firmware": "bios"}
UEFI_HW = {"cpu": {"model": "QEMU", "cores": 4, "threads": 8, "arch": "x86_64"}, "memory_mb": 8192, "firmware": "uefi",
           "disks": [{"name": "nvme0n1", "size_bytes": 512 * 10**9, "transport": "nvme"}]}
SMALL_HW = {"cpu": {"threads": 2}, "memory_mb": 2048, "firmware": "bios"}  # the least a report carries
INSTALL = {"mac": MAC, "hostname": "node1", "role": "worker", "os": "fedora-43", "disk": "", "ssh_keys": [ED25519]}


def install_params(role: str = "worker", disk: str = "", os_name: str = "fedora-43") -> dict:
    """A machine record as the installer renderers get it (with its install token)."""
    return {"mac": MAC, "hostname": "node1", "role": role, "os": os_name, "disk": disk,
            "ssh_keys": [KEY], "install_token": TOKEN}


def seed_mib(n_bytes: int) -> int:
    """A size of the seed's disk layout table (decimal MB/GB, as ``n_bytes``) in whole MiB, rounded
    up: what the installers are expected to ask for."""
    return math.ceil(n_bytes / 2**20)


def synthetic_mac(i: int, prefix: str = "52:54:01") -> str:
    """The i-th MAC address under a locally administered 3-byte prefix (tests and benches)."""
    return f"{prefix}:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"


# -- the Flask app through its test client -----------------------------------------------------------
def queue_install(client, auth, os_name="fedora-43", mac="52:54:00:ab:cd:01", **over) -> str:
    """discover -> install -> GET /dispatch through the test client; returns the install token."""
    assert client.post("/api/discover", json={"mac": mac}).status_code == 200
    body = {"mac": mac, "hostname": over.pop("hostname", "node-ks"), "role": "worker", "os": os_name,
            "disk": "", "ssh_keys": [KEY], **over}
    r = client.post("/api/install", json=body, headers=auth)
    assert r.status_code == 202, r.json
    text = client.get(f"/dispatch?mac={mac}").get_data(as_text=True)
    return TOKEN_RE.search(text).group(1)


# -- a real `lab-bastion serve` ----------------------------------------------------------------------
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
        stop_process(self.proc, timeout=20)


def start_bastion(data_dir: Path, *args: str, env: dict | None = None, workers: int = 4, port: int | None = None,
                  timeout: float = 30.0, log_dir: Path | None = None) -> Bastion:
    """Start `lab-bastion serve` and wait for /healthz. Extra CLI args pass through."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = (log_dir or data_dir.parent) / f"bastion-{port}.log"
    if "--syslog-port" not in args:  # never the shared default 5514: tests run side by side
        args = ("--syslog-port", str(free_syslog_port()), *args)
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


def labctl_env(bastion: Bastion, home: Path) -> dict[str, str]:
    """The environment that points labctl at ``bastion`` with its own (empty) home."""
    return {"LABCTL_HOME": str(home), "LABCTL_CONFIG": str(home / "config.yaml"),
            "LABCTL_BASTION_URL": bastion.url, "LABCTL_TOKEN": bastion.token, "LABCTL_OUTPUT": ""}


class Machines:
    """The machine side of the protocol against a live bastion (reports hardware ``UEFI_HW``)."""

    def __init__(self, bastion: Bastion):
        self.b = bastion
        self.http = bastion.session()

    def discover(self, mac: str) -> None:
        r = requests.post(self.b.url + "/api/discover", json={"mac": mac, "hardware": UEFI_HW}, timeout=10)
        assert r.status_code == 200, r.text

    def boot(self, mac: str) -> str:
        """PXE-boot: fetch /dispatch; return the install token from the install script."""
        text = requests.get(self.b.url + "/dispatch", params={"mac": mac}, timeout=10).text
        m = re.search(r"token=([A-Za-z0-9_-]{16,128})", text)
        assert m, text
        return m.group(1)

    def progress(self, mac: str, token: str, stage: str, percent: int | None = None, message: str = "") -> None:
        r = requests.post(self.b.url + "/api/progress", json={"mac": mac, "token": token, "stage": stage,
                                                              "percent": percent, "message": message}, timeout=10)
        assert r.status_code == 200, r.text

    def log(self, mac: str, token: str, *lines: str) -> None:
        r = requests.post(self.b.url + "/api/log", json={"mac": mac, "token": token, "lines": list(lines)}, timeout=10)
        assert r.status_code == 200, r.text

    def api(self, path: str):
        r = self.http.get(self.b.url + path, timeout=10)
        return r.status_code, r.json()

    def events(self, mac: str) -> int:
        return len(self.api(f"/api/events?mac={mac}")[1]["events"])


def udp_port(b: Bastion) -> int:
    """The bastion's syslog port (start_bastion always passes one)."""
    return int(b.extra_args[b.extra_args.index("--syslog-port") + 1])


def send_udp(port: int, *datagrams: bytes, source: str = "127.0.0.1") -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        for d in datagrams:
            s.sendto(d, ("127.0.0.1", port))


def call_from(b: Bastion, source: str, method: str, path: str, body: dict | None = None, auth: bool = False):
    """An HTTP request from a chosen loopback source address (what the machine's IP will be)."""
    host, port = b.url.split("//")[1].split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30, source_address=(source, 0))
    headers = {"Content-Type": "application/json", **(b.headers if auth else {})}
    c.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data.decode()


def session_from(source: str) -> requests.Session:
    """A requests session whose connections come from ``source`` (a loopback address that acts as
    a LAN host: all of 127/8 is this machine)."""
    class From(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            kwargs["source_address"] = (source, 0)
            super().init_poolmanager(*args, **kwargs)

    s = requests.Session()
    s.mount("http://", From())
    return s


def installing(b: Bastion, mac: str, hostname: str, *, os_name: str = "fedora-43", source: str = "127.0.0.1") -> str:
    """discover -> install -> dispatch (the machine is installing); returns its install token."""
    st, _ = call_from(b, source, "POST", "/api/discover", {"mac": mac})
    assert st == 200
    r = requests.post(b.url + "/api/install", headers=b.headers, timeout=10,
                      json={"mac": mac, "hostname": hostname, "role": "worker", "os": os_name})
    assert r.status_code == 202, r.text
    st, text = call_from(b, source, "GET", f"/dispatch?mac={mac}")
    assert st == 200
    return TOKEN_RE.search(text).group(1)


def machines_requests(url: str) -> float:
    """lab_bastion_requests_total for GET /api/machines (all statuses), from /metrics."""
    text = requests.get(url + "/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("lab_bastion_requests_total{") and 'endpoint="/api/machines"' in line and 'method="GET"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- a fake machine for the installers' shell (kickstart %pre/%post, autoinstall commands) -----------
# The shims are bash (a Python start per call would make %pre's many lsblk calls slow); their
# answers are files that FakeMachine.run() writes from its tables.
LSBLK = r'''#!/bin/bash
# fake lsblk: `lsblk -dno COL DEV` and `lsblk -lnpo NAME,TYPE DISK`, from $FAKE/lsblk/<dev>/
dev="${@: -1}" cols="${@: -2:1}"
d="$FAKE/lsblk/$(printf '%s' "$dev" | tr / _)"
[ -d "$d" ] || { echo "lsblk: $dev: not a block device" >&2; exit 32; }
if [ "$cols" = NAME,TYPE ]; then cat "$d/list"; else cat "$d/$cols" 2>/dev/null; fi
exit 0
'''

LVM = r'''#!/bin/bash
# fake lvm: vgs / pvs / lvs for labvg from $FAKE/lvm/
[ -d "$FAKE/lvm/labvg" ] || exit 5
case "$1" in
    vgs) case "$*" in
             *vg_free*) echo "  $(cat "$FAKE/lvm/labvg/free")" ;;  # bytes (--units b --nosuffix)
             *) echo "  labvg" ;;
         esac ;;
    pvs) sed 's/^/  /' "$FAKE/lvm/labvg/pvs" ;;
    lvs) case "$*" in
             *lv_size*) sed 's/^/  /; s/$/ 10737418240/' "$FAKE/lvm/labvg/lvs" ;;  # every volume 10 GiB
             *) sed 's/^/  /' "$FAKE/lvm/labvg/lvs" ;;
         esac ;;
esac
'''

CURL = r'''#!/bin/bash
# fake curl: records URL and body of each call (tab-separated); a reachable bastion that answers 200
body="" url="${@: -1}" status=""
while [ $# -gt 0 ]; do [ "$1" = -d ] && body="$2"; [ "$1" = -w ] && status=200; shift; done
printf '%s\t%s\n' "$url" "$body" >> "$FAKE/curl.log"
printf '%s' "$status"
'''

EFIBOOTMGR = r'''#!/bin/bash
# fake efibootmgr: `efibootmgr [-v]` prints $FAKE/efi.txt; `-o ORDER` is recorded in $FAKE/bootorder,
# every other change (`-b NNNN -B`, ...) in $FAKE/efibootmgr.log
case "${1:-}" in
    ""|-v) cat "$FAKE/efi.txt" ;;
    -o) printf '%s' "$2" > "$FAKE/bootorder" ;;
    *) echo "$*" >> "$FAKE/efibootmgr.log" ;;
esac
'''

CHROOT = r'''#!/bin/bash
# fake chroot: records the command run inside the target
root="$1"; shift
echo "$*" >> "$FAKE/chroot.log"
'''

NVME_PARTS = {"/dev/nvme0n1p1": {"FSTYPE": "vfat", "PARTTYPE": "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"},
              "/dev/nvme0n1p2": {"FSTYPE": "ext4", "PARTTYPE": "0fc63daf-8483-4772-8e79-3d69d8477de4"},
              "/dev/nvme0n1p3": {"FSTYPE": "LVM2_member", "PARTTYPE": "e6d6d379-f507-44c2-a23c-238f2a3df928"}}


class FakeMachine:
    """A fake /sys/block tree plus lsblk/lvm state; runs %pre for real."""

    def __init__(self, root: Path, uefi: bool = True):
        self.root = root
        self.sys = root / "sys"
        (self.sys / "block").mkdir(parents=True)
        if uefi:
            (self.sys / "firmware" / "efi").mkdir(parents=True)
        self.bin = root / "bin"
        self.bin.mkdir()
        for name, body in (("lsblk", LSBLK), ("lvm", LVM), ("curl", CURL), ("efibootmgr", EFIBOOTMGR)):
            self.shim(name, body)
        self.lsblk: dict = {}
        self.lvm: dict = {}

    def shim(self, name: str, body: str) -> None:
        """Put an executable ``name`` first on the scripts' PATH."""
        p = self.bin / name
        p.write_text(body)
        p.chmod(0o755)

    def disk(self, name, *, tran="sata", removable=0, ro=0, size=1_000_000_000, parts=None, aliases=()):
        d = self.sys / "block" / name
        d.mkdir()
        (d / "removable").write_text(f"{removable}\n")
        (d / "ro").write_text(f"{ro}\n")
        (d / "size").write_text(f"{size}\n")
        self.lsblk[f"/dev/{name}"] = {"TRAN": tran, "parts": parts or {}, "aliases": list(aliases)}
        for number, part in enumerate(parts or {}, start=1):  # /sys/class/block/<part>/{partition,size}
            p = self.sys / "class" / "block" / part.rsplit("/", 1)[-1]
            p.mkdir(parents=True)
            (p / "partition").write_text(f"{number}\n")
            (p / "size").write_text(f"{number * 2048 * 1024}\n")  # number GiB, in 512-byte sectors

    def labvg(self, pv, lvs, free=100 * 10**9):
        """labvg on physical volume ``pv`` with logical volumes ``lvs`` (10 GiB each) and ``free``
        bytes unallocated."""
        self.lvm = {"labvg": {"pvs": [pv], "lvs": list(lvs), "free": free}}

    def _write_tables(self) -> None:
        def entry(path: str, rows: dict[str, str], listing: list[str] | None = None):
            d = self.root / "lsblk" / path.replace("/", "_")
            d.mkdir(parents=True, exist_ok=True)
            for col, value in rows.items():
                (d / col).write_text(f"{value}\n")
            if listing is not None:
                (d / "list").write_text("".join(f"{line}\n" for line in listing))

        for disk, info in self.lsblk.items():
            kname = disk.rsplit("/", 1)[-1]
            rows = {"TYPE": "disk", "TRAN": info["TRAN"], "KNAME": kname}
            listing = [f"{disk} disk"] + [f"{p} part" for p in info["parts"]]
            for name in [disk, *info["aliases"]]:
                entry(name, rows, listing)
            for part, pinfo in info["parts"].items():
                entry(part, {"TYPE": "part", "KNAME": part.rsplit("/", 1)[-1], "PKNAME": kname, **pinfo})
        if self.lvm:
            vg = self.root / "lvm" / "labvg"
            vg.mkdir(parents=True, exist_ok=True)
            (vg / "pvs").write_text("".join(f"{pv}\n" for pv in self.lvm["labvg"]["pvs"]))
            (vg / "lvs").write_text("".join(f"{lv}\n" for lv in self.lvm["labvg"]["lvs"]))
            (vg / "free").write_text(f"{self.lvm['labvg']['free']}\n")

    def run(self, body: str) -> subprocess.CompletedProcess:
        need_binary("bash")
        self._write_tables()
        env = {"PATH": f"{self.bin}:/usr/bin:/bin", "FAKE": str(self.root), "LAB_SYSFS": str(self.sys),
               "LAB_PART_INCLUDE": str(self.root / "part-include"), "HOME": str(self.root)}
        return subprocess.run(["bash", "-c", body], env=env, capture_output=True, text=True, timeout=60)

    def target(self, name: str, fstab: str, efi: str) -> Path:
        """A target root for %post or late-commands, ``<root>/<name>`` with ``etc/fstab`` holding
        ``fstab``; efibootmgr prints ``efi`` and chroot only records what it would run (chroot.log)."""
        self.shim("chroot", CHROOT)
        target = self.root / name
        (target / "etc").mkdir(parents=True)
        (target / "etc" / "fstab").write_text(fstab)
        (self.root / "efi.txt").write_text(efi)
        return target

    @property
    def include(self) -> str:
        return (self.root / "part-include").read_text()

    def progress(self) -> list[dict]:
        log = self.root / "curl.log"
        calls = [line.split("\t", 1) for line in log.read_text().splitlines()] if log.exists() else []
        return [json.loads(body) for url, body in calls if url.endswith("/api/progress")]


def sections(text: str):
    """A kickstart parsed by pykickstart (F43); returns its handler."""
    from pykickstart.parser import KickstartParser
    from pykickstart.version import makeVersion

    handler = makeVersion("F43")
    KickstartParser(handler, followIncludes=False).readKickstartFromString(text)
    return handler


def script(text: str, kind: str, chroot: bool = True) -> str:
    """The body of a kickstart's one %pre, %pre-install, %post (in or out of the chroot) or %onerror."""
    from pykickstart.constants import KS_SCRIPT_ONERROR, KS_SCRIPT_POST, KS_SCRIPT_PRE, KS_SCRIPT_PREINSTALL

    t = {"pre": KS_SCRIPT_PRE, "pre-install": KS_SCRIPT_PREINSTALL, "post": KS_SCRIPT_POST,
         "onerror": KS_SCRIPT_ONERROR}[kind]
    found = [s for s in sections(text).scripts if s.type == t and (kind != "post" or s.inChroot == chroot)]
    assert len(found) == 1, f"expected one %{kind} section"
    return found[0].script


# -- the ansible CLIs against this checkout ----------------------------------------------------------
def ansible_env(coll: Path, **extra: str) -> dict[str, str]:
    """A clean environment (no ANSIBLE_* or LAB_BASTION_* of the caller) with the collection on ``coll``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "LAB_BASTION_"))}
    env.update(
        ANSIBLE_COLLECTIONS_PATH=str(coll),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_LOCALHOST_WARNING="False",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="False",
        ANSIBLE_RETRY_FILES_ENABLED="False",
        ANSIBLE_PYTHON_INTERPRETER=sys.executable,
        ANSIBLE_HOME=str(coll / "ansible-home"),
        PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
    )
    env.update(extra)
    return env


def run(cmd: list[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def inventory_list(inv: Path, env: dict[str, str], *args: str) -> dict:
    r = run([str(BIN / "ansible-inventory"), "-i", str(inv), "--list", *args], env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def unsafe(value):
    """ansible-inventory --list shows unsafe strings as {"__ansible_unsafe": "..."}; unwrap them."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {k: unsafe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unsafe(v) for v in value]
    return value


def recap(stdout: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP counters per host."""
    out = {}
    for m in re.finditer(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", stdout, re.M):
        out[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return out


# -- a reachable SSH host: sshd in a network namespace -------------------------------------------------
FAKE_SYSTEMD_RUN = """#!/bin/sh
# stand-in for systemd-run on the SSH test host: records the reboot it was asked for, reboots nothing
echo "$@" >> "{log}"
"""
FAKE_EFIBOOTMGR = """#!/bin/sh
# stand-in for efibootmgr on the SSH test host (only reached on a UEFI test runner): never touches NVRAM
echo "efibootmgr $@" >> "{log}"
printf 'BootCurrent: 0001\\nBootOrder: 0001,0002\\nBoot0001* debian\\tHD(1)\\nBoot0002* UEFI PXEv4\\tPciRoot(0x0)/MAC(525400123456,1)/IPv4(0.0.0.0)\\n'
"""


class SshHost:
    """sshd in its own network namespace, reached from here over a veth pair at ``address`` (root
    logs in with ``key``); ``unreachable`` is an address on the same link where nothing listens.

    It is this machine seen over the network: a playbook run there changes this machine's files, so
    the session's PATH starts with fakes of ``systemd-run`` and ``efibootmgr`` that only append
    their arguments to ``calls`` (a reprovision run records the reboot instead of rebooting)."""

    def __init__(self, root: Path):
        need_root()
        need_binary("ip", "sshd", "ssh-keygen")
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        n = os.getpid() % 100000
        self.ns, self.veth = f"lssh{n}", f"vssh{n}"
        net = f"10.{200 + n % 50}.{n % 250}"
        self.local, self.address, self.unreachable = f"{net}.1", f"{net}.2", f"{net}.3"
        self.key, self.calls = root / "id_ed25519", root / "calls.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> SshHost:
        r = self.root
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(r / "host_key")], check=True)
        (r / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        fake = r / "fakebin"
        fake.mkdir(exist_ok=True)
        for name, text in (("systemd-run", FAKE_SYSTEMD_RUN), ("efibootmgr", FAKE_EFIBOOTMGR)):
            (fake / name).write_text(text.format(log=self.calls))
            (fake / name).chmod(0o755)
        (r / "sshd_config").write_text("\n".join([
            f"ListenAddress {self.address}", f"HostKey {r / 'host_key'}", f"AuthorizedKeysFile {r / 'authorized_keys'}",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no", "UsePAM no", "StrictModes no",
            f"PidFile {r / 'sshd.pid'}", f"SetEnv PATH={fake}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "Subsystem sftp internal-sftp", ""]))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        self._ip("netns", "add", self.ns)
        try:
            self._ip("link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
            self._ip("addr", "add", f"{self.local}/29", "dev", self.veth)
            self._ip("link", "set", self.veth, "up")
            for cmd in (["addr", "add", f"{self.address}/29", "dev", "eth0"], ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"]):
                self._ip("-n", self.ns, *cmd)
            sshd = shutil.which("sshd") or "/usr/sbin/sshd"
            with open(r / "sshd.log", "ab") as log:
                self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, sshd, "-D", "-e", "-f", str(r / "sshd_config")],
                                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            wait_for(lambda: self.ssh("true").returncode == 0, timeout=20, interval=0.2, what=f"sshd at {self.address}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proc:
            stop_process(self.proc, timeout=10, group=True)
        # sshd's per-connection processes (ControlPersist sessions) live in their own sessions: end them too
        pids = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def ssh(self, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", "-i", str(self.key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                               "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5",
                               f"root@{self.address}", command], capture_output=True, text=True, timeout=30)

    def calls_made(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []


# -- the end-to-end lab (tests/e2e/lab.py) -----------------------------------------------------------
E2E_TIMES: list[tuple[str, float, str]] = []  # (what, seconds, note), printed at the end of the e2e run


def e2e_prerequisites() -> None:
    from tests.e2e import lab as labmod

    need_root()
    need_binary("ip", "qemu-system-x86_64", "dnsmasq", "grub-mkstandalone", "mformat", "apt-get", "dpkg-deb")
    need(Path("/dev/net/tun").exists(), "needs /dev/net/tun (QEMU tap devices)")
    for f in (labmod.OVMF_CODE, labmod.OVMF_VARS):
        need(f.exists(), f"needs {f} (Debian package ovmf)")
    need(Path("/usr/lib/ipxe/snponly.efi").exists(), "needs /usr/lib/ipxe/snponly.efi (Debian package ipxe)")
    need(Path("/usr/lib/ipxe/qemu/pxe-virtio.rom").exists(), "needs QEMU's iPXE ROMs (Debian package ipxe-qemu)")


@contextlib.contextmanager
def e2e_lab(root: Path, what: str, **kw):
    """A virtual lab (tests.e2e.lab.Lab(root, **kw)) that is up inside the block and down after it;
    the time it took to come up is recorded in E2E_TIMES under ``what``."""
    from tests.e2e import lab as labmod

    the_lab = labmod.Lab(root, **kw)
    try:
        started = time.monotonic()
        the_lab.up()
        E2E_TIMES.append((what, time.monotonic() - started, the_lab.ns))
        yield the_lab
    finally:
        the_lab.down()


class LabMachines:
    """Creates QEMU machines in an e2e lab and stops them when the test ends (pass or fail)."""

    def __init__(self, lab, prefix: str):
        self.lab = lab
        self.prefix = prefix
        self.made: list = []

    def __call__(self, name: str, **kw):
        m = self.lab.machine(f"{self.prefix}-{name}", **kw)
        self.made.append(m)
        return m

    def stop_all(self) -> None:
        for m in self.made:
            self.lab.stop_machine(m)


def console_login(url: str, token: str) -> requests.Session:
    """A requests session logged in to a bastion's web console (its login form, CSRF token and all)."""
    s = requests.Session()
    page = s.get(url + "/console/login", timeout=30).text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    r = s.post(url + "/console/login", data={"csrf": csrf, "token": token}, allow_redirects=False, timeout=30)
    assert r.status_code == 302, r.text
    return s


# -- a real PostgreSQL 15 for labd (one server per pytest session) -------------------------------------
PG_BIN = Path("/usr/lib/postgresql/15/bin")


@dataclass
class Postgres:
    """A PostgreSQL server started from Debian's binaries as user postgres, on a unix socket only."""

    root: Path
    socket_dir: Path
    port: int

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@/{dbname}?host={self.socket_dir}&port={self.port}"

    def sql(self, statement: str, dbname: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.url(dbname), autocommit=True) as conn:
            conn.execute(statement)

    def restart(self) -> None:
        """Stop it (fast: connections are cut) and start it again with the same options."""
        r = subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "restart", "-D", str(self.root / "pgdata"),
                            "-m", "fast", "-w", "-t", "60", "-l", str(self.root / "postgres.log")],
                           capture_output=True, text=True, timeout=90)
        if r.returncode:
            raise RuntimeError(f"pg_ctl restart failed: {r.stdout}{r.stderr}")

    def stop(self) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "stop", "-D", str(self.root / "pgdata"),
                        "-m", "immediate", "-w"], capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres() -> Postgres:
    """initdb + pg_ctl start through `runuser -u postgres` (Debian's initdb refuses root), in a
    directory of its own under /tmp (short: the socket path must fit in sun_path; reachable by user
    postgres). Tuned for tests: no fsync, no full-page writes (a crash loses a test database only).
    :meth:`Postgres.stop` stops it and removes the directory."""
    import tempfile

    need(PG_BIN.joinpath("initdb").exists(), "needs PostgreSQL 15 (apt-get install postgresql-15)")
    need(os.geteuid() == 0, "needs root to run PostgreSQL as user postgres")
    root = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))
    os.chmod(root, 0o755)
    socket_dir = root / "sock"
    socket_dir.mkdir()
    shutil.chown(root, "postgres")
    shutil.chown(socket_dir, "postgres")
    pgdata = root / "pgdata"
    as_pg = ["runuser", "-u", "postgres", "--"]
    r = subprocess.run([*as_pg, str(PG_BIN / "initdb"), "-D", str(pgdata), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                        "--locale=C.UTF-8", "--no-sync"], capture_output=True, text=True, timeout=120)
    if r.returncode:
        raise RuntimeError(f"initdb failed: {r.stdout}{r.stderr}")
    port = free_port()
    opts = (f"-c listen_addresses='' -c unix_socket_directories={socket_dir} -c port={port} -c fsync=off "
            "-c full_page_writes=off -c synchronous_commit=off -c max_connections=200")
    r = subprocess.run([*as_pg, str(PG_BIN / "pg_ctl"), "start", "-D", str(pgdata), "-w", "-t", "60", "-o", opts,
                        "-l", str(root / "postgres.log")], capture_output=True, text=True, timeout=90)
    if r.returncode:
        raise RuntimeError(f"pg_ctl start failed: {r.stdout}{r.stderr}{(root / 'postgres.log').read_text(errors='replace')}")
    return Postgres(root, socket_dir, port)


# -- a real `labd serve` ------------------------------------------------------------------------------
@dataclass
class Labd:
    """A running `labd serve` (gunicorn, HTTPS with labd's own CA) on a database of its own."""

    url: str
    data_dir: Path
    database_url: str
    admin_password: str
    proc: subprocess.Popen
    log_path: Path

    @property
    def ca(self) -> str:
        return str(self.data_dir / "ca.crt")

    def session(self, token: str | None = None) -> requests.Session:
        s = requests.Session()
        s.trust_env = False  # else REQUESTS_CA_BUNDLE overrides the session's verify (psf/requests#3829)
        s.verify = self.ca
        if token:
            s.headers["Authorization"] = f"Bearer {token}"
        return s

    def login(self, user: str = "admin", password: str | None = None) -> str:
        r = self.session().post(self.url + "/api/v1/login", json={"username": user, "password": password or self.admin_password})
        r.raise_for_status()
        return r.json()["token"]

    hub_port: int = 0
    workers: int = 2
    env: dict = field(default_factory=dict)
    #: where `labd serve` listens when that is not ``url``'s address (e.g. inside the e2e lab's
    #: network namespace, ``url`` being a forwarder on loopback), and the command's prefix there
    listen_host: str = ""
    prefix: tuple[str, ...] = ()

    @property
    def hub_url(self) -> str:
        return f"wss://127.0.0.1:{self.hub_port}"

    api_port: int = 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc, timeout=20, group=True)

    def kill(self) -> None:
        """SIGKILL to labd and its children (gunicorn's workers, the hub): a crash."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def start(self, timeout: float = 30.0) -> None:
        """(Re)start `labd serve` on this data directory and ports; wait for /readyz."""
        port = int(self.url.rsplit(":", 1)[1])
        self.log_path = self.data_dir.parent / f"labd-{port}.log"
        host = self.listen_host or "127.0.0.1"
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "labd", "serve", "--data-dir", str(self.data_dir), "--listen",
                 f"{host}:{self.api_port}", "--workers", str(self.workers), "--hub-listen", f"{host}:{self.hub_port}"],
                stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO), **self.env}, cwd=REPO,
                start_new_session=True)

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"labd serve exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                return requests.get(self.url + "/readyz", timeout=1, verify=self.ca).status_code == 200
            except requests.exceptions.SSLError:
                raise
            except requests.ConnectionError:
                return False

        try:
            wait_for(ready, timeout=timeout, interval=0.1, what="labd serve /readyz")
        except BaseException:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            raise


def labd_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "labd", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, cwd=REPO)


def serve_labd(postgres, tmp_path_factory, database: str, env: dict | None = None):
    """A fixture body: `labd serve` on a new database cloned from the session's migrated template."""
    postgres.sql(f"CREATE DATABASE {database} TEMPLATE labd_template")
    server = start_labd(tmp_path_factory.mktemp("labd") / "data", postgres.url(database), env=env)
    yield server
    server.stop()


def start_labd(data_dir: Path, database_url: str, *, workers: int = 2, timeout: float = 30.0, env: dict | None = None,
               url: str | None = None, listen: str | None = None, prefix: tuple[str, ...] = ()) -> Labd:
    """`labd init` (keeps the printed admin password) then `labd serve` on a free loopback port
    (and its hub on another); waits for /readyz over HTTPS, trusting labd's own CA. Elsewhere:
    ``listen`` HOST:PORT (the hub on PORT + 1; HOST also in the server certificate), run with
    ``prefix`` (e.g. `ip netns exec NS`), reached by this process at ``url``."""
    host, port = listen.rsplit(":", 1) if listen else ("", "0")
    r = labd_cli("init", "--data-dir", str(data_dir), "--database-url", database_url, *(("--san", host) if host else ()))
    if r.returncode:
        raise RuntimeError(f"labd init failed:\n{r.stdout}{r.stderr}")
    password = re.search(r"^admin password: (\S+)$", r.stdout, re.M).group(1)
    api_port = int(port) if listen else free_port()
    server = Labd(url or f"https://127.0.0.1:{api_port}", data_dir, database_url, password, None, None,  # type: ignore[arg-type]
                  hub_port=api_port + 1 if listen else free_port(), workers=workers, env=dict(env or {}),
                  listen_host=host, prefix=tuple(prefix), api_port=api_port)
    server.start(timeout)
    return server


# -- lab-agent: a fake `journalctl` (where systemd's journal is absent) ---------------------------------
FAKE_JOURNALCTL = r'''#!/usr/bin/env python3
"""A fake journalctl for lab-agent's tests: entries are the JSON lines of $FAKE_JOURNAL (appended by
the test); supports -o json, -u UNIT, -n N, --since (ignored: all), --cursor C (from C on), --after-cursor C and -f."""
import json, os, sys, time

args = sys.argv[1:]
def opt(name):
    return args[args.index(name) + 1] if name in args else None
path, unit, n = os.environ["FAKE_JOURNAL"], opt("-u"), opt("-n")
cursor, inclusive = (opt("--cursor"), 0) if "--cursor" in args else (opt("--after-cursor"), 1)
with open(os.environ["FAKE_JOURNAL"] + ".argv", "a") as f:
    f.write(json.dumps(args) + "\n")
def entries():
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
def wanted(es):
    es = [e for e in es if unit is None or e.get("_SYSTEMD_UNIT") == unit]
    return es
es = wanted(entries())
if cursor is not None:
    idx = [i for i, e in enumerate(es) if e["__CURSOR"] == cursor]
    es = es[idx[0] + inclusive:] if idx else es
elif n is not None:
    es = es[-int(n):]
seen = {e["__CURSOR"] for e in wanted(entries())} - {e["__CURSOR"] for e in es}
for e in es:
    print(json.dumps(e), flush=True)
    seen.add(e["__CURSOR"])
while "-f" in args:
    time.sleep(0.05)
    for e in wanted(entries()):
        if e["__CURSOR"] not in seen:
            print(json.dumps(e), flush=True)
            seen.add(e["__CURSOR"])
'''


def fake_journal(directory: Path) -> tuple[Path, Path]:
    """(bin directory holding a fake `journalctl`, the journal file its entries come from)."""
    bindir = directory / "fakebin"
    bindir.mkdir(parents=True, exist_ok=True)
    script = bindir / "journalctl"
    script.write_text(FAKE_JOURNALCTL.replace("/usr/bin/env python3", sys.executable))
    script.chmod(0o755)
    journal = directory / "journal.jsonl"
    journal.touch()
    return bindir, journal


def journal_append(journal: Path, n: int, message: str, unit: str = "demo.service") -> str:
    """Append one entry (cursor ``s=abc;i=<n hex>``); returns its cursor."""
    cursor = f"s=abc;i={n:x}"
    with journal.open("a") as f:
        f.write(json.dumps({"__CURSOR": cursor, "__REALTIME_TIMESTAMP": str(1_700_000_000_000_000 + n), "PRIORITY": "6",
                            "_SYSTEMD_UNIT": unit, "MESSAGE": message}) + "\n")
    return cursor


# -- lab-agent as a subprocess -------------------------------------------------------------------------------
def lab_agent_cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lab_agent", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, cwd=REPO)


@dataclass
class Agent:
    """A running `lab-agent run` (its own process group, log in ``log_path``)."""

    state_dir: Path
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc, timeout=10, group=True)


def start_agent(state_dir: Path, *args: str, env: dict | None = None) -> Agent:
    log_path = state_dir.parent / f"{state_dir.name}.log"
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "lab_agent", "run", "--state-dir", str(state_dir), *args],
                                stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                                cwd=REPO, start_new_session=True)
    return Agent(state_dir, proc, log_path)


def pids_with(marker: str) -> list[int]:
    """The processes whose command line contains ``marker`` (to prove nothing was left running)."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    out.append(int(pid))
            except OSError:
                pass
    return out


def bastion_join(labd_url: str, join_token: str, data_dir: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    """`lab-bastion join` of the bastion in ``data_dir`` to labd (issue 17)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", "bastion_app.cli", "join", "--data-dir", str(data_dir), "--labd", labd_url,
                           "--token", join_token, "--name", name, *extra], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)


def join_token(labd: Labd, admin: requests.Session, *, uses: int | None = 1, ttl: int = 3600, scope: str = "*",
               kind: str = "bastion") -> str:
    """A join token (with labd's CA pin) made by the admin."""
    r = admin.post(labd.url + "/api/v1/tokens", json={"kind": kind, "ttl_seconds": ttl, "uses": uses, "scope": scope})
    r.raise_for_status()
    return r.json()["token"]


# -- installer content in unit tests ------------------------------------------------------------------
INSTALL_BASE = "http://10.0.0.1:8080"  # the bastion URL the rendered installers name
IMAGE_SHA = "ab" * 32
IMAGE = {"sha256": IMAGE_SHA, "size_bytes": 255_000_000}  # a debian-12 image manifest's figures


def image_machine(role="worker", disk="", os_name="debian-12", keys=(KEY,)):
    """A queued machine row as the image deploy's install script gets it."""
    return {"mac": MAC, "hostname": "node1", "role": role, "os": os_name, "disk": disk, "ssh_keys": list(keys),
            "install_token": TOKEN}


def ksvalidator() -> str:
    """pykickstart's ksvalidator of the virtualenv."""
    import shutil

    exe = shutil.which("ksvalidator") or str(Path(sys.executable).with_name("ksvalidator"))
    need(Path(exe).exists(), "needs pykickstart's ksvalidator (pip install -e '.[test]')")
    return exe


def validate_f43(tmp_path: Path, text: str, name: str = "ks.cfg") -> None:
    """The real `ksvalidator -v F43` passes ``text``."""
    f = tmp_path / name
    f.write_text(text)
    res = subprocess.run([ksvalidator(), "-v", "F43", str(f)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"ksvalidator -v F43 failed:\n{res.stdout}\n{res.stderr}"


# -- labd and its clients in tests -------------------------------------------------------------------
def labctl(env, *args, input=None):
    """labctl as a user types it (the real click command tree) with the environment ``env``."""
    from click.testing import CliRunner

    from labctl.main import cli

    return CliRunner().invoke(cli, list(args), env=env, input=input, catch_exceptions=False)


def ca_fp(labd) -> str:
    from labctl.login import fingerprint

    with open(labd.ca) as f:
        return fingerprint(f.read())


def logged_in(home, labd) -> dict:
    """``home`` (a labctl environment) after `labctl login` to labd as its admin."""
    r = labctl(home, "login", labd.url, "--username", "admin", "--password-stdin", "--ca-fingerprint", ca_fp(labd),
               input=labd.admin_password + "\n")
    assert r.exit_code == 0, r.output
    return home


def fleet_mac(b: int, i: int) -> str:
    """Machine ``i`` of bastion ``b`` in the labd fleet tests."""
    return f"52:54:{b:02x}:00:{i // 256:02x}:{i % 256:02x}"


def labd_bastion_join(labd, admin, data_dir, name, *, uses=1, ttl=3600, scope="*", extra=()) -> subprocess.CompletedProcess:
    """`lab-bastion join` with a new join token the admin made."""
    return bastion_join(labd.url, join_token(labd, admin, uses=uses, ttl=ttl, scope=scope), data_dir, name, *extra)


def labd_sql(labd):
    """A connection to labd's database (autocommit)."""
    import psycopg

    return psycopg.connect(labd.database_url, autocommit=True)


# -- schemathesis against a running server -----------------------------------------------------------
def run_schemathesis(spec_url: str, cwd: Path, *headers: str, max_examples: int, seed: str = "1",
                     extra: tuple[str, ...] = ()) -> tuple[int, str, int]:
    """`schemathesis run` with every check over the examples, coverage and fuzzing phases; returns
    (exit code, output, number of test cases generated). ``cwd`` may hold a schemathesis.toml."""
    exe = Path(sys.executable).with_name("schemathesis")
    need(exe.exists() or shutil.which("schemathesis") is not None, "schemathesis is not installed (make venv)")
    cmd = [str(exe if exe.exists() else "schemathesis"), "run", spec_url, "--checks", "all",
           "--max-examples", str(max_examples), "--phases", "examples,coverage,fuzzing", "-w", "2",
           "--seed", seed, "--suppress-health-check", "all", *extra]
    for h in headers:
        cmd += ["-H", h]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300)
    out = r.stdout + r.stderr
    generated = re.search(r"(\d+) generated", out)
    return r.returncode, out, int(generated.group(1)) if generated else 0


def start_chromium(width: int = 1280, height: int = 900):
    """Debian's chromium, headless, driven by selenium through chromium-driver (the consoles'
    browser tests); the caller quits it."""
    need_binary("chromium", "chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}",
                "--disable-gpu", "--no-first-run"):
        opts.add_argument(arg)
    opts.accept_insecure_certs = True  # labd's certificate is signed by its own CA
    return webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))


def save_screenshot(driver, path: Path, width: int = 1280) -> None:
    """The whole page at ``width`` as a PNG; with UPDATE_DOCS_IMAGES=1 also copied to docs/img/."""
    driver.set_window_size(width, 900)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, min(max(height + 200, 600), 2400))
    driver.save_screenshot(str(path))
    driver.set_window_size(1280, 900)
    if os.environ.get("UPDATE_DOCS_IMAGES"):
        shutil.copy(path, REPO / "docs" / "img" / path.name)


# -- emulated BMCs (tests/bmc.py) ------------------------------------------------------------------
@dataclass
class EmulatedBmc:
    proc: subprocess.Popen
    address: str  # what `labctl power set --address` takes
    log_path: Path

    def stop(self) -> None:
        stop_process(self.proc, timeout=5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_redfish_bmc(work: Path, systems: list[dict], user: str, password: str, *, prefix: tuple[str, ...] = (),
                      host: str = "127.0.0.1", port: int | None = None) -> EmulatedBmc:
    """sushy-tools' Redfish emulator with tests/bmc.py's systems driver (``systems``: {uuid, name,
    power_state, monitor?}), basic auth ``user``/``password``; ``prefix`` runs it elsewhere (ip netns exec)."""
    import bcrypt

    work.mkdir(parents=True, exist_ok=True)
    auth = work / "htpasswd"
    auth.write_text(f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}\n")
    port = port or free_port(host)
    log_path = work / f"redfish-{port}.log"
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen([*prefix, sys.executable, "-m", "tests.bmc", "redfish", "--host", host, "--port", str(port),
                                 "--auth-file", str(auth), "--systems", json.dumps(systems)],
                                stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)},
                                cwd=REPO, start_new_session=True)
    bmc = EmulatedBmc(proc, f"http://{host}:{port}", log_path)
    if not prefix:
        def up():
            if proc.poll() is not None:
                raise RuntimeError(f"the Redfish emulator exited:\n{bmc.log()[-2000:]}")
            try:
                return requests.get(bmc.address + "/redfish/v1/", timeout=1).status_code == 200
            except requests.RequestException:
                return False
        wait_for(up, timeout=30, interval=0.1, what="the Redfish emulator")
    return bmc


def start_ipmi_bmc(work: Path, user: str, password: str, *, monitor: str | None = None, prefix: tuple[str, ...] = (),
                   host: str = "127.0.0.1", port: int | None = None) -> EmulatedBmc:
    """pyghmi's BMC server (tests/bmc.py) for one machine, on UDP ``port``."""
    work.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host, socket.SOCK_DGRAM)
    log_path = work / f"ipmi-{port}.log"
    argv = [*prefix, sys.executable, "-m", "tests.bmc", "ipmi", "--host", host, "--port", str(port), "--user", user,
            "--password", password] + (["--monitor", monitor] if monitor else [])
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)},
                                cwd=REPO, start_new_session=True)
    time.sleep(0.5)
    if proc.poll() is not None:
        raise RuntimeError(f"the IPMI BMC exited:\n{log_path.read_text(errors='replace')[-2000:]}")
    return EmulatedBmc(proc, f"{host}:{port}", log_path)
