"""The installer syslog listener: ``python -m bastion_app.syslog`` (a child of ``lab-bastion serve``).

Receives RFC 3164 and RFC 5424 messages on UDP (and, on the same port, TCP with newline or
octet-counted framing, RFC 6587: Anaconda's ``inst.syslog``/``logging --host`` forwards with
rsyslog's ``@@host:port``, which is TCP). Each message is parsed, its sender's IP resolved to a MAC
(the bastion's dnsmasq leases, the kernel's neighbour table, the machine's last known address in
the store) and stored under that machine in ``logs.db``; senders nobody knows go to the
``unattributed`` bucket. Lines that show an install moving on (Anaconda's stages, its package
count) advance the machine's progress timeline.

One thread receives (and only receives: a datagram costs it one ``recvfrom`` and one append), the
main thread parses and writes in batches, so a slow disk never makes the kernel drop datagrams
unless the backlog is full.

Bounds (docs/logs.md, docs/reliability.md "Threat model"): the backlog holds at most
:data:`MAX_BACKLOG_BYTES` of messages, counting the batch being written; every message that is not
stored is counted in ``lab_bastion_syslog_dropped_total``: refused by a full backlog, lost by a
batch the data directory would not take, cut off in a TCP frame too long to be a message, and
dropped by the kernel before the listener could read it (the socket's drop counter). TCP
connections: at most :data:`TCP_PER_SOURCE` per sender address and :data:`TCP_TOTAL` in all (a
new one then closes the least recently active one), each closed after :data:`TCP_IDLE_S` without
data.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bastion_app.binding import leases_path, read_leases, read_neighbours
from bastion_app.db import StorageUnavailable
from bastion_app.logstore import SEVERITIES, UNATTRIBUTED, LogStore, advance, clean, clip, keepalive_interval
from labcore import progress as timeline

log = logging.getLogger("lab-bastion.syslog")

MAX_DATAGRAM = 65535
#: Bytes of messages waiting for the writer or being written; beyond this the receivers drop (and
#: count) them. With the receive buffer this bounds the listener's memory (docs/reliability.md).
MAX_BACKLOG_BYTES = 8 * 1024 * 1024
BATCH = 5000
RCVBUF = 32 * 1024 * 1024
#: TCP connections per sender address and in all; an idle connection is closed after TCP_IDLE_S.
#: An installer's rsyslog keeps one connection and reconnects when it was closed.
TCP_PER_SOURCE = 4
TCP_TOTAL = 128
TCP_IDLE_S = 300.0


# -- parsing (pure) ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Message:
    facility: int
    severity: str
    host: str
    app: str
    text: str
    rfc: str  # "5424", "3164" or "raw" (no valid header: the whole datagram is the text)


_PRI = re.compile(r"<(\d{1,3})>")
_TS3164 = re.compile(r"(?:[A-Z][a-z]{2}  ?\d{1,2} \d\d:\d\d:\d\d(?:\.\d+)?(?: \d{4})?|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?) ")
_TAG = re.compile(r"([^\s:\[\]]{1,64})(?:\[([^\]\s]{0,32})\])?: ?")
_HOST = re.compile(r"[A-Za-z0-9._:%-]{1,255}")
def _sd_end(s: str) -> int:
    """Index just past the STRUCTURED-DATA of an RFC 5424 message ('-' or [..][..]), or -1."""
    if s.startswith("-"):
        return 1
    i, n = 0, len(s)
    if not s.startswith("["):
        return -1
    while i < n and s[i] == "[":
        i += 1
        quoted = False
        while i < n:
            ch = s[i]
            if ch == "\\" and quoted:
                i += 2
                continue
            if ch == '"':
                quoted = not quoted
            elif ch == "]" and not quoted:
                break
            i += 1
        if i >= n:
            return -1
        i += 1
    return i


def parse(data: bytes) -> Message:
    """Parse one syslog message. Never raises: whatever does not fit a format is kept whole as
    the text of a ``raw`` message (user.notice, as RFC 3164 says for a message without PRI)."""
    s = data.decode("utf-8", "replace").rstrip("\r\n\x00")
    m = _PRI.match(s)
    if not m or int(m.group(1)) > 191:
        return Message(1, "notice", "", "", clip(clean(s.lstrip("\ufeff"))), "raw")
    pri = int(m.group(1))
    facility, severity = pri >> 3, SEVERITIES[pri & 7]
    rest = s[m.end():]
    if rest.startswith("1 "):
        parts = rest.split(" ", 6)
        if len(parts) == 7:
            _, _ts, host, app, _procid, _msgid, tail = parts
            end = _sd_end(tail)
            if end > 0 and (end == len(tail) or tail[end] == " "):
                msg = tail[end + 1:] if end < len(tail) else ""
                if msg.startswith("\ufeff"):
                    msg = msg[1:]
                return Message(facility, severity, "" if host == "-" else clean(host[:255]), "" if app == "-" else clean(app[:48]),
                               clip(clean(msg)), "5424")
        return Message(facility, severity, "", "", clip(clean(rest)), "raw")
    host = app = ""
    t = _TS3164.match(rest)
    if t:
        rest = rest[t.end():]
        # HOSTNAME follows the timestamp unless the next token is already the tag.
        first, sep, after = rest.partition(" ")
        if sep and _HOST.fullmatch(first) and not _TAG.fullmatch(first + " ") and not first.endswith(":"):
            host, rest = first, after
    tag = _TAG.match(rest)
    if tag:
        app, rest = tag.group(1), rest[tag.end():]
    return Message(facility, severity, host[:255], clean(app[:48]), clip(clean(rest)), "3164")


# -- who sent it: the lease file and the neighbour table (bastion_app.binding) ----------------
class Resolver:
    """Sender IP -> MAC, cached (``ttl_s`` for an answer, ``miss_ttl_s`` for "unknown"); on a miss
    the tables are re-read, at most every ``refresh_s``, and the store is asked for that address,
    so a machine that just called the bastion is known at once while a flood from an unknown
    sender costs one indexed-size query a second."""

    def __init__(self, store, leases: Path, *, ttl_s: float = 10.0, miss_ttl_s: float = 1.0, refresh_s: float = 0.25):
        self.store, self.leases = store, leases
        self.ttl_s, self.miss_ttl_s, self.refresh_s = ttl_s, miss_ttl_s, refresh_s
        self._cache: dict[str, tuple[str | None, float]] = {}
        self._table: dict[str, str] = {}
        self._loaded: float | None = None

    def _reload(self) -> None:
        table = self.store.macs_by_ip()  # the most recently seen machine wins
        table.update(read_leases(self.leases))
        table.update(read_neighbours())
        self._table, self._loaded = table, time.monotonic()
        self._cache.clear()

    def resolve(self, ip: str) -> str | None:
        now = time.monotonic()
        hit = self._cache.get(ip)
        if hit and hit[1] > now:
            return hit[0]
        if self._loaded is None or now - self._loaded > self.refresh_s:
            self._reload()
        mac = self._table.get(ip)
        if mac is None:  # a machine that called the bastion a moment ago: ask the store itself
            mac = self.store.mac_for_ip(ip)
        self._cache[ip] = (mac, now + (self.ttl_s if mac else self.miss_ttl_s))
        return mac


# -- the listener ------------------------------------------------------------------------------
class Listener:
    def __init__(self, cfg, host: str, port: int, *, store=None, logs: LogStore | None = None,
                 tcp_idle_s: float = TCP_IDLE_S, tcp_total: int = TCP_TOTAL, tcp_per_source: int = TCP_PER_SOURCE):
        from bastion_app.store import Store

        self.cfg, self.host, self.port = cfg, host, port
        self.store = store or Store.from_config(cfg)
        self.logs = logs or LogStore.from_config(cfg)
        self.resolver = Resolver(self.store, leases_path(cfg))
        self.queue: collections.deque = collections.deque()
        self.backlog_bytes = 0  # queued plus the batch being written
        self._backlog_lock = threading.Lock()
        self.stopping = threading.Event()
        self.received = self.dropped = self.stored = 0
        self.keepalive_s = keepalive_interval(cfg.stall_timeout)
        self.udp: socket.socket | None = None
        self.tcp = TcpConnections(tcp_total, tcp_per_source)
        self.tcp_idle_s = tcp_idle_s
        self._machines: dict[str, tuple[dict | None, float]] = {}
        self._store_error_logged = 0.0

    @property
    def kernel_dropped(self) -> int:
        """Datagrams the kernel dropped for this socket (its receive buffer was full)."""
        return socket_drops(self.udp) if self.udp is not None else 0

    # receiving
    def bind(self, sockets: tuple[socket.socket, socket.socket] | None = None) -> None:
        """Listen on ``sockets`` (UDP, TCP) as :func:`bind_sockets` made them (`serve` binds them
        in the supervisor and hands them down), or bind them here; OSError when the port is taken."""
        udp, tcp = sockets or bind_sockets(self.host, self.port)
        self.udp = udp
        log.info("syslog: listening on udp and tcp %s:%d", self.host, self.port)
        threading.Thread(target=self._recv_udp, name="syslog-udp", daemon=True).start()
        threading.Thread(target=self._accept_tcp, args=(tcp,), name="syslog-tcp", daemon=True).start()

    def _push(self, ip: str, data: bytes) -> None:
        with self._backlog_lock:
            self.received += 1
            if self.backlog_bytes + len(data) > MAX_BACKLOG_BYTES:
                self.dropped += 1
                return
            self.backlog_bytes += len(data)
        self.queue.append((time.time(), ip, data))

    def _recv_udp(self) -> None:
        recv, push = self.udp.recvfrom, self._push  # type: ignore[union-attr]
        while True:
            try:
                data, addr = recv(MAX_DATAGRAM)
            except OSError:
                if self.stopping.is_set():
                    return
                continue
            push(addr[0], data)

    def _accept_tcp(self, srv: socket.socket) -> None:
        while not self.stopping.is_set():
            try:
                conn, addr = srv.accept()
            except OSError:
                continue
            if not self.tcp.admit(conn, addr[0]):
                conn.close()  # this host has its share already
                continue
            threading.Thread(target=self._read_tcp, args=(conn, addr[0]), daemon=True).start()

    def _read_tcp(self, conn: socket.socket, ip: str) -> None:
        """RFC 6587 framing: octet counting ("LEN SP MSG") or one message per line. A frame
        longer than a datagram can be is counted as dropped and ends the connection."""
        buf = b""
        try:
            conn.settimeout(self.tcp_idle_s)
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                self.tcp.touch(conn)
                buf += chunk
                while buf:
                    m = re.match(rb"(\d{1,6}) ", buf)
                    if m:
                        n = int(m.group(1))
                        if n > MAX_DATAGRAM:
                            with self._backlog_lock:
                                self.received += 1
                                self.dropped += 1
                            return
                        if len(buf) < m.end() + n:
                            break
                        self._push(ip, buf[m.end():m.end() + n])
                        buf = buf[m.end() + n:]
                        continue
                    nl = buf.find(b"\n")
                    if nl < 0:
                        if len(buf) > MAX_DATAGRAM:
                            self._push(ip, buf)
                            buf = b""
                        break
                    if nl:
                        self._push(ip, buf[:nl])
                    buf = buf[nl + 1:]
            if buf.strip():
                self._push(ip, buf)
        except OSError:
            pass  # idle for tcp_idle_s (a timeout), closed to make room, or reset by the sender
        finally:
            self.tcp.release(conn)
            conn.close()

    # writing
    def _machine(self, mac: str) -> dict | None:
        hit = self._machines.get(mac)
        now = time.monotonic()
        if hit and hit[1] > now:
            return hit[0]
        try:
            m = self.store.get(mac)
        except StorageUnavailable:
            return None
        self._machines[mac] = (m, now + 1.0)
        return m

    def process(self, batch: list[tuple[float, str, bytes]]) -> int:
        """Parse, attribute and store one batch; advance the progress of machines it shows."""
        rows = []
        steps: dict[str, timeline.Progress | None] = {}
        ips: dict[str, str] = {}
        for ts, ip, data in batch:
            msg = parse(data)
            mac = self.resolver.resolve(ip) or UNATTRIBUTED
            rows.append((mac, ts, "syslog", msg.severity, msg.app, msg.host, ip, msg.text))
            if mac != UNATTRIBUTED:
                step = timeline.from_anaconda_line(msg.text)
                best = steps.get(mac)
                if step is not None and (best is None or timeline.advances(best.stage, best.percent, step)):
                    steps[mac] = step
                else:
                    steps.setdefault(mac, None)
                ips[mac] = ip
        try:
            n = self.logs.append(rows)
        except StorageUnavailable as exc:
            with self._backlog_lock:
                self.dropped += len(rows)
            if time.monotonic() - self._store_error_logged > 60:
                self._store_error_logged = time.monotonic()
                log.error("syslog: %d lines dropped (counted): %s", len(rows), exc)
            return 0
        for mac, step in steps.items():
            m = self._machine(mac)
            if m is None:
                continue
            try:
                updated = advance(self.store, mac, step, machine=m, ip=ips[mac], keepalive_s=self.keepalive_s)
            except StorageUnavailable:
                continue  # the lines are stored; the progress step waits for the next line
            if updated is not None:
                self._machines[mac] = (updated, time.monotonic() + 1.0)
        self.stored += n
        return n

    def run(self) -> None:
        """Store what the receivers queue until stopped (call :meth:`bind` first)."""
        q = self.queue
        last_report = time.monotonic()
        while not (self.stopping.is_set() and not q):
            if not q:
                time.sleep(0.02)
            else:
                batch = []
                pop = q.popleft
                while q and len(batch) < BATCH:
                    batch.append(pop())
                try:
                    self.process(batch)
                except Exception:  # noqa: BLE001 - a bad batch must not stop the listener
                    log.exception("syslog: could not store %d lines", len(batch))
                    with self._backlog_lock:
                        self.dropped += len(batch)
                finally:
                    with self._backlog_lock:
                        self.backlog_bytes -= sum(len(d) for _ts, _ip, d in batch)
            if time.monotonic() - last_report > 1:
                last_report = time.monotonic()
                _report(self)


#: `serve` binds the syslog sockets itself and passes them to the listener: "UDP_FD,TCP_FD".
SOCKETS_ENV = "LAB_BASTION_SYSLOG_FDS"


def bind_sockets(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """The listener's UDP and TCP sockets on the port, bound and listening, or OSError. UDP without
    SO_REUSEADDR: with it, a second bastion on the same port would bind too and take some of the
    datagrams. TCP with it: a connection of an earlier run in TIME_WAIT is no conflict."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    udp = socket.socket(family, socket.SOCK_DGRAM)
    tcp = socket.socket(family, socket.SOCK_STREAM)
    try:
        try:
            udp.setsockopt(socket.SOL_SOCKET, 33, RCVBUF)  # SO_RCVBUFFORCE (root)
        except OSError:
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        udp.bind((host, port))
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((host, port))
        tcp.listen(64)
    except OSError:
        udp.close()
        tcp.close()
        raise
    return udp, tcp


