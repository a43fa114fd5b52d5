"""The follow stream (server-sent events) with a real HTTP client against `lab-bastion serve`:
resume with Last-Event-ID loses nothing, heartbeats, clean end, stalled installs, the follower cap
that keeps threads free for machines."""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest
import requests

from tests.support import (
    call_from,
    free_syslog_port,
    installing,
    send_udp,
    start_bastion,
    udp_port,
    wait_for,
)


class SSE:
    """A minimal server-sent-events client on http.client (one connection, read line by line)."""

    def __init__(self, b, mac: str, last_id: str | None = None, query: str = "", timeout: float = 15):
        host, port = b.url.split("//")[1].split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        headers = {**b.headers, "Accept": "text/event-stream"}
        if last_id:
            headers["Last-Event-ID"] = last_id
        self.conn.request("GET", f"/api/logs/{mac}/follow{query}", headers=headers)
        self.resp = self.conn.getresponse()
        self.last_id = last_id

    def events(self):
        """Yield (event, data) for each event and ("comment", text) for comment lines."""
        event, data = None, []
        while True:
            raw = self.resp.readline()
            if not raw:
                return
            line = raw.decode().rstrip("\r\n")
            if line == "":
                if event or data:
                    yield event or "message", json.loads("\n".join(data))
                event, data = None, []
            elif line.startswith(":"):
                yield "comment", line[1:].strip()
            else:
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if field == "event":
                    event = value
                elif field == "data":
                    data.append(value)
                elif field == "id":
                    self.last_id = value

    def close(self):
        self.conn.close()


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    b = start_bastion(tmp_path_factory.mktemp("follow") / "data", "--syslog-port", str(free_syslog_port()),
                      workers=2)
    yield b
    b.stop()


