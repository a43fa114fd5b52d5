"""Shared test helpers: prerequisites, free ports, waiting.

A missing prerequisite skips the test with a reason on a developer machine, and fails it under
CI=true (CI runs as root with every package installed by the project's own files).
"""

from __future__ import annotations

import os
import shutil
import socket
import time

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


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


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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


def synthetic_mac(i: int, prefix: str = "52:54:01") -> str:
    """The i-th MAC address under a locally administered 3-byte prefix (tests and benches)."""
    return f"{prefix}:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"
