"""`labctl init bastion standalone start|stop|status` and `labctl init bastion wheelhouse DIR`.

`start` runs the collection's playbooks/bastion.yml on this host (or on --target over SSH) through
ansible-runner (labctl.runner, live task progress), then checks that the bastion answers. The bastion
host needs no internet: lab-platform and its dependencies go there as wheels (the wheelhouse, built
here with pip and cached outside the repository).
"""

from __future__ import annotations

import base64
import email.parser
import fcntl
import hashlib
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import click

from labcore import bastion_config
from labctl import errors, output, runner

REPO = runner.REPO
SERVICES = ("lab-bastion", "lab-dnsmasq")
DEFAULT_DATA_DIR = "/var/lib/lab-bastion"


# -- wheelhouse -------------------------------------------------------------------------------------
def cache_dir() -> Path:
    base = Path(os.environ.get("LAB_WHEELHOUSE_CACHE") or
                ("/var/cache/lab-platform/wheelhouse" if os.geteuid() == 0 else Path.home() / ".cache/lab-platform/wheelhouse"))
    base.mkdir(parents=True, exist_ok=True)
    return base


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise errors.LabctlError(f"pip failed: {shlex.join(cmd)}\n{(r.stderr or r.stdout)[-2000:]}",
                                 "the wheelhouse needs the package index (or PIP_FIND_LINKS) once; then it is cached")


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def repack_installed(dest: Path, name: str = "lab-platform") -> Path:
    """The wheel of the installed distribution *name*, rebuilt from its files (pip keeps no copy of
    the wheel it installed): every file its RECORD lists inside site-packages, a new RECORD with
    their hashes; the console scripts are left out (pip makes them from entry_points.txt)."""
    dist = importlib.metadata.distribution(name)
    tag = next((line.split(":", 1)[1].strip() for line in (dist.read_text("WHEEL") or "").splitlines()
                if line.startswith("Tag:")), "py3-none-any")
    files = [f for f in dist.files or [] if not str(f).startswith("..") and "__pycache__" not in f.parts]
    info = next(f.parts[0] for f in files if f.parts[0].endswith(".dist-info"))
    skip = {f"{info}/{n}" for n in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")}
    whl = dest / f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}-{tag}.whl"
    record = []
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(files, key=lambda f: (f.parts[0] == info, str(f))):  # dist-info last, as wheels have it
            path = str(f).replace(os.sep, "/")
            if path in skip:
                continue
            data = Path(dist.locate_file(f)).read_bytes()
            z.writestr(path, data)
            record.append(f"{path},{_record_hash(data)},{len(data)}")
        z.writestr(f"{info}/RECORD", "\n".join([*record, f"{info}/RECORD,,"]) + "\n")
    return whl


