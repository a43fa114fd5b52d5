"""lab-agent's host side, without labd: the heartbeat from /proc, the command runner (order of
stdout/stderr, exit codes, timeout, cancel, the user, nothing left behind) and the journal relay
(a fake journalctl: argv, entries, resume after a cursor)."""

from __future__ import annotations

import asyncio
import os
import pwd
import sys
import time

import pytest

from lab_agent import execute, facts, journal
from tests.support import fake_journal, journal_append, need_root, pids_with


def test_heartbeat_reads_proc_and_cpu_moves_between_samples():
    s = facts.Sampler()
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        pass
    beat = s.sample()
    assert beat["hostname"] and beat["uptime_seconds"] > 0 and len(beat["load"]) == 3
    assert 0 < beat["cpu_percent"] <= 100 and beat["memory_total_bytes"] > beat["memory_used_bytes"] > 0
    assert beat["version"] and beat["os"] and beat["kernel"] == os.uname().release


def test_heartbeat_from_a_fake_proc(tmp_path):
    (tmp_path / "stat").write_text("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3\n")
    (tmp_path / "meminfo").write_text("MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    250 kB\n")
    (tmp_path / "loadavg").write_text("0.50 0.25 0.10 1/100 42\n")
    (tmp_path / "uptime").write_text("3600.5 100.0\n")
    s = facts.Sampler(tmp_path)
    (tmp_path / "stat").write_text("cpu  150 0 150 900 0 0 0 0 0 0\n")
    beat = s.sample()
    assert beat["cpu_percent"] == 50.0 and beat["uptime_seconds"] == 3600 and beat["load"] == [0.5, 0.25, 0.1]
    assert beat["memory_total_bytes"] == 1024000 and beat["memory_used_bytes"] == 750 * 1024 and beat["memory_percent"] == 75.0


def _run(argv, **kw):
    chunks = []

    async def emit(stream, text):
        chunks.append((stream, text))

    result = asyncio.run(execute.run(argv, emit, **kw))
    return result, chunks


def test_exec_interleaves_stdout_and_stderr_in_order_and_returns_the_exit_code():
    script = "import sys,time\nfor i in range(4):\n    s = sys.stdout if i % 2 == 0 else sys.stderr\n" \
             "    s.write(f'line {i}\\n'); s.flush(); time.sleep(0.05)\nsys.exit(3)"
    result, chunks = _run([sys.executable, "-c", script])
    assert result == {"exit_code": 3, "signal": None, "timed_out": False, "truncated_bytes": 0}
    assert chunks == [("stdout", "line 0\n"), ("stderr", "line 1\n"), ("stdout", "line 2\n"), ("stderr", "line 3\n")]


def test_exec_argv_is_not_a_shell_line():
    result, chunks = _run(["printf", "%s|%s", "$(id) ; rm -rf /", "`x`"])
    assert result["exit_code"] == 0 and "".join(t for _, t in chunks) == "$(id) ; rm -rf /|`x`"


def test_exec_timeout_kills_the_whole_group():
    marker = f"agent-timeout-{os.getpid()}"
    t0 = time.monotonic()
    result, chunks = _run(["bash", "-c", f"(exec -a {marker}-bg sleep 300) & echo started; exec -a {marker} sleep 301"], timeout=0.5)
    assert result["timed_out"] and result["exit_code"] is None and result["signal"] in (15, 9)
    assert time.monotonic() - t0 < 5 and ("stdout", "started\n") in chunks
    time.sleep(0.1)
    assert pids_with(marker) == []


def test_exec_leaves_no_background_child_behind():
    marker = f"agent-bg-{os.getpid()}"
    result, _ = _run(["bash", "-c", f"(exec -a {marker} sleep 300) >/dev/null 2>&1 & echo done"])
    assert result["exit_code"] == 0
    time.sleep(0.1)
    assert pids_with(marker) == []


def test_exec_cancel_kills_the_process():
    marker = f"agent-cancel-{os.getpid()}"

    async def main():
        async def emit(stream, text):
            pass
        task = asyncio.create_task(execute.run(["bash", "-c", f"exec -a {marker} sleep 300"], emit))
        await asyncio.sleep(0.3)
        assert pids_with(marker)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert pids_with(marker) == []


def test_exec_runs_as_the_configured_user():
    need_root()
    result, chunks = _run(["id", "-un"], user="nobody")
    assert result["exit_code"] == 0 and chunks == [("stdout", "nobody\n")]
    result, chunks = _run(["sh", "-c", "echo $HOME $USER"], user="nobody")
    assert chunks[0][1].strip() == f"{pwd.getpwnam('nobody').pw_dir} nobody"


def test_exec_output_is_capped(monkeypatch):
    monkeypatch.setattr(execute, "MAX_OUTPUT", 1000)
    result, chunks = _run([sys.executable, "-c", "print('x' * 5000)"])
    assert sum(len(t) for _, t in chunks) == 1000 and result["truncated_bytes"] == 4001


def test_journal_argv_is_checked():
    a = journal.argv(unit="ssh.service", since="-1h", follow=True)
    assert a == ["journalctl", "-o", "json", "--no-pager", "--quiet", "-u", "ssh.service", "--since", "-1h", "-f"]
    assert journal.argv(after_cursor="s=1;i=2", since="today")[-2:] == ["--cursor", "s=1;i=2"]
    assert "--since" not in journal.argv(after_cursor="s=1;i=2", since="today")
    for bad in ({"unit": "--help"}, {"unit": "a b"}, {"since": "x\nY"}, {"after_cursor": "a b"}, {"unit": "x;reboot"}):
        with pytest.raises(ValueError):
            journal.argv(**bad)


def test_journal_entry_decodes_binary_messages():
    e = journal.entry('{"__CURSOR": "c1", "__REALTIME_TIMESTAMP": "5", "MESSAGE": [104, 105, 255], "PRIORITY": "3"}')
    assert e == {"cursor": "c1", "time_us": 5, "unit": "", "priority": 3, "message": "hi\ufffd"}
    assert journal.entry("not json") is None and journal.entry('{"MESSAGE": "no cursor"}') is None


def test_journal_relay_follows_and_resumes_after_a_cursor(tmp_path, monkeypatch):
    bindir, jfile = fake_journal(tmp_path)
    monkeypatch.setenv("FAKE_JOURNAL", str(jfile))
    for i in range(3):
        journal_append(jfile, i, f"m{i}")
    journal_append(jfile, 99, "other unit", unit="other.service")
    got = []

    async def follow():
        async def emit(e):
            got.append(e)
            if len(got) == 3:
                journal_append(jfile, 3, "m3")
        task = asyncio.create_task(journal.relay(journal.argv(unit="demo.service", follow=True, journalctl=str(bindir / "journalctl")), emit))
        for _ in range(100):
            await asyncio.sleep(0.05)
            if len(got) == 4:
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(follow())
    assert [e["message"] for e in got] == ["m0", "m1", "m2", "m3"]
    rest = []

    async def resume():
        async def emit(e):
            rest.append(e)
        return await journal.relay(journal.argv(after_cursor=got[1]["cursor"], unit="demo.service",
                                                journalctl=str(bindir / "journalctl")), emit)

    assert asyncio.run(resume()) == 0 and [e["message"] for e in rest] == ["m2", "m3"]
