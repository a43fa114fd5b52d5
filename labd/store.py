"""labd's store: PostgreSQL (or CockroachDB) through psycopg 3 and a psycopg_pool connection pool.

- The pool is opened on first use in the process that uses it: gunicorn preloads the app in its
  master and forks workers, and no connection may cross a fork.
- Every unit of work runs in :meth:`Store.transaction`, SERIALIZABLE, and is run again when the
  database answers SQLSTATE 40001 (serialization failure): CockroachDB requires client-side
  retries, PostgreSQL under SERIALIZABLE needs them too. The unit must therefore be a function
  of its cursor only (no side effects outside the database).
- Every mutation writes its audit row (:func:`audit`) in the same transaction.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import psycopg
from psycopg import IsolationLevel
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

log = logging.getLogger("labd")
T = TypeVar("T")
MAX_ATTEMPTS = 8


class Store:
    def __init__(self, url: str, max_size: int = 8):
        self.url, self.max_size = url, max_size
        self._pool: ConnectionPool | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()
        self.retries = 0  # serialization failures retried (also a metric)

    def _configure(self, conn: psycopg.Connection) -> None:
        conn.isolation_level = IsolationLevel.SERIALIZABLE
        conn.execute("SET TIME ZONE 'UTC'")  # times rendered by the database (JSON) are in UTC
        conn.commit()

    @property
    def pool(self) -> ConnectionPool:
        if self._pool is None or self._pid != os.getpid():
            with self._lock:
                if self._pool is None or self._pid != os.getpid():
                    self._pool = ConnectionPool(self.url, min_size=1, max_size=self.max_size, open=True, timeout=10,
                                                kwargs={"row_factory": dict_row, "autocommit": False},
                                                configure=self._configure, name="labd",
                                                # a connection the server dropped (a restart) is replaced, not handed out
                                                check=ConnectionPool.check_connection)
                    self._pid = os.getpid()
        return self._pool

    def close(self) -> None:
        if self._pool is not None and self._pid == os.getpid():
            self._pool.close()
        self._pool = None

    def transaction(self, work: Callable[[psycopg.Cursor], T], *, attempts: int = MAX_ATTEMPTS) -> T:
        """Run ``work(cursor)`` in one SERIALIZABLE transaction; on SQLSTATE 40001 roll back and run
        it again (jittered exponential backoff), up to ``attempts`` times."""
        for attempt in range(1, attempts + 1):
            try:
                with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                    return work(cur)
            except psycopg.errors.SerializationFailure:
                if attempt == attempts:
                    raise
                self.retries += 1
                from labd import metrics

                metrics.RETRIES.inc()
                time.sleep(min(0.5, 0.005 * 2 ** attempt) * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")

    def ping(self) -> None:
        self.transaction(lambda cur: cur.execute("SELECT 1"))


def audit(cur: psycopg.Cursor, actor: str, action: str, resource: str, *, outcome: str = "allowed",
          status: int = 200, detail: dict | None = None) -> None:
    """One audit row, in the caller's transaction. ``detail`` never holds a secret."""
    cur.execute("INSERT INTO audit (actor, action, resource, outcome, status, detail) VALUES (%s, %s, %s, %s, %s, %s)",
                (actor[:128], action, resource[:256], outcome, status, Jsonb(detail or {})))
