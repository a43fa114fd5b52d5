"""Power control through a machine's BMC: Redfish (``sushy``) and IPMI (``pyghmi``).

One home for BMC calls. The bastion makes them itself (BMCs live on its network), each operation
bounded in time (connect and read timeouts, at most ATTEMPTS tries on a transient error: a
connection that fails or times out, a 5xx), and every result, good or bad, is an event on the
machine. Credentials are sealed at rest with :mod:`labcore.secretbox` (the key is
``<data_dir>/secret.key``, the aad binds them to the machine's MAC), opened only for the call and
never returned, logged or put in an event: error texts are scrubbed of the password, and sushy's
debug log (which shows request bodies) is kept quiet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Protocol

import sushy
from pyghmi import exceptions as pyghmi_exceptions
from pyghmi.ipmi import command as ipmi_command
from pyghmi.ipmi.private import session as ipmi_session
from sushy import exceptions as sushy_exceptions

from bastion_app.errors import ApiError
from labcore import secretbox

# (imported here, not in the calls: gunicorn loads the app before it forks its workers, so no
# worker pays for these imports on its first BMC call)

CONNECT_S = 3.0  # TCP connect to a BMC, at most (the read timeout is the bastion's bmc_timeout setting)
ATTEMPTS = 2  # tries of one operation on a transient error (pyghmi retransmits IPMI packets itself:
# an IPMI BMC that does not answer is not tried again)
RETRY_DELAY_S = 1.0
IPMI_PORT = 623

logging.getLogger("sushy").setLevel(logging.WARNING)  # its DEBUG lines carry request bodies


class BmcError(Exception):
    """A BMC call failed. ``transient`` errors are tried again (ATTEMPTS)."""

    status, code, transient = 502, "bmc_error", False


class BmcAuthError(BmcError):
    status, code = 502, "bmc_auth"


class BmcUnreachable(BmcError):
    status, code, transient = 504, "bmc_unreachable", True


class Driver(Protocol):
    """What every BMC driver does. Power states are ``on`` / ``off``; a boot device is ``network``
    (PXE) or ``disk``, for the next boot only unless ``persistent``."""

    def status(self) -> str: ...
    def on(self) -> None: ...
    def off(self) -> None: ...
    def cycle(self) -> None: ...
    def set_boot_device(self, device: str, persistent: bool = False) -> None: ...
    def close(self) -> None: ...


class RedfishDriver:
    def __init__(self, scheme: str | None, host: str, port: int | None, username: str, password: str, *,
                 system_id: str | None = None, verify_tls: bool = True, uefi: bool | None = None, timeout: float = 8.0):
        self._sushy, self._sx, self.uefi = sushy, sushy_exceptions, uefi
        url = f"{scheme or 'https'}://{host}" + (f":{port}" if port else "")
        self._password = password
        with _errors(self, password):
            self._conn = sushy.Sushy(url, auth=sushy.auth.BasicAuth(username, password), verify=verify_tls,
                                     server_side_retries=1, server_side_retries_delay=RETRY_DELAY_S,
                                     read_timeout=timeout, connect_timeout=min(CONNECT_S, timeout))
            self._system = self._conn.get_system(f"/redfish/v1/Systems/{system_id}" if system_id else None)
        self._fresh = True  # just read: the first status needs no second GET

    def _map(self, exc: Exception) -> BmcError | None:
        sx = self._sx
        if isinstance(exc, sx.AccessError):
            return BmcAuthError("the BMC refused the credentials (HTTP 401/403)")
        if isinstance(exc, sx.ConnectionError):
            return BmcUnreachable("the BMC did not answer")
        if isinstance(exc, sx.ServerSideError):
            err = BmcError(f"the BMC failed: {exc}")
            err.transient = True
            return err
        if isinstance(exc, sx.ResourceNotFoundError):
            return BmcError("no such system on this BMC (check system_id)")
        if isinstance(exc, sx.SushyError):
            return BmcError(f"Redfish error: {exc}")
        return None

    def status(self) -> str:
        with _errors(self, self._password):
            if not self._fresh:
                self._system.refresh()
            self._fresh = False
            state = self._system.power_state
        return "on" if state in (self._sushy.PowerState.ON, self._sushy.PowerState.POWERING_OFF) else "off"

    def _reset(self, kind) -> None:
        with _errors(self, self._password):
            self._system.reset_system(kind)

    def on(self) -> None:
        self._reset(self._sushy.ResetType.ON)

    def off(self) -> None:
        self._reset(self._sushy.ResetType.FORCE_OFF)

    def cycle(self) -> None:
        # a machine that is off is switched on; one that is on restarts at once (no OS shutdown)
        if self.status() == "off":
            self.on()
        else:
            self._reset(self._sushy.ResetType.FORCE_RESTART)

    def set_boot_device(self, device: str, persistent: bool = False) -> None:
        s = self._sushy
        target = s.BootSource.PXE if device == "network" else s.BootSource.HDD
        enabled = s.BootSourceOverrideEnabled.CONTINUOUS if persistent else s.BootSourceOverrideEnabled.ONCE
        with _errors(self, self._password):
            self._system.set_system_boot_options(target=target, enabled=enabled)

    def close(self) -> None:
        self._conn._conn.close()


class IpmiDriver:
    """pyghmi keeps one RMCP+ session per BMC and credentials in the process (and logs in again
    when the BMC drops it); a second ``Command`` on a live session hangs in pyghmi 1.6, so the
    commands are kept here, one per BMC and credentials, used by one thread at a time."""

    _commands: dict[tuple, Any] = {}
    _locks: dict[tuple, threading.Lock] = {}
    _guard = threading.Lock()

    def __init__(self, host: str, port: int | None, username: str, password: str, *, uefi: bool | None = None):
        self._px, self.uefi, self._password = pyghmi_exceptions, uefi, password
        self._key = (host, port or IPMI_PORT, username, hashlib.sha256(password.encode()).hexdigest())
        with self._guard:
            self._lock = self._locks.setdefault(self._key, threading.Lock())
        if not self._lock.acquire(timeout=30):
            raise BmcUnreachable("the BMC is busy with another call")
        try:
            with _errors(self, password):
                self._cmd = self._commands.get(self._key) or self._login(host, port, username, password)
        except BaseException:
            self._lock.release()
            raise

    def _login(self, host, port, username, password):
        session = ipmi_session
        try:
            cmd = ipmi_command.Command(bmc=host, userid=username, password=password, port=port or IPMI_PORT, keepalive=False)
        except self._px.IpmiException:
            # pyghmi keeps a failed login among its sessions being set up, and the next login with
            # the same credentials waits on it for 8 s: drop it
            for key, sess in list(session.Session.initting_sessions.items()):
                if key[0] == host and key[3] == (port or IPMI_PORT):
                    sess._mark_broken()
                    session.Session.initting_sessions.pop(key, None)
            raise
        self._commands[self._key] = cmd
        return cmd

    def _map(self, exc: Exception) -> BmcError | None:
        if isinstance(exc, self._px.IpmiException):
            self._commands.pop(self._key, None)  # log in afresh next time
            text = str(exc)
            if text in ("None", ""):
                return _silent()
            low = text.lower()
            if "unauthorized" in low or "password" in low or "privilege" in low or "rakp" in low or "authentication" in low:
                return BmcAuthError(f"the BMC refused the credentials ({text})")
            if "timeout" in low or "not responding" in low or "no longer connected" in low:
                return _silent()
            return BmcError(f"IPMI error: {text}")
        return None

    def status(self) -> str:
        with _errors(self, self._password):
            return "on" if self._cmd.get_power()["powerstate"] == "on" else "off"

    def _set(self, state: str) -> None:
        with _errors(self, self._password):
            self._cmd.set_power(state, wait=False)

    def on(self) -> None:
        self._set("on")

    def off(self) -> None:
        self._set("off")

    def cycle(self) -> None:
        # "boot": power on if off, else a hard reset (chassis control 03h)
        if self.status() == "off":
            self.on()
        else:
            self._set("reset")

    def set_boot_device(self, device: str, persistent: bool = False) -> None:
        # the boot flags carry a BIOS/EFI bit: set it from what the machine reported, so that a
        # UEFI machine is not switched to legacy boot
        with _errors(self, self._password):
            self._cmd.set_bootdev("network" if device == "network" else "hd", persist=persistent,
                                  uefiboot=bool(self.uefi))

    def close(self) -> None:
        self._lock.release()  # the session stays, for the next call


def _silent() -> BmcUnreachable:
    err = BmcUnreachable("the BMC did not answer")
    err.transient = False  # pyghmi has retransmitted already
    return err


class _errors:
    """Turn a driver's library exception into a BmcError whose text never holds the password."""

    def __init__(self, driver, password: str):
        self.driver, self.password = driver, password

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if exc is None or isinstance(exc, BmcError):
            if isinstance(exc, BmcError):
                exc.args = (scrub(str(exc), self.password),)
            return False
        mapped = self.driver._map(exc)
        if mapped is None:
            if isinstance(exc, OSError | TimeoutError):
                mapped = BmcUnreachable("the BMC did not answer")
            else:
                return False
        mapped.args = (scrub(str(mapped), self.password),)
        raise mapped from None