def inherited_sockets() -> tuple[socket.socket, socket.socket] | None:
    """The sockets `serve` bound and passed down (SOCKETS_ENV), if any."""
    fds = os.environ.get(SOCKETS_ENV)
    if not fds:
        return None
    udp_fd, tcp_fd = (int(fd) for fd in fds.split(","))
    return socket.socket(fileno=udp_fd), socket.socket(fileno=tcp_fd)


class TcpConnections:
    """The listener's TCP connections: at most ``per_source`` per sender address and ``total`` in
    all; when the table is full, a new connection closes the least recently active one, so idle
    connections (however many addresses they come from) never lock a real installer out."""

    def __init__(self, total: int, per_source: int):
        self.total, self.per_source = total, per_source
        self._active: dict[socket.socket, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def admit(self, conn: socket.socket, ip: str) -> bool:
        with self._lock:
            if sum(1 for src, _ in self._active.values() if src == ip) >= self.per_source:
                return False
            if len(self._active) >= self.total:
                victim = min(self._active, key=lambda c: self._active[c][1])
                del self._active[victim]
                try:
                    victim.shutdown(socket.SHUT_RDWR)  # its reader wakes up and closes it
                except OSError:
                    pass
            self._active[conn] = (ip, time.monotonic())
            return True

    def touch(self, conn: socket.socket) -> None:
        with self._lock:
            if conn in self._active:
                self._active[conn] = (self._active[conn][0], time.monotonic())

    def release(self, conn: socket.socket) -> None:
        with self._lock:
            self._active.pop(conn, None)


def socket_drops(sock: socket.socket) -> int:
    """The kernel's drop counter of a UDP socket (the last column of /proc/net/udp[6]), 0 if unknown."""
    try:
        inode = str(os.fstat(sock.fileno()).st_ino)
    except OSError:
        return 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) >= 13 and f[9] == inode:
                return int(f[-1])
    return 0


