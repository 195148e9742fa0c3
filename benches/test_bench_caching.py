"""Caching: write-behind beside the usual ways of doing the same writes.

- writebehind-enqueue: a write-behind enqueue (``set``: the cache updated, the write queued)
  beside a write-behind built the usual way on ``queue.Queue`` with a flusher thread, caching in
  a dict. buttress caches in a ``LocalCache`` (bounded; the default in-process cache) and, as a
  second form, in a ``DictCache``. All flush to a dict "database" on a thread of their own.
- writebehind-sqlite: end-to-end write throughput into an SQLite file. One call of ``run()`` is
  ``ROWS`` (1,000) key/value writes until all are in the database, so the report's median per
  call divided by 1,000 is the cost per row (1,000,000 ns per call = 1,000 ns = 1 µs per row).
  buttress: ``WriteBehind(DictCache(), SQLiteDatabase(path))``, ``set()`` 1,000 times, then
  ``flush()``; the flusher writes batches of up to 100 rows (the default ``batch_size``), each
  one transaction. The peer (``sqlite3``) writes one row per transaction: an autocommit upsert
  per row. The floor is the least the same rows can cost: one ``executemany`` of all 1,000 in
  one transaction, on the calling thread, no cache and no queue.
- writebehind-postgres: the same on a PostgreSQL server (BUTTRESS_POSTGRES_URL, a table per case
  that is dropped afterwards): ``WriteBehind`` over ``PostgresDatabase`` (one statement per batch)
  beside one autocommit ``INSERT ... ON CONFLICT`` per row through psycopg. Two reference points
  (floors) on the calling thread: psycopg's ``executemany`` of all 1,000 upserts in one
  transaction (pipelined: few round trips, but the server runs an upsert per row), and one
  statement upserting all 1,000 rows from ``unnest()`` (what ``PostgresDatabase`` sends per batch,
  with every row at once). Skipped when no server answers, unless ``BUTTRESS_REQUIRE_SERVICES=1``,
  which makes that a failure.

The comparison is fair on storage settings: every SQLite case opens its file the way
``SQLiteDatabase`` does (``journal_mode=wal``, ``synchronous=normal``: a commit waits for no sync,
the WAL is synced at checkpoints), and every PostgreSQL case uses the server's settings as they
are (``synchronous_commit`` as configured, by default a sync per commit; each check prints it).
Floors show in a group's table, not in its ratios, which set the peer against buttress. Every
case writes the same rows to the same schema: keys cycle over ``KEYS`` (1,000), so after the
first call every row is an update of an existing key, and no key comes twice in one call, so the
write queue never coalesces two writes of a key: every row reaches the database.

Every case is checked after the run: the write-behinds are drained, and every database is read
back and compared with the last value of every key, so a case that lost a write fails its check.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import queue
import shutil
import sqlite3
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
import pytest
from _harness import BUTTRESS, FLOOR, Bench, Case, Counts, Made, registrar
from _services import POSTGRES_URL, postgres_answered, require_postgres
from buttress import LocalCache, WriteBehind
from buttress.backends.postgres import PostgresDatabase
from buttress.caching import DictCache, SQLiteDatabase

KEYS = [f"user:{number}" for number in range(1000)]
PEER = "queue.Queue"

ENQUEUE_COUNTS = Counts(
    rounds=200, iterations=1000, warmup_rounds=10, interleaved_rounds=200, interleaved_calls=1000
)
ENQUEUE: list[Case] = []
add = registrar(ENQUEUE, ENQUEUE_COUNTS)


class DictDatabase:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def write_batch(self, items: Sequence[tuple[str, Any, bool]]) -> None:
        for key, value, deleted in items:
            if deleted:
                self.data.pop(key, None)
            else:
                self.data[key] = value

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)


class QueueWriteBehind:
    """The usual write-behind: a dict cache and a queue.Queue of writes a thread drains."""

    def __init__(self, database: DictDatabase) -> None:
        self.cache: dict[str, Any] = {}
        self.database = database
        self.writes: queue.Queue[tuple[str, Any] | None] = queue.Queue(maxsize=1_000_000)
        self.flusher = threading.Thread(target=self._run, daemon=True)
        self.flusher.start()

    def set(self, key: str, value: Any) -> None:
        self.cache[key] = value
        self.writes.put((key, value))

    def _run(self) -> None:
        while True:
            item = self.writes.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < 100:
                try:
                    more = self.writes.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self.database.write_batch([(k, v, False) for k, v in batch])
                    return
                batch.append(more)
            self.database.write_batch([(k, v, False) for k, v in batch])

    def close(self) -> None:
        self.writes.put(None)
        self.flusher.join(60)


def _checked(database: DictDatabase, last: dict[str, int], writes: list[int]) -> str:
    assert database.data == last, "a write was lost"
    return f"{writes[0]:,} writes, the database holds the last value of all {len(last):,} keys"


def _write_behind_set(cache: Any) -> Made:
    database = DictDatabase()
    store = WriteBehind(cache, database, batch_size=100, max_pending=1_000_000, close_at_exit=False)
    keys = itertools.cycle(KEYS)
    last: dict[str, int] = {}
    writes = [0]

    def run() -> bool:
        key = next(keys)
        writes[0] += 1
        store.set(key, writes[0])
        last[key] = writes[0]
        return True

    def verify() -> str:
        assert store.close(timeout=60) == []
        return _checked(database, last, writes)

    return run, verify


# The in-process cache is filled in the same Rust call that queues the write.
add(BUTTRESS, "WriteBehind.set")(lambda: _write_behind_set(LocalCache(len(KEYS))))
# Any other cache is filled from Python, then checked against the newest queued write.
add(BUTTRESS, "WriteBehind.set, DictCache")(lambda: _write_behind_set(DictCache()))


@add(PEER, "set: dict cache + Queue.put")
def _() -> Made:
    database = DictDatabase()
    store = QueueWriteBehind(database)
    keys = itertools.cycle(KEYS)
    last: dict[str, int] = {}
    writes = [0]

    def run() -> bool:
        key = next(keys)
        writes[0] += 1
        store.set(key, writes[0])
        last[key] = writes[0]
        return True

    def verify() -> str:
        store.close()
        return _checked(database, last, writes)

    return run, verify


@pytest.mark.benchmark(group="writebehind-enqueue")
@pytest.mark.parametrize("case", ENQUEUE, ids=lambda case: case.id)
def test_writebehind_enqueue(bench: Bench, case: Case) -> None:
    bench(case, expect=True)


# --- writebehind-sqlite and writebehind-postgres: rows per second into a real database -------

ROWS = 1000  # rows written per call of run(): the report's ns per call / 1,000 = ns per row
assert len(KEYS) >= ROWS, "a key written twice in one call would be coalesced, not written"
PER_ROW = "one transaction per row"
SQLITE_PEER = "sqlite3"
POSTGRES_PEER = "psycopg"
SQLITE_UPSERT = (
    "insert into {table} (key, value) values (?, ?) "
    "on conflict (key) do update set value = excluded.value"
)
POSTGRES_UPSERT = (
    "insert into {table} (key, value) values (%s, %s) "
    "on conflict (key) do update set value = excluded.value"
)
POSTGRES_UNNEST = (
    "insert into {table} (key, value) select * from unnest(%s::text[], %s::bytea[]) "
    "on conflict (key) do update set value = excluded.value"
)


class Rows:
    """The rows one case writes: ``ROWS`` a call, keys cycling over ``KEYS``, each value the
    running count of rows written (as bytes), so every row changes what the database holds."""

    def __init__(self) -> None:
        self._keys = itertools.cycle(KEYS)
        self.written = 0
        self.last: dict[str, bytes] = {}

    def next_call(self) -> list[tuple[str, bytes]]:
        rows = []
        last = self.last
        for _ in range(ROWS):
            key = next(self._keys)
            self.written += 1
            value = b"%d" % self.written
            last[key] = value
            rows.append((key, value))
        return rows

    def checked(self, stored: dict[str, bytes], transactions: int | None = None) -> str:
        assert stored == self.last, "the database does not hold the last value of every key"
        calls = self.written // ROWS
        line = f"{self.written:,} rows ({calls:,} calls of {ROWS:,})"
        if transactions is not None:
            average = self.written / transactions
            line += f" in {transactions:,} transactions ({average:,.0f} rows each on average)"
        return f"{line}; the database holds the last value of all {len(stored):,} keys"


class _Batches:
    """Counts the write-behind's transactions (one per write_batch call)."""

    batches = 0

    def counted(self) -> None:
        self.batches += 1


