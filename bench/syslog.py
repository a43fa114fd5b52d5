#!/usr/bin/env python3
"""Syslog ingestion: the highest rate our listener stores with no loss, against rsyslog's imudp.

Both run on this machine in the same run: `lab-bastion serve --no-dnsmasq` (its syslog child,
storing into logs.db) and Debian's rsyslogd started here with a private configuration (imudp on
another loopback port, omfile into a file, no system log sockets). Each is offered rising rates
of Anaconda-like RFC 3164 lines (a paced, bounded send loop per step); a step is lossless when
every line sent was stored (count in logs.db / lines in the file). Each rate is offered to both in
turn, so both see the same machine load. The highest rate each stored with no loss (as actually
delivered by the sender) is printed, and the ratio ours / rsyslog. Target: at least 20,000 lines/s
lossless.

    python bench/syslog.py [--seconds 2] [--max-rate 160000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.boot_storm import start_server  # noqa: E402
from tests.support import free_port, stop_process  # noqa: E402

MAC = "52:54:00:be:e0:01"
RATES = [5000, 10000, 20000, 30000, 40000, 60000, 80000, 120000, 160000, 240000]
LINE = "<30>Nov 26 12:00:01 localhost anaconda[1234]: INFO:program:Running... /usr/bin/rpm --import key step {step} line {i:08d}"


def send(port: int, rate: int, seconds: float, step: int) -> tuple[int, float]:
    """Send rate*seconds datagrams, paced to `rate` per second. Returns (sent, achieved rate)."""
    total = int(rate * seconds)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    payloads = [LINE.format(step=step, i=i).encode() for i in range(total)]
    t0 = time.perf_counter()
    sent = 0
    while sent < total:  # bounded: ends after `total` datagrams
        due = min(total, int((time.perf_counter() - t0) * rate) + 1)
        while sent < due:
            try:
                sock.send(payloads[sent])
            except BlockingIOError:
                time.sleep(0.0001)
                continue
            sent += 1
        if sent < total:
            time.sleep(0.0002)
    took = time.perf_counter() - t0
    sock.close()
    return sent, sent / took


def settle(count, expect: int, timeout: float = 30.0) -> int:
    """Wait until the stored count reaches `expect` or stops changing for 1.5 s."""
    deadline = time.monotonic() + timeout
    last, last_change = count(), time.monotonic()
    while time.monotonic() < deadline and last < expect:
        time.sleep(0.1)
        now = count()
        if now != last:
            last, last_change = now, time.monotonic()
        elif time.monotonic() - last_change > 1.5:
            break
    return last


class Rsyslog:
    def __init__(self, work: Path, port: int):
        self.work, self.port = work, port
        self.out = work / "out.log"
        conf = work / "rsyslog.conf"
        conf.write_text(f"""
