"""The event store on PostgreSQL (the ``postgres`` extra): the same semantics as
``buttress.EventStore``, for several processes or machines sharing one store.

An append is one round trip: a call of a PL/pgSQL function installed with the tables, which
checks expected versions and idempotency, gives the events their versions and positions, and
inserts them. Every append takes the same row lock (on the head of the log) for its short
transaction, so appends commit in position order and a reader of the global order never sees a
later position before an earlier one commits: none is ever skipped. New events are announced
with ``NOTIFY``, which wakes subscriptions without polling.

>>> store = PostgresEventStore("postgresql://postgres@127.0.0.1:5432/test")  # doctest: +SKIP
>>> store.append("order-1", [NewEvent("Placed")], expected_version="no_stream")  # doctest: +SKIP
AppendResult(version=0, position=0)
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import psycopg

from buttress._core import AppendResult, NewEvent, RecordedEvent
from buttress.backends.postgres import postgres_pool
from buttress.errors import (
    DuplicateEventError,
    EventStoreClosedError,
    PoolClosedError,
    WrongExpectedVersionError,
)
from buttress.events.store import ExpectedVersion, StoreMethods

__all__ = ["PostgresEventStore"]

_PREFIX = re.compile(r"[a-z_][a-z0-9_]{0,40}")
_SENTINELS = {"any": -1, "no_stream": -2, "stream_exists": -3}
_NAMES = {value: name for name, value in _SENTINELS.items()}
_BIGGEST = 2**63 - 1  # PostgreSQL's bigint
_WRONG_VERSION = "BT001"
_DUPLICATE = "BT002"

_SCHEMA = """
create table if not exists {p}_events (
    position bigint primary key,
    stream text collate "C" not null,
    version bigint not null,
    id uuid not null unique,
    type text not null,
    data bytea not null,
    metadata bytea not null,
    timestamp double precision not null,
    -- The append that stored the event: its first position and how many events it held,
    -- which tells an exact retry from other reuse of ids.
    append_start bigint not null,
    append_size integer not null,
    unique (stream, version)
);
create table if not exists {p}_head (
    id integer primary key check (id = 1),
    position bigint not null
);
insert into {p}_head (id, position) values (1, 0) on conflict (id) do nothing;
create or replace function {p}_append(
    p_streams text[], p_expected bigint[], p_counts integer[], p_ids uuid[], p_types text[],
    p_data bytea[], p_metadata bytea[], p_timestamp double precision
) returns table (out_version bigint, out_position bigint) language plpgsql as $$
declare
    next_position bigint;
    start_position bigint;
    known integer;
    total integer := coalesce(array_length(p_ids, 1), 0);
    offset_ integer := 0;
    current bigint;
    wanted bigint;
    found record;
    previous bigint;
    original record;
