"""Projections (``Projection``, ``ProjectionRunner``) on SQLite and on PostgreSQL.

Every test runs on two backends: ``sqlite`` (an in-memory ``EventStore`` and a read model in a
temporary SQLite file) and ``postgres`` (a ``PostgresEventStore`` and a read model, both in a
schema of their own on the server at BUTTRESS_POSTGRES_URL, dropped afterwards; these skip when
no server answers).

The read model (``projection_child.Applied``) writes one row per event handled with no unique
key, so "exactly once" is checked by counting rows: every event's position appears once, and
the checkpoint equals the number of rows. The crash tests run ``projection_child.py`` in a
child process, kill it with SIGKILL at a random moment in the middle of a catch-up (inside a
batch's transaction, or between two), and check that catching up afterwards applies every
event exactly once. The multi-process test runs two children against one PostgreSQL database
while the parent appends.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from buttress import EventStore, NewEvent, RecordedEvent
from buttress.backends.sqlite import sqlite_pool
from buttress.events import Aggregate, Event, Projection, ProjectionRunner, Repository, applies
from projection_child import (
    READY,
    Applied,
    create_schema,
    drop_schema,
    schema_dsn,
)
from support import JOIN, background, run_threads, wait_until

CHILD = Path(__file__).with_name("projection_child.py")
CHECKPOINTS = "buttress_projection_checkpoints"


# -- backends ----------------------------------------------------------------------------------


class Backend:
    """A store and a read-model database of one kind; closes what it opened."""

    kind: str

    def __init__(self) -> None:
        self.store: Any = None
        self._runners: list[ProjectionRunner] = []
        self._pools: list[Any] = []

    @property
    def postgres(self) -> bool:
        return self.kind == "postgres"

    def applied(self, name: str | None = None, **options: Any) -> Applied:
        """An `Applied` projection with a table (and name) of its own."""
        name = name or f"p_{uuid.uuid4().hex[:10]}"
        return Applied(name, f"rm_{name}", postgres=self.postgres, **options)

    def runner(self, projection: Projection, **options: Any) -> ProjectionRunner:
        runner = ProjectionRunner(self.store, projection, self.database(), **options)
        self._runners.append(runner)
        return runner

    def database(self) -> Any:
        raise NotImplementedError

    def query(self, statement: str) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def execute(self, statement: str) -> None:
        """Runs a statement on the read model, behind the runners' backs."""
        self.query(statement)

    def rows(self, projection: Applied) -> list[int]:
        """The positions in the read model, sorted (one per event handled)."""
        return sorted(row[0] for row in self.query(f"select position from {projection.table}"))

    def checkpoint(self, projection: Projection) -> int:
        [(position,)] = self.query(
            f"select position from {CHECKPOINTS} where name = '{projection.name}'"
        )
        return int(position)

    def close(self) -> None:
        for runner in self._runners:
            runner.close()
        for pool in self._pools:
            pool.close()
        if self.store is not None:
            self.store.close()


class SQLiteBackend(Backend):
    kind = "sqlite"

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.path = directory / "read.db"
        self.store = EventStore()

    def database(self) -> Any:
        return self.path

    def query(self, statement: str) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.path, timeout=JOIN)
        try:
            with conn:
                return conn.execute(statement).fetchall()
        finally:
            conn.close()


