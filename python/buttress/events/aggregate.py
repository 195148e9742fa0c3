"""Event-sourced aggregates: state rebuilt from events, changes recorded as new events, saved
with the version they were decided on.

Events are ``msgspec`` structs, so they encode to JSON bytes fast and decode back to the same
class. An event class that changed shape raises ``schema_version`` and says how to bring the
stored data of older versions up to date in ``upcast``.

>>> class User(Aggregate):
...     class Registered(Event):
...         name: str
...     class Renamed(Event):
...         name: str
...
...     @classmethod
...     def register(cls, user_id: str, name: str) -> "User":
...         user = cls(user_id)
...         user.trigger(cls.Registered(name=name))
...         return user
...
...     def rename(self, name: str) -> None:
...         if name != self.name:
...             self.trigger(self.Renamed(name=name))
...
...     @applies(Registered, Renamed)
...     def _named(self, event: "User.Registered | User.Renamed") -> None:
...         self.name = event.name
>>> from buttress.events.store import EventStore
>>> users = Repository(EventStore(), User)
>>> ada = User.register("ada", "Ada")
>>> ada.rename("Ada Lovelace")
>>> users.save(ada)
1
>>> users.get("ada").name, users.get("ada").version
('Ada Lovelace', 1)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Generic, TypeVar

import msgspec

from buttress._core import NewEvent, RecordedEvent
from buttress.errors import AggregateNotFoundError
from buttress.events.store import EventStoreLike, ExpectedVersion

__all__ = [
    "Aggregate",
    "AggregateNotFoundError",
    "Event",
    "Repository",
    "applies",
]

A = TypeVar("A", bound="Aggregate")
F = TypeVar("F", bound=Callable[..., Any])

_ENCODER = msgspec.json.Encoder()


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """Base class of domain events: subclass it with typed fields.

    ``schema_version`` names the shape of the class's fields; raise it when they change and
    override ``upcast`` to turn stored data of an older version into the current shape.
    """

    schema_version: ClassVar[int] = 1

    @classmethod
    def upcast(cls, data: dict[str, Any], stored_version: int) -> dict[str, Any]:
        """The fields of an event stored at ``stored_version`` (older than ``schema_version``),
        brought up to the current version."""
        raise NotImplementedError(
            f"{cls.__qualname__} is at schema version {cls.schema_version}, but a stored "
            f"event is at version {stored_version} and the class has no upcast() for it."
        )


def applies(*event_types: type[Event]) -> Callable[[F], F]:
    """Marks an aggregate method as the one that applies events of ``event_types``."""
    for event_type in event_types:
        if not (isinstance(event_type, type) and issubclass(event_type, Event)):
            raise TypeError(f"applies() takes Event subclasses (got {event_type!r}).")

    def mark(method: F) -> F:
        method.__buttress_applies__ = event_types  # type: ignore[attr-defined]
        return method

    return mark


class _Stored(dict[type[Event], tuple[str, bytes]]):
    """Each event class's stored type name and metadata, worked out once. The type name is the
    class's qualified name whatever its schema version, so filters by type keep working when a
    class changes shape; a version above 1 goes in the metadata."""

    def __missing__(self, event_type: type[Event]) -> tuple[str, bytes]:
        version = event_type.schema_version
        metadata = b"" if version == 1 else _ENCODER.encode({"schema_version": version})
        stored = self[event_type] = (event_type.__qualname__, metadata)
        return stored


_STORED = _Stored()


class Aggregate:
    """Base class of event-sourced aggregates.

    Decide in methods, then ``trigger(event)``: the event is applied at once (by the method
    marked ``@applies`` for its type) and kept as pending until a ``Repository`` saves it.
    ``version`` is the version of the last event applied (None before any), as in the store.
    The stream of an aggregate is ``f"{stream_prefix}-{id}"``; ``stream_prefix`` defaults to
    the class name.

    A repository rebuilds an aggregate without calling ``__init__`` (only the events make its
    state), so keep state out of ``__init__``: set it in the method that applies the first
    event, as the example above does.
    """

    stream_prefix: ClassVar[str] = ""
    _appliers: ClassVar[dict[type[Event], Callable[[Any, Any], None]]] = {}
    _event_types: ClassVar[dict[str, type[Event]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        appliers: dict[type[Event], Callable[[Any, Any], None]] = {}
        for base in reversed(cls.__mro__[1:]):
            appliers.update(vars(base).get("_appliers", {}))
        for value in vars(cls).values():
            for event_type in getattr(value, "__buttress_applies__", ()):
                appliers[event_type] = value
        cls._appliers = appliers
        cls._event_types = {event_type.__qualname__: event_type for event_type in appliers}
        if "stream_prefix" not in vars(cls):
            cls.stream_prefix = cls.__name__

    def __init__(self, id: str) -> None:
        _initialise(self, id)

    id: str
    version: int | None
    _stream: str
    # What trigger() recorded since the last save: the events, and each one encoded with the
    # id it keeps if the save is retried.
    _pending: list[Event]
    _pending_new: list[NewEvent]

    @property
    def stream(self) -> str:
        """The aggregate's stream in the event store."""
        return self._stream

    def trigger(self, event: Event) -> None:
        """Applies ``event`` and records it to be saved."""
        event_type = type(event)
        self._apply(event)
        self._pending.append(event)
        name, metadata = _STORED[event_type]
        self._pending_new.append(NewEvent(name, _ENCODER.encode(event), metadata))

    @property
    def pending_events(self) -> tuple[Event, ...]:
        """The events triggered since the last save."""
        return tuple(self._pending)

    def _apply(self, event: Event) -> None:
        applier = self._appliers.get(type(event))
        if applier is None:
            raise TypeError(
                f"{type(self).__qualname__} has no @applies method for "
                f"{type(event).__qualname__}; add one."
            )
        applier(self, event)
        version = self.version
        self.version = 0 if version is None else version + 1

    def snapshot_state(self) -> dict[str, Any]:
        """The state a snapshot keeps: by default every public attribute but ``id`` and
        ``version``. Override (with ``restore_state``) when the state does not encode as JSON."""
        return {
            name: value
            for name, value in vars(self).items()
            if not name.startswith("_") and name not in ("id", "version")
        }

    def restore_state(self, state: dict[str, Any]) -> None:
        """Puts back what ``snapshot_state`` kept."""
        vars(self).update(state)

    def __repr__(self) -> str:
        return f"{type(self).__qualname__}(id={self.id!r}, version={self.version})"


