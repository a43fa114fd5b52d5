"""The follow machinery without Flask: the watcher, the follower slots and the SSE stream, on real
SQLite stores in a temporary directory (tests/integration/test_follow.py runs it behind gunicorn)."""

from __future__ import annotations

import json

import pytest

from bastion_app import follow
from bastion_app.logstore import LogStore
from bastion_app.store import Store

MAC, OTHER = "52:54:00:00:00:01", "52:54:00:00:00:02"
HW = {"cpu": {"model": "test"}}


@pytest.fixture
def stores(tmp_path):
    store, logs = Store(tmp_path / "state.db"), LogStore(tmp_path / "logs.db")
    yield store, logs
    store.close()
    logs.close()


def _line(mac: str, text: str):
    return (mac, 1.0, "api", "info", "", "", None, text)


def test_watcher_wakes_only_the_followers_of_changed_machines(stores):
    store, logs = stores
    w = follow.Watcher(store, logs, interval_s=0.02)
    mine, theirs = w.subscribe(MAC), w.subscribe(OTHER)
    store.discover(MAC, HW, ip=None)  # a state event
    assert mine.wait(5) and not theirs.wait(0.2)
    mine.clear()
    logs.append([_line(OTHER, "hello")])  # a log line
    assert theirs.wait(5) and not mine.wait(0.2)
    w.unsubscribe(MAC, mine)
    w.unsubscribe(OTHER, theirs)
    assert w.subs == {}


def test_stream_replays_history_and_ends_when_not_installing(stores, monkeypatch):
    store, logs = stores
    monkeypatch.setattr(follow, "END_LINGER_S", 0)
    store.discover(MAC, HW, ip=None)
    logs.append([_line(MAC, "one"), _line(MAC, "two")])
    body = follow.open_stream(store, logs, MAC, (0, 0), heartbeat=1, followers=4)
    text = "".join(body)
    body.close()
    events = [b.split("\n") for b in text.split("\n\n") if "event: " in b]
    kinds = [next(x[7:] for x in b if x.startswith("event: ")) for b in events]
    assert kinds == ["log", "log", "state", "end"]
    eid = store.last_event_id()
    assert events[-1][0] == f"id: {eid}-{logs.last_id()}"
    assert json.loads(events[-1][-1][6:]) == {"state": "discovered", "failure": None, "stalled": False}


def test_follower_slots_are_bounded_and_freed_once(stores):
    store, logs = stores
    first = follow.open_stream(store, logs, MAC, (0, 0), heartbeat=1, followers=1)
    assert first is not None
    assert follow.open_stream(store, logs, MAC, (0, 0), heartbeat=1, followers=1) is None
    first.close()
    first.close()  # a second close must not free a second slot
    again = follow.open_stream(store, logs, MAC, (0, 0), heartbeat=1, followers=1)
    assert again is not None
    assert follow.open_stream(store, logs, MAC, (0, 0), heartbeat=1, followers=1) is None
    again.close()