class CountingSQLiteDatabase(SQLiteDatabase, _Batches):
    def write_batch(self, items: Sequence[tuple[Any, Any, bool]]) -> None:
        super().write_batch(items)
        self.counted()


class CountingPostgresDatabase(PostgresDatabase, _Batches):
    def write_batch(self, items: Sequence[tuple[Any, Any, bool]]) -> None:
        super().write_batch(items)
        self.counted()


def _write_behind(database: CountingSQLiteDatabase | CountingPostgresDatabase) -> WriteBehind:
    # The defaults (batch_size=100, flush_interval=0.05), with room for ten calls' rows.
    return WriteBehind(DictCache(), database, max_pending=10 * ROWS, close_at_exit=False)


def _write_behind_case(
    database: CountingSQLiteDatabase | CountingPostgresDatabase,
    checked: Callable[[Rows, int | None], str],
    cleanup: Callable[[], None],
) -> Made:
    """``checked(rows, transactions)`` reads the database back and compares it with ``rows``."""
    store = _write_behind(database)
    rows = Rows()

    def run() -> bool:
        for key, value in rows.next_call():
            store.set(key, value)
        return store.flush(timeout=60)

    def verify() -> str:
        try:
            assert store.close(timeout=60) == [], "writes were left unwritten"
            stats = store.stats()
            assert stats["dead_letters"] == 0, stats
            assert (stats["flushed"], stats["coalesced"]) == (rows.written, 0), stats
            database.close()
            return checked(rows, database.batches)
        finally:
            cleanup()

    return run, verify