begin
    -- One lock for every append: appends commit in position order, so readers skip nothing.
    select position into next_position from {p}_head where id = 1 for update;
    start_position := next_position;
    select count(*) into known from {p}_events where id = any(p_ids);
    if known > 0 then
        -- A retry of an append returns what the append got; any other reuse is refused.
        select min(append_start) as start, min(append_size) as size,
               count(distinct append_start) as appends, min(id::text) as some_id
            into original from {p}_events where id = any(p_ids);
        if known <> total or original.appends <> 1 or original.size <> total then
            raise exception 'event ids stored by another append' using errcode = 'BT002',
                detail = original.some_id;
        end if;
        for i in 1 .. array_length(p_streams, 1) loop
            previous := null;
            for j in offset_ + 1 .. offset_ + p_counts[i] loop
                select stream, version, position into found from {p}_events where id = p_ids[j];
                if found.stream <> p_streams[i]
                        or (previous is not null and found.position <> previous + 1) then
                    raise exception 'event ids stored by another append'
                        using errcode = 'BT002', detail = original.some_id;
                end if;
                previous := found.position;
                out_position := found.position;
                out_version := found.version;
            end loop;
            offset_ := offset_ + p_counts[i];
            return next;
        end loop;
        return;
    end if;
    for i in 1 .. array_length(p_streams, 1) loop
        select max(version) into current from {p}_events where stream = p_streams[i];
        wanted := p_expected[i];
        if (wanted = -2 and current is not null) or (wanted = -3 and current is null)
                or (wanted >= 0 and current is distinct from wanted) then
            raise exception 'wrong expected version' using errcode = 'BT001',
                detail = json_build_object(
                    'stream', p_streams[i], 'expected', wanted, 'actual', current)::text;
        end if;
        insert into {p}_events (
            position, stream, version, id, type, data, metadata, timestamp, append_start,
            append_size
        )
        select next_position + k - 1, p_streams[i], coalesce(current, -1) + k,
               p_ids[offset_ + k], p_types[offset_ + k], p_data[offset_ + k],
               p_metadata[offset_ + k], p_timestamp, start_position, total
        from generate_series(1, p_counts[i]) as k;
        next_position := next_position + p_counts[i];
        offset_ := offset_ + p_counts[i];
        out_version := coalesce(current, -1) + p_counts[i];
        out_position := next_position - 1;
        return next;
    end loop;
    update {p}_head set position = next_position where id = 1;
    perform pg_notify('{p}_events', next_position::text);
