"""`lab-bastion serve`: one small supervisor process that starts and watches its children:
gunicorn (the Flask app, several workers), the syslog listener and dnsmasq, restarting any that
dies, and stopping all of them on SIGTERM/SIGINT. It also marks silent installs as stalled."""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bastion_app import dnsmasq
from bastion_app.store import Store
from labcore.bastion_config import Config, write_serve_state

log = logging.getLogger("lab-bastion")


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


_METRICS_PREFIX = "lab-bastion-metrics-"


def _metrics_base() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def new_metrics_dir() -> Path:
    """Where the workers keep their Prometheus counters: in memory (/dev/shm), never on the data
    disk, so that a full or read-only data directory cannot crash a worker through its metrics
    files (they are mmap'ed: a full filesystem means SIGBUS). One directory per supervisor run;
    those of supervisors that died without cleaning up are removed."""
    base = _metrics_base()
    for old in base.glob(_METRICS_PREFIX + "*"):
        pid = old.name[len(_METRICS_PREFIX):]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    path = base / f"{_METRICS_PREFIX}{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700, parents=True)
    return path


def child_env(cfg: Config, metrics: Path) -> dict[str, str]:
    """The environment every child gets: the data dir and every effective setting, so that each
    gunicorn worker loads exactly the configuration the supervisor resolved."""
    env = dict(os.environ)
    env["LAB_BASTION_DATA_DIR"] = str(cfg.data_path)
    for k, v in cfg.as_dict().items():
        if k in ("data_dir", "extra"):
            continue
        env["LAB_BASTION_" + k.upper()] = str(v).lower() if isinstance(v, bool) else str(v)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)
    return env


def children(cfg: Config) -> list[ChildSpec]:
    """What `serve` runs. Other parts of the bastion add their processes here."""
    specs = [
        ChildSpec("gunicorn", [sys.executable, "-m", "gunicorn", "-c", "python:bastion_app.gunicorn_conf", "bastion_app.wsgi:app"]),
    ]
    specs.append(ChildSpec("syslog", [sys.executable, "-m", "bastion_app.syslog"]))
    if cfg.dnsmasq:
        specs.append(dnsmasq_child(cfg))
    return specs


def dnsmasq_child(cfg: Config) -> ChildSpec:
    """dnsmasq's child: its TFTP root and configuration written (the same write_config as
    `lab-bastion dnsmasq-config`), then its command line."""
    binary = dnsmasq.binary()
    conf = dnsmasq.conf_path(cfg)
    dnsmasq.write_config(cfg, conf)
    return ChildSpec("dnsmasq", dnsmasq.argv(conf, binary))


class Supervisor:
    def __init__(self, cfg: Config, specs: list[ChildSpec]):
        self.cfg = cfg
        self.specs = specs
        self.running: dict[str, _Running] = {}
        self.stopping = threading.Event()
        self.metrics: Path | None = None
        self.env: dict[str, str] = {}
        self._serve_lock: int | None = None

    def prepare(self) -> None:
        from bastion_app.auth import ensure_token

        self.cfg.data_path.mkdir(parents=True, exist_ok=True)
        ensure_token(self.cfg.token_path)
        Store.from_config(self.cfg).migrate()
        self._take_serve_lock()
        try:  # for `labctl doctor`: how this serve was started
            write_serve_state(self.cfg, os.getpid(), time.time())
        except OSError as exc:
            log.warning("cannot write %s (%s): labctl doctor will not know this serve's settings",
                        self.cfg.serve_state_path, exc)
        self.metrics = new_metrics_dir()
        self.env = child_env(self.cfg, self.metrics)

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
            raise SystemExit(f"lab-bastion serve: another bastion (pid {other}) is already serving {self.cfg.data_path}") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass  # read-only: the lock holds all the same
        self._serve_lock = fd  # held (open) for the life of this process

    def _start(self, spec: ChildSpec, restarts: int = 0) -> None:
        env = {**self.env, **spec.env}
        proc = subprocess.Popen(spec.argv, env=env, start_new_session=True, preexec_fn=_die_with_parent)
        self.running[spec.name] = _Running(spec, proc, time.monotonic(), restarts)
        log.info("started %s (pid %d)", spec.name, proc.pid)

    def _stall_loop(self) -> None:
        store = Store.from_config(self.cfg)
        interval = max(1.0, min(30.0, self.cfg.stall_timeout / 4))
        while not self.stopping.wait(interval):
            try:
                for mac in store.mark_stalled(self.cfg.stall_timeout):
                    log.warning("install on %s stalled: no progress for %d s", mac, self.cfg.stall_timeout)
            except Exception:  # noqa: BLE001 - keep supervising; the next round retries
                log.exception("stall check failed")

    def stop(self, *_args) -> None:
        self.stopping.set()

    def run(self) -> int:
        self.prepare()
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        for spec in self.specs:
            self._start(spec)
        threading.Thread(target=self._stall_loop, name="stall-check", daemon=True).start()
        rc = 0
        while not self.stopping.wait(0.5):
            for name, r in list(self.running.items()):
                code = r.proc.poll()
                if code is None:
                    continue
                uptime = time.monotonic() - r.started
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
        if self.metrics:
            shutil.rmtree(self.metrics, ignore_errors=True)
        log.info("stopped")
