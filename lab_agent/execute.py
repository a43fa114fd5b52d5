"""Commands: run an argv as the configured user (never through a shell), stream stdout and stderr
in the order their chunks arrive, stop it at a deadline, and leave nothing behind: the command is
the leader of a new process group (session) and the whole group is killed when the command ends,
times out or is cancelled."""

from __future__ import annotations

import asyncio
import codecs
import os
import pwd
import signal
from collections.abc import Awaitable, Callable

CHUNK = 16 * 1024
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL on a timeout or a cancel
MAX_OUTPUT = 8 * 1024 * 1024  # bytes relayed per command; the rest is counted, not sent

Emit = Callable[[str, str], Awaitable[None]]


def user_env(entry: pwd.struct_passwd) -> dict[str, str]:
    return {"HOME": entry.pw_dir, "USER": entry.pw_name, "LOGNAME": entry.pw_name, "SHELL": entry.pw_shell or "/bin/sh",
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def run(argv: list[str], emit: Emit, *, user: str | None = None, timeout: float | None = None) -> dict:
    """Run ``argv``; ``emit(stream, text)`` gets each chunk ("stdout" or "stderr") in arrival order.
    Returns ``{"exit_code", "signal", "timed_out", "truncated_bytes"}``; ``exit_code`` is None when a
    signal ended it. Cancelling the awaiting task kills the process group and re-raises."""
    if not argv:
        raise ValueError("an empty command")
    entry = pwd.getpwnam(user) if user else pwd.getpwuid(os.getuid())
    switch = entry.pw_uid != os.getuid()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True, env=user_env(entry), cwd=entry.pw_dir if os.path.isdir(entry.pw_dir) else "/",
        user=entry.pw_uid if switch else None, group=entry.pw_gid if switch else None,
        extra_groups=os.getgrouplist(entry.pw_name, entry.pw_gid) if switch else None)
    pgid = proc.pid
    sent = 0
    dropped = 0
    lock = asyncio.Lock()  # one chunk at a time: the order of emit calls is the order of arrival

    async def pump(stream: asyncio.StreamReader, name: str) -> None:
        nonlocal sent, dropped
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        while True:
            data = await stream.read(CHUNK)
            text = decoder.decode(data, final=not data)
            async with lock:
                room = MAX_OUTPUT - sent
                if text and room > 0:
                    piece = text[:room]
                    sent += len(piece)
                    dropped += len(text) - len(piece)
                    await emit(name, piece)
                elif text:
                    dropped += len(text)
            if not data:
                return

    pumps = asyncio.gather(pump(proc.stdout, "stdout"), pump(proc.stderr, "stderr"))
    timed_out = False
    try:
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            timed_out = True
            await _stop(proc, pgid)
        _killpg(pgid, signal.SIGKILL)  # what the command left running in its group goes with it
        await pumps
    except asyncio.CancelledError:
        await asyncio.shield(_stop(proc, pgid))
        pumps.cancel()
        raise
    rc = proc.returncode
    return {"exit_code": rc if rc >= 0 else None, "signal": -rc if rc < 0 else None, "timed_out": timed_out,
            "truncated_bytes": dropped}


async def _stop(proc: asyncio.subprocess.Process, pgid: int) -> None:
    _killpg(pgid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), KILL_GRACE)
    except TimeoutError:
        pass
    _killpg(pgid, signal.SIGKILL)
    await proc.wait()
