"""Projections: read models fed from the event store's global order, exactly once.

A ``Projection`` says how to set up its tables and how one event changes them. A
``ProjectionRunner`` feeds it: each batch of events is applied in one database transaction
that also moves the projection's checkpoint. A crash between two events therefore loses or
repeats nothing, and two runners on one database never apply an event twice: each batch locks
the checkpoint first (``BEGIN IMMEDIATE`` on SQLite, ``SELECT ... FOR UPDATE`` on PostgreSQL).

>>> import os, tempfile
>>> from buttress.events.store import EventStore, NewEvent
>>> class Totals(Projection):
...     name = "totals"
...     def setup(self, conn):
...         conn.execute("create table if not exists totals (kind text primary key, n int)")
...     def handle(self, conn, event):
...         conn.execute(
...             "insert into totals values (?, 1) on conflict (kind) do update set n = n + 1",
...             (event.type,),
...         )
>>> store = EventStore()
>>> _ = store.append("order-1", [NewEvent("Placed"), NewEvent("Paid")])
>>> runner = ProjectionRunner(store, Totals(), os.path.join(tempfile.mkdtemp(), "read.db"))
>>> runner.catch_up()
2
>>> with runner.pool.connection() as conn:
...     sorted(conn.execute("select kind, n from totals").fetchall())
[('Paid', 1), ('Placed', 1)]
>>> runner.close()
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from buttress._core import RecordedEvent
from buttress.events.store import EventStoreLike
from buttress.pool import ConnectionPool

__all__ = ["Projection", "ProjectionRunner"]

logger = logging.getLogger("buttress.projection")

CHECKPOINTS = "buttress_projection_checkpoints"


class Projection:
    """A read model. Subclasses set ``name`` (unique per database) and implement ``setup``
    and ``handle``; ``reset`` (empty the read model) makes ``rebuild`` possible.
    ``stream_prefix`` and ``event_types`` limit the events it is given. Events of system
    streams (names starting with ``$``, such as snapshots) are left out unless
    ``system_streams`` is True."""

    name: ClassVar[str] = ""
    stream_prefix: ClassVar[str | None] = None
    event_types: ClassVar[frozenset[str] | None] = None
    system_streams: ClassVar[bool] = False

    def setup(self, conn: Any) -> None:
        """Creates the read model's tables (idempotently), inside the setup transaction."""

    def handle(self, conn: Any, event: RecordedEvent) -> None:
        """Applies one event to the read model, inside the batch's transaction."""
        raise NotImplementedError

    def reset(self, conn: Any) -> None:
        """Empties the read model, inside the rebuild's transaction."""
        raise NotImplementedError(
            f"{type(self).__qualname__} has no reset(), so it cannot be rebuilt; implement it."
        )


