"""A pool of sqlite3 connections to one database file: the embedded default.

SQLite needs no server, so it is what buttress uses when nothing else is configured. Pooled
connections are opened with ``check_same_thread=False`` (the pool hands each to one thread at
a time) and, for files, in WAL mode so readers don't block the writer.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import weakref
from collections.abc import Iterator
from typing import Any

from buttress.backends._shard_sql import SqlShardBackend
from buttress.pool import ConnectionPool

__all__ = [
    "PooledConnection",
    "SQLiteShardBackend",
    "check",
    "connect",
    "reset",
    "sqlite_pool",
]


class PooledConnection(sqlite3.Connection):
    """A ``sqlite3.Connection`` that remembers its open cursors, so the pool can finish them
    when the connection comes back: a cursor left part-way through a ``SELECT`` holds a read
    snapshot open, and the next borrower would read stale data."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cursors: weakref.WeakSet[sqlite3.Cursor] = weakref.WeakSet()

    def cursor(self, factory: Any = sqlite3.Cursor) -> Any:
        cursor = super().cursor(factory)
        self._cursors.add(cursor)
        return cursor

    # The C methods open their cursors without calling cursor(); these route through it.
    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        cursor: sqlite3.Cursor = self.cursor().execute(sql, parameters)
        return cursor

    def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
        cursor: sqlite3.Cursor = self.cursor().executemany(sql, parameters)
        return cursor

    def close_cursors(self) -> None:
        """Finishes every statement a borrower left open."""
        for cursor in list(self._cursors):
            cursor.close()


def connect(
    path: str | os.PathLike[str], *, busy_timeout: float = 5.0, wal: bool = True
) -> PooledConnection:
    """Opens one connection the way the pool does: shareable across threads (one at a time),
    waiting up to ``busy_timeout`` seconds for a lock, in WAL mode for files when ``wal``."""
    conn = sqlite3.connect(
        os.fspath(path),
        timeout=busy_timeout,
        check_same_thread=False,
        factory=PooledConnection,
    )
    try:
        if wal and os.fspath(path) not in ("", ":memory:"):
            conn.execute("pragma journal_mode=wal")
            conn.execute("pragma synchronous=normal")
    except BaseException:
        conn.close()
        raise
    return conn


def check(conn: sqlite3.Connection) -> None:
    """Raises when the connection cannot run a statement (closed, or its file is gone)."""
    conn.execute("select 1").fetchone()


def reset(conn: sqlite3.Connection) -> None:
    """Finishes the statements and rolls back the transaction the borrower left open, so the
    next one starts clean (and reads the latest data)."""
    if isinstance(conn, PooledConnection):
        conn.close_cursors()
    if conn.in_transaction:
        conn.rollback()


def sqlite_pool(
    path: str | os.PathLike[str],
    *,
    max_size: int = 5,
    busy_timeout: float = 5.0,
    wal: bool = True,
    **options: Any,
) -> ConnectionPool[PooledConnection]:
    """A pool of connections to the SQLite database at ``path``.

    Uncommitted work is rolled back on return; ``options`` go to ``ConnectionPool`` (for
    example ``timeout`` or ``leak_threshold``).

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "app.db")
    >>> with sqlite_pool(path) as pool:
    ...     with pool.connection() as conn, conn:
    ...         _ = conn.execute("create table t (x)")
    ...         _ = conn.execute("insert into t values (42)")
    ...     with pool.connection() as conn:
    ...         conn.execute("select x from t").fetchone()
    (42,)
    """
    if os.fspath(path) in ("", ":memory:"):
        raise ValueError(
            "path must name a database file: every pooled connection to ':memory:' would open "
            "its own empty database. Use a file (a temporary one for tests)."
        )
    options.setdefault("name", f"sqlite:{os.path.basename(os.fspath(path))}")
    return ConnectionPool(
        lambda: connect(path, busy_timeout=busy_timeout, wal=wal),
        check=check,
        reset=reset,
        max_size=max_size,
        **options,
    )


class SQLiteShardBackend(SqlShardBackend):
    """A node of a ``ShardedStore`` in one SQLite file: the default, no server needed.

    ``pool_options`` go to ``sqlite_pool`` (for example ``max_size`` or ``busy_timeout``).

    >>> import tempfile, os
    >>> node = SQLiteShardBackend(os.path.join(tempfile.mkdtemp(), "node-a.db"))
    >>> node.write(7, "user:1", b"ada", replicas=[], now=1)
    1
    >>> node.read(7, "user:1")
    (b'ada', 1)
    >>> node.close()
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        table_prefix: str = "buttress_shard",
        **pool_options: Any,
    ) -> None:
        self.path = os.fspath(path)
        pool_options.setdefault("name", f"shard:{os.path.basename(self.path)}")
        super().__init__(lambda: sqlite_pool(path, **pool_options), table_prefix=table_prefix)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[PooledConnection]:
        with self.pool.connection() as conn, conn:
            yield conn

    def __repr__(self) -> str:
        return f"SQLiteShardBackend({self.path!r})"
