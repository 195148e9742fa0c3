"""A pool of psycopg 3 connections to PostgreSQL (the ``postgres`` extra).

Checks are an empty query (one round trip, no parsing on the server), returns roll back any
open transaction, and a connection psycopg reports as closed or broken is replaced. Defaults
follow psycopg_pool and HikariCP: connections live at most an hour and idle ones above
``min_size`` close after ten minutes.
"""

from __future__ import annotations

from typing import Any

try:
    import psycopg
    from psycopg import pq
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "buttress.backends.postgres needs psycopg 3; install it with "
        "`pip install 'buttress[postgres]'`."
    ) from error

from collections.abc import Callable

from buttress.pool import ConnectionPool

__all__ = ["check", "is_broken", "postgres_pool", "reset"]


def check(conn: psycopg.Connection[Any]) -> None:
    """Raises when the server does not answer an empty query."""
    if conn.closed:
        raise psycopg.OperationalError("The connection is closed.")
    if conn.autocommit:
        conn.execute("")
        return
    # Outside a transaction, so the check leaves none open behind it. On failure the connection
    # is discarded, so it is not switched back (which would raise again and hide the cause).
    conn.autocommit = True
    conn.execute("")
    conn.autocommit = False


def reset(conn: psycopg.Connection[Any]) -> None:
    """Rolls back what the borrower left open. Raises (so the pool closes the connection) when
    it is broken, or still busy with a query, such as an unfinished ``cursor.stream()``, whose
    lock a rollback would wait on forever."""
    status = conn.info.transaction_status
    if conn.closed or status == pq.TransactionStatus.UNKNOWN:
        raise psycopg.OperationalError("The connection was lost while it was checked out.")
    if status == pq.TransactionStatus.ACTIVE:
        raise psycopg.OperationalError(
            "The connection came back with a query still running; it is closed, not reused."
        )
    if status != pq.TransactionStatus.IDLE:
        conn.rollback()


def is_broken(conn: psycopg.Connection[Any], error: BaseException) -> bool:
    """After an error in a borrower's block: whether psycopg lost the connection."""
    return bool(conn.closed or conn.broken)


def postgres_pool(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    max_lifetime: float | None = 3600.0,
    max_idle: float | None = 600.0,
    autocommit: bool = False,
    configure: Callable[[psycopg.Connection[Any]], object] | None = None,
    connect_options: dict[str, Any] | None = None,
    **options: Any,
) -> ConnectionPool[psycopg.Connection[Any]]:
    """A pool of psycopg connections to ``url`` (a ``postgresql://`` URL or a DSN).

    ``configure(conn)`` runs once on each new connection (register types, set a search path);
    ``connect_options`` go to ``psycopg.connect``; ``options`` to ``ConnectionPool``.

    >>> pool = postgres_pool("postgresql://postgres@127.0.0.1:5432/test")  # doctest: +SKIP
    >>> with pool.connection() as conn:  # doctest: +SKIP
    ...     conn.execute("select 1").fetchone()
    (1,)
    """
    extra = dict(connect_options or {})

    def create() -> psycopg.Connection[Any]:
        conn = psycopg.connect(url, autocommit=autocommit, **extra)
        if configure is not None:
            try:
                configure(conn)
                if not autocommit and conn.info.transaction_status != pq.TransactionStatus.IDLE:
                    conn.commit()
            except BaseException:
                conn.close()
                raise
        return conn

    options.setdefault("name", "postgres")
    return ConnectionPool(
        create,
        check=check,
        reset=reset,
        is_broken=is_broken,
        min_size=min_size,
        max_size=max_size,
        max_lifetime=max_lifetime,
        max_idle=max_idle,
        **options,
    )