def test_resume_with_last_event_id_loses_nothing(srv):
    mac = "52:54:00:20:00:01"
    token = installing(srv, mac, "follow-one", source="127.0.0.41")
    sent: list[str] = []
    percents = list(range(20, 80, 5))

    errors: list[BaseException] = []
    src = "127.0.0.41"  # the machine's address: its HTTP calls and its syslog come from it

    def machine():
        """The installer: log posts, syslog datagrams and progress posts, interleaved."""
        try:
            for i in range(60):
                text = f"api line {i:03d}"
                st, body = call_from(srv, src, "POST", "/api/log", {"mac": mac, "token": token, "lines": [text]})
                assert st == 200, body
                sent.append(text)
                udp = f"udp line {i:03d}"
                send_udp(udp_port(srv), f"<30>Nov 26 12:00:00 h anaconda: {udp}".encode(), source=src)
                sent.append(udp)
                if i % 5 == 0:
                    st, body = call_from(srv, src, "POST", "/api/progress",
                                         {"mac": mac, "token": token, "stage": "packages", "percent": percents[i // 5]})
                    assert st == 200, body
                time.sleep(0.01)
            # syslog is asynchronous: the install ends once its last datagram is stored
            wait_for(lambda: len(requests.get(f"{srv.url}/api/logs/{mac}", headers=srv.headers, params={"limit": 1000},
                                              timeout=30).json()["lines"]) == len(sent), timeout=60, what="all lines stored")
            st, body = call_from(srv, src, "POST", "/api/progress", {"mac": mac, "token": token, "stage": "complete"})
            assert st == 200, body
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    writer = threading.Thread(target=machine)
    writer.start()
    got_logs: list[str] = []
    got_progress: list[int | None] = []
    ids: list[str] = []

    first = SSE(srv, mac, query="?heartbeat=2")
    deadline = time.monotonic() + 120
    assert first.resp.status == 200 and first.resp.getheader("Content-Type").startswith("text/event-stream")
    for event, data in first.events():
        assert not errors, errors
        assert time.monotonic() < deadline, "25 lines not seen within 120 s"
        if event == "log":
            got_logs.append(data["text"])
            ids.append(first.last_id)
        elif event == "progress":
            got_progress.append(data["percent"])
        if len(got_logs) >= 25:
            break
    first.close()  # the client goes away mid-install; the machine keeps talking
    time.sleep(0.5)

    second = SSE(srv, mac, last_id=first.last_id, query="?heartbeat=2")
    end = None
    deadline = time.monotonic() + 120
    for event, data in second.events():
        assert not errors, errors
        assert time.monotonic() < deadline, "no end event within 120 s"
        if event == "log":
            got_logs.append(data["text"])
            ids.append(second.last_id)
        elif event == "progress":
            got_progress.append(data["percent"])
        elif event == "end":
            end = data
            break
    second.close()
    writer.join(60)
    assert not errors, errors

    assert sorted(got_logs) == sorted(sent), "every line exactly once across the reconnect"
    assert [p for p in got_progress if p is not None and p >= 20] == percents + [100]
    assert end == {"state": "installed", "failure": None, "stalled": False}
    pairs = [tuple(map(int, i.split("-"))) for i in ids]
    assert all(a[0] <= b[0] and a[1] < b[1] for a, b in zip(pairs, pairs[1:], strict=False)), "ids only grow"


def test_heartbeat_and_history_replay(srv):
    mac = "52:54:00:20:00:02"
    installing(srv, mac, "follow-idle")
    s = SSE(srv, mac, query="?heartbeat=1")
    seen = []
    t0 = time.monotonic()
    for event, data in s.events():
        seen.append((event, data))
        if event == "comment" and data.startswith("keepalive"):
            break
        assert time.monotonic() - t0 < 5
    s.close()
    kinds = [e for e, _ in seen]
    assert "state" in kinds and "progress" in kinds  # the history: discovered -> queued -> installing
    assert seen[-1][0] == "comment"


def test_follow_of_a_finished_install_replays_and_ends(srv):
    mac = "52:54:00:20:00:03"
    token = installing(srv, mac, "follow-done")
    requests.post(srv.url + "/api/progress", json={"mac": mac, "token": token, "stage": "failed", "message": "disk on fire"},
                  timeout=10)
    s = SSE(srv, mac)
    events = list(s.events())
    s.close()
    assert events[-1] == ("end", {"state": "failed", "failure": "disk on fire", "stalled": False})
    assert ("state" in [e for e, _ in events])


def test_bad_cursor_is_400(srv):
    r = requests.get(f"{srv.url}/api/logs/52:54:00:20:00:01/follow", headers={**srv.headers, "Last-Event-ID": "x"}, timeout=5)
    assert r.status_code == 400


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """One worker, at most 3 followers, installs stall after 3 s of silence."""
    b = start_bastion(tmp_path_factory.mktemp("stall") / "data", "--syslog-port", str(free_syslog_port()),
                      workers=1, env={"LAB_BASTION_STALL_TIMEOUT": "3", "LAB_BASTION_FOLLOWERS": "3"})
    yield b
    b.stop()


def test_silent_install_is_marked_stalled_but_a_chatty_one_is_not(small):
    silent, chatty = "52:54:00:20:00:11", "52:54:00:20:00:12"
    installing(small, silent, "stall-silent")
    installing(small, chatty, "stall-chatty", source="127.0.0.42")
    stop = threading.Event()

    def chatter():  # the chatty installer logs a line every 0.2 s and never reports progress
        while not stop.wait(0.2):
            send_udp(udp_port(small), b"<30>Nov 26 12:00:00 h anaconda: still working", source="127.0.0.42")

    threading.Thread(target=chatter, daemon=True).start()
    s = SSE(small, silent, query="?heartbeat=1")
    t0 = time.monotonic()
    events = []
    try:
        for event, data in s.events():
            events.append((event, data))
            if event == "end":
                break
            assert time.monotonic() - t0 < 30, "no stall within 30 s"
    finally:
        s.close()
        stop.set()
    assert events[-1] == ("end", {"state": "failed", "failure": "stalled", "stalled": True})
    assert any(e == "state" and d["to"] == "failed" and d["kind"] == "stall" for e, d in events)
    machines = {m["mac"]: m for m in requests.get(small.url + "/api/machines", headers=small.headers, timeout=10).json()["machines"]}
    assert machines[silent]["stalled"] is True and machines[silent]["state"] == "failed"
    assert machines[chatty]["state"] == "installing" and machines[chatty]["stalled"] is False, "log lines are a sign of life"
    metrics = requests.get(small.url + "/metrics", timeout=10).text
    assert "lab_bastion_installs_stalled 1.0" in metrics


def test_follower_cap_keeps_machines_served(small):
    mac = "52:54:00:20:00:21"
    installing(small, mac, "cap-one")
    held = [SSE(small, mac, query="?heartbeat=300") for _ in range(3)]
    try:
        for h in held:
            assert h.resp.status == 200
        wait_for(lambda: requests.get(f"{small.url}/api/logs/{mac}/follow", headers=small.headers, timeout=5).status_code == 503,
                 timeout=10, what="the 4th follower refused")
        r = requests.get(f"{small.url}/api/logs/{mac}/follow", headers=small.headers, timeout=5)
        assert r.status_code == 503 and r.json()["error"] == "too many log followers on this worker"
        t = time.perf_counter()
        st, _ = call_from(small, "127.0.0.1", "GET", "/dispatch?mac=52:54:00:20:00:99")
        assert st == 200 and time.perf_counter() - t < 2, "machines are still served while followers hold their threads"
    finally:
        for h in held:
            h.close()
    # the slots come back when the followers go away
    wait_for(lambda: (r := requests.get(f"{small.url}/api/logs/{mac}/follow?heartbeat=1", headers=small.headers,
                                        stream=True, timeout=5)) and (r.close() or r.status_code == 200),
             timeout=10, what="a follower slot freed")