def scrub(text: str, password: str) -> str:
    return text.replace(password, "***") if password else text


# -- records ------------------------------------------------------------------------------------------
def _key(cfg) -> bytes:
    return secretbox.load_or_create_key(cfg.data_path / "secret.key")


def _aad(mac: str) -> bytes:
    return f"bmc:{mac}".encode()


def sealed_record(cfg, mac: str, req) -> dict[str, Any]:
    """What the store keeps of a :class:`labcore.schemas.BmcRequest`: the credentials sealed."""
    creds = json.dumps({"username": req.username, "password": req.password}).encode()
    return {"driver": req.driver, "address": req.address, "system_id": getattr(req, "system_id", None),
            "verify_tls": getattr(req, "verify_tls", True), "credentials": secretbox.seal(_key(cfg), creds, _aad(mac))}


def view(bmc: dict[str, Any]) -> dict[str, Any]:
    from labcore.schemas import api_time

    return {"mac": bmc["mac"], "driver": bmc["driver"], "address": bmc["address"], "system_id": bmc["system_id"],
            "verify_tls": bool(bmc["verify_tls"]), "credentials": bmc["credentials"] is not None,
            "source": bmc["source"], "updated_at": api_time(bmc["updated_at"])}


def connect(cfg, bmc: dict[str, Any], *, uefi: bool | None = None) -> Driver:
    """A driver for a stored BMC record (409 if it has no address or no credentials yet)."""
    from labcore import validate

    if not bmc.get("address") or not bmc.get("credentials"):
        raise ApiError(409, "the BMC is not configured", "set its address and credentials: labctl power set TARGET ...")
    try:
        creds = json.loads(secretbox.unseal(_key(cfg), bmc["credentials"], _aad(bmc["mac"])))
    except secretbox.SecretError as exc:
        raise ApiError(409, "the BMC's credentials cannot be opened", f"{exc}; set them again with labctl power set") from None
    scheme, host, port = validate.bmc_address(bmc["address"], bmc["driver"])
    if bmc["driver"] == "redfish":
        return RedfishDriver(scheme, host, port, creds["username"], creds["password"], system_id=bmc["system_id"],
                             verify_tls=bool(bmc["verify_tls"]), uefi=uefi, timeout=cfg.bmc_timeout)
    return IpmiDriver(host, port, creds["username"], creds["password"], uefi=uefi)