# --- writebehind-sqlite ----------------------------------------------------------------------

SQLITE_TABLE = "buttress_kv"  # SQLiteDatabase's table and schema, for every case
SQLITE_COUNTS = Counts(
    rounds=50, iterations=1, warmup_rounds=5, interleaved_rounds=50, interleaved_calls=1
)
SQLITE: list[Case] = []
add_sqlite = registrar(SQLITE, SQLITE_COUNTS)


def _sqlite_file() -> tuple[str, Callable[[], None]]:
    folder = tempfile.mkdtemp(prefix="buttress-bench-writebehind-")
    return os.path.join(folder, "kv.db"), lambda: shutil.rmtree(folder, ignore_errors=True)


def _sqlite_connect(path: str, **options: Any) -> sqlite3.Connection:
    """A connection set up as SQLiteDatabase's pool sets up its own, with its table."""
    conn = sqlite3.connect(path, **options)
    conn.execute("pragma journal_mode=wal")
    conn.execute("pragma synchronous=normal")
    with conn:
        conn.execute(f"create table if not exists {SQLITE_TABLE} (key primary key, value)")
    return conn


def _sqlite_rows(path: str) -> dict[str, bytes]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return dict(conn.execute(f"select key, value from {SQLITE_TABLE}").fetchall())


@add_sqlite(BUTTRESS, f"WriteBehind: {ROWS} set() + flush()")
def _() -> Made:
    path, cleanup = _sqlite_file()
    database = CountingSQLiteDatabase(path, table=SQLITE_TABLE)
    return _write_behind_case(
        database, lambda rows, n: rows.checked(_sqlite_rows(path), n), cleanup
    )


def _sqlite_peer(
    path: str, cleanup: Callable[[], None], write: Callable[[list[Any]], None]
) -> Made:
    rows = Rows()

    def run() -> bool:
        write(rows.next_call())
        return True

    def verify() -> str:
        try:
            return rows.checked(_sqlite_rows(path))
        finally:
            cleanup()

    return run, verify


@add_sqlite(SQLITE_PEER, f"{PER_ROW}: {ROWS} autocommit upserts")
def _() -> Made:
    path, cleanup = _sqlite_file()
    # isolation_level=None: autocommit, so each upsert is a transaction of its own.
    conn = _sqlite_connect(path, isolation_level=None)
    upsert = SQLITE_UPSERT.format(table=SQLITE_TABLE)

    def write(rows: list[Any]) -> None:
        for row in rows:
            conn.execute(upsert, row)

    def closing() -> None:
        conn.close()
        cleanup()

    return _sqlite_peer(path, closing, write)


@add_sqlite(FLOOR, f"sqlite3 executemany: {ROWS} upserts in one transaction")
def _() -> Made:
    path, cleanup = _sqlite_file()
    conn = _sqlite_connect(path)
    upsert = SQLITE_UPSERT.format(table=SQLITE_TABLE)

    def write(rows: list[Any]) -> None:
        with conn:
            conn.executemany(upsert, rows)

    def closing() -> None:
        conn.close()
        cleanup()

    return _sqlite_peer(path, closing, write)


@pytest.mark.benchmark(group="writebehind-sqlite")
@pytest.mark.parametrize("case", SQLITE, ids=lambda case: case.id)
def test_writebehind_sqlite(bench: Bench, case: Case) -> None:
    bench(case, expect=True)


# --- writebehind-postgres --------------------------------------------------------------------

