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

import contextlib
from collections.abc import Callable, Iterator, Sequence

from buttress.backends._shard_sql import SqlShardBackend
from buttress.pool import ConnectionPool

__all__ = [
    "PostgresDatabase",
    "PostgresShardBackend",
    "check",
    "is_broken",
    "postgres_pool",
    "reset",
]


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


class PostgresShardBackend(SqlShardBackend):
    """A node of a ``ShardedStore`` in a PostgreSQL database.

    A primary's write is one round trip: the row and what each replica is owed go in one
    statement. Keys sort in byte order (``COLLATE "C"``) whatever the database's locale.
    ``pool_options`` go to ``postgres_pool``.
    """

    blob_type = "bytea"
    key_type = 'text collate "C"'
    greatest = "greatest"

    def __init__(
        self, url: str, *, table_prefix: str = "buttress_shard", **pool_options: Any
    ) -> None:
        self.url = url
        pool_options.setdefault("name", "postgres-shard")
        pool_options.setdefault("min_size", 0)
        super().__init__(
            lambda: postgres_pool(url, autocommit=True, **pool_options), table_prefix=table_prefix
        )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection[Any]]:
        with self.pool.connection() as conn, conn.transaction():
            yield conn

    def _sql(self, statement: str) -> str:
        return statement.replace("?", "%s")

    def write(
        self, shard: int, key: str, value: bytes | None, replicas: Sequence[str], now: int
    ) -> int | None:
        rows, hints = self.rows_table, self.hints_table
        if value is None:
            written = (
                f"update {rows} set value = null, version = greatest(version + 1, %(now)s) "
                "where shard = %(shard)s and key = %(key)s and value is not null returning version"
            )
        else:
            written = (
                f"insert into {rows} (shard, key, value, version) "
                "values (%(shard)s, %(key)s, %(value)s, %(now)s) "
                "on conflict (shard, key) do update set value = excluded.value, "
                f"version = greatest({rows}.version + 1, excluded.version) returning version"
            )
        statement = (
            f"with written as ({written}), owed as ("
            f"insert into {hints} (shard, replica, key, version) "
            "select %(shard)s, replica, %(key)s, written.version "
            "from written, unnest(%(replicas)s::text[]) as replica "
            "on conflict (shard, replica, key) do update set version = excluded.version) "
            "select version from written"
        )
        parameters = {
            "shard": shard,
            "key": key,
            "value": value,
            "now": now,
            "replicas": list(replicas),
        }
        with self.pool.connection() as conn:
            found = conn.execute(statement, parameters).fetchone()
        return None if found is None else int(found[0])

    def __repr__(self) -> str:
        return f"PostgresShardBackend({self.url!r})"


class PostgresDatabase:
    """A key-value table in PostgreSQL for ``WriteBehind``, ``CacheAside`` and
    ``WriteThrough``: keys are str, values bytes. A batch of writes is one statement (deletes
    and upserts together), so one round trip and one transaction. ``pool_options`` go to
    ``postgres_pool``."""

    def __init__(self, url: str, *, table: str = "buttress_kv", **pool_options: Any) -> None:
        if not isinstance(table, str) or not table.isidentifier():
            raise ValueError(f"table must be an SQL identifier (got {table!r}).")
        self.table = table
        pool_options.setdefault("name", f"kv:{table}")
        pool_options.setdefault("min_size", 0)
        self.pool = postgres_pool(url, autocommit=True, **pool_options)
        try:
            with self.pool.connection() as conn, conn.transaction():
                conn.execute("select pg_advisory_xact_lock(hashtext(%s))", (table,))
                conn.execute(
                    f'create table if not exists {table} (key text collate "C" primary key, '
                    "value bytea not null)"
                )
        except BaseException:
            self.pool.close()
            raise

    def write_batch(self, items: Sequence[tuple[Any, Any, bool]]) -> None:
        """Applies ``(key, value, deleted)`` items in one statement."""
        puts_keys: list[str] = []
        puts_values: list[bytes] = []
        deletes: list[str] = []
        for key, value, deleted in items:
            if not isinstance(key, str):
                raise TypeError(f"PostgresDatabase keys are str (got {type(key).__name__}).")
            if deleted:
                deletes.append(key)
                continue
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise TypeError(
                    f"PostgresDatabase values are bytes (got {type(value).__name__} for "
                    f"key {key!r}); encode them first."
                )
            puts_keys.append(key)
            puts_values.append(bytes(value))
        table = self.table
        with self.pool.connection() as conn:
            conn.execute(
                f"with removed as (delete from {table} where key = any(%(deletes)s)) "
                f"insert into {table} (key, value) "
                "select * from unnest(%(keys)s::text[], %(values)s::bytea[]) "
                "on conflict (key) do update set value = excluded.value",
                {"deletes": deletes, "keys": puts_keys, "values": puts_values},
            )

    def get(self, key: Any, default: Any = None) -> Any:
        """The stored value of ``key``, or ``default``."""
        if not isinstance(key, str):
            return default
        with self.pool.connection() as conn:
            row = conn.execute(f"select value from {self.table} where key = %s", (key,)).fetchone()
        return default if row is None else bytes(row[0])

    def close(self) -> None:
        """Closes the pool."""
        self.pool.close()