def run(cfg, store, mac: str, action: str, *, boot: str | None = None, persistent: bool = False,
        actor: str = "operator", record=None) -> dict[str, Any]:
    """One power operation (``status``, ``on``, ``off``, ``cycle``; ``boot`` first sets the next
    boot device) on a machine's BMC, tried again on a transient error, recorded as an event
    whether it worked or not. ``on`` on a machine that is on (and ``off`` on one that is off)
    changes nothing. Raises ApiError with the BMC's error (502/504) after recording it.

    ``record(mac, actor, reason, data)`` records the event (default: at once, in its own
    transaction; :func:`batch` gathers them and commits them together before answering)."""
    record = record or (lambda *event: store.power_events([event]))
    m = store.require(mac)
    bmc = store.get_bmc(mac)
    if bmc is None:
        raise ApiError(404, f"no BMC recorded for {mac}", "labctl power set TARGET --driver redfish|ipmi ...")
    firmware = (m.get("hardware") or {}).get("firmware")
    uefi = {"uefi": True, "bios": False}.get(firmware)
    started = time.monotonic()
    last: BmcError | None = None
    for attempt in range(1, ATTEMPTS + 1):
        driver = None
        try:
            driver = connect(cfg, bmc, uefi=uefi)
            before = driver.status()
            changed = False
            if boot:
                driver.set_boot_device(boot, persistent)
                changed = True
            if action == "on" and before == "off":
                driver.on()
                changed = True
            elif action == "off" and before == "on":
                driver.off()
                changed = True
            elif action == "cycle":
                driver.cycle()
                changed = True
            power = {"on": "on", "off": "off", "cycle": "on"}.get(action, before)
            result = {"mac": mac, "driver": bmc["driver"], "action": action, "power": power, "changed": changed,
                      "boot": boot}
            record(mac, actor, _reason(action, boot, power, changed),
                   {**result, "before": before, "result": "ok", "attempts": attempt,
                    "seconds": round(time.monotonic() - started, 3)})
            return result
        except BmcError as exc:
            last = exc
            if not exc.transient or attempt == ATTEMPTS:
                break
            time.sleep(RETRY_DELAY_S)
        finally:
            if driver is not None:
                driver.close()
    assert last is not None
    record(mac, actor, f"power {action} failed: {last}",
           {"action": action, "boot": boot, "driver": bmc["driver"], "result": "error", "error": str(last),
            "code": last.code, "attempts": attempt, "seconds": round(time.monotonic() - started, 3)})
    raise ApiError(last.status, f"BMC {action} failed: {last}",
                   {"code": last.code, "driver": bmc["driver"], "attempts": attempt})


