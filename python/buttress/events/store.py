"""The event store (Rust core) and its catch-up subscriptions.

``EventStore()`` keeps events in memory; ``EventStore(path)`` keeps them in a durable log in the
directory ``path`` (format: ``docs/event-log-format.md``) and in memory for reads. Appends check
an expected version, are idempotent by event id, and can span several streams atomically.

>>> store = EventStore()
>>> store.append("order-1", [NewEvent("Placed", b'{"total": 30}')], expected_version="no_stream")
AppendResult(version=0, position=0)
>>> store.append("order-1", [NewEvent("Paid", b"{}")], expected_version=0)
AppendResult(version=1, position=1)
>>> [event.type for event in store.read_stream("order-1")]
['Placed', 'Paid']
>>> subscription = store.subscribe(event_types={"Paid"})
>>> subscription.next(timeout=1).stream
'order-1'
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Literal, Protocol, TypeVar, cast, runtime_checkable

from buttress import _core
from buttress._core import AppendResult, NewEvent, RecordedEvent
from buttress.errors import EventStoreClosedError

__all__ = [
    "AppendResult",
    "EventStore",
    "EventStoreLike",
    "ExpectedVersion",
    "NewEvent",
    "RecordedEvent",
    "Snapshot",
    "StoreMethods",
    "Subscription",
]

ExpectedVersion = int | Literal["any", "no_stream", "stream_exists"]


@runtime_checkable
class EventStoreLike(Protocol):
    """What repositories, projections and subscriptions need of a store: ``EventStore`` (in
    memory or durable) and ``buttress.backends.postgres_events.PostgresEventStore`` have it."""

    @property
    def blocks(self) -> bool:
        """Whether calls wait on I/O (asyncio twins then run them on a worker thread)."""
        ...

    @property
    def closed(self) -> bool: ...

    def append(
        self,
        stream: str,
        events: NewEvent | Iterable[NewEvent],
        expected_version: ExpectedVersion | None = None,
    ) -> AppendResult: ...

    def append_many(
        self, appends: Iterable[tuple[str, NewEvent | Iterable[NewEvent], ExpectedVersion | None]]
    ) -> list[AppendResult]: ...

    def read_stream(
        self,
        stream: str,
        from_version: int | None = None,
        *,
        backwards: bool = False,
        limit: int | None = None,
    ) -> list[RecordedEvent]: ...

    def read_all(
        self, from_position: int | None = None, *, limit: int | None = None
    ) -> list[RecordedEvent]: ...

    def stream_version(self, stream: str) -> int | None: ...

    def poll(
        self,
        from_position: int,
        limit: int,
        timeout: float | None,
        stream_prefix: str | None = None,
        event_types: set[str] | None = None,
    ) -> tuple[list[RecordedEvent], int]: ...

    def _watch(self, after: int, callback: Callable[[], object]) -> None: ...

    def load_snapshot(self, stream: str) -> Snapshot | None: ...

    def save_snapshot(self, stream: str, version: int, data: bytes) -> None: ...

    def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A stream's state as of ``version``, saved so loading need not replay from the start."""

    stream: str
    version: int
    data: bytes


def _snapshot_stream(stream: str) -> str:
    return f"$snapshot-{stream}"


_S = TypeVar("_S", bound="StoreMethods")


class StoreMethods:
    """What every event store builds on its own calls: snapshots (kept in a stream of their own,
    ``$snapshot-<stream>``), subscriptions, asyncio twins and context managers."""

    def save_snapshot(self, stream: str, version: int, data: bytes) -> None:
        """Saves ``data`` as the state of ``stream`` as of ``version`` (an event it holds)."""
        store = cast(EventStoreLike, self)
        if not isinstance(version, int) or isinstance(version, bool):
            raise TypeError(f"version must be an int (got {type(version).__name__}).")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes (got {type(data).__name__}).")
        current = store.stream_version(stream)
        if version < 0 or current is None or version > current:
            raise ValueError(
                f"version must be a version stream '{stream}' holds, from 0 to its last "
                f"({current}) (got {version})."
            )
        store.append(
            _snapshot_stream(stream), [NewEvent("Snapshot", bytes(data), str(version).encode())]
        )

    def load_snapshot(self, stream: str) -> Snapshot | None:
        """The newest snapshot of ``stream``, or None."""
        store = cast(EventStoreLike, self)
        newest = store.read_stream(_snapshot_stream(stream), backwards=True, limit=1)
        if not newest:
            return None
        return Snapshot(stream, int(newest[0].metadata), newest[0].data)

    def read_from_snapshot(self, stream: str) -> tuple[Snapshot | None, list[RecordedEvent]]:
        """The newest snapshot of ``stream`` (or None) and the events after it."""
        store = cast(EventStoreLike, self)
        snapshot = self.load_snapshot(stream)
        start = 0 if snapshot is None else snapshot.version + 1
        return snapshot, store.read_stream(stream, start)

    def subscribe(
        self,
        from_position: int = 0,
        *,
        stream_prefix: str | None = None,
        event_types: Iterable[str] | None = None,
        batch_size: int = 256,
    ) -> Subscription:
        """A catch-up subscription: the events from ``from_position`` on (history first, then
        new ones as they are appended), optionally only those of streams starting with
        ``stream_prefix`` and of the ``event_types``."""
        store = cast(EventStoreLike, self)
        return Subscription(store, from_position, stream_prefix, event_types, batch_size)

    async def append_async(
        self,
        stream: str,
        events: NewEvent | Iterable[NewEvent],
        expected_version: ExpectedVersion | None = None,
    ) -> AppendResult:
        """``append`` for asyncio: a store whose appends wait on I/O runs it on a worker
        thread."""
        store = cast(EventStoreLike, self)
        if not store.blocks:
            return store.append(stream, events, expected_version)
        return await asyncio.to_thread(store.append, stream, events, expected_version)

    async def append_many_async(
        self, appends: Iterable[tuple[str, NewEvent | Iterable[NewEvent], ExpectedVersion | None]]
    ) -> list[AppendResult]:
        """``append_many`` for asyncio."""
        store = cast(EventStoreLike, self)
        if not store.blocks:
            return store.append_many(appends)
        return await asyncio.to_thread(store.append_many, list(appends))

    async def close_async(self) -> None:
        """``close`` for asyncio."""
        await asyncio.to_thread(cast(EventStoreLike, self).close)

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, *exc_info: object) -> None:
        cast(EventStoreLike, self).close()

    async def __aenter__(self: _S) -> _S:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close_async()