# Every table made here is named from this, so none outlives the run.
PG_NAMES = f"bench_writebehind_{uuid.uuid4().hex[:8]}"
POSTGRES_COUNTS = Counts(
    rounds=20, iterations=1, warmup_rounds=2, interleaved_rounds=20, interleaved_calls=1
)
POSTGRES: list[Case] = []
add_postgres = registrar(POSTGRES, POSTGRES_COUNTS)


@pytest.fixture
def postgres() -> None:
    """A fixture, so the check runs before the benchmark fixture is made (an unused one would
    add an error of its own)."""
    require_postgres()


def _admin(statement: str) -> None:
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(statement)


def _pg_table() -> tuple[str, Callable[[], None]]:
    table = f"{PG_NAMES}_{uuid.uuid4().hex[:8]}"
    return table, lambda: _admin(f"drop table if exists {table}")


def _pg_checked(table: str, rows: Rows, transactions: int | None = None) -> str:
    """Reads ``table`` back into ``rows.checked``, and says how the server syncs commits."""
    with psycopg.connect(POSTGRES_URL, connect_timeout=5) as conn:
        stored = {key: bytes(value) for key, value in conn.execute(f"select * from {table}")}
        setting = conn.execute("show synchronous_commit").fetchone()
    synchronous = setting[0] if setting else "?"
    return f"{rows.checked(stored, transactions)}; synchronous_commit={synchronous}"


def _drop_everything_made_here() -> None:
    """The safety net for a case whose check never ran (its body failed): at exit, every table
    still named from PG_NAMES goes."""
    if not postgres_answered():
        return
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as admin:
        tables = admin.execute(
            "select relname from pg_class where relkind = 'r' and starts_with(relname, %s)",
            (PG_NAMES,),
        ).fetchall()
        for (table,) in tables:
            admin.execute(f"drop table if exists {table}")


atexit.register(_drop_everything_made_here)


@add_postgres(BUTTRESS, f"WriteBehind: {ROWS} set() + flush()")
def _() -> Made:
    table, cleanup = _pg_table()
    database = CountingPostgresDatabase(POSTGRES_URL, table=table)
    return _write_behind_case(database, lambda rows, n: _pg_checked(table, rows, n), cleanup)


def _postgres_peer(
    statement: str, write: Callable[[psycopg.Connection[Any], str, list[Any]], None]
) -> Made:
    """``write(conn, sql, rows)`` writes a call's rows with ``statement`` made for the table."""
    table, cleanup = _pg_table()
    # autocommit: a statement outside a transaction block commits on its own.
    conn = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5)
    try:
        # PostgresDatabase's schema.
        conn.execute(
            f'create table {table} (key text collate "C" primary key, value bytea not null)'
        )
    except BaseException:
        conn.close()
        cleanup()
        raise
    sql = statement.format(table=table)
    rows = Rows()

    def run() -> bool:
        write(conn, sql, rows.next_call())
        return True

    def verify() -> str:
        try:
            return _pg_checked(table, rows)
        finally:
            conn.close()
            cleanup()

    return run, verify


@add_postgres(POSTGRES_PEER, f"{PER_ROW}: {ROWS} autocommit upserts")
def _() -> Made:
    def write(conn: psycopg.Connection[Any], upsert: str, rows: list[Any]) -> None:
        for row in rows:
            conn.execute(upsert, row)

    return _postgres_peer(POSTGRES_UPSERT, write)


@add_postgres(FLOOR, f"psycopg executemany: {ROWS} upserts in one transaction")
def _() -> Made:
    # psycopg's executemany pipelines the statements: one round trip, but one upsert a row.
    def write(conn: psycopg.Connection[Any], upsert: str, rows: list[Any]) -> None:
        with conn.transaction(), conn.cursor() as cursor:
            cursor.executemany(upsert, rows)

    return _postgres_peer(POSTGRES_UPSERT, write)


@add_postgres(FLOOR, f"psycopg one statement: {ROWS} upserts from unnest()")
def _() -> Made:
    # What PostgresDatabase sends for a batch, all rows at once: one statement, one transaction.
    def write(conn: psycopg.Connection[Any], statement: str, rows: list[Any]) -> None:
        conn.execute(statement, ([key for key, _ in rows], [value for _, value in rows]))

    return _postgres_peer(POSTGRES_UNNEST, write)


@pytest.mark.benchmark(group="writebehind-postgres")
@pytest.mark.parametrize("case", POSTGRES, ids=lambda case: case.id)
def test_writebehind_postgres(postgres: None, bench: Bench, case: Case) -> None:
    bench(case, expect=True)
