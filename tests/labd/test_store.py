"""labd's store on a real PostgreSQL 15: migrations, the 40001 retry loop (a real serialization
failure between two concurrent SERIALIZABLE transactions, and an injected one), the audit row
sharing its mutation's transaction."""

from __future__ import annotations

import os
import threading

import psycopg
import pytest

from labd import migrations
from labd.store import Store, audit


def test_migrations_are_recorded_and_run_once(labd_db):
    # the template ran them all; a second run applies nothing and every step is recorded once
    assert migrations.migrate(labd_db) == []
    assert migrations.pending(labd_db) == []
    with psycopg.connect(labd_db) as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM schema_migrations ORDER BY id")]
        assert ids == [s for s, _ in migrations.STEPS]
        # a step that ran but was not recorded (a crash in between) runs again harmlessly
        conn.execute("DELETE FROM schema_migrations WHERE id = %s", (migrations.STEPS[-1][0],))
        conn.commit()
    assert migrations.migrate(labd_db) == [migrations.STEPS[-1][0]]


def test_a_real_serialization_failure_is_retried(labd_db):
    """Two SERIALIZABLE transactions read the same row, both wait until the other has read, then
    both write it: PostgreSQL fails one with 40001; the loop runs it again and no increment is lost."""
    with psycopg.connect(labd_db) as conn:
        conn.execute("INSERT INTO roles (name, rules, description) VALUES ('counter', '[]', '0')")
    store = Store(labd_db, max_size=4)
    both_read = threading.Barrier(2, timeout=10)
    attempts = []

    def bump(cur):
        attempts.append(1)
        n = int(cur.execute("SELECT description FROM roles WHERE name = 'counter'").fetchone()["description"])
        if len(attempts) <= 2:  # first attempts only: the retry runs alone
            both_read.wait()
        cur.execute("UPDATE roles SET description = %s WHERE name = 'counter'", (str(n + 1),))

    threads = [threading.Thread(target=store.transaction, args=(bump,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    final = store.transaction(lambda cur: cur.execute("SELECT description FROM roles WHERE name = 'counter'").fetchone())
    store.close()
    assert final["description"] == "2"
    assert store.retries == 1 and len(attempts) == 3


def test_an_injected_failure_is_retried_and_the_last_one_raised(labd_db):
    store = Store(labd_db, max_size=2)
    calls = []

    def flaky(cur):
        calls.append(1)
        audit(cur, "tester", "servers.update", "servers/x")
        if len(calls) < 3:
            raise psycopg.errors.SerializationFailure("injected: could not serialize access")
        return "done"

    assert store.transaction(flaky) == "done"
    assert store.retries == 2
    # the two failed attempts were rolled back with their audit rows: exactly one row remains
    assert store.transaction(lambda cur: cur.execute("SELECT count(*) AS n FROM audit WHERE actor = 'tester'").fetchone())["n"] == 1

    def always(cur):
        raise psycopg.errors.SerializationFailure("injected")
    with pytest.raises(psycopg.errors.SerializationFailure):
        store.transaction(always, attempts=3)
    store.close()


def test_a_failed_mutation_leaves_no_audit_row(labd_db):
    store = Store(labd_db)

    def work(cur):
        audit(cur, "tester", "servers.create", "servers/y")
        cur.execute("INSERT INTO servers (mac, state, cloud, environment) VALUES ('m', 'discovered', 'c', 'e')")
        cur.execute("INSERT INTO servers (mac, state, cloud, environment) VALUES ('m', 'discovered', 'c', 'e')")
    with pytest.raises(psycopg.errors.UniqueViolation):
        store.transaction(work)
    assert store.transaction(lambda cur: cur.execute("SELECT count(*) AS n FROM audit").fetchone())["n"] == 0
    assert store.transaction(lambda cur: cur.execute("SELECT count(*) AS n FROM servers").fetchone())["n"] == 0
    store.close()


def test_the_pool_opens_in_the_process_that_uses_it(labd_db):
    """No connection crosses a fork: a child process gets a pool of its own on first use."""
    store = Store(labd_db, max_size=2)
    store.ping()
    parent_pool = store.pool
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a new pool, and it works
        try:
            store.ping()
            os.write(w, b"ok" if store.pool is not parent_pool else b"same")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(r, 10) == b"ok"
    store.ping()  # the parent's pool still works
    store.close()