global(workDirectory="{work}")
$OmitLocalLogging on
module(load="imudp")
input(type="imudp" address="127.0.0.1" port="{port}" rcvbufSize="32m")
template(name="msgonly" type="string" string="%msg%\\n")
action(type="omfile" file="{self.out}" template="msgonly")
""")
        self.proc = subprocess.Popen(["rsyslogd", "-n", "-f", str(conf), "-i", str(work / "rsyslogd.pid")],
                                     stdout=subprocess.DEVNULL, stderr=open(work / "rsyslogd.err", "wb"),  # noqa: SIM115
                                     start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # ready once it answers: a probe line reaches the file
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"<30>Nov 26 12:00:00 h probe: ready", ("127.0.0.1", port))
            time.sleep(0.2)
            if self.count() > 0:
                return
        raise RuntimeError("rsyslogd did not start: " + (work / "rsyslogd.err").read_text()[-2000:])

    def count(self) -> int:
        try:
            with open(self.out, "rb") as f:
                return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        except FileNotFoundError:
            return 0

    def stop(self) -> None:
        stop_process(self.proc, 10)


def ladder(targets: dict[str, tuple[int, object]], seconds: float, max_rate: int) -> dict[str, tuple[float, str]]:
    """Offer each rate to every target in turn (so both see the same machine load), until each
    loses a line or the sender cannot reach the rate. Returns name -> (highest rate actually
    delivered with no loss, why the ladder stopped)."""
    best = {name: (0.0, "top of the ladder") for name in targets}
    live = dict(targets)
    for step, rate in enumerate(r for r in RATES if r <= max_rate):
        for name, (port, count) in list(live.items()):
            before = count()
            sent, achieved = send(port, rate, seconds, step)
            stored = settle(count, before + sent) - before
            lost = sent - stored
            print(f"  {name:8s} offered {rate:>7,}/s (achieved {achieved:>9,.0f}/s): sent {sent:>7,} stored {stored:>7,} "
                  f"lost {lost:>6,}", flush=True)
            if lost > 0:
                best[name] = (best[name][0], f"lost lines at {rate:,}/s")
                del live[name]
                continue
            best[name] = (max(best[name][0], achieved), "top of the ladder")
            if achieved < rate * 0.9:
                best[name] = (best[name][0], f"sender could not reach {rate:,}/s (machine busy)")
                del live[name]
        if not live:
            break
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="send time per rate step")
    ap.add_argument("--max-rate", type=int, default=RATES[-1])
    args = ap.parse_args()
    if not shutil.which("rsyslogd"):
        print("rsyslogd not found: apt-get install rsyslog (scripts/apt-packages.txt)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="bench-syslog-"))
    data = tmp / "data"
    (data / "run").mkdir(parents=True)
    # Attribute the sender (127.0.0.1) to one machine, as the dnsmasq leases would.
    (data / "run" / "dnsmasq.leases").write_text(f"{int(time.time()) + 3600} {MAC} 127.0.0.1 bench *\n")
    os.environ["LAB_BASTION_LOG_LINES"] = "100000000"  # count everything: no trimming during the bench
    ours_port, rs_port = free_port(kind=socket.SOCK_DGRAM), free_port(kind=socket.SOCK_DGRAM)
    server = start_server(data, workers=2, extra=["--syslog-port", str(ours_port)])
    rs = None
    try:
        db = data / "logs.db"
        deadline = time.monotonic() + 15
        while not db.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        conn = sqlite3.connect(db, timeout=30)

        def ours_count() -> int:
            return conn.execute("SELECT COALESCE(max(id), 0) FROM lines").fetchone()[0]

        # warm up (the listener binds and loads its tables)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _ in range(50):
                s.sendto(b"<30>Nov 26 12:00:00 h warm: up", ("127.0.0.1", ours_port))
                if ours_count() > 0:
                    break
                time.sleep(0.2)
        rs_work = tmp / "rsyslog"
        rs_work.mkdir()
        rs = Rsyslog(rs_work, rs_port)
        print(f"syslog ingestion, {args.seconds:g} s per step, {len(LINE) + 10}-byte lines, sender attributed to {MAC}")
        res = ladder({"ours": (ours_port, ours_count), "rsyslog": (rs_port, rs.count)}, args.seconds, args.max_rate)
        (ours, ours_why), (theirs, theirs_why) = res["ours"], res["rsyslog"]
        attributed = conn.execute("SELECT count(*) FROM lines WHERE mac=?", (MAC,)).fetchone()[0]
        print(f"lab-bastion syslog listener: {ours:,.0f} lines/s lossless ({ours_why}; stored under {MAC}: {attributed:,})")
        print(f"rsyslogd imudp -> omfile:    {theirs:,.0f} lines/s lossless ({theirs_why})")
        print(f"ratio ours/rsyslog: {ours / theirs:.2f}" if theirs else "ratio: rsyslog lost lines at every rate")
        print(f"target >= 20,000 lines/s: {'met' if ours >= 20000 else 'NOT met'}")
        return 0 if ours >= 20000 else 1
    finally:
        if rs:
            rs.stop()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