class ProjectionRunner:
    """Feeds a projection from ``store``, keeping its read model and checkpoint in
    ``database``: an SQLite file path, or a ``ConnectionPool`` of sqlite3 or psycopg
    connections (``buttress.backends.postgres.postgres_pool`` for PostgreSQL).

    ``catch_up()`` applies what is there; ``start()`` follows new events on a thread;
    ``wait_until(position)`` waits until an event is applied (read-your-writes after a save).
    """

    def __init__(
        self,
        store: EventStoreLike,
        projection: Projection,
        database: str | os.PathLike[str] | ConnectionPool[Any],
        *,
        batch_size: int = 256,
    ) -> None:
        if not isinstance(store, EventStoreLike):
            raise TypeError(f"store must be an event store (got {type(store).__name__}).")
        if not isinstance(projection, Projection):
            raise TypeError(f"projection must be a Projection (got {type(projection).__name__}).")
        if not isinstance(projection.name, str) or not projection.name:
            raise ValueError(f"{type(projection).__qualname__}.name must be a non-empty str.")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number from 1 (got {batch_size!r}).")
        self.store = store
        self.projection = projection
        self.batch_size = batch_size
        self._owns_pool = not isinstance(database, ConnectionPool)
        if isinstance(database, ConnectionPool):
            self.pool: ConnectionPool[Any] = database
        elif isinstance(database, (str, os.PathLike)):
            from buttress.backends.sqlite import sqlite_pool

            self.pool = sqlite_pool(database, name=f"projection:{projection.name}")
        else:
            raise TypeError(
                "database must be an SQLite file path or a ConnectionPool "
                f"(got {type(database).__name__})."
            )
        self._lock = threading.Lock()
        self._applied = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._sqlite: bool | None = None
        self._position = self._setup()

    # -- the database ------------------------------------------------------------------------

    def _sql(self, statement: str) -> str:
        return statement if self._sqlite else statement.replace("?", "%s")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        """A connection in a transaction that holds the checkpoint's lock until it ends."""
        with self.pool.connection() as conn:
            if self._sqlite is None:
                self._sqlite = isinstance(conn, sqlite3.Connection)
            if self._sqlite:
                if conn.in_transaction:
                    conn.rollback()
                conn.execute("begin immediate")
                try:
                    yield conn
                except BaseException:
                    conn.rollback()
                    raise
                conn.commit()
            else:
                with conn.transaction():
                    yield conn

    def _setup(self) -> int:
        with self._transaction() as conn:
            if not self._sqlite:
                # Runners starting together on a new database would race to create the table.
                conn.execute("select pg_advisory_xact_lock(hashtext(%s))", (CHECKPOINTS,))
            conn.execute(
                f"create table if not exists {CHECKPOINTS} "
                "(name text primary key, position bigint not null)"
            )
            conn.execute(
                self._sql(
                    f"insert into {CHECKPOINTS} (name, position) values (?, 0) "
                    "on conflict (name) do nothing"
                ),
                (self.projection.name,),
            )
            self.projection.setup(conn)
            return self._checkpoint(conn)

    def _checkpoint(self, conn: Any) -> int:
        lock = "" if self._sqlite else " for update"
        row = conn.execute(
            self._sql(f"select position from {CHECKPOINTS} where name = ?{lock}"),
            (self.projection.name,),
        ).fetchone()
        return int(row[0])

    def _move_checkpoint(self, conn: Any, position: int) -> None:
        conn.execute(
            self._sql(f"update {CHECKPOINTS} set position = ? where name = ?"),
            (position, self.projection.name),
        )

    # -- applying ----------------------------------------------------------------------------

    @property
    def position(self) -> int:
        """The global position of the next event this projection will consider: every
        event before it has been applied (or did not concern it)."""
        return self._position

    def catch_up(self, timeout: float | None = 0) -> int:
        """Applies every event available, waiting up to ``timeout`` seconds for the first
        (None: until one comes); returns how many were applied."""
        return self._drain(timeout, stoppable=False)

    def _drain(self, timeout: float | None, *, stoppable: bool) -> int:
        applied = 0
        wait = timeout
        while not (stoppable and self._stopping.is_set()):
            start = self._position
            events, next_position = self.store.poll(
                start,
                self.batch_size,
                wait,
                self.projection.stream_prefix,
                None if self.projection.event_types is None else set(self.projection.event_types),
            )
            if next_position == start:
                break
            applied += self._apply(start, events, next_position)
            wait = 0
        return applied

    def _apply(self, start: int, events: Sequence[RecordedEvent], next_position: int) -> int:
        """Applies a batch read from ``start`` up to ``next_position``, from the stored
        checkpoint on: another runner may have applied part of it already, and a batch read
        before the checkpoint moved back (a rebuild) is dropped and read again."""
        system = self.projection.system_streams
        with self._lock, self._transaction() as conn:
            checkpoint = self._checkpoint(conn)
            if checkpoint < start:
                todo: list[RecordedEvent] = []
                position = checkpoint
            else:
                todo = [
                    event
                    for event in events
                    if event.position >= checkpoint and (system or event.stream[:1] != "$")
                ]
                for event in todo:
                    self.projection.handle(conn, event)
                position = max(checkpoint, next_position)
                self._move_checkpoint(conn, position)
        with self._applied:
            self._position = position
            self._applied.notify_all()
        return len(todo)

    def wait_until(self, position: int, timeout: float | None = None) -> bool:
        """Waits until the event at ``position`` has been applied (or passed over); False if
        ``timeout`` seconds pass first. Without a running thread, catches up itself."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._position <= position:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            if self._thread is None:
                self.catch_up(timeout=0.05 if left is None else min(left, 0.05))
                continue
            with self._applied:
                if self._position <= position:
                    self._applied.wait(0.05 if left is None else min(left, 0.05))
        return True

    def rebuild(self) -> int:
        """Empties the read model, moves the checkpoint back to 0 and applies everything
        again; returns how many events were applied."""
        with self._lock, self._transaction() as conn:
            self._checkpoint(conn)
            self.projection.reset(conn)
            self._move_checkpoint(conn, 0)
        with self._applied:
            self._position = 0
        return self.catch_up()

    # -- following ---------------------------------------------------------------------------

    def start(self) -> None:
        """Follows the store on a daemon thread until ``stop()``."""
        if self._thread is not None:
            raise RuntimeError("The runner is already started.")
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._follow, name=f"projection-{self.projection.name}", daemon=True
        )
        self._thread.start()

    def _follow(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                self._drain(0.25, stoppable=True)
                failures = 0
            except Exception:
                failures += 1
                delay = min(5.0, 0.05 * 2**failures)
                logger.exception(
                    "Projection %r failed; retrying in %.2f s.", self.projection.name, delay
                )
                self._stopping.wait(delay)
            if self.store.closed:
                return

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stops following (after the batch under way)."""
        self._stopping.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def close(self) -> None:
        """Stops, and closes the pool if the runner opened it."""
        self.stop()
        if self._owns_pool:
            self.pool.close()

    def __enter__(self) -> ProjectionRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