def _initialise(aggregate: Aggregate, id: str) -> None:
    if not isinstance(id, str) or not id:
        raise TypeError(f"id must be a non-empty str (got {id!r}).")
    aggregate.id = id
    aggregate.version = None
    aggregate._stream = f"{aggregate.stream_prefix}-{id}"
    aggregate._pending = []
    aggregate._pending_new = []


class _Decoders:
    """Decoders by stored type name, upcasting older schema versions."""

    def __init__(self, aggregate: type[Aggregate]) -> None:
        self._aggregate = aggregate
        self._typed: dict[tuple[str, bytes], Callable[[bytes], Event]] = {}

    def decode(self, event: RecordedEvent) -> Event:
        key = (event.type, event.metadata)
        decode = self._typed.get(key)
        if decode is None:
            decode = self._typed[key] = self._decoder(*key)
        return decode(event.data)

    def _decoder(self, stored: str, metadata: bytes) -> Callable[[bytes], Event]:
        event_type = self._aggregate._event_types.get(stored)
        if event_type is None:
            raise TypeError(
                f"Stored event type {stored!r} is not applied by "
                f"{self._aggregate.__qualname__}; add an @applies method for it."
            )
        stored_version = 1
        if metadata:
            try:
                stored_version = int(msgspec.json.decode(metadata)["schema_version"])
            except (msgspec.DecodeError, KeyError, TypeError, ValueError):
                raise TypeError(
                    f"Stored event type {stored!r} has metadata this repository did not write "
                    f"({metadata[:60]!r}); it cannot tell the event's schema version."
                ) from None
        current = event_type.schema_version
        if stored_version == current:
            return msgspec.json.Decoder(event_type).decode
        if stored_version > current:
            raise TypeError(
                f"Stored event {stored!r} is newer (version {stored_version}) than "
                f"{event_type.__qualname__} here (version {current}); deploy the newer code."
            )

        def upcast(data: bytes) -> Event:
            fields = event_type.upcast(msgspec.json.decode(data), stored_version)
            return msgspec.convert(fields, event_type)

        return upcast