def _reason(action: str, boot: str | None, power: str, changed: bool) -> str:
    first = f"next boot {boot}, then " if boot else ""
    if action == "status":
        return f"power status: {power}"
    return f"{first}power {action}: {power}" + ("" if changed else " (already)")


class _EventBuffer:
    """The `power` events of one batch, group-committed: kept until the next :meth:`flush`; once
    closed (the client went away), each event is written as it comes."""

    def __init__(self, store):
        self.store = store
        self.lock = threading.Lock()
        self.pending: list[tuple] = []
        self.closed = False

    def keep(self, *event) -> None:
        with self.lock:
            if not self.closed:
                self.pending.append(event)
                return
        self.store.power_events([event])  # a call that ends after its client went away is still recorded

    def flush(self) -> None:
        with self.lock:
            events, self.pending = self.pending, []
        if events:
            self.store.power_events(events)

    def close(self) -> None:
        with self.lock:
            self.closed = True
        self.flush()


def batch(cfg, store, macs: list[str], action: str, *, boot: str | None = None, persistent: bool = False,
          max_parallel: int = 10, stagger: float = 0.0, actor: str = "operator") -> Iterator[dict[str, Any]]:
    """:func:`run` on several machines from a pool of at most ``max_parallel`` threads, two starts
    at least ``stagger`` seconds apart (a rack's circuits do not take every inrush at once; on the
    bastion, so no client can skip it). Every machine must be known (404 before any call). Yields
    each result as it ends (a failure as ``{mac, error, status, detail}``), then ``{"summary"}``.

    The events are group-committed: the calls that ended while the previous commit was written are
    recorded in one transaction, and a result is yielded only once its event is on disk (instead
    of a sync to disk per machine)."""
    macs = list(dict.fromkeys(macs))
    for mac in macs:
        store.require(mac)
    lock = threading.Lock()
    next_start = [time.monotonic()]
    started = time.monotonic()
    events = _EventBuffer(store)

    def one(mac: str) -> dict[str, Any]:
        with lock:  # the start times are handed out in order: one every `stagger` seconds
            start = max(next_start[0], time.monotonic())
            next_start[0] = start + stagger
        time.sleep(max(0.0, start - time.monotonic()))
        try:
            if action == "status":
                return run(cfg, store, mac, "status", actor=actor, record=events.keep)
            return run(cfg, store, mac, action, boot=boot, persistent=persistent, actor=actor, record=events.keep)
        except ApiError as exc:
            return {"mac": mac, "error": exc.error, "status": exc.status, "detail": exc.detail}

    def results() -> Iterator[dict[str, Any]]:
        pool = ThreadPoolExecutor(max_workers=min(max_parallel, len(macs)), thread_name_prefix="power")
        ok = 0
        try:
            for fut in as_completed([pool.submit(one, mac) for mac in macs]):
                r = fut.result()
                events.flush()  # its event, and those of the calls that ended meanwhile
                ok += "error" not in r
                yield r
            yield {"summary": {"total": len(macs), "ok": ok, "failed": len(macs) - ok,
                               "seconds": round(time.monotonic() - started, 3)}}
        finally:  # a client that went away: the calls not started yet are not made
            pool.shutdown(wait=False, cancel_futures=True)
            events.close()

    return results()
