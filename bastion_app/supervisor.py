"""`lab-bastion serve`: one small supervisor process that starts and watches its children:
gunicorn (the Flask app, several workers), the syslog listener and dnsmasq, restarting any that
dies, and stopping all of them on SIGTERM/SIGINT. It also marks silent installs as stalled.

The supervisor binds the syslog port itself and hands the sockets to the listener child: the port
is the bastion's from the first moment and across the listener's restarts, and lines sent before
the listener runs wait in the socket's buffer.

Start-up fails fast: an unusable data directory, a taken HTTP or syslog port, or a child that
exits with an error during its first seconds ends `serve` at once with :data:`EX_CONFIG` and a message that says
what to change (the systemd unit does not restart on that status), instead of retrying forever
while the ports it did get stay held."""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bastion_app import dnsmasq, front
from bastion_app.store import Store
from bastion_app.syslog import SOCKETS_ENV, bind_sockets
from labcore.bastion_config import Config, write_serve_state

log = logging.getLogger("lab-bastion")

#: sysexits.h EX_CONFIG: `serve` cannot start as configured (taken port, unusable data directory).
#: The systemd unit lists it in RestartPreventExitStatus=, so the failure shows instead of a loop.
EX_CONFIG = 78
#: A critical child that exits with an error within this many seconds of its first start fails
#: `serve` at once (one killed by a signal is restarted as always).
STARTUP_S = 5.0


class StartupError(Exception):
    """`serve` cannot start as configured; the message says what to change."""


@dataclass
class ChildSpec:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    #: a child that cannot start (say, dnsmasq without its port) is retried with backoff
    critical: bool = True


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the supervisor dies (even by SIGKILL), so no
    orphaned gunicorn or dnsmasq keeps the ports when the bastion is restarted."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class _Running:
    spec: ChildSpec
    proc: subprocess.Popen
    started: float
    restarts: int = 0
    #: its first start: exiting within STARTUP_S then means the bastion cannot start
    first: bool = False


_RUNTIME_PREFIX = "lab-bastion-run-"
_runtime: Path | None = None


def _runtime_base() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def runtime_dir() -> Path:
    """This supervisor's runtime directory (mode 0700), made on first use: the workers' Prometheus
    counters (``metrics/``), gunicorn's unix socket and nginx's configuration, pid and temporary
    files. In memory (/dev/shm), never on the data disk, so that a full or read-only data
    directory cannot crash a worker through its metrics files (they are mmap'ed: a full filesystem
    means SIGBUS). Directories of supervisors that died without cleaning up are removed."""
    global _runtime
    if _runtime is None:
        base = _runtime_base()
        for old in base.glob(_RUNTIME_PREFIX + "*"):
            pid = old.name[len(_RUNTIME_PREFIX):]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(old, ignore_errors=True)
        path = base / f"{_RUNTIME_PREFIX}{os.getpid()}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(mode=0o700, parents=True)
        (path / "metrics").mkdir(mode=0o700)
        _runtime = path
    return _runtime


def child_env(cfg: Config, runtime: Path) -> dict[str, str]:
    """The environment every child gets: the data dir and every effective setting, so that each
    gunicorn worker loads exactly the configuration the supervisor resolved."""
    env = dict(os.environ)
    env["LAB_BASTION_DATA_DIR"] = str(cfg.data_path)
    for k, v in cfg.as_dict().items():
        if k in ("data_dir", "extra"):
            continue
        env["LAB_BASTION_" + k.upper()] = str(v).lower() if isinstance(v, bool) else str(v)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(runtime / "metrics")
    return env