_metrics: dict = {}


def _report(listener: Listener) -> None:
    """Counters for /metrics (prometheus multiprocess files, summed by the gunicorn workers)."""
    try:
        from prometheus_client import Counter
    except ImportError:  # pragma: no cover
        return
    if not _metrics:
        _metrics["lines"] = Counter("lab_bastion_syslog_lines_total", "Syslog messages stored")
        _metrics["dropped"] = Counter("lab_bastion_syslog_dropped_total",
                                      "Syslog messages not stored: backlog full, refused by the data directory, "
                                      "a TCP frame too long, or dropped by the kernel (receive buffer full)")
        _metrics["seen"] = (0, 0)
    stored, dropped = _metrics["seen"]
    now = (listener.stored, listener.dropped + listener.kernel_dropped)
    _metrics["lines"].inc(now[0] - stored)
    _metrics["dropped"].inc(now[1] - dropped)
    _metrics["seen"] = now


def main() -> int:
    from labcore import bastion_config as configmod

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = configmod.load(os.environ.get(configmod.DATA_DIR_ENV), detect=False)
    listener = Listener(cfg, cfg.listen_host, cfg.syslog_port)

    def stop(*_):
        listener.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        listener.bind(inherited_sockets())
    except OSError as exc:
        log.error("syslog: cannot listen on udp and tcp %s:%d (%s): use another --syslog-port", cfg.listen_host, cfg.syslog_port, exc)
        from bastion_app.supervisor import EX_CONFIG

        return EX_CONFIG
    try:
        listener.logs.trim_all()
    except StorageUnavailable as exc:  # a read-only data directory: lines are refused (and counted) until it is writable
        log.warning("syslog: %s", exc)
    listener.run()
    _report(listener)
    log.info("syslog: stopped (%d received, %d stored, %d dropped, %d more dropped by the kernel)",
             listener.received, listener.stored, listener.dropped, listener.kernel_dropped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