class PostgresBackend(Backend):
    kind = "postgres"

    def __init__(self, url: str) -> None:
        from buttress.backends.postgres_events import PostgresEventStore

        super().__init__()
        self.url = url
        self.schema = create_schema(url)
        self.dsn = schema_dsn(url, self.schema)
        self.prefix = f"ev_{uuid.uuid4().hex[:10]}"
        self.store = PostgresEventStore(self.dsn, table_prefix=self.prefix, max_size=4)

    def database(self) -> Any:
        from buttress.backends.postgres import postgres_pool

        pool = postgres_pool(self.dsn, min_size=0, max_size=3, name="read-model")
        self._pools.append(pool)
        return pool

    def query(self, statement: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cursor = conn.execute(statement)
            return cursor.fetchall() if cursor.description else []

    def close(self) -> None:
        try:
            super().close()
        finally:
            drop_schema(self.url, self.schema)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    made: Backend
    if request.param == "sqlite":
        made = SQLiteBackend(tmp_path)
    else:
        made = PostgresBackend(request.getfixturevalue("postgres_url"))
    try:
        yield made
    finally:
        made.close()


def append(store: Any, count: int, *, stream: str = "order", type_: str = "Placed") -> int:
    """Appends `count` events, a few per stream; returns the position of the last one."""
    last = -1
    for start in range(0, count, 5):
        events = [NewEvent(type_) for _ in range(min(5, count - start))]
        last = store.append(f"{stream}-{start // 5}", events).position
    return last


def assert_exactly_once(backend: Backend, projection: Applied, positions: list[int]) -> None:
    rows = backend.rows(projection)
    assert rows == sorted(positions), (
        f"{len(rows)} rows for {len(positions)} events; "
        f"twice: {sorted({p for p in rows if rows.count(p) > 1})[:10]}, "
        f"missing: {sorted(set(positions) - set(rows))[:10]}"
    )


# -- catching up -------------------------------------------------------------------------------


def test_catch_up_applies_every_event_once_and_counts(backend: Backend) -> None:
    projection = backend.applied()
    runner = backend.runner(projection, batch_size=4)
    assert runner.position == 0
    assert runner.catch_up() == 0
    append(backend.store, 10)
    assert runner.catch_up() == 10
    assert runner.position == 10
    assert backend.checkpoint(projection) == 10
    assert runner.catch_up() == 0
    append(backend.store, 3, stream="later")
    assert runner.catch_up() == 3
    assert runner.position == 13
    assert_exactly_once(backend, projection, list(range(13)))
    assert projection.handled == list(range(13))  # in global order


def test_catch_up_waits_up_to_its_timeout_for_the_first_event(backend: Backend) -> None:
    runner = backend.runner(backend.applied())
    started = time.monotonic()
    assert runner.catch_up(timeout=0.2) == 0
    assert 0.15 <= time.monotonic() - started < JOIN
    timer = threading.Timer(0.1, lambda: append(backend.store, 2))
    timer.start()
    try:
        assert runner.catch_up(timeout=JOIN) >= 1
    finally:
        timer.join()
    runner.catch_up()
    assert runner.position == 2


def test_setup_is_idempotent_and_the_checkpoint_survives(backend: Backend) -> None:
    append(backend.store, 6)
    projection = backend.applied()
    first = backend.runner(projection)
    assert projection.setups == 1
    assert first.catch_up() == 6
    first.close()

    # A new runner (a restart) on the same database: setup runs again, harmlessly, and it
    # resumes at the checkpoint.
    again = backend.applied(projection.name)
    second = backend.runner(again)
    assert again.setups == 1
    assert second.position == 6
    assert second.catch_up() == 0
    append(backend.store, 2, stream="more")
    assert second.catch_up() == 2
    assert again.handled == [6, 7]
    assert_exactly_once(backend, projection, list(range(8)))


def test_projections_on_one_database_keep_their_own_checkpoints(backend: Backend) -> None:
    append(backend.store, 5)
    one, two = backend.applied(), backend.applied()
    first, second = backend.runner(one), backend.runner(two)
    assert first.catch_up() == 5
    append(backend.store, 2, stream="more")
    assert second.catch_up() == 7
    assert first.catch_up() == 2
    assert_exactly_once(backend, one, list(range(7)))
    assert_exactly_once(backend, two, list(range(7)))
    assert (backend.checkpoint(one), backend.checkpoint(two)) == (7, 7)


def test_filters_pass_over_unrelated_events_and_the_checkpoint_moves_past_them(
    backend: Backend,
) -> None:
    store = backend.store
    store.append("order-1", [NewEvent("Placed"), NewEvent("Paid")])  # 0, 1
    store.append("user-1", [NewEvent("Placed")])  # 2
    store.append("order-2", [NewEvent("Placed"), NewEvent("Cancelled")])  # 3, 4
    store.append("user-2", [NewEvent("Paid"), NewEvent("Renamed")])  # 5, 6
    store.append("user-3", [NewEvent("Renamed")])  # 7

    by_type = backend.applied(event_types=frozenset({"Placed"}))
    by_prefix = backend.applied(stream_prefix="order-")
    both = backend.applied(stream_prefix="user-", event_types=frozenset({"Paid"}))
    runners = [backend.runner(p, batch_size=2) for p in (by_type, by_prefix, both)]
    assert [runner.catch_up() for runner in runners] == [3, 4, 1]
    assert backend.rows(by_type) == [0, 2, 3]
    assert backend.rows(by_prefix) == [0, 1, 3, 4]
    assert backend.rows(both) == [5]
    # The last events concern none of them, yet every checkpoint is past them.
    assert [runner.position for runner in runners] == [8, 8, 8]
    assert [backend.checkpoint(p) for p in (by_type, by_prefix, both)] == [8, 8, 8]

    # So waiting for an unrelated event's position returns (it was passed over).
    store.append("user-4", [NewEvent("Renamed")])  # 8: none of them wants it
    for runner in runners:
        assert runner.wait_until(8, timeout=JOIN)
        assert runner.position == 9
    runners[0].start()
    store.append("user-5", [NewEvent("Renamed")])  # 9
    assert runners[0].wait_until(9, timeout=JOIN)
    runners[0].stop()
    assert backend.rows(by_type) == [0, 2, 3]


def test_a_failing_handle_rolls_back_its_batch_and_a_retry_applies_each_event_once(
    backend: Backend,
) -> None:
    append(backend.store, 12)
    projection = backend.applied(fail_at=frozenset({4, 10}))
    runner = backend.runner(projection, batch_size=3)

    with pytest.raises(RuntimeError, match="position 4"):
        runner.catch_up()
    # The batch [3, 4, 5] was rolled back, 3 included; the one before it stands.
    assert runner.position == 3
    assert backend.checkpoint(projection) == 3
    assert backend.rows(projection) == [0, 1, 2]

    with pytest.raises(RuntimeError, match="position 10"):
        runner.catch_up()
    assert runner.position == backend.checkpoint(projection) == 9
    assert backend.rows(projection) == list(range(9))

    assert runner.catch_up() == 3
    assert runner.position == 12
    assert_exactly_once(backend, projection, list(range(12)))


# -- several runners on one database -----------------------------------------------------------


def test_two_runners_on_one_database_never_apply_an_event_twice(backend: Backend) -> None:
    name = f"p_{uuid.uuid4().hex[:10]}"
    projections = [backend.applied(name) for _ in range(2)]
    runners = [backend.runner(p, batch_size=3) for p in projections]
    total = 300
    appended = threading.Event()

    def work(index: int) -> None:
        if index == 2:
            for start in range(0, total, 10):
                append(backend.store, 10, stream=f"s{start}")
                time.sleep(0.001)
            appended.set()
            return
        runner = runners[index]
        deadline = time.monotonic() + 60
        while not (appended.is_set() and runner.position >= total):
            assert time.monotonic() < deadline, f"runner {index} stuck at {runner.position}"
            runner.catch_up(timeout=0.01)

    run_threads(work, 3, within=90)
    assert_exactly_once(backend, projections[0], list(range(total)))
    assert backend.checkpoint(projections[0]) == total
    # Between them they handled every event once (no handle ran in a rolled-back batch).
    assert len(projections[0].handled) + len(projections[1].handled) == total


def test_runners_starting_together_on_a_new_postgres_database(postgres_url: str) -> None:
    from buttress.backends.postgres import postgres_pool

    class Quiet(Projection):
        name = "quiet"

        def handle(self, conn: Any, event: RecordedEvent) -> None:
            pass

    errors: list[BaseException] = []
    store = EventStore()
    for _ in range(3):  # each in a fresh schema, where the checkpoint table does not exist
        schema = create_schema(postgres_url)
        dsn = schema_dsn(postgres_url, schema)
        pools = [postgres_pool(dsn, min_size=0, max_size=1, name="race") for _ in range(4)]
        start = threading.Barrier(len(pools))

        def open_runner(index: int, pools: list[Any] = pools, start: Any = start) -> None:
            start.wait(JOIN)
            try:
                ProjectionRunner(store, Quiet(), pools[index]).close()
            except psycopg.Error as error:
                errors.append(error)

        try:
            run_threads(open_runner, len(pools), within=30)
        finally:
            for pool in pools:
                pool.close()
            drop_schema(postgres_url, schema)
    store.close()
    assert errors == []


# -- following: start, stop, wait_until --------------------------------------------------------


def test_start_follows_live_appends_until_stop(backend: Backend) -> None:
    projection = backend.applied()
    runner = backend.runner(projection, batch_size=2)
    append(backend.store, 3)
    runner.start()
    with pytest.raises(RuntimeError, match="already started"):
        runner.start()
    assert runner.wait_until(2, timeout=JOIN)
    for n in range(5):
        position = backend.store.append(f"live-{n}", [NewEvent("Placed")]).position
        assert runner.wait_until(position, timeout=JOIN)
        # Read your own write: the read model has it as soon as wait_until returns.
        assert position in backend.rows(projection)
    runner.stop()
    stopped_at = runner.position
    append(backend.store, 4, stream="unseen")
    time.sleep(0.3)
    assert runner.position == stopped_at
    assert len(backend.rows(projection)) == stopped_at

    runner.start()  # and again
    assert runner.wait_until(stopped_at + 3, timeout=JOIN)
    runner.stop()
    assert_exactly_once(backend, projection, list(range(stopped_at + 4)))


def test_the_following_thread_retries_after_handle_fails(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="buttress.projection")
    projection = backend.applied(fail_at=frozenset({3}))
    runner = backend.runner(projection, batch_size=2)
    runner.start()
    append(backend.store, 6)
    assert runner.wait_until(5, timeout=JOIN)
    runner.stop()
    assert_exactly_once(backend, projection, list(range(6)))
    failures = [r for r in caplog.records if r.name == "buttress.projection"]
    assert len(failures) == 1
    assert projection.name in failures[0].getMessage()
    assert "retrying" in failures[0].getMessage()
    assert failures[0].exc_info is not None


def test_the_following_thread_ends_when_the_store_closes(backend: Backend) -> None:
    runner = backend.runner(backend.applied())
    runner.start()
    thread = runner._thread
    assert thread is not None
    if backend.postgres:
        # Once the thread waits on the store's LISTEN connection (closing while that is
        # being started is the race test_closing_a_postgres_store_while_its_listener_starts
        # covers).
        wait_until(lambda: listener_running(backend.store))
    backend.store.close()
    thread.join(JOIN)
    assert not thread.is_alive()
    runner.stop()


def listener_running(store: Any) -> bool:
    listener = store._listener
    return listener is not None and listener.is_alive()


def test_closing_a_postgres_store_while_its_listener_starts(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from buttress.backends import postgres_events

    schema = create_schema(postgres_url)
    store = postgres_events.PostgresEventStore(
        schema_dsn(postgres_url, schema), table_prefix="ev_race", max_size=2
    )
    # Hold the listener thread between its creation and its start, where a real reader's
    # thread can be preempted.
    real_thread = threading.Thread
    created, release = threading.Event(), threading.Event()

    class Gated(real_thread):
        def start(self) -> None:
            if self.name.startswith("events-listen-"):
                created.set()
                release.wait(JOIN)
            super().start()

    monkeypatch.setattr(postgres_events.threading, "Thread", Gated)
    reader_errors: list[BaseException] = []

    def read() -> None:
        try:
            store.poll(0, 10, JOIN)
        except postgres_events.EventStoreClosedError:
            pass  # what a reader of a closed store gets
        except BaseException as error:
            reader_errors.append(error)

    reader = real_thread(target=read, daemon=True)
    try:
        reader.start()
        assert created.wait(JOIN)
        try:
            store.close()
        finally:
            release.set()
            reader.join(JOIN)
        assert not reader.is_alive()
        assert reader_errors == []
    finally:
        release.set()
        store.pool.close()
        drop_schema(postgres_url, schema)


def test_wait_until_without_a_thread_catches_up_itself(backend: Backend) -> None:
    projection = backend.applied()
    runner = backend.runner(projection, batch_size=4)
    last = append(backend.store, 9)
    assert runner.wait_until(last, timeout=JOIN)
    assert runner.position == 9
    assert_exactly_once(backend, projection, list(range(9)))
    assert runner.wait_until(3)  # already applied: at once, even without a timeout

    # Not there yet, and nobody appends: False once the timeout passes.
    started = time.monotonic()
    assert not runner.wait_until(last + 1, timeout=0.3)
    assert 0.25 <= time.monotonic() - started < JOIN

    # Appended while it waits.
    timer = threading.Timer(0.1, lambda: append(backend.store, 2, stream="late"))
    timer.start()
    try:
        assert runner.wait_until(last + 2, timeout=JOIN)
    finally:
        timer.join()
    assert runner.position == 11


def test_wait_until_with_a_running_thread(backend: Backend) -> None:
    projection = backend.applied()
    runner = backend.runner(projection)
    runner.start()
    try:
        timer = threading.Timer(0.1, lambda: append(backend.store, 3))
        timer.start()
        try:
            assert runner.wait_until(2, timeout=JOIN)
        finally:
            timer.join()
        started = time.monotonic()
        assert not runner.wait_until(3, timeout=0.3)
        assert 0.25 <= time.monotonic() - started < JOIN
        woke: list[bool] = []
        with background(lambda: woke.append(runner.wait_until(3, timeout=JOIN))):
            time.sleep(0.05)
            append(backend.store, 1, stream="wake")
        assert woke == [True]
        assert runner.position == 4
    finally:
        runner.stop()
    assert_exactly_once(backend, projection, list(range(4)))


# -- rebuilding --------------------------------------------------------------------------------


def test_rebuild_resets_the_read_model_and_applies_everything_again(backend: Backend) -> None:
    append(backend.store, 20)
    projection = backend.applied()
    runner = backend.runner(projection, batch_size=6)
    assert runner.catch_up() == 20
    # The read model drifted (say an old handle had a bug); rebuild puts it right.
    backend.execute(f"delete from {projection.table} where position < 5")
    assert backend.rows(projection) == list(range(5, 20))
    projection.handled.clear()
    assert runner.rebuild() == 20
    assert projection.handled == list(range(20))
    assert runner.position == 20
    assert backend.checkpoint(projection) == 20
    assert_exactly_once(backend, projection, list(range(20)))


class NoReset(Applied):
    """A projection that cannot be rebuilt."""

    reset = Projection.reset


def test_rebuild_without_reset_raises_and_changes_nothing(backend: Backend) -> None:
    append(backend.store, 5)
    projection = NoReset(
        f"p_{uuid.uuid4().hex[:10]}", f"rm_{uuid.uuid4().hex[:10]}", postgres=backend.postgres
    )
    runner = backend.runner(projection)
    runner.catch_up()
    with pytest.raises(NotImplementedError, match="reset"):
        runner.rebuild()
    assert runner.position == backend.checkpoint(projection) == 5
    assert_exactly_once(backend, projection, list(range(5)))
    append(backend.store, 1, stream="more")
    assert runner.catch_up() == 1


def test_rebuild_while_the_runner_follows_applies_every_event_once(backend: Backend) -> None:
    total = 200
    append(backend.store, total)
    # Slow enough that the rebuild outlasts the thread's 0.25 s wait for new events.
    projection = backend.applied(delay=0.003)
    runner = backend.runner(projection, batch_size=5)
    runner.start()
    try:
        assert runner.wait_until(total - 1, timeout=30)
        time.sleep(0.05)  # the thread is now waiting for new events at position `total`
        runner.rebuild()
        assert runner.wait_until(total - 1, timeout=30)
    finally:
        runner.stop()
    assert_exactly_once(backend, projection, list(range(total)))


# -- crashes and other processes ---------------------------------------------------------------


class Child:
    """A `projection_child.py` process whose output lines are read on a thread."""

    def __init__(self, config: dict[str, Any]) -> None:
        environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, str(CHILD), json.dumps(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def next_line(self, timeout: float = 30.0) -> str | None:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise AssertionError("the child printed nothing in time") from None

    def expect_ready(self) -> None:
        line = self.next_line()
        if line != READY:
            self.kill()
            raise AssertionError(f"the child did not start: {line!r}\n{self.stderr}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.finish()

    def finish(self, timeout: float = 30.0) -> int:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(JOIN)
        self._reader.join(JOIN)
        assert self.process.stderr is not None
        self.stderr = self.process.stderr.read()
        self.process.stderr.close()
        assert self.process.stdout is not None
        self.process.stdout.close()
        return code


def crash_config(backend: str, tmp_path: Path, postgres_url: str | None) -> dict[str, Any]:
    """The child's settings for a crash test: a durable store and an SQLite read model, or
    both on PostgreSQL (in the schema the caller made)."""
    name = f"p_{uuid.uuid4().hex[:10]}"
    config: dict[str, Any] = {
        "name": name,
        "table": f"rm_{name}",
        "batch_size": 7,
        "delay": 0.0005,
        "echo": True,
        "mode": "catch_up",
    }
    if backend == "sqlite":
        config["store"] = {"kind": "durable", "path": str(tmp_path / "log")}
        config["database"] = {"kind": "sqlite", "path": str(tmp_path / "read.db")}
    else:
        assert postgres_url is not None
        config["store"] = {
            "kind": "postgres",
            "url": postgres_url,
            "prefix": f"ev_{uuid.uuid4().hex[:10]}",
        }
        config["database"] = {"kind": "postgres", "url": postgres_url}
    return config


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_runner_killed_mid_catch_up_loses_and_repeats_nothing(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from projection_child import open_store

    total = 400
    schema = None
    if kind == "postgres":
        url = request.getfixturevalue("postgres_url")
        schema = create_schema(url)
        config = crash_config(kind, tmp_path, schema_dsn(url, schema))
    else:
        config = crash_config(kind, tmp_path, None)
    try:
        store = open_store(config["store"])
        for start in range(0, total, 10):
            store.append(f"s-{start}", [NewEvent("Placed") for _ in range(10)])
        if kind == "sqlite":
            store.close()  # the child becomes the log's one writer

        rng = random.Random()
        checkpoints = []
        for _ in range(3):
            child = Child(config)
            child.expect_ready()
            # Kill it after a random number of events handled in this run: inside a batch's
            # transaction, or just after a commit.
            handled = rng.randrange(1, 60)
            for _ in range(handled):
                line = child.next_line()
                if line is None:
                    child.finish()
                    raise AssertionError(f"the child ended early:\n{child.stderr}")
                assert line.isdigit(), line
            time.sleep(rng.uniform(0, 0.003))
            child.kill()
            assert child.process.returncode == -signal.SIGKILL
            # What the killed run committed is exactly what its checkpoint says.
            checkpoint = read_checkpoint(config, kind)
            assert read_rows(config, kind) == list(range(checkpoint))
            checkpoints.append(checkpoint)

        assert checkpoints == sorted(checkpoints)  # no run went back
        assert checkpoints[-1] < total
        if kind == "sqlite":
            store = open_store(config["store"])
        runner, pool = _parent_runner(store, config)
        try:
            assert runner.position == checkpoints[-1]
            assert len(read_rows(config, kind)) == checkpoints[-1]
            assert runner.catch_up() == total - checkpoints[-1]
        finally:
            runner.close()
            if pool is not None:
                pool.close()
            store.close()
        rows = read_rows(config, kind)
        assert rows == list(range(total))
    finally:
        if schema is not None:
            drop_schema(request.getfixturevalue("postgres_url"), schema)


def _parent_runner(store: Any, config: dict[str, Any]) -> tuple[ProjectionRunner, Any]:
    from projection_child import open_runner

    return open_runner(store, {**config, "echo": False, "delay": 0.0})


def _query(config: dict[str, Any], kind: str, statement: str) -> list[tuple[Any, ...]]:
    database = config["database"]
    if kind == "sqlite":
        conn = sqlite3.connect(database["path"], timeout=JOIN)
        try:
            return conn.execute(statement).fetchall()
        finally:
            conn.close()
    with psycopg.connect(database["url"], autocommit=True) as conn:
        return conn.execute(statement).fetchall()


def read_checkpoint(config: dict[str, Any], kind: str) -> int:
    found = _query(
        config, kind, f"select position from {CHECKPOINTS} where name = '{config['name']}'"
    )
    return int(found[0][0]) if found else 0


def read_rows(config: dict[str, Any], kind: str) -> list[int]:
    return sorted(row[0] for row in _query(config, kind, f"select position from {config['table']}"))


def test_two_runner_processes_on_one_postgres_database(postgres_url: str) -> None:
    from projection_child import open_runner, open_store

    schema = create_schema(postgres_url)
    dsn = schema_dsn(postgres_url, schema)
    name = f"p_{uuid.uuid4().hex[:10]}"
    total = 400
    config: dict[str, Any] = {
        "store": {"kind": "postgres", "url": dsn, "prefix": f"ev_{uuid.uuid4().hex[:10]}"},
        "database": {"kind": "postgres", "url": dsn},
        "name": name,
        "table": f"rm_{name}",
        "batch_size": 5,
        "mode": "until",
        "until": total,
        "deadline": 60.0,
    }
    children: list[Child] = []
    try:
        store = open_store(config["store"])
        # The tables exist before the children start, so the children contend only over
        # applying (starting together is test_runners_starting_together_on_a_new_postgres_database).
        runner, pool = open_runner(store, config)
        runner.close()
        pool.close()
        children = [Child(config) for _ in range(2)]
        for child in children:
            child.expect_ready()
        for start in range(0, total, 4):
            store.append(f"s-{start}", [NewEvent("Placed") for _ in range(4)])
            if start % 40 == 0:
                time.sleep(0.01)
        store.close()
        for child in children:
            code = child.finish(timeout=90)
            assert code == 0, child.stderr
        rows = read_rows(config, "postgres")
        assert rows == list(range(total))
        runners = {
            row[0] for row in _query(config, "postgres", f"select runner from {config['table']}")
        }
        assert runners <= {str(child.process.pid) for child in children}
        assert read_checkpoint(config, "postgres") == total
    finally:
        for child in children:
            if child.process.returncode is None:
                child.kill()
        drop_schema(postgres_url, schema)


# -- a projection of domain events -------------------------------------------------------------


class Account(Aggregate):
    class Opened(Event):
        pass

    class Deposited(Event):
        amount: int

    @applies(Opened)
    def _opened(self, event: Account.Opened) -> None:
        self.balance = 0

    @applies(Deposited)
    def _deposited(self, event: Account.Deposited) -> None:
        self.balance += event.amount


def test_a_projection_reads_domain_events_through_repository_decode(tmp_path: Path) -> None:
    store = EventStore()
    accounts = Repository(store, Account, snapshot_every=2)

    class Balances(Projection):
        name = "balances"
        stream_prefix = "Account-"  # not the $snapshot-Account- streams

        def setup(self, conn: Any) -> None:
            conn.execute("create table if not exists balances (id text primary key, n int)")

        def handle(self, conn: Any, event: RecordedEvent) -> None:
            domain = accounts.decode(event)
            account_id = event.stream.removeprefix("Account-")
            if isinstance(domain, Account.Opened):
                conn.execute("insert into balances values (?, 0)", (account_id,))
            else:
                assert isinstance(domain, Account.Deposited)
                conn.execute(
                    "update balances set n = n + ? where id = ?", (domain.amount, account_id)
                )

    def account(account_id: str, *amounts: int) -> Account:
        made = Account(account_id)
        made.trigger(Account.Opened())
        for amount in amounts:
            made.trigger(Account.Deposited(amount=amount))
        return made

    with ProjectionRunner(store, Balances(), tmp_path / "read.db") as runner:
        first = account("a1", 5, 6)
        assert runner.wait_until(accounts.save(first), timeout=JOIN)
        first.trigger(Account.Deposited(amount=7))
        assert runner.wait_until(accounts.save(first, account("b1", 1)), timeout=JOIN)
        with runner.pool.connection() as conn:
            found = dict(conn.execute("select id, n from balances").fetchall())
        assert found == {"a1": 18, "b1": 1}
        assert store.streams()[0].startswith("$snapshot-")  # snapshots were written, and skipped
        pool = runner.pool
    assert pool.closed  # the runner opened it, so the runner closed it


# -- bad input and ownership -------------------------------------------------------------------


class Named(Projection):
    name = "named"

    def handle(self, conn: Any, event: RecordedEvent) -> None:
        pass


def test_bad_input_is_refused(tmp_path: Path) -> None:
    store = EventStore()
    path = tmp_path / "read.db"
    with pytest.raises(TypeError, match="store"):
        ProjectionRunner("not a store", Named(), path)
    with pytest.raises(TypeError, match="store"):
        ProjectionRunner(store.subscribe(), Named(), path)
    with pytest.raises(TypeError, match="projection"):
        ProjectionRunner(store, Named, path)
    with pytest.raises(TypeError, match="projection"):
        ProjectionRunner(store, object(), path)

    class Nameless(Projection):
        def handle(self, conn: Any, event: RecordedEvent) -> None:
            pass

    with pytest.raises(ValueError, match="name"):
        ProjectionRunner(store, Nameless(), path)
    badly_named = Named()
    badly_named.name = 42
    with pytest.raises(ValueError, match="name"):
        ProjectionRunner(store, badly_named, path)
    for size in (0, -1, True, 1.5, "10", None):
        with pytest.raises(ValueError, match="batch_size"):
            ProjectionRunner(store, Named(), path, batch_size=size)
    for database in (42, None, b"read.db", sqlite3.connect(":memory:")):
        with pytest.raises(TypeError, match="database"):
            ProjectionRunner(store, Named(), database)
        if isinstance(database, sqlite3.Connection):
            database.close()
    with pytest.raises(ValueError, match="file"):
        ProjectionRunner(store, Named(), ":memory:")
    assert not path.exists()  # nothing was opened by a refused call
    store.close()


def test_a_pool_given_to_the_runner_stays_open_after_close(tmp_path: Path) -> None:
    store = EventStore()
    store.append("s-1", [NewEvent("Placed")])
    pool = sqlite_pool(tmp_path / "read.db")
    projection = Applied("given", "rm_given")
    with ProjectionRunner(store, projection, pool) as runner:
        assert runner.pool is pool
        assert runner.catch_up() == 1
    assert not pool.closed
    with pool.connection() as conn:
        assert conn.execute("select position from rm_given").fetchall() == [(0,)]
    pool.close()
    store.close()


def test_a_projection_without_handle_cannot_apply(backend: Backend) -> None:
    class Bare(Projection):
        name = f"bare_{uuid.uuid4().hex[:8]}"

    runner = backend.runner(Bare())
    append(backend.store, 2)
    with pytest.raises(NotImplementedError):
        runner.catch_up()
    assert runner.position == 0