class Repository(Generic[A]):
    """Saves aggregates of one class to an event store and loads them back by replay.

    With ``snapshot_every=N``, a snapshot of the aggregate is stored each time a save crosses a
    multiple of N events, and loading starts from the newest one.
    """

    def __init__(
        self, store: EventStoreLike, aggregate: type[A], *, snapshot_every: int | None = None
    ) -> None:
        if not isinstance(store, EventStoreLike):
            raise TypeError(f"store must be an event store (got {type(store).__name__}).")
        if not (isinstance(aggregate, type) and issubclass(aggregate, Aggregate)):
            raise TypeError(f"aggregate must be an Aggregate subclass (got {aggregate!r}).")
        if snapshot_every is not None and (
            not isinstance(snapshot_every, int) or isinstance(snapshot_every, bool)
        ):
            raise TypeError(f"snapshot_every must be an int or None (got {snapshot_every!r}).")
        if snapshot_every is not None and snapshot_every < 1:
            raise ValueError(f"snapshot_every must be 1 or more (got {snapshot_every}).")
        self.store = store
        self.aggregate = aggregate
        self.snapshot_every = snapshot_every
        self._decoders = _Decoders(aggregate)

    def stream_of(self, aggregate_id: str) -> str:
        """The stream that holds the aggregate's events."""
        return f"{self.aggregate.stream_prefix}-{aggregate_id}"

    def save(self, *aggregates: A) -> int | None:
        """Appends every aggregate's pending events, all or none, each expecting its stream at
        the version the aggregate was loaded at (``WrongExpectedVersionError`` when another
        writer got there first). Returns the global position of the last event written."""
        if len(aggregates) == 1:
            return self._save_one(aggregates[0])
        requests = []
        for aggregate in aggregates:
            if not isinstance(aggregate, self.aggregate):
                raise TypeError(
                    f"This repository saves {self.aggregate.__qualname__} aggregates "
                    f"(got {type(aggregate).__qualname__})."
                )
            if aggregate._pending:
                requests.append(_request(aggregate))
        if not requests:
            return None
        if len(requests) == 1:
            results = [self.store.append(*requests[0])]
        else:
            results = self.store.append_many(requests)
        self._saved(aggregates)
        return max(result.position for result in results)

    async def save_async(self, *aggregates: A) -> int | None:
        """``save`` for asyncio (a durable store waits for its sync on a worker thread)."""
        if not self.store.blocks:
            return self.save(*aggregates)
        return await asyncio.to_thread(self.save, *aggregates)

    def _save_one(self, aggregate: A) -> int | None:
        # save() for the common case, without the lists and loops of several aggregates.
        if not isinstance(aggregate, self.aggregate):
            raise TypeError(
                f"This repository saves {self.aggregate.__qualname__} aggregates "
                f"(got {type(aggregate).__qualname__})."
            )
        new = aggregate._pending_new
        if not new:
            return None
        assert aggregate.version is not None
        base = aggregate.version - len(new)
        position = self.store.append(
            aggregate._stream, new, "no_stream" if base < 0 else base
        ).position
        if self.snapshot_every is None:
            aggregate._pending = []
            aggregate._pending_new = []
        else:
            self._saved((aggregate,))
        return position

    def _saved(self, aggregates: Iterable[A]) -> None:
        for aggregate in aggregates:
            count = len(aggregate._pending)
            aggregate._pending = []
            aggregate._pending_new = []
            every = self.snapshot_every
            if every and count and aggregate.version is not None:
                before = aggregate.version - count
                if (aggregate.version + 1) // every > (before + 1) // every:
                    self._snapshot(aggregate)

    def _snapshot(self, aggregate: A) -> None:
        assert aggregate.version is not None
        state = _ENCODER.encode(aggregate.snapshot_state())
        self.store.save_snapshot(aggregate.stream, aggregate.version, state)

    def get(self, aggregate_id: str, *, version: int | None = None) -> A:
        """The aggregate rebuilt from its events (from its newest snapshot on, when there is
        one), or as it was at ``version``. Raises ``AggregateNotFoundError``."""
        if version is not None and (
            not isinstance(version, int) or isinstance(version, bool) or version < 0
        ):
            raise ValueError(f"version must be a version from 0, or None (got {version!r}).")
        stream = self.stream_of(aggregate_id)
        aggregate = self.aggregate.__new__(self.aggregate)
        _initialise(aggregate, aggregate_id)
        start = 0
        if self.snapshot_every is not None and version is None:
            snapshot = self.store.load_snapshot(stream)
            if snapshot is not None:
                aggregate.restore_state(msgspec.json.decode(snapshot.data))
                aggregate.version = snapshot.version
                start = snapshot.version + 1
        limit = None if version is None else max(0, version - start + 1)
        events = self.store.read_stream(stream, start, limit=limit)
        if not events and aggregate.version is None:
            raise AggregateNotFoundError(aggregate_id, stream)
        decode = self._decoders.decode
        for recorded in events:
            aggregate._apply(decode(recorded))
        return aggregate

    async def get_async(self, aggregate_id: str, *, version: int | None = None) -> A:
        """``get`` for asyncio (on a worker thread when the store's calls wait on I/O)."""
        if not self.store.blocks:
            return self.get(aggregate_id, version=version)
        return await asyncio.to_thread(self.get, aggregate_id, version=version)

    def decode(self, event: RecordedEvent) -> Event:
        """The domain event a stored event holds (upcast when stored at an older schema
        version): what a projection reads."""
        return self._decoders.decode(event)

    def exists(self, aggregate_id: str) -> bool:
        """Whether the aggregate has any events."""
        return self.store.stream_version(self.stream_of(aggregate_id)) is not None


def _request(aggregate: Aggregate) -> tuple[str, list[NewEvent], ExpectedVersion]:
    assert aggregate.version is not None
    base = aggregate.version - len(aggregate._pending_new)
    expected: ExpectedVersion = "no_stream" if base < 0 else base
    return aggregate._stream, aggregate._pending_new, expected