def children(cfg: Config) -> list[ChildSpec]:
    """What `serve` runs: gunicorn on a unix socket behind nginx (bastion_app.front), the syslog
    listener, dnsmasq. Other parts of the bastion add their processes here."""
    runtime = runtime_dir()
    upstream = runtime / "gunicorn.sock"
    specs = [
        ChildSpec("gunicorn", [sys.executable, "-m", "gunicorn", "-c", "python:bastion_app.gunicorn_conf", "bastion_app.wsgi:app"],
                  env={front.UPSTREAM_ENV: str(upstream)}),
        ChildSpec("nginx", front.argv(front.write_config(cfg, runtime, upstream), front.binary())),
    ]
    specs.append(ChildSpec("syslog", [sys.executable, "-m", "bastion_app.syslog"]))
    if cfg.dnsmasq:
        specs.append(dnsmasq_child(cfg))
    from labcore.enroll import has_identity

    if has_identity(cfg.link_path):  # joined to a labd (lab-bastion join): keep the link up
        specs.append(ChildSpec("link", [sys.executable, "-m", "bastion_app.link"], critical=False))
    return specs


def dnsmasq_child(cfg: Config) -> ChildSpec:
    """dnsmasq's child: its TFTP root and configuration written (the same write_config as
    `lab-bastion dnsmasq-config`), then its command line."""
    binary = dnsmasq.binary()
    conf = dnsmasq.conf_path(cfg)
    dnsmasq.write_config(cfg, conf)
    return ChildSpec("dnsmasq", dnsmasq.argv(conf, binary))


