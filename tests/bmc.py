"""Emulated BMCs for the tests, the e2e lab and bench/power.py: OpenStack's own emulators with a
small backend that turns power and boot-device calls into QEMU human-monitor (HMP) commands.

- Redfish: sushy-tools' emulator (``sushy_tools.emulator.main.app``) with :class:`LabSystems`, a
  systems driver built on its fake driver (state kept in memory, power changes at once instead of
  after its random 1-11 s) whose systems may name a QEMU monitor socket.
- IPMI: :class:`LabIpmiBmc`, pyghmi's ``pyghmi.ipmi.bmc.Bmc`` server for one machine.

QEMU power as the lab emulates it: "off" is ``stop`` (the vCPUs are paused: the machine does
nothing, as if switched off), "on" is ``system_reset`` + ``cont`` (a cold boot from the firmware),
a cycle is ``system_reset`` (+ ``cont`` if it was off); "status" reads ``info status``. The lab's
machines boot the network first (NIC bootindex 1), so a network boot device needs no QEMU
change; a disk boot device is recorded (the bastion's answer decides what a PXE boot does).

Run: ``python -m tests.bmc redfish --port P --auth-file F --systems JSON`` or
``python -m tests.bmc ipmi --port P --user U --password W [--monitor SOCK]``.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time


def hmp(monitor: str, command: str, expect: bytes | None = None) -> str:
    """One HMP command on a QEMU monitor socket; its answer: read until ``expect`` has come and
    the monitor is quiet (the banner and prompt may arrive in pieces, the echo with escapes)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(0.3)
        s.connect(monitor)
        banner, deadline = b"", time.monotonic() + 5
        while b"(qemu)" not in banner and time.monotonic() < deadline:
            try:
                banner += s.recv(4096)
            except TimeoutError:
                continue
        s.sendall(command.encode() + b"\n")
        out, deadline = b"", time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                if expect is None or expect in out:
                    break
                continue
            if not chunk:
                break
            out += chunk
        return out.decode(errors="replace")


class Machine:
    """The power and boot device of one emulated machine; with a monitor socket, a QEMU VM."""

    def __init__(self, monitor: str | None = None, power: str = "Off"):
        self.monitor, self._power, self.boot = monitor, power, "Pxe"

    @property
    def power(self) -> str:
        if self.monitor:
            return "On" if "running" in hmp(self.monitor, "info status", expect=b"VM status") else "Off"
        return self._power

    def on(self) -> None:
        if self.monitor and self.power == "Off":
            hmp(self.monitor, "system_reset")
            hmp(self.monitor, "cont")
        self._power = "On"

    def off(self) -> None:
        if self.monitor:
            hmp(self.monitor, "stop")
        self._power = "Off"

    def reset(self) -> None:
        if self.monitor:
            hmp(self.monitor, "system_reset")
            hmp(self.monitor, "cont")
        self._power = "On"


def _lab_systems_class():
    from sushy_tools import error
    from sushy_tools.emulator.resources.systems import fakedriver

    class LabSystems(fakedriver.FakeDriver):
        """sushy-tools' fake driver, in memory, with power applied at once (to a QEMU VM when the
        system names a ``monitor``)."""

        def __init__(self):
            self._systems = {s["uuid"]: dict(s) for s in self._config["SUSHY_EMULATOR_FAKE_SYSTEMS"]}
            self._by_name = {s["name"]: u for u, s in self._systems.items()}
            self._machines = {u: Machine(s.get("monitor"), s.get("power_state", "Off")) for u, s in self._systems.items()}

        def _update(self, system, **changes):
            if isinstance(system, str):
                system = self._get(system)
            system.update(changes)

        def get_power_state(self, identity):
            return self._machines[self.uuid(identity)].power

        def set_power_state(self, identity, state):
            m = self._machines[self.uuid(identity)]
            if state in ("On", "ForceOn"):
                m.on()
            elif state in ("ForceOff", "GracefulShutdown"):
                m.off()
            elif state in ("ForceRestart", "GracefulRestart", "PowerCycle"):
                m.reset()
            else:
                raise error.NotSupportedError(f"Power state {state} is not supported")

    return LabSystems


def serve_redfish(port: int, auth_file: str, systems: list[dict], host: str = "127.0.0.1") -> None:
    from sushy_tools.emulator import main

    cls = _lab_systems_class()
    main.app.configure(extra_config={"SUSHY_EMULATOR_FAKE_DRIVER": True, "SUSHY_EMULATOR_FAKE_SYSTEMS": systems,
                                     "SUSHY_EMULATOR_AUTH_FILE": auth_file})
    instance = cls.initialize(main.app.config, main.app.logger)()
    type(main.app).systems = property(lambda self: instance)
    main.app.run(host=host, port=port, threaded=True)


def _ipmi_class():
    from pyghmi.ipmi import bmc
    from pyghmi.ipmi.private import serversession

    # pyghmi's server always answers with cipher suite 3 (HMAC-SHA1), even to a client that asked
    # for SHA-256 (its own client asks that first, and would then fail RAKP2): answer such a
    # request "invalid authentication algorithm" (RMCP+ status 0x11) as a BMC that only does
    # cipher suite 3 does, and the client falls back to SHA-1
    original = serversession.ServerSession.create_open_session_response

    def open_session(self, request):
        if len(request) > 12 and request[12] != 1:
            return bytearray([request[0], 0x11, 0, 0]) + request[4:8] + bytearray(4)
        return original(self, request)

    serversession.ServerSession.create_open_session_response = open_session

    class LabIpmiBmc(bmc.Bmc):
        """pyghmi's BMC server in front of one machine."""

        def __init__(self, authdata, port, monitor=None, address="127.0.0.1"):
            super().__init__(authdata, port=port, address=address)
            self.machine = Machine(monitor)
            self.bootdev = "network"

        def get_power_state(self):
            return self.machine.power.lower()

        def power_on(self):
            self.machine.on()

        def power_off(self):
            self.machine.off()

        def power_reset(self):
            self.machine.reset()

        def power_cycle(self):
            self.machine.reset()

        def power_shutdown(self):
            self.machine.off()

        def get_boot_device(self):
            return self.bootdev

        def set_boot_device(self, bootdevice):
            self.bootdev = bootdevice

    return LabIpmiBmc


def serve_ipmi(port: int, user: str, password: str, monitor: str | None = None, host: str = "127.0.0.1") -> None:
    cls = _ipmi_class()
    server = cls({user: password}, port, monitor=monitor, address=host)
    server.listen()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bmc")
    sub = p.add_subparsers(dest="kind", required=True)
    r = sub.add_parser("redfish")
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--auth-file", required=True, help="htpasswd file (bcrypt)")
    r.add_argument("--systems", required=True, help="JSON list of {uuid, name, power_state, monitor?}")
    i = sub.add_parser("ipmi")
    i.add_argument("--host", default="127.0.0.1")
    i.add_argument("--port", type=int, required=True)
    i.add_argument("--user", required=True)
    i.add_argument("--password", required=True)
    i.add_argument("--monitor")
    a = p.parse_args(argv)
    if a.kind == "redfish":
        serve_redfish(a.port, a.auth_file, json.loads(a.systems), a.host)
    else:
        serve_ipmi(a.port, a.user, a.password, a.monitor, a.host)
    return 0


if __name__ == "__main__":
    sys.exit(main())