end
$$;
"""


class PostgresEventStore(StoreMethods):
    """``EventStore``'s API on PostgreSQL. ``pool_options`` go to ``postgres_pool``.

    Tables and the append function are named from ``table_prefix`` (lower-case letters, digits
    and underscores), so several stores can share a database.
    """

    def __init__(
        self, url: str, *, table_prefix: str = "buttress_event", **pool_options: Any
    ) -> None:
        if not isinstance(table_prefix, str) or not _PREFIX.fullmatch(table_prefix):
            raise ValueError(
                "table_prefix must be lower-case letters, digits and underscores, starting "
                f"with a letter or an underscore (got {table_prefix!r})."
            )
        self.url = url
        self._prefix = table_prefix
        pool_options.setdefault("name", f"events:{table_prefix}")
        pool_options.setdefault("min_size", 0)
        self.pool = postgres_pool(url, autocommit=True, **pool_options)
        self._closed = False
        self._head_seen = 0
        self._changed = threading.Condition()
        self._watchers: list[tuple[int, Callable[[], object]]] = []
        self._listener: threading.Thread | None = None
        self._listener_lock = threading.Lock()
        try:
            with self.pool.connection() as conn, conn.transaction():
                # Two processes creating the schema at once would race on the catalogs.
                conn.execute("select pg_advisory_xact_lock(hashtext(%s))", (table_prefix,))
                conn.execute(_SCHEMA.replace("{p}", table_prefix))
        except BaseException:
            self.pool.close()
            raise

    # -- what EventStore has too --------------------------------------------------------------

    @property
    def path(self) -> None:
        """None: the store is a database, not a directory."""
        return None

    @property
    def blocks(self) -> bool:
        """True: every call is a round trip to the server."""
        return True

    @property
    def closed(self) -> bool:
        """Whether the store was closed."""
        return self._closed

    def append(
        self,
        stream: str,
        events: NewEvent | Iterable[NewEvent],
        expected_version: ExpectedVersion | None = None,
    ) -> AppendResult:
        """Appends ``events`` to ``stream`` if it is at ``expected_version``; all or none."""
        (result,) = self._append([(stream, events, expected_version)])
        return result

    def append_many(
        self,
        appends: Iterable[tuple[str, NewEvent | Iterable[NewEvent], ExpectedVersion | None]],
    ) -> list[AppendResult]:
        """Appends to several streams atomically."""
        try:
            requests = list(appends)
        except TypeError:
            raise TypeError(
                "appends must be an iterable of (stream, events, expected_version) tuples."
            ) from None
        return self._append(requests)

    def _append(
        self,
        requests: Sequence[tuple[str, NewEvent | Iterable[NewEvent], ExpectedVersion | None]],
    ) -> list[AppendResult]:
        self._check_open()
        streams: list[str] = []
        expected: list[int] = []
        counts: list[int] = []
        ids: list[uuid.UUID] = []
        types: list[str] = []
        data: list[bytes] = []
        metadata: list[bytes] = []
        if not requests:
            raise ValueError("An append needs at least one stream.")
        for request in requests:
            if not isinstance(request, tuple) or len(request) != 3:
                raise TypeError("appends must hold (stream, events, expected_version) tuples.")
            stream, events, wanted = request
            _check_stream(stream)
            if stream in streams:
                raise ValueError(
                    f"Stream '{stream}' appears twice in one append; put its events in one request."
                )
            batch = _events(events)
            if not batch:
                raise ValueError(
                    f"Stream '{stream}' has no events in this append; give it at least one."
                )
            streams.append(stream)
            expected.append(_expected(wanted))
            counts.append(len(batch))
            for event in batch:
                if "\x00" in event.type:
                    raise ValueError(
                        "An event's type must not contain NUL characters: PostgreSQL text "
                        "cannot hold them."
                    )
                ids.append(event.id)
                types.append(event.type)
                data.append(event.data)
                metadata.append(event.metadata)
        if len(set(ids)) != len(ids):
            duplicate = next(event_id for event_id in ids if ids.count(event_id) > 1)
            raise DuplicateEventError(
                str(duplicate), "The same event id appears twice in one append."
            )
        try:
            with self._connection() as conn:
                rows = conn.execute(
                    f"select out_version, out_position from {self._prefix}_append("
                    "%s, %s, %s, %s, %s, %s, %s, %s)",
                    (
                        streams,
                        [min(wanted, _BIGGEST) for wanted in expected],
                        counts,
                        ids,
                        types,
                        data,
                        metadata,
                        time.time(),
                    ),
                ).fetchall()
        except psycopg.Error as error:
            raise _translate(error, dict(zip(streams, expected, strict=True))) from None
        return [_result(version, position) for version, position in rows]

    def read_stream(
        self,
        stream: str,
        from_version: int | None = None,
        *,
        backwards: bool = False,
        limit: int | None = None,
    ) -> list[RecordedEvent]:
        """A stream's events from ``from_version``, forwards or backwards."""
        self._check_open()
        _check_stream(stream)
        from_version = _check_count("from_version", from_version)
        limit = _check_count("limit", limit)
        if backwards:
            condition = "" if from_version is None else " and version <= %(from)s"
            order = "desc"
        else:
            condition = " and version >= %(from)s"
            order = "asc"
        return self._select(
            f"where stream = %(stream)s{condition} order by version {order}",
            {"stream": stream, "from": from_version or 0},
            limit,
        )

    def read_all(
        self, from_position: int | None = None, *, limit: int | None = None
    ) -> list[RecordedEvent]:
        """Every stream's events in global order, from ``from_position``."""
        self._check_open()
        from_position = _check_count("from_position", from_position)
        limit = _check_count("limit", limit)
        return self._select(
            "where position >= %(from)s order by position", {"from": from_position or 0}, limit
        )

    @contextlib.contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection; a pool closed by close() under a running call means the store
        is closed."""
        try:
            with self.pool.connection() as conn:
                yield conn
        except PoolClosedError:
            raise EventStoreClosedError() from None

    def _select(
        self, where: str, parameters: dict[str, Any], limit: int | None
    ) -> list[RecordedEvent]:
        bounded = "" if limit is None else " limit %(limit)s"
        with self._connection() as conn:
            rows = conn.execute(
                "select stream, version, position, type, data, metadata, id, timestamp "
                f"from {self._prefix}_events {where}{bounded}",
                {**parameters, "limit": limit},
            ).fetchall()
        return [_recorded(row) for row in rows]

    def stream_version(self, stream: str) -> int | None:
        """The version of a stream's last event, or None when it has none."""
        self._check_open()
        _check_stream(stream)
        with self._connection() as conn:
            row = conn.execute(
                f"select max(version) from {self._prefix}_events where stream = %s", (stream,)
            ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def streams(self) -> list[str]:
        """The names of the streams that have events, sorted."""
        self._check_open()
        with self._connection() as conn:
            rows = conn.execute(
                f"select distinct stream from {self._prefix}_events order by stream"
            ).fetchall()
        return [str(name) for (name,) in rows]

    @property
    def head(self) -> int:
        """The position the next event will get."""
        self._check_open()
        with self._connection() as conn:
            row = conn.execute(f"select position from {self._prefix}_head where id = 1").fetchone()
        assert row is not None
        return int(row[0])

    def poll(
        self,
        from_position: int,
        limit: int,
        timeout: float | None,
        stream_prefix: str | None = None,
        event_types: set[str] | None = None,
    ) -> tuple[list[RecordedEvent], int]:
        """Up to ``limit`` matching events from ``from_position``, and where to continue;
        waits up to ``timeout`` seconds (None: forever) while there are none."""
        if timeout is not None and not 0 <= timeout < math.inf:
            raise ValueError(
                f"timeout must be a number of seconds from 0, or None (got {timeout})."
            )
        from_position = _check_count("from_position", from_position) or 0
        limit = max(1, _check_count("limit", limit) or 1)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._check_open()
            head = self.head
            found: list[RecordedEvent] = []
            if head > from_position:
                conditions = ["position >= %(from)s", "position < %(head)s"]
                if stream_prefix is not None:
                    conditions.append("starts_with(stream, %(prefix)s)")
                if event_types is not None:
                    conditions.append("type = any(%(types)s)")
                found = self._select(
                    "where " + " and ".join(conditions) + " order by position",
                    {
                        "from": from_position,
                        "head": head,
                        "prefix": stream_prefix,
                        "types": sorted(event_types or ()),
                    },
                    limit,
                )
                # With a full batch, continue after its last event; else everything up to the
                # head was looked at (and passed over, when nothing matched).
                next_position = found[-1].position + 1 if len(found) == limit else head
                if found:
                    return found, next_position
                from_position = next_position
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return found, from_position
            self._wait_for_head(from_position, left)

    # -- waiting for new events: one LISTEN connection per store -------------------------------

    def _wait_for_head(self, position: int, timeout: float | None) -> None:
        self._ensure_listener()
        with self._changed:
            if self._head_seen <= position and not self._closed:
                # Bounded, so a missed notification costs at most this long.
                self._changed.wait(1.0 if timeout is None else min(timeout, 1.0))

    def _watch(self, after: int, callback: Callable[[], object]) -> None:
        self._ensure_listener()
        with self._changed:
            if self._head_seen > after or self._closed:
                due = True
            else:
                self._watchers.append((after, callback))
                due = False
        if due:
            callback()

    def _ensure_listener(self) -> None:
        with self._listener_lock:
            if self._listener is None and not self._closed:
                self._listener = threading.Thread(
                    target=self._listen, name=f"events-listen-{self._prefix}", daemon=True
                )
                self._listener.start()

    def _listen(self) -> None:
        while not self._closed:
            try:
                with psycopg.connect(self.url, autocommit=True) as conn:
                    conn.execute(f"listen {self._prefix}_events")
                    self._saw(self._read_head(conn))
                    while not self._closed:
                        for notice in conn.notifies(timeout=0.5):
                            self._saw(int(notice.payload))
                        # Also on a timeout: notices may be lost on a reconnect.
                        self._saw(self._read_head(conn))
            except psycopg.Error:
                if not self._closed:
                    time.sleep(0.5)

    def _read_head(self, conn: psycopg.Connection[Any]) -> int:
        row = conn.execute(f"select position from {self._prefix}_head where id = 1").fetchone()
        return 0 if row is None else int(row[0])

    def _saw(self, head: int) -> None:
        with self._changed:
            if head <= self._head_seen and not self._closed:
                return
            self._head_seen = max(self._head_seen, head)
            due = [cb for after, cb in self._watchers if self._closed or head > after]
            self._watchers = [
                (after, cb) for after, cb in self._watchers if not (self._closed or head > after)
            ]
            self._changed.notify_all()
        for callback in due:
            callback()

    def close(self) -> None:
        """Closes the pool and the listener; subscriptions end."""
        if self._closed:
            return
        with self._listener_lock:
            # Under the lock: a listener being started is started before this reads it, and
            # no new one starts once the store is closed.
            self._closed = True
            listener = self._listener
        self._saw(self._head_seen)
        if listener is not None:
            listener.join(2.0)
        self.pool.close()

    def _check_open(self) -> None:
        if self._closed:
            raise EventStoreClosedError()

    def __repr__(self) -> str:
        return f"PostgresEventStore(table_prefix={self._prefix!r})"


def _events(events: NewEvent | Iterable[NewEvent]) -> list[NewEvent]:
    if isinstance(events, NewEvent):
        return [events]
    if isinstance(events, (str, bytes)):
        raise TypeError("events must be a list of NewEvent objects.")
    try:
        batch = list(events)
    except TypeError:
        raise TypeError("events must be a NewEvent or an iterable of them.") from None
    for event in batch:
        if not isinstance(event, NewEvent):
            raise TypeError(f"events must hold NewEvent objects (got {type(event).__name__}).")
    return batch


def _check_stream(stream: object) -> None:
    if not isinstance(stream, str):
        raise TypeError(f"stream must be a str (got {type(stream).__name__}).")
    if not stream:
        raise ValueError("stream must not be empty.")
    if "\x00" in stream:
        raise ValueError("stream must not contain NUL characters: PostgreSQL text cannot.")


def _check_count(argument: str, value: object) -> int | None:
    """A version, position or limit as EventStore takes it (0 to 2**64 - 1), brought within a
    bigint: no stored version or position is that large, so the answer is the same."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{argument} must be a whole number or None (got {value!r}).")
    if not 0 <= value < 2**64:
        raise ValueError(f"{argument} must be from 0 to 2**64 - 1 (got {value}).")
    return min(value, _BIGGEST)


def _expected(value: object) -> int:
    if value is None:
        return -1
    if isinstance(value, str) and value in _SENTINELS:
        return _SENTINELS[value]
    # Up to 2**64 - 1, as EventStore takes; past a bigint no stream is there, which the
    # append function (given the largest bigint) reports as a conflict.
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64:
        return value
    raise ValueError(
        "expected_version must be a version from 0 up, or 'any', 'no_stream' or "
        f"'stream_exists' (got {value!r})."
    )


def _translate(error: psycopg.Error, expected: dict[str, int]) -> Exception:
    if error.sqlstate == _WRONG_VERSION and error.diag.message_detail:
        detail = json.loads(error.diag.message_detail)
        wanted = expected.get(detail["stream"], int(detail["expected"]))
        return WrongExpectedVersionError(
            detail["stream"], _NAMES.get(wanted, str(wanted)), detail["actual"]
        )
    if error.sqlstate == _DUPLICATE:
        return DuplicateEventError(
            error.diag.message_detail or "",
            "Some of this append's event ids are already stored, but not as this same append "
            "(other ids, another stream or another order); a retried append must repeat the "
            "original exactly.",
        )
    return error


def _result(version: int, position: int) -> AppendResult:
    return AppendResult(version, position)


def _recorded(row: tuple[Any, ...]) -> RecordedEvent:
    stream, version, position, type_, data, metadata, event_id, timestamp = row
    return RecordedEvent(
        stream=stream,
        version=version,
        position=position,
        type=type_,
        data=bytes(data),
        metadata=bytes(metadata),
        id=event_id,
        timestamp=timestamp,
    )