def _bind_probe(host: str, port: int) -> None:
    """Bind (and release) a TCP port as its listener will (with SO_REUSEADDR: a connection of an
    earlier run in TIME_WAIT is no conflict)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))


def check_http_port(cfg: Config) -> None:
    """The HTTP port is free (nginx will bind it), or StartupError."""
    try:
        _bind_probe(cfg.listen_host, cfg.listen_port)
    except OSError as exc:
        raise StartupError(f"cannot listen on {cfg.listen} ({exc.strerror}): the HTTP port is in use by another "
                           "program (another bastion?); stop it, or choose another address with --listen HOST:PORT") from None


def bind_syslog(cfg: Config) -> tuple[socket.socket, socket.socket]:
    """The syslog listener's sockets, bound here so that the port is taken (and datagrams wait in
    its buffer) from the start, whenever the listener child gets to run, and across its restarts."""
    try:
        return bind_sockets(cfg.listen_host, cfg.syslog_port)
    except OSError as exc:
        raise StartupError(f"cannot listen on the syslog port {cfg.syslog_port} (udp and tcp {cfg.listen_host}: "
                           f"{exc.strerror}): another program (another bastion, rsyslog?) has it; stop it, or "
                           "choose another port with --syslog-port PORT") from None


class Supervisor:
    def __init__(self, cfg: Config, specs: list[ChildSpec]):
        self.cfg = cfg
        self.specs = specs
        self.running: dict[str, _Running] = {}
        self.stopping = threading.Event()
        self.runtime: Path | None = None
        self.env: dict[str, str] = {}
        self._serve_lock: int | None = None
        self._syslog_sockets: tuple[socket.socket, ...] = ()

    def prepare(self) -> None:
        self._check_data_dir()
        self._take_serve_lock()
        check_http_port(self.cfg)
        udp, tcp = bind_syslog(self.cfg)
        self.runtime = runtime_dir()
        self.env = child_env(self.cfg, self.runtime)
        self._syslog_sockets = (udp, tcp)  # held (open) for the life of this process
        try:  # for `labctl doctor`: how this serve was started
            write_serve_state(self.cfg, os.getpid(), time.time())
        except OSError as exc:
            log.warning("cannot write %s (%s): labctl doctor will not know this serve's settings",
                        self.cfg.serve_state_path, exc)

    def _check_data_dir(self) -> None:
        """The data directory, the token and both databases open (created on first start); a
        read-only directory with a bastion in it is fine (it is served read-only)."""
        from bastion_app.auth import ensure_token
        from bastion_app.db import StorageUnavailable
        from bastion_app.logstore import LogStore

        steps = ((self.cfg.data_path, lambda: self.cfg.data_path.mkdir(parents=True, exist_ok=True)),
                 (self.cfg.token_path, lambda: ensure_token(self.cfg.token_path)),
                 (self.cfg.db_path, lambda: Store.from_config(self.cfg).close()),
                 (self.cfg.data_path / "logs.db", lambda: LogStore.from_config(self.cfg).close()))
        for path, step in steps:
            try:
                step()
            except (OSError, sqlite3.Error, StorageUnavailable, RuntimeError) as exc:
                raise StartupError(f"the data directory is unusable: {path}: {exc}") from None

    def _take_serve_lock(self) -> None:
        """One bastion per data directory: a second `serve` on the same one is refused."""
        path = self.cfg.data_path / "serve.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:  # a read-only data directory: lock the existing file if there is one
            if not path.exists():
                log.warning("cannot create %s (%s): not guarding against a second bastion", path, exc)
                return
            fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StartupError(f"another bastion (pid {other}) is already serving {self.cfg.data_path}") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass  # read-only: the lock holds all the same
        self._serve_lock = fd  # held (open) for the life of this process

    def _start(self, spec: ChildSpec, restarts: int = 0, first: bool = False) -> None:
        env = {**self.env, **spec.env}
        fds: tuple[int, ...] = ()
        if spec.name == "syslog" and self._syslog_sockets:
            fds = tuple(sock.fileno() for sock in self._syslog_sockets)
            env[SOCKETS_ENV] = ",".join(map(str, fds))
        proc = subprocess.Popen(spec.argv, env=env, start_new_session=True, preexec_fn=_die_with_parent, pass_fds=fds)
        self.running[spec.name] = _Running(spec, proc, time.monotonic(), restarts, first)
        log.info("started %s (pid %d)", spec.name, proc.pid)

    def _stall_loop(self) -> None:
        from bastion_app.db import StorageUnavailable

        store = Store.from_config(self.cfg)
        interval = max(1.0, min(30.0, self.cfg.stall_timeout / 4))
        while not self.stopping.wait(interval):
            try:
                for mac in store.mark_stalled(self.cfg.stall_timeout):
                    log.warning("install on %s stalled: no progress for %d s", mac, self.cfg.stall_timeout)
            except StorageUnavailable as exc:
                log.error("stall check: %s", exc)
            except Exception:  # noqa: BLE001 - keep supervising; the next round retries
                log.exception("stall check failed")

    def stop(self, *_args) -> None:
        self.stopping.set()

    def run(self) -> int:
        """Supervise until stopped. Raises StartupError when the bastion cannot start."""
        try:
            self.prepare()
        except StartupError:
            shutil.rmtree(runtime_dir(), ignore_errors=True)
            raise
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        for spec in self.specs:
            self._start(spec, first=True)
        threading.Thread(target=self._stall_loop, name="stall-check", daemon=True).start()
        rc = 0
        while not self.stopping.wait(0.2):
            for name, r in list(self.running.items()):
                code = r.proc.poll()
                if code is None:
                    continue
                uptime = time.monotonic() - r.started
                if r.first and r.spec.critical and uptime < STARTUP_S and code > 0:  # not killed by a signal
                    self.shutdown()
                    raise StartupError(f"{name} exited with code {code} while starting (its messages are above); "
                                       "nothing is served")
                restarts = 0 if uptime > 60 else r.restarts + 1
                if restarts > 5:
                    log.error("%s keeps exiting (code %s); giving up", name, code)
                    rc = 1
                    self.stopping.set()
                    break
                delay = min(30.0, 0.5 * 2**restarts)
                log.warning("%s exited with code %s; restarting in %.1f s", name, code, delay)
                if self.stopping.wait(delay):
                    break
                self._start(r.spec, restarts)
        self.shutdown()
        return rc

    def shutdown(self) -> None:
        for r in self.running.values():
            if r.proc.poll() is None:
                try:
                    os.killpg(r.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for r in self.running.values():
            try:
                r.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(r.proc.pid, signal.SIGKILL)
                r.proc.wait()
        if self.runtime:
            shutil.rmtree(self.runtime, ignore_errors=True)
        log.info("stopped")
