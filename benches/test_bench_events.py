"""Event sourcing: buttress's aggregates and event store beside the eventsourcing library.

Both sides model the same user aggregate (registered, then renamed) and do the same work:
- events-append-one: one domain method call (an event) and one save;
- events-append-batch: one hundred method calls, then one save of all their events;
- events-rebuild: loading an aggregate of 1,000 events from its store;
- events-append-sqlite: one event and one save, durable: eventsourcing's SQLite recorder (WAL,
  a sync per commit) beside buttress's log with a sync per append;
- events-durable: appends from 1 and 4 threads to buttress's log, a sync per append
  (fsync="always") beside group commit (fsync="group");
- events-append-postgres: one event and one save on a PostgreSQL server (BUTTRESS_POSTGRES_URL):
  buttress's Repository over PostgresEventStore beside eventsourcing's PostgreSQL persistence,
  each on tables of its own that are dropped afterwards (skipped when no server answers).

Every check reads the store back and counts what was saved, so a case that lost or doubled an
event fails its check.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from _harness import BUTTRESS, Bench, Case, Counts, Crowd, Made, registrar
from _services import POSTGRES_URL, postgres_answered, require_postgres
from buttress import NewEvent
from buttress.backends.postgres_events import PostgresEventStore
from buttress.events.aggregate import Aggregate, Event, Repository, applies
from buttress.events.store import EventStore
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate as EsAggregate
from eventsourcing.domain import event as es_event
from psycopg.conninfo import conninfo_to_dict

ES = "eventsourcing"


class User(Aggregate):
    class Registered(Event):
        name: str

    class Renamed(Event):
        name: str

    @classmethod
    def register(cls, user_id: str, name: str) -> User:
        user = cls(user_id)
        user.trigger(cls.Registered(name=name))
        return user

    def rename(self, name: str) -> None:
        self.trigger(self.Renamed(name=name))

    @applies(Registered, Renamed)
    def _named(self, event: User.Registered | User.Renamed) -> None:
        self.name = event.name


class EsUser(EsAggregate):
    @es_event("Registered")
    def __init__(self, name: str) -> None:
        self.name = name

    @es_event("Renamed")
    def rename(self, name: str) -> None:
        self.name = name


def _temp_dir() -> str:
    return tempfile.mkdtemp(prefix="buttress-bench-events-")


def _sqlite_app(folder: str) -> Application:
    return Application(
        env={
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": os.path.join(folder, "eventsourcing.db"),
        }
    )


def _buttress_saves(
    store: EventStore | PostgresEventStore,
    per_save: int,
    cleanup: Callable[[], None] | None = None,
) -> Made:
    users = Repository(store, User)
    user = User.register("ada", "Ada")
    users.save(user)
    saves = 0

    def run() -> bool:
        nonlocal saves
        for _ in range(per_save):
            user.rename("Ada Lovelace")
        users.save(user)
        saves += 1
        return True

    def verify() -> str:
        try:
            loaded = users.get("ada")
            assert loaded.version == saves * per_save, (loaded.version, saves)
            assert store.head == 1 + saves * per_save
            return f"{saves:,} saves, {store.head:,} events read back"
        finally:
            store.close()
            if cleanup is not None:
                cleanup()

    return run, verify


def _es_saves(app: Application, per_save: int, cleanup: Callable[[], None] | None = None) -> Made:
    user = EsUser(name="Ada")
    app.save(user)
    saves = 0

    def run() -> bool:
        nonlocal saves
        for _ in range(per_save):
            user.rename("Ada Lovelace")
        app.save(user)
        saves += 1
        return True

    def verify() -> str:
        try:
            loaded = app.repository.get(user.id)
            # eventsourcing's versions count events from 1.
            assert loaded.version == 1 + saves * per_save, (loaded.version, saves)
            return f"{saves:,} saves, {loaded.version:,} events read back"
        finally:
            app.close()
            if cleanup is not None:
                cleanup()

    return run, verify


# --- events-append-one -----------------------------------------------------------------------

ONE_COUNTS = Counts(
    rounds=200, iterations=100, warmup_rounds=10, interleaved_rounds=100, interleaved_calls=100
)
ONE: list[Case] = []
add_one = registrar(ONE, ONE_COUNTS)


@add_one(BUTTRESS, "trigger + Repository.save (in memory)")
def _() -> Made:
    return _buttress_saves(EventStore(), 1)


@add_one(ES, "method + Application.save (in memory)")
def _() -> Made:
    return _es_saves(Application(), 1)


@pytest.mark.benchmark(group="events-append-one")
@pytest.mark.parametrize("case", ONE, ids=lambda case: case.id)
def test_events_append_one(bench: Bench, case: Case) -> None:
    bench(case, expect=True)


# --- events-append-batch ---------------------------------------------------------------------

BATCH = 100
BATCH_COUNTS = Counts(
    rounds=30, iterations=10, warmup_rounds=3, interleaved_rounds=30, interleaved_calls=10
)
BATCHES: list[Case] = []
add_batch = registrar(BATCHES, BATCH_COUNTS)


@add_batch(BUTTRESS, f"{BATCH} triggers + one save (in memory)")
def _() -> Made:
    return _buttress_saves(EventStore(), BATCH)


@add_batch(ES, f"{BATCH} methods + one save (in memory)")
def _() -> Made:
    return _es_saves(Application(), BATCH)


@pytest.mark.benchmark(group="events-append-batch")
@pytest.mark.parametrize("case", BATCHES, ids=lambda case: case.id)
def test_events_append_batch(bench: Bench, case: Case) -> None:
    bench(case, expect=True)


# --- events-rebuild --------------------------------------------------------------------------

REBUILD = 1000
REBUILD_COUNTS = Counts(
    rounds=20, iterations=2, warmup_rounds=2, interleaved_rounds=20, interleaved_calls=2
)
REBUILDS: list[Case] = []
add_rebuild = registrar(REBUILDS, REBUILD_COUNTS)


@add_rebuild(BUTTRESS, f"Repository.get, {REBUILD} events (in memory)")
def _() -> Made:
    store = EventStore()
    users = Repository(store, User)
    user = User.register("ada", "Ada")
    for _ in range(REBUILD - 1):
        user.rename("Ada Lovelace")
    users.save(user)
    loads = 0

    def run() -> bool:
        nonlocal loads
        loaded = users.get("ada")
        loads += 1
        return loaded.version == REBUILD - 1 and loaded.name == "Ada Lovelace"

    def verify() -> str:
        store.close()
        return f"{loads:,} loads of {REBUILD:,} events"

    return run, verify


@add_rebuild(ES, f"repository.get, {REBUILD} events (in memory)")
def _() -> Made:
    app = Application()
    user = EsUser(name="Ada")
    for _ in range(REBUILD - 1):
        user.rename("Ada Lovelace")
    app.save(user)
    loads = 0

    def run() -> bool:
        nonlocal loads
        loaded = app.repository.get(user.id)
        loads += 1
        return bool(loaded.version == REBUILD and loaded.name == "Ada Lovelace")

    def verify() -> str:
        app.close()
        return f"{loads:,} loads of {REBUILD:,} events"

    return run, verify


@pytest.mark.benchmark(group="events-rebuild")
@pytest.mark.parametrize("case", REBUILDS, ids=lambda case: case.id)
def test_events_rebuild(bench: Bench, case: Case) -> None:
    bench(case, expect=True)


# --- events-append-sqlite: durable, one sync per save ----------------------------------------

SQLITE_COUNTS = Counts(
    rounds=20, iterations=10, warmup_rounds=2, interleaved_rounds=20, interleaved_calls=10
)
SQLITE: list[Case] = []
add_sqlite = registrar(SQLITE, SQLITE_COUNTS)


@add_sqlite(BUTTRESS, 'trigger + save, durable log (fsync="always")')
def _() -> Made:
    folder = _temp_dir()
    store = EventStore(folder, fsync="always")
    return _buttress_saves(store, 1, lambda: shutil.rmtree(folder, ignore_errors=True))


@add_sqlite(ES, "method + save, SQLite recorder")
def _() -> Made:
    folder = _temp_dir()
    return _es_saves(_sqlite_app(folder), 1, lambda: shutil.rmtree(folder, ignore_errors=True))


@pytest.mark.benchmark(group="events-append-sqlite")
@pytest.mark.parametrize("case", SQLITE, ids=lambda case: case.id)
def test_events_append_sqlite(bench: Bench, case: Case) -> None:
    bench(case, expect=True)


# --- events-durable: threads appending to the log --------------------------------------------

APPENDS_PER_THREAD = 25
DURABLE_COUNTS = Counts(
    rounds=10, iterations=1, warmup_rounds=2, interleaved_rounds=10, interleaved_calls=1
)
DURABLE: list[Case] = []
add_durable = registrar(DURABLE, DURABLE_COUNTS)
PER_APPEND = "fsync-per-append"


def _durable(fsync: str, threads: int) -> Made:
    folder = _temp_dir()
    store = EventStore(folder, fsync=fsync)
    data = b'{"name": "Ada Lovelace"}'

    def one() -> Any:
        return store.append("user-ada", [NewEvent("Renamed", data)])

    crowd = Crowd(one, APPENDS_PER_THREAD, threads)

    def run() -> int:
        # Every batch is the same number of appends, so times compare as throughput.
        for _ in range(4 // threads):
            crowd.run()
        return 4 * APPENDS_PER_THREAD

    def verify() -> str:
        try:
            crowd.stop()
            store.close()
            reopened = EventStore(folder)
            assert reopened.head == crowd.cycles, (reopened.head, crowd.cycles)
            versions = [event.version for event in reopened.read_stream("user-ada")]
            assert versions == list(range(crowd.cycles))
            reopened.close()
            return f"{crowd.cycles:,} appends, all read back after reopening"
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    return run, verify


@add_durable(PER_APPEND, '1 thread, fsync="always"')
def _() -> Made:
    return _durable("always", 1)


@add_durable(PER_APPEND, '4 threads, fsync="always"')
def _() -> Made:
    return _durable("always", 4)


@add_durable(BUTTRESS, 'group commit, 1 thread (fsync="group")')
def _() -> Made:
    return _durable("group", 1)


@add_durable(BUTTRESS, 'group commit, 4 threads (fsync="group")')
def _() -> Made:
    return _durable("group", 4)


@pytest.mark.benchmark(group="events-durable")
@pytest.mark.parametrize("case", DURABLE, ids=lambda case: case.id)
def test_events_durable(bench: Bench, case: Case) -> None:
    bench(case, expect=4 * APPENDS_PER_THREAD)


# --- events-append-postgres: one event per save on a PostgreSQL server -----------------------

# Every table, function and schema made here is named from this, so none outlives the run.
PG_NAMES = f"bench_events_{uuid.uuid4().hex[:8]}"
POSTGRES_COUNTS = Counts(
    rounds=20, iterations=10, warmup_rounds=2, interleaved_rounds=20, interleaved_calls=10
)
POSTGRES: list[Case] = []
add_postgres = registrar(POSTGRES, POSTGRES_COUNTS)


def _admin(*statements: str) -> None:
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as admin:
        for statement in statements:
            admin.execute(statement)


def _drop_prefix(prefix: str) -> None:
    _admin(
        f"drop table if exists {prefix}_events, {prefix}_head cascade",
        f"drop function if exists {prefix}_append",
    )


def _drop_everything_made_here() -> None:
    """The safety net for a case whose check never ran (its body failed): at exit, whatever is
    still named from PG_NAMES goes."""
    if not postgres_answered():
        return
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as admin:
        schemas = admin.execute(
            "select nspname from pg_namespace where starts_with(nspname, %s)", (PG_NAMES,)
        ).fetchall()
        for (schema,) in schemas:
            admin.execute(f"drop schema if exists {schema} cascade")
        tables = admin.execute(
            "select relname from pg_class where relkind = 'r' and starts_with(relname, %s)",
            (PG_NAMES,),
        ).fetchall()
        for (table,) in tables:
            admin.execute(f"drop table if exists {table} cascade")
        functions = admin.execute(
            "select proname from pg_proc where starts_with(proname, %s)", (PG_NAMES,)
        ).fetchall()
        for (function,) in functions:
            admin.execute(f"drop function if exists {function}")


atexit.register(_drop_everything_made_here)


def _eventsourcing_env(schema: str) -> dict[str, str]:
    """eventsourcing's PostgreSQL settings (9.x names) for POSTGRES_URL, in a schema of its own."""
    params = conninfo_to_dict(POSTGRES_URL)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": str(params.get("dbname", "postgres")),
        "POSTGRES_HOST": str(params.get("host", "127.0.0.1")),
        "POSTGRES_PORT": str(params.get("port", "5432")),
        "POSTGRES_USER": str(params.get("user", "postgres")),
        "POSTGRES_PASSWORD": str(params.get("password", "")),
        "POSTGRES_SCHEMA": schema,
    }


@add_postgres(BUTTRESS, "trigger + Repository.save (PostgresEventStore)")
def _() -> Made:
    prefix = f"{PG_NAMES}_{uuid.uuid4().hex[:8]}"
    try:
        store = PostgresEventStore(POSTGRES_URL, table_prefix=prefix, max_size=1)
    except BaseException:
        _drop_prefix(prefix)
        raise
    return _buttress_saves(store, 1, lambda: _drop_prefix(prefix))


@add_postgres(ES, "method + Application.save (PostgreSQL)")
def _() -> Made:
    schema = f"{PG_NAMES}_{uuid.uuid4().hex[:8]}"
    _admin(f"create schema {schema}")
    try:
        app = Application(env=_eventsourcing_env(schema))
    except BaseException:
        _admin(f"drop schema if exists {schema} cascade")
        raise
    return _es_saves(app, 1, lambda: _admin(f"drop schema if exists {schema} cascade"))


@pytest.mark.benchmark(group="events-append-postgres")
@pytest.mark.parametrize("case", POSTGRES, ids=lambda case: case.id)
def test_events_append_postgres(bench: Bench, case: Case) -> None:
    require_postgres()
    bench(case, expect=True)