def lab_platform_wheel(dest: Path, source: Path = REPO) -> Path:
    """The lab-platform wheel of this labctl in *dest*: built with pip from the source tree labctl
    runs from, or repacked from the installed distribution (:func:`repack_installed`)."""
    dest.mkdir(parents=True, exist_ok=True)
    if not (source / "pyproject.toml").is_file():
        return repack_installed(dest)
    # setuptools builds in the tree (build/, *.egg-info): one build of a checkout at a time
    with open(cache_dir() / ".source-build.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _pip("wheel", "--no-deps", "--wheel-dir", str(dest), str(source))
    return next(dest.glob("lab_platform-*.whl"))


def requirements(wheel: Path) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA, without the optional (extra) ones."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(z.read(meta).decode())
    return [r for r in msg.get_all("Requires-Dist") or [] if not re.search(r"\bextra\s*==", r)]


def build_wheelhouse(dest: Path, source: Path = REPO) -> Path:
    """dest/ = the lab-platform wheel (:func:`lab_platform_wheel`) + the wheels of what it requires
    (cached by the hash of that list, outside the repository). Returns dest."""
    dest.mkdir(parents=True, exist_ok=True)
    build = cache_dir() / f"build-{os.getpid()}"
    shutil.rmtree(build, ignore_errors=True)
    try:
        wheel = lab_platform_wheel(build, source)
        deps = requirements(wheel)
        key = hashlib.sha256(("\n".join(sorted(deps)) + sys.version.split()[0]).encode()).hexdigest()[:12]
        deps_dir = cache_dir() / f"deps-{key}"
        if not (deps_dir / ".complete").exists():
            tmp = deps_dir.with_name(deps_dir.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            _pip("wheel", "--wheel-dir", str(tmp), *deps)
            (tmp / ".complete").touch()
            shutil.rmtree(deps_dir, ignore_errors=True)
            tmp.rename(deps_dir)
        for old in dest.glob("lab_platform-*.whl"):
            old.unlink()
        for whl in deps_dir.glob("*.whl"):
            if not (dest / whl.name).exists():
                shutil.copy2(whl, dest / whl.name)
        shutil.copy2(wheel, dest / wheel.name)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return dest


# -- running the playbook ----------------------------------------------------------------------------
_TARGET = re.compile(r"(?:(?P<user>[a-z_][a-z0-9_-]*)@)?(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\])(?::(?P<port>\d{1,5}))?")


def target_inventory(target: str | None, ssh_key: str | None) -> dict:
    if not target:
        return runner.inventory({"localhost": {"ansible_connection": "local", "ansible_python_interpreter": "/usr/bin/python3"}},
                                group="bastion")
    m = _TARGET.fullmatch(target)
    if not m:
        raise errors.UsageError(f"--target {target!r} is not [USER@]HOST[:PORT]")
    hv = {"ansible_host": m["host"].strip("[]"), "ansible_user": m["user"] or "root"}
    if m["port"]:
        hv["ansible_port"] = int(m["port"])
    if ssh_key:
        hv["ansible_ssh_private_key_file"] = ssh_key
    return runner.inventory({"bastion": hv}, group="bastion")


def _remote(target: str | None, ssh_key: str | None, argv: list[str]) -> subprocess.CompletedProcess:
    if target:
        m = _TARGET.fullmatch(target)
        if not m:
            raise errors.UsageError(f"--target {target!r} is not [USER@]HOST[:PORT]")
        ssh = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "LogLevel=ERROR", "-p", m["port"] or "22", *(["-i", ssh_key] if ssh_key else []),
               f"{m['user'] or 'root'}@{m['host'].strip('[]')}", shlex.join(argv)]
        return subprocess.run(ssh, capture_output=True, text=True, timeout=60)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def _health(target: str | None, ssh_key: str | None, port: int) -> str | None:
    """The bastion's /healthz answer, asked on the bastion host itself (None if it does not answer)."""
    url = f"http://127.0.0.1:{port}/healthz"
    if not target:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.read().decode()
        except OSError:
            return None
    r = _remote(target, ssh_key, ["python3", "-c", f"import urllib.request;print(urllib.request.urlopen({url!r},timeout=5).read().decode())"])
    return r.stdout.strip() if r.returncode == 0 else None


# -- commands ---------------------------------------------------------------------------------------
target_option = click.option("--target", metavar="[USER@]HOST[:PORT]", help="Set up this host over SSH instead of this machine.")
key_option = click.option("--ssh-key", type=click.Path(exists=True, dir_okay=False), help="SSH private key for --target.")


@click.group()
def init() -> None:
    """Set up lab-platform infrastructure (a standalone bastion) with the collection's playbooks."""


@init.group()
def bastion() -> None:
    """A bastion: lab-bastion serve + dnsmasq, as systemd services."""


@bastion.command("wheelhouse")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
def wheelhouse_cmd(dest: Path) -> None:
    """Build DEST: the lab-platform wheel and its dependencies' wheels (what bastion_wheelhouse needs)."""
    out = build_wheelhouse(dest)
    output.console().print(f"{len(list(out.glob('*.whl')))} wheels in {out}", markup=False, highlight=False)


@bastion.group()
def standalone() -> None:
    """A bastion on this host (or --target), set up by playbooks/bastion.yml."""


@standalone.command("start")
@target_option
@key_option
@click.option("--wheelhouse", type=click.Path(file_okay=False, path_type=Path), help="Wheels to install (default: built and cached here).")
@click.option("--listen", default="0.0.0.0:8080", show_default=True, help="HTTP address of the bastion.")
@click.option("--interface", default="", help="Provisioning interface (default: the default route's).")
@click.option("--dhcp-mode", type=click.Choice(["proxy", "full"]), default="proxy", show_default=True)
@click.option("--dhcp-range", default="", metavar="START,END", help="Addresses to hand out with --dhcp-mode full.")
@click.option("--public-url", default="", help="URL machines use to reach the bastion.")
@click.option("--no-firewall", is_flag=True, help="Do not open the bastion's ports in the host firewall.")
@click.option("--timeout", type=int, default=1800, show_default=True, help="Seconds before the playbook run is stopped.")
@click.option("--labd", "labd_url", default="", metavar="URL", help="Join this labd (https://HOST:PORT) with --token.")
@click.option("--token", "join_token", default="", envvar="LAB_BASTION_JOIN_TOKEN", metavar="JOIN",
              help="The join token `labctl create token --kind bastion` printed (pins labd's CA). Env: LAB_BASTION_JOIN_TOKEN.")
@click.option("--name", "labd_name", default="", metavar="NAME", help="The bastion's name in labd (default: the host's name).")
def start(target, ssh_key, wheelhouse, listen, interface, dhcp_mode, dhcp_range, public_url, no_firewall, timeout,
          labd_url, join_token, labd_name) -> None:
    """Install (or update) and start the bastion, then check that it answers. With --labd and
    --token the bastion joins labd (its key is made on the bastion) and keeps a link to its hub."""
    if bool(labd_url) != bool(join_token):
        raise errors.UsageError("--labd and --token go together", "labctl create token --kind bastion prints the token")
    if join_token:
        from labcore.enroll import EnrollError, parse_join

        try:
            parse_join(join_token)
        except EnrollError as exc:
            raise errors.UsageError(str(exc), "nothing was changed") from None
    try:  # the bastion's own rules, before anything is installed
        bastion_config.build({"listen": listen, "interface": interface, "dhcp_mode": dhcp_mode,
                              "dhcp_range": dhcp_range, "public_url": public_url})
    except bastion_config.ConfigError as exc:
        raise errors.UsageError(str(exc), "nothing was changed") from None
    if not wheelhouse:
        wheelhouse = build_wheelhouse(cache_dir() / "current")
    extravars = {"bastion_wheelhouse": str(Path(wheelhouse).resolve()), "bastion_listen": listen,
                 "bastion_interface": interface, "bastion_dhcp_mode": dhcp_mode, "bastion_dhcp_range": dhcp_range,
                 "bastion_public_url": public_url, "bastion_firewall_enabled": not no_firewall,
                 "bastion_labd_url": labd_url, "bastion_labd_join_token": join_token, "bastion_labd_name": labd_name}
    result = runner.run_playbook(runner.playbook_path("bastion.yml"), inventory=target_inventory(target, ssh_key),
                                 extravars=extravars, name="init-bastion", timeout=timeout)
    if join_token:  # the run's artefacts keep no secret: the join token was in its extravars
        (result.run_dir / "env" / "extravars").unlink(missing_ok=True)
    runner.check(result, "bastion.yml")
    port = int(listen.rsplit(":", 1)[1])
    deadline = time.monotonic() + 30
    while (answer := _health(target, ssh_key, port)) is None and time.monotonic() < deadline:
        time.sleep(1)
    if answer is None:
        raise errors.Unreachable(f"the bastion was set up but does not answer on port {port}",
                                 "look at `journalctl -u lab-bastion` on the bastion host")
    output.console().print(f"bastion is up: {answer.strip()}\ntoken: lab-bastion token --data-dir {DEFAULT_DATA_DIR}",
                           markup=False, highlight=False)


@standalone.command("stop")
@target_option
@key_option
def stop(target, ssh_key) -> None:
    """Stop the bastion's services (lab-bastion, lab-dnsmasq); the data directory is kept."""
    r = _remote(target, ssh_key, ["systemctl", "stop", *SERVICES])
    if r.returncode != 0:
        raise errors.LabctlError(f"systemctl stop failed: {(r.stderr or r.stdout).strip()}")
    output.console().print("stopped: " + ", ".join(SERVICES), markup=False, highlight=False)


@standalone.command("status")
@target_option
@key_option
@click.option("--port", type=int, default=8080, show_default=True)
def status(target, ssh_key, port) -> None:
    """Show whether the services run and the bastion answers; exit 3 if it does not."""
    r = _remote(target, ssh_key, ["systemctl", "is-active", *SERVICES])
    states = dict(zip(SERVICES, (r.stdout.split() + ["unknown"] * len(SERVICES))[: len(SERVICES)], strict=True))
    answer = _health(target, ssh_key, port)
    for name, st in states.items():
        output.console().print(f"{name}: {st}", markup=False, highlight=False)
    output.console().print(f"healthz: {answer.strip() if answer else 'no answer'}", markup=False, highlight=False)
    if answer is None:
        raise errors.Unreachable(f"the bastion does not answer on port {port}", "labctl init bastion standalone start")
