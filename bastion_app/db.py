"""The one home of SQLite connections for the bastion's stores (state.db, logs.db).

- a connection per thread (gunicorn gthread workers, the syslog listener), WAL, a busy timeout;
- ``tx()``: one ``BEGIN IMMEDIATE`` write transaction; optionally writers first queue on a blocking
  kernel file lock, which hands the write lock over in order (SQLite's own busy handler polls with
  growing sleeps and starves unlucky writers for seconds under a boot storm);
- a data directory that is full, read-only or failing is a :class:`StorageUnavailable` (HTTP 503,
  nothing changed), and a read-only one can still be read: the connection falls back to SQLite's
  read-only immutable mode, and every write first tries a normal connection again, so the bastion
  recovers by itself when the disk does;
- the database file is created only while its store is set up (``creating``); a file deleted or
  replaced under a running bastion is a :class:`StorageUnavailable` for every connection (each
  checks that the path still names the file it opened), never a new empty database for some
  threads while others keep writing into the deleted one.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path


class StoreError(Exception):
    """Base of the errors the API turns into 4xx/5xx answers."""

    status = 400
    code = "bad_request"


class StorageUnavailable(StoreError):
    """The data directory cannot take the change (disk full, read-only, I/O error). The change
    was not made; it can be retried once the disk is fixed."""

    status = 503
    code = "storage_unavailable"


class Database:
    def __init__(self, path: str | Path, *, synchronous: str = "FULL", busy_timeout_s: float = 30.0,
                 queue_writers: bool = False):
        self.path = Path(path)
        self.synchronous = synchronous.upper()
        if self.synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
        self.busy_timeout_s = busy_timeout_s
        self.queue_writers = queue_writers
        #: the file may be created (the subclass sets this to False once its schema is in place)
        self.creating = True
        self._local = threading.local()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if not self.path.parent.is_dir():
                raise StorageUnavailable(f"storage unavailable: {exc}") from exc
        self._make_private()

    def _make_private(self) -> None:
        """The database holds live install tokens: mode 0600. It is created so (SQLite gives its
        -wal and -shm files the database file's mode), and an older, wider one is narrowed."""
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        except OSError:
            return  # a read-only or missing directory: nothing to create, the open says why
        for f in (self.path, self.path.with_name(self.path.name + "-wal"), self.path.with_name(self.path.name + "-shm")):
            try:
                if f.stat().st_mode & 0o077:
                    os.chmod(f, 0o600)
            except OSError:
                continue

    # -- connections -------------------------------------------------------------------------
    def _uri(self, params: str) -> str:
        return f"{self.path.resolve().as_uri()}?{params}"

    def _open(self) -> sqlite3.Connection:
        mode = "rwc" if self.creating else "rw"
        c = sqlite3.connect(self._uri(f"mode={mode}"), uri=True, timeout=self.busy_timeout_s, isolation_level=None,
                            check_same_thread=False)
        try:
            c.row_factory = sqlite3.Row
            c.execute("PRAGMA journal_mode=WAL")
            c.execute(f"PRAGMA synchronous={self.synchronous}")
        except sqlite3.Error:
            c.close()
            raise
        return c

    def _open_read_only(self) -> sqlite3.Connection:
        c = sqlite3.connect(self._uri("mode=ro&immutable=1"), uri=True, isolation_level=None, check_same_thread=False)
        c.row_factory = sqlite3.Row
        return c

    def _identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _gone(self) -> StorageUnavailable:
        return StorageUnavailable(f"storage unavailable: {self.path} was deleted or replaced while the bastion was "
                                  "running; nothing more is stored: restore it from a backup and restart lab-bastion serve")

    def conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is not None:
            if self._identity() == self._local.identity:
                return c
            self.close()
            raise self._gone()
        if not self.creating and self._identity() is None:
            raise self._gone()
        try:
            c = self._open()
            self._local.read_only = False
        except sqlite3.OperationalError as exc:
            if not self.path.exists():
                raise StorageUnavailable(f"storage unavailable: {self.path}: {exc}") from exc
            c = self._open_read_only()  # a read-only data directory can still be read
            self._local.read_only = True
        self._local.conn, self._local.identity = c, self._identity()
        return c

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None
        fd = getattr(self._local, "lock_fd", None)
        if fd is not None:
            os.close(fd)
            self._local.lock_fd = None

    def _writable_conn(self) -> sqlite3.Connection:
        if getattr(self._local, "read_only", False):
            self.close()  # the disk may be writable again: try a normal connection
        try:
            c = self.conn()
        except sqlite3.OperationalError as exc:
            raise StorageUnavailable(f"storage unavailable: {exc}") from exc
        if self._local.read_only:
            self.close()
            raise StorageUnavailable(f"storage unavailable: {self.path.parent} is read-only")
        return c

    def _lock_fd(self) -> int:
        fd = getattr(self._local, "lock_fd", None)
        if fd is None:
            fd = os.open(str(self.path) + ".writelock", os.O_RDWR | os.O_CREAT, 0o600)
            self._local.lock_fd = fd
        return fd

    @contextmanager
    def tx(self):
        """One write transaction (BEGIN IMMEDIATE: the write lock is taken up front, so two writers
        never deadlock on a lock upgrade and the busy timeout always applies)."""
        try:
            c = self._writable_conn()
            fd = self._lock_fd() if self.queue_writers else None
        except OSError as exc:
            raise StorageUnavailable(f"storage unavailable: {exc}") from exc
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            try:
                c.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StorageUnavailable(f"storage unavailable: {exc}") from exc
            try:
                yield c
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise
            else:
                try:
                    c.execute("COMMIT")
                except sqlite3.OperationalError as exc:
                    if c.in_transaction:
                        c.execute("ROLLBACK")
                    raise StorageUnavailable(f"storage unavailable: {exc}") from exc
        finally:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def schema_version(self) -> int:
        return self.conn().execute("PRAGMA user_version").fetchone()[0]

    def integrity_check(self) -> str:
        return self.conn().execute("PRAGMA integrity_check").fetchone()[0]