class EventStore(_core.EventStore, StoreMethods):
    """Streams of events with per-stream versions and one global order.

    ``path=None`` keeps the store in memory. With a directory, events go to a durable log:
    ``fsync="always"`` syncs each append, ``"group"`` (the default) lets appends that arrive
    together share one sync, ``"never"`` leaves syncing to the operating system (a machine crash
    can lose the latest appends, never corrupt the log). One process writes a directory at a time.
    """

    @property
    def blocks(self) -> bool:
        """Whether appends wait on the disk (a durable store): asyncio twins then run them on a
        worker thread."""
        return self.path is not None


class Subscription:
    """Delivers a store's events in global order from a position: everything already stored,
    then each new event as it becomes visible. Iterate it (``for event in subscription``, which
    waits with the GIL released, or ``async for``), or call ``next(timeout)``. Iteration ends
    when the subscription is closed, or when the store is closed and every event it held has
    been delivered. ``position`` is where it will read next, so a
    consumer that saves it can resume there."""

    def __init__(
        self,
        store: EventStoreLike,
        from_position: int,
        stream_prefix: str | None,
        event_types: Iterable[str] | None,
        batch_size: int,
    ) -> None:
        if not isinstance(from_position, int) or isinstance(from_position, bool):
            raise TypeError(f"from_position must be an int (got {type(from_position).__name__}).")
        if from_position < 0:
            raise ValueError(f"from_position must be 0 or more (got {from_position}).")
        if stream_prefix is not None and not isinstance(stream_prefix, str):
            raise TypeError(
                f"stream_prefix must be a str or None (got {type(stream_prefix).__name__})."
            )
        if isinstance(event_types, str):
            raise TypeError("event_types must be a collection of type names, not one string.")
        types = None if event_types is None else set(event_types)
        if types is not None and not all(isinstance(name, str) for name in types):
            raise TypeError("event_types must hold str type names.")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number from 1 (got {batch_size!r}).")
        self._store = store
        self._next = from_position
        self._prefix = stream_prefix
        self._types = types
        self._batch_size = batch_size
        self._buffer: deque[RecordedEvent] = deque()
        self._closed = False
        self._lock = threading.Lock()

    @property
    def position(self) -> int:
        """The global position after the last event delivered: where a resumed subscription
        should start."""
        with self._lock:
            return self._buffer[0].position if self._buffer else self._next

    def next(self, timeout: float | None = None) -> RecordedEvent | None:
        """The next event, waiting up to ``timeout`` seconds (None: until one comes); None if
        none came in time, or the subscription is closed, or the store is closed and every
        event it held was delivered."""
        while True:
            with self._lock:
                if self._closed:
                    return None
                if self._buffer:
                    return self._buffer.popleft()
                start = self._next
            # Polled without the lock, so close() and position never wait for it.
            try:
                found, after = self._store.poll(
                    start, self._batch_size, timeout, self._prefix, self._types
                )
            except EventStoreClosedError:
                return None
            with self._lock:
                if self._closed:
                    return None
                if self._next == start:
                    self._buffer.extend(found)
                    self._next = after
                elif not self._buffer:
                    continue  # another thread polled the same events and took them
                return self._buffer.popleft() if self._buffer else None

    def _exhausted(self) -> bool:
        """The store is closed and everything it held was delivered."""
        return self._store.closed and not self._buffer

    def __iter__(self) -> Iterator[RecordedEvent]:
        return self

    def __next__(self) -> RecordedEvent:
        while not self._closed:
            event = self.next(timeout=0.25)
            if event is not None:
                return event
            if self._exhausted():
                break
        raise StopIteration

    def __aiter__(self) -> AsyncIterator[RecordedEvent]:
        return self

    async def __anext__(self) -> RecordedEvent:
        loop = asyncio.get_running_loop()
        while not self._closed:
            event = self.next(timeout=0)
            if event is not None:
                return event
            if self._exhausted():
                break
            woken = loop.create_future()

            def wake(future: asyncio.Future[None] = woken) -> None:
                # From whichever thread made events visible; the loop may be gone by then.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_resolve, future)

            # Woken once the position this subscription reads next is visible.
            self._store._watch(self._next, wake)
            await woken
        raise StopAsyncIteration

    def close(self) -> None:
        """Ends iteration; events not yet delivered are dropped."""
        with self._lock:
            self._closed = True
            self._buffer.clear()

    def __repr__(self) -> str:
        return (
            f"Subscription(position={self.position}, stream_prefix={self._prefix!r}, "
            f"event_types={self._types!r})"
        )


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
