"""Boot, reach and stop throwaway Debian 12 VMs built from the cached image.

Each VM is a qcow2 overlay on the read-only cached image, booted with QEMU's direct kernel boot
under TCG (`/dev/kvm` is not usable here), serial console written to a file, user-mode networking
with `restrict=on` (the guest can reach nothing; the host reaches the guest's SSH through one
forwarded loopback port). A VM's state lives in `cache_dir()/run/<name>/state.json`, so separate
processes (molecule's create and destroy playbooks, pytest fixtures, the bench) can share it.

QEMU runs under `timeout`, so a VM whose owner died without calling `down` still goes away.

Warm start: booting under TCG takes 45-75 s (most of a molecule `create`). So the first VM of a
given image, memory size and vCPU count is booted once, its RAM and devices saved with QEMU's
migration stream (`-incoming` format) and its disk kept as a read-only layer; every later VM of
that shape resumes from there on its own overlay in a few seconds, then gets its host name and the
current time over SSH. `vmgenid` tells the guest kernel it was cloned, so it reseeds its random
number generator. LAB_VM_WARM=0 boots every VM from cold.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.vm.image import Image, cache_dir, ensure_image, file_lock

DEFAULT_MEMORY_MB = 2048
DEFAULT_CPUS = 2
DEFAULT_LIFETIME_S = 3 * 3600
SSH_OPTIONS = [
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", "IdentitiesOnly=yes",
    "-o", "BatchMode=yes",
    "-o", "ConnectTimeout=5",
]


class VMError(RuntimeError):
    pass


def run_root() -> Path:
    path = cache_dir() / "run"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); look at its state.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class VM:
    name: str
    port: int
    pid: int
    key: str
    overlay: str
    console: str
    rundir: str
    started: float
    boot_seconds: float | None = None
    user: str = "root"
    host: str = "127.0.0.1"

    # -- state ---------------------------------------------------------------------------------
    @staticmethod
    def state_path(name: str) -> Path:
        return run_root() / name / "state.json"

    def save(self) -> None:
        Path(self.rundir).mkdir(parents=True, exist_ok=True)
        self.state_path(self.name).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, name: str) -> VM | None:
        path = cls.state_path(name)
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))

    @property
    def alive(self) -> bool:
        return _alive(self.pid)

    # -- access --------------------------------------------------------------------------------
    def ssh_argv(self, *command: str) -> list[str]:
        return ["ssh", *SSH_OPTIONS, "-i", self.key, "-p", str(self.port), f"{self.user}@{self.host}", *command]

    def ssh(self, *command: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.ssh_argv(*command), capture_output=True, text=True, check=check, timeout=timeout)

    def inventory_vars(self) -> dict:
        """Ansible connection variables for this VM."""
        return {
            "ansible_host": self.host,
            "ansible_port": self.port,
            "ansible_user": self.user,
            "ansible_ssh_private_key_file": self.key,
            "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
            "ansible_python_interpreter": "/usr/bin/python3",
        }

    def instance_config(self) -> dict:
        """This VM as an entry of molecule's instance_config.yml (driver `default`)."""
        return {
            "instance": self.name,
            "address": self.host,
            "user": self.user,
            "port": self.port,
            "identity_file": self.key,
        }

    def console_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(Path(self.console).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no console log)"

    # -- lifecycle -----------------------------------------------------------------------------
    def wait_ssh(self, timeout: float = 300) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise VMError(f"VM {self.name} exited during boot; console:\n{self.console_tail()}")
            try:
                if self.ssh("true", check=False, timeout=15).returncode == 0:
                    return time.monotonic()
            except subprocess.TimeoutExpired:
                pass
            time.sleep(1)
        raise VMError(f"VM {self.name}: no SSH after {timeout:.0f}s; console:\n{self.console_tail()}")

    def stop(self, timeout: float = 20, keep_overlay_as: Path | None = None) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL) and remove the overlay and state; with keep_overlay_as,
        the overlay is first moved there (once QEMU has exited)."""
        if self.alive:
            with _suppress():
                os.killpg(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.alive and time.monotonic() < deadline:
                time.sleep(0.2)
            if self.alive:
                with _suppress():
                    os.killpg(self.pid, signal.SIGKILL)
        # Reap if it is our child (same process that started it).
        with _suppress():
            os.waitpid(self.pid, os.WNOHANG)
        if keep_overlay_as is not None:
            Path(self.overlay).rename(keep_overlay_as)
        keep = os.environ.get("LAB_VM_KEEP_LOGS")
        rundir = Path(self.rundir)
        if keep:
            Path(self.overlay).unlink(missing_ok=True)
            self.state_path(self.name).unlink(missing_ok=True)
        else:
            shutil.rmtree(rundir, ignore_errors=True)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return exc_type is not None and issubclass(exc_type, (ProcessLookupError, ChildProcessError, PermissionError))


def qemu_argv(
    image: Image, overlay: Path, console: Path, port: int, memory_mb: int, cpus: int, pidfile: Path, hostname: str
) -> list[str]:
    return [
        "qemu-system-x86_64",
        "-accel", "tcg",
        "-machine", "q35",
        "-cpu", os.environ.get("LAB_VM_CPU", "max"),
        "-m", str(memory_mb),
        "-smp", str(cpus),
        "-display", "none",
        "-monitor", "none",
        "-serial", f"file:{console}",
        "-no-reboot",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", f"{image.cmdline} systemd.hostname={hostname}",
        "-drive", f"file={overlay},if=virtio,format=qcow2,cache=unsafe,discard=unmap",
        "-nic", f"user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device", "virtio-rng-pci",
        "-device", "vmgenid,guid=auto",
        "-pidfile", str(pidfile),
    ]


#: the host name a warm-start snapshot is booted with (each resumed VM then gets its own)
WARM_HOSTNAME = "labvm"


def _launch(name: str, rundir: Path, backing: Path, image: Image, memory_mb: int, cpus: int, lifetime_s: int,
            hostname: str, extra: list[str]) -> VM:
    """Start QEMU for VM `name` on a fresh overlay of `backing` (SSH not yet waited for)."""
    shutil.rmtree(rundir, ignore_errors=True)
    rundir.mkdir(parents=True)
    overlay = rundir / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "qcow2", str(overlay)],
                   check=True)
    console = rundir / "console.log"
    port = _free_port()
    argv = ["timeout", "--kill-after=10", str(lifetime_s)] + qemu_argv(
        image, overlay, console, port, memory_mb, cpus, rundir / "qemu.pid", hostname) + extra
    with open(rundir / "qemu.log", "w") as qlog:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=subprocess.STDOUT, start_new_session=True)
    vm = VM(name=name, port=port, pid=proc.pid, key=str(image.key), overlay=str(overlay), console=str(console),
            rundir=str(rundir), started=time.time())
    vm.save()
    return vm


def _qmp(sock: Path, *commands: dict) -> list:
    """Send QMP commands to a QEMU monitor socket; return their results (events are skipped)."""
    results = []
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(60)
        s.connect(str(sock))
        f = s.makefile("rw")
        json.loads(f.readline())  # greeting
        for command in ({"execute": "qmp_capabilities"}, *commands):
            f.write(json.dumps(command) + "\n")
            f.flush()
            while True:
                reply = json.loads(f.readline())
                if "return" in reply or "error" in reply:
                    break
            if "error" in reply:
                raise VMError(f"QMP {command['execute']}: {reply['error']}")
            results.append(reply["return"])
    return results[1:]


def warm_state(image: Image, memory_mb: int, cpus: int, boot_timeout: float = 600) -> tuple[Path, Path]:
    """(disk layer, migration stream) of a VM booted once from `image` with this memory and vCPU
    count, made on first use and cached beside the image, keyed by everything the stream depends on."""
    version = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    probe = qemu_argv(image, Path("D"), Path("C"), 0, memory_mb, cpus, Path("P"), WARM_HOSTNAME)
    key = hashlib.sha256(json.dumps([image.qcow2.name, version, probe]).encode()).hexdigest()[:12]
    disk = cache_dir() / f"warm-{key}.qcow2"
    state = cache_dir() / f"warm-{key}.vmstate"
    with file_lock(cache_dir() / "warm.lock"):
        if disk.exists() and state.exists():
            return disk, state
        name = f"warm-{key}"
        rundir = run_root() / name
        sock = rundir.parent / f"{name}.qmp"
        sock.unlink(missing_ok=True)
        vm = _launch(name, rundir, image.qcow2, image, memory_mb, cpus, 3600, WARM_HOSTNAME,
                     ["-qmp", f"unix:{sock},server=on,wait=off"])
        try:
            vm.wait_ssh(boot_timeout)
            vm.ssh("sync")
            time.sleep(3)  # let the SSH connection's teardown finish on both sides
            partial = state.with_suffix(".partial")
            # Migrated while running: the stream then records a running guest, so a VM started
            # with -incoming from it runs (a stopped source would leave it paused).
            _qmp(sock, {"execute": "migrate", "arguments": {"uri": f"exec:cat > {shlex.quote(str(partial))}"}})
            deadline = time.monotonic() + 300
            while True:
                status = _qmp(sock, {"execute": "query-migrate"})[0].get("status")
                if status == "completed":
                    break
                if status in ("failed", "cancelled") or time.monotonic() > deadline:
                    raise VMError(f"saving the warm-start state of {name}: migration {status}")
                time.sleep(0.5)
            _qmp(sock, {"execute": "quit"})
            vm.stop(timeout=30, keep_overlay_as=disk)
            partial.rename(state)
        finally:
            vm.stop()
            sock.unlink(missing_ok=True)
    return disk, state


def up(
    name: str,
    memory_mb: int = DEFAULT_MEMORY_MB,
    cpus: int = DEFAULT_CPUS,
    boot_timeout: float = 300,
    lifetime_s: int = DEFAULT_LIFETIME_S,
    reuse: bool = False,
) -> VM:
    """Boot VM `name` on a fresh overlay and wait for SSH. With reuse, return it if already up."""
    existing = VM.load(name)
    if existing is not None:
        if existing.alive and reuse:
            return existing
        if existing.alive:
            raise VMError(f"VM {name} is already running (pid {existing.pid}); `python -m tests.vm down {name}`")
        existing.stop()
    image = ensure_image()
    warm = os.environ.get("LAB_VM_WARM", "1") != "0"
    if warm:
        disk, state = warm_state(image, memory_mb, cpus)
        base, hostname, extra = disk, WARM_HOSTNAME, ["-incoming", f"exec:cat {shlex.quote(str(state))}"]
    else:
        base, hostname, extra = image.qcow2, _hostname(name), []
    started = time.monotonic()
    vm = _launch(name, run_root() / name, base, image, memory_mb, cpus, lifetime_s, hostname, extra)
    try:
        ready = vm.wait_ssh(boot_timeout)
        if warm:  # a resumed VM is a clone of the snapshot: its own identity and the current clock
            vm.ssh(f"sh -ec {shlex.quote(_clone_identity(_hostname(name), time.time()))}")
    except BaseException:
        vm.stop()
        raise
    vm.boot_seconds = round(ready - started, 1)
    vm.save()
    return vm


def down(name: str) -> bool:
    vm = VM.load(name)
    if vm is None:
        return False
    vm.stop()
    return True


def running() -> list[VM]:
    vms = []
    for state in sorted(run_root().glob("*/state.json")):
        vm = VM.load(state.parent.name)
        if vm is not None:
            vms.append(vm)
    return vms


def _clone_identity(hostname: str, now: float) -> str:
    """Guest shell script: host name, clock, a new machine-id and new SSH host keys (ed25519 and
    ECDSA only: an RSA key takes ~10 s to make under TCG, and every client here offers ed25519)."""
    keys = " && ".join(f"ssh-keygen -q -t {t} -N '' -f /etc/ssh/ssh_host_{t}_key" for t in ("ed25519", "ecdsa"))
    return (f"hostname {shlex.quote(hostname)}\n"
            f"date -u -s @{now:.3f} >/dev/null\n"
            "tr -d - < /proc/sys/kernel/random/uuid > /etc/machine-id\n"
            "rm -f /var/lib/dbus/machine-id /etc/ssh/ssh_host_*\n"
            f"{keys}\n"
            "systemctl reload ssh\n")


def _hostname(name: str) -> str:
    """The guest's hostname: the VM name made RFC 1123-safe."""
    import re

    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63]
    return label or "labvm"
