"""The shard-backend protocol in SQL, shared by SQLite and PostgreSQL.

Each node keeps three tables:

- ``<prefix>_rows (shard, key, value, version)``: the data. A deleted key stays as a tombstone
  (``value`` NULL) so that a copy or a late replication of the old value cannot bring it back.
- ``<prefix>_hints (shard, replica, key, version)``: on a primary, the writes each replica is
  still owed. They are written in the same transaction as the data, so a write is never lost
  between the primary and its replicas, whatever crashes.
- ``<prefix>_catalog``: the layout (shard → nodes) with an epoch, saved on every node so a store
  reopened on the same nodes finds its shards where it left them.

Versions only grow: a write sets ``max(old version + 1, now in µs)``, and copies apply a row only
when it is newer than the one there, so applying the same rows twice, or in any order, ends in
the same state.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

from buttress.pool import ConnectionPool

__all__ = ["Row", "SqlShardBackend"]

Row = tuple[str, bytes | None, int]
"""A key, its value (None: deleted) and its version."""

_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,40}")

# Enough for one batch, well under SQLite's limit of bound parameters per statement.
_CHUNK = 500


class SqlShardBackend:
    """A node of a ``ShardedStore`` on an SQL database reached through a connection pool.

    Subclasses say how to open a transaction and what their SQL differs in.
    """

    #: The column type of values.
    blob_type = "blob"
    #: The key column's type, with a byte-order collation so every engine sorts keys alike.
    key_type = "text"
    #: The larger of two numbers.
    greatest = "max"

    def __init__(
        self, open_pool: Callable[[], ConnectionPool[Any]], *, table_prefix: str = "buttress_shard"
    ) -> None:
        if not isinstance(table_prefix, str) or not _PREFIX.fullmatch(table_prefix):
            raise ValueError(
                "table_prefix must be an SQL identifier of letters, digits and underscores, "
                f"starting with a letter or an underscore (got {table_prefix!r})."
            )
        self.rows_table = f"{table_prefix}_rows"
        self.hints_table = f"{table_prefix}_hints"
        self.catalog_table = f"{table_prefix}_catalog"
        self.pool = open_pool()
        try:
            if not self._tables_exist():
                self._create_tables()
        except BaseException:
            self.pool.close()
            raise

    # -- what subclasses provide -------------------------------------------------------------

    def _transaction(self) -> AbstractContextManager[Any]:
        """A connection in a transaction that commits when the block ends without error."""
        raise NotImplementedError

    def _sql(self, statement: str) -> str:
        """Turns this module's ``?`` placeholders into the driver's."""
        return statement

    # -- schema ------------------------------------------------------------------------------

    def _tables_exist(self) -> bool:
        # Checked first, so a read-only copy (a hot standby given as a read replica) whose
        # tables came by replication opens without running DDL, which it would refuse.
        try:
            with self.pool.connection() as conn:
                for table in (self.rows_table, self.hints_table, self.catalog_table):
                    conn.execute(f"select 1 from {table} limit 0").fetchall()
        except Exception:
            return False
        return True

    def _create_tables(self) -> None:
        with self._transaction() as conn:
            conn.execute(
                f"create table if not exists {self.rows_table} ("
                f"shard integer not null, key {self.key_type} not null, "
                f"value {self.blob_type}, version bigint not null, primary key (shard, key))"
            )
            conn.execute(
                f"create table if not exists {self.hints_table} ("
                f"shard integer not null, replica text not null, key {self.key_type} not null, "
                "version bigint not null, primary key (shard, replica, key))"
            )
            conn.execute(
                f"create table if not exists {self.catalog_table} ("
                "id integer primary key check (id = 1), epoch bigint not null, "
                "layout text not null)"
            )

    # -- the primary's writes ----------------------------------------------------------------

    def write(
        self, shard: int, key: str, value: bytes | None, replicas: Sequence[str], now: int
    ) -> int | None:
        """Writes ``value`` (None: deletes) as the shard's primary and records that each of
        ``replicas`` is owed it, in one transaction. Returns the new version, or None when a
        delete found nothing to delete."""
        with self._transaction() as conn:
            version = self._write_row(conn, shard, key, value, now)
            if version is not None and replicas:
                _executemany(
                    conn,
                    self._sql(
                        f"insert into {self.hints_table} (shard, replica, key, version) "
                        "values (?, ?, ?, ?) on conflict (shard, replica, key) "
                        "do update set version = excluded.version"
                    ),
                    [(shard, replica, key, version) for replica in replicas],
                )
            return version

    def _write_row(
        self, conn: Any, shard: int, key: str, value: bytes | None, now: int
    ) -> int | None:
        rows = self.rows_table
        if value is None:
            found = conn.execute(
                self._sql(
                    f"update {rows} set value = null, version = {self.greatest}(version + 1, ?) "
                    "where shard = ? and key = ? and value is not null returning version"
                ),
                (now, shard, key),
            ).fetchall()
            return int(found[0][0]) if found else None
        ((version,),) = conn.execute(
            self._sql(
                f"insert into {rows} (shard, key, value, version) values (?, ?, ?, ?) "
                "on conflict (shard, key) do update set value = excluded.value, "
                f"version = {self.greatest}({rows}.version + 1, excluded.version) "
                "returning version"
            ),
            (shard, key, value, now),
        ).fetchall()
        return int(version)

    # -- reads -------------------------------------------------------------------------------

    def read(self, shard: int, key: str) -> tuple[bytes | None, int] | None:
        """The key's value (None: deleted) and version, or None when the node never had it."""
        with self.pool.connection() as conn:
            found = conn.execute(
                self._sql(
                    f"select value, version from {self.rows_table} where shard = ? and key = ?"
                ),
                (shard, key),
            ).fetchone()
        return None if found is None else (_value(found[0]), int(found[1]))

    def read_many(self, shard: int, keys: Sequence[str]) -> dict[str, tuple[bytes | None, int]]:
        """``read`` for many keys of one shard; keys the node never had are left out."""
        found: dict[str, tuple[bytes | None, int]] = {}
        with self.pool.connection() as conn:
            for start in range(0, len(keys), _CHUNK):
                chunk = list(keys[start : start + _CHUNK])
                marks = ", ".join("?" * len(chunk))
                cursor = conn.execute(
                    self._sql(
                        f"select key, value, version from {self.rows_table} "
                        f"where shard = ? and key in ({marks})"
                    ),
                    (shard, *chunk),
                )
                for key, value, version in _rows(cursor):
                    found[key] = (value, version)
        return found

    def scan(self, shard: int, after: str | None, limit: int) -> list[Row]:
        """Up to ``limit`` rows of the shard (tombstones too) in key order, after ``after``."""
        with self.pool.connection() as conn:
            if after is None:
                cursor = conn.execute(
                    self._sql(
                        f"select key, value, version from {self.rows_table} "
                        "where shard = ? order by key limit ?"
                    ),
                    (shard, limit),
                )
            else:
                cursor = conn.execute(
                    self._sql(
                        f"select key, value, version from {self.rows_table} "
                        "where shard = ? and key > ? order by key limit ?"
                    ),
                    (shard, after, limit),
                )
            return list(_rows(cursor))

    def counts(self) -> dict[int, int]:
        """How many live keys (not tombstones) the node holds per shard."""
        with self.pool.connection() as conn:
            return {
                int(shard): int(count)
                for shard, count in conn.execute(
                    f"select shard, count(*) from {self.rows_table} "
                    "where value is not null group by shard"
                )
            }

    # -- copies ------------------------------------------------------------------------------

    def apply(self, shard: int, rows: Sequence[Row]) -> None:
        """Stores the rows that are newer than what the node has, in one transaction."""
        if not rows:
            return
        table = self.rows_table
        with self._transaction() as conn:
            _executemany(
                conn,
                self._sql(
                    f"insert into {table} (shard, key, value, version) values (?, ?, ?, ?) "
                    "on conflict (shard, key) do update set value = excluded.value, "
                    f"version = excluded.version where excluded.version > {table}.version"
                ),
                [(shard, key, value, version) for key, value, version in rows],
            )

    def drop_shard(self, shard: int) -> None:
        """Forgets the shard's rows and hints (once it has moved elsewhere)."""
        with self._transaction() as conn:
            conn.execute(self._sql(f"delete from {self.rows_table} where shard = ?"), (shard,))
            conn.execute(self._sql(f"delete from {self.hints_table} where shard = ?"), (shard,))

    # -- what replicas are owed --------------------------------------------------------------

    def hints(
        self, shard: int, limit: int, replica: str | None = None
    ) -> list[tuple[str, str, int]]:
        """Up to ``limit`` of the (replica, key, version) the shard's replicas are owed."""
        with self.pool.connection() as conn:
            if replica is None:
                cursor = conn.execute(
                    self._sql(
                        f"select replica, key, version from {self.hints_table} "
                        "where shard = ? order by replica, key limit ?"
                    ),
                    (shard, limit),
                )
            else:
                cursor = conn.execute(
                    self._sql(
                        f"select replica, key, version from {self.hints_table} "
                        "where shard = ? and replica = ? order by key limit ?"
                    ),
                    (shard, replica, limit),
                )
            return [(str(name), str(key), int(version)) for name, key, version in cursor]

    def hinted_shards(self) -> dict[int, int]:
        """How many hints the node holds per shard."""
        with self.pool.connection() as conn:
            return {
                int(shard): int(count)
                for shard, count in conn.execute(
                    f"select shard, count(*) from {self.hints_table} group by shard"
                )
            }

    def add_hints(self, shard: int, hints: Sequence[tuple[str, str, int]]) -> None:
        """Records that replicas are owed these (replica, key, version), keeping the newest."""
        if not hints:
            return
        table = self.hints_table
        with self._transaction() as conn:
            _executemany(
                conn,
                self._sql(
                    f"insert into {table} (shard, replica, key, version) values (?, ?, ?, ?) "
                    "on conflict (shard, replica, key) do update set version = excluded.version "
                    f"where excluded.version > {table}.version"
                ),
                [(shard, replica, key, version) for replica, key, version in hints],
            )

    def clear_hints(self, shard: int, hints: Sequence[tuple[str, str, int]]) -> None:
        """Forgets hints a replica has been given, unless a newer write renewed them."""
        if not hints:
            return
        with self._transaction() as conn:
            _executemany(
                conn,
                self._sql(
                    f"delete from {self.hints_table} "
                    "where shard = ? and replica = ? and key = ? and version <= ?"
                ),
                [(shard, replica, key, version) for replica, key, version in hints],
            )

    # -- the layout --------------------------------------------------------------------------

    def load_layout(self) -> tuple[int, str] | None:
        """The saved layout (as JSON) and its epoch, if one was saved here."""
        with self.pool.connection() as conn:
            found = conn.execute(f"select epoch, layout from {self.catalog_table}").fetchone()
        return None if found is None else (int(found[0]), str(found[1]))

    def save_layout(self, epoch: int, layout: str) -> None:
        """Saves the layout unless a newer one is already here."""
        table = self.catalog_table
        with self._transaction() as conn:
            conn.execute(
                self._sql(
                    f"insert into {table} (id, epoch, layout) values (1, ?, ?) "
                    "on conflict (id) do update set epoch = excluded.epoch, "
                    f"layout = excluded.layout where excluded.epoch >= {table}.epoch"
                ),
                (epoch, layout),
            )

    def close(self) -> None:
        """Closes the node's connection pool."""
        self.pool.close()


def _executemany(conn: Any, statement: str, rows: Sequence[tuple[Any, ...]]) -> None:
    # A psycopg connection has no executemany of its own, and its cursors want closing.
    cursor = conn.cursor()
    try:
        cursor.executemany(statement, rows)
    finally:
        cursor.close()


def _value(stored: Any) -> bytes | None:
    return None if stored is None else bytes(stored)


def _rows(cursor: Any) -> Iterator[Row]:
    for key, value, version in cursor:
        yield str(key), _value(value), int(version)
