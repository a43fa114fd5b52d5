"""The heartbeat: what the agent reports about its host, read from /proc and os.uname (no
subprocess, cheap enough for every beat)."""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path

from lab_agent import VERSION

PROC = Path("/proc")


def _cpu_times(proc: Path) -> tuple[int, int]:
    """(busy, total) jiffies from the first line of /proc/stat."""
    fields = [int(x) for x in (proc / "stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user/nice
    return total - idle, total


def _meminfo(proc: Path) -> dict[str, int]:
    out = {}
    for line in (proc / "meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            out[key] = int(parts[0]) * 1024
    return out


def os_release(path: Path = Path("/etc/os-release")) -> str:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')[:128]
    except OSError:
        pass
    return platform.system()


class Sampler:
    """Successive heartbeats; CPU use is the busy share of the jiffies since the previous sample."""

    def __init__(self, proc: Path = PROC):
        self.proc = proc
        self._last = _cpu_times(proc)
        self._os = os_release()

    def sample(self) -> dict:
        busy, total = _cpu_times(self.proc)
        db, dt_ = busy - self._last[0], total - self._last[1]
        self._last = (busy, total)
        mem = _meminfo(self.proc)
        mem_total = mem.get("MemTotal", 0)
        available = mem.get("MemAvailable", mem.get("MemFree", 0))
        load = (self.proc / "loadavg").read_text().split()[:3]
        return {
            "hostname": socket.gethostname(),
            "uptime_seconds": int(float((self.proc / "uptime").read_text().split()[0])),
            "load": [float(x) for x in load],
            "cpu_percent": round(100.0 * db / dt_, 1) if dt_ > 0 else 0.0,
            "cpus": os.cpu_count() or 1,
            "memory_total_bytes": mem_total,
            "memory_used_bytes": max(0, mem_total - available),
            "memory_percent": round(100.0 * (mem_total - available) / mem_total, 1) if mem_total else 0.0,
            "version": VERSION,
            "os": self._os,
            "kernel": platform.release(),
        }
