"""A pool of sqlite3 connections to one database file: the embedded default.

SQLite needs no server, so it is what buttress uses when nothing else is configured. Pooled
connections are opened with ``check_same_thread=False`` (the pool hands each to one thread at
a time) and, for files, in WAL mode so readers don't block the writer.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from buttress.pool import ConnectionPool

__all__ = ["check", "connect", "reset", "sqlite_pool"]


def connect(
    path: str | os.PathLike[str], *, busy_timeout: float = 5.0, wal: bool = True
) -> sqlite3.Connection:
    """Opens one connection the way the pool does: shareable across threads (one at a time),
    waiting up to ``busy_timeout`` seconds for a lock, in WAL mode for files when ``wal``."""
    conn = sqlite3.connect(os.fspath(path), timeout=busy_timeout, check_same_thread=False)
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
    """Rolls back whatever the borrower left open, so the next one starts clean."""
    if conn.in_transaction:
        conn.rollback()


def sqlite_pool(
    path: str | os.PathLike[str],
    *,
    max_size: int = 5,
    busy_timeout: float = 5.0,
    wal: bool = True,
    **options: Any,
) -> ConnectionPool[sqlite3.Connection]:
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
