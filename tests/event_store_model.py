"""A pure-Python reference model of ``buttress.EventStore``, for the state machine in
``test_event_store_model.py``.

It is written from the store's contract, not from its code:

- stream versions are 0-based and gapless; global positions are 0-based and gapless;
- an append names its streams' expected versions: ``None``/``"any"`` (anything goes),
  ``"no_stream"`` (the stream has no events), ``"stream_exists"`` (it has some) or the version of
  its last event; the first request (in order) whose expectation fails refuses the whole append;
- an append is all-or-nothing across its streams, and each stream's result is the version and
  the global position of its last event;
- an append retried exactly (the same streams, each with the same event ids in the same order)
  returns the original results and stores nothing, whatever its expected versions say now;
  reusing stored ids in any other way is refused as a duplicate, as is one id twice in an append.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# What an append may expect of a stream: None (the default, same as "any"), "any", "no_stream",
# "stream_exists", or the version of the stream's last event.
Expected = str | int | None


@dataclass(frozen=True)
class Spec:
    """An event to append (the model's NewEvent)."""

    id: bytes
    type: str
    data: bytes
    metadata: bytes


@dataclass(frozen=True)
class Request:
    """One stream's part of an append."""

    stream: str
    events: tuple[Spec, ...]
    expected: Expected = None


@dataclass(frozen=True)
class Event:
    """A stored event, as the model compares it with a RecordedEvent."""

    stream: str
    version: int
    position: int
    id: bytes
    type: str
    data: bytes
    metadata: bytes


@dataclass(frozen=True)
class Appended:
    """The append succeeded (or was an exact retry): (version, position) per request."""

    results: tuple[tuple[int, int], ...]
    replayed: bool = False


@dataclass(frozen=True)
class WrongVersion:
    """WrongExpectedVersionError(stream, expected, actual)."""

    stream: str
    expected: str
    actual: int | None


@dataclass(frozen=True)
class Duplicate:
    """DuplicateEventError: ids reused, but not as an exact retry."""


@dataclass(frozen=True)
class Invalid:
    """ValueError: an append the store refuses outright (a stream twice, no events)."""

    reason: str


Outcome = Appended | WrongVersion | Duplicate | Invalid


def _key(
    requests: tuple[Request, ...] | list[Request],
) -> tuple[tuple[str, tuple[bytes, ...]], ...]:
    """What identifies an append for a retry: its streams and their ids, in order."""
    return tuple((r.stream, tuple(e.id for e in r.events)) for r in requests)


@dataclass
class EventStoreModel:
    events: list[Event] = field(default_factory=list)
    streams: dict[str, list[int]] = field(default_factory=dict)
    ids: set[bytes] = field(default_factory=set)
    # Every successful (not replayed) append: its key and its results.
    appends: dict[tuple[tuple[str, tuple[bytes, ...]], ...], tuple[tuple[int, int], ...]] = field(
        default_factory=dict
    )

    @property
    def head(self) -> int:
        return len(self.events)

    def stream_version(self, stream: str) -> int | None:
        positions = self.streams.get(stream)
        return len(positions) - 1 if positions else None

    def stream_names(self) -> list[str]:
        return sorted(self.streams)

    @staticmethod
    def _matches(expected: Expected, actual: int | None) -> bool:
        if expected is None or expected == "any":
            return True
        if expected == "no_stream":
            return actual is None
        if expected == "stream_exists":
            return actual is not None
        assert isinstance(expected, int)
        return actual == expected

    def append(self, requests: list[Request]) -> Outcome:
        """The outcome of an append; the model changes only when it is a new, accepted one."""
        if not requests:
            return Invalid("no streams")
        key = _key(requests)
        all_ids = [e.id for r in requests for e in r.events]
        if any(i in self.ids for i in all_ids):
            if key in self.appends:
                return Appended(self.appends[key], replayed=True)
            return Duplicate()
        names = [r.stream for r in requests]
        if len(set(names)) != len(names):
            return Invalid("a stream twice")
        if any(not r.events for r in requests):
            return Invalid("no events")
        if len(set(all_ids)) != len(all_ids):
            return Duplicate()
        for request in requests:
            actual = self.stream_version(request.stream)
            if not self._matches(request.expected, actual):
                expected = "any" if request.expected is None else str(request.expected)
                return WrongVersion(request.stream, expected, actual)
        results = []
        for request in requests:
            positions = self.streams.setdefault(request.stream, [])
            for spec in request.events:
                event = Event(
                    stream=request.stream,
                    version=len(positions),
                    position=len(self.events),
                    id=spec.id,
                    type=spec.type,
                    data=spec.data,
                    metadata=spec.metadata,
                )
                positions.append(event.position)
                self.events.append(event)
                self.ids.add(spec.id)
            results.append((len(positions) - 1, len(self.events) - 1))
        self.appends[key] = tuple(results)
        return Appended(tuple(results))

    def read_stream(
        self, stream: str, from_version: int | None, backwards: bool, limit: int | None
    ) -> list[Event]:
        positions = self.streams.get(stream, [])
        if backwards:
            top = len(positions) if from_version is None else min(from_version + 1, len(positions))
            chosen = positions[:top][::-1]
        else:
            chosen = positions[from_version or 0 :]
        if limit is not None:
            chosen = chosen[:limit]
        return [self.events[p] for p in chosen]

    def read_all(self, from_position: int | None, limit: int | None) -> list[Event]:
        chosen = self.events[from_position or 0 :]
        return chosen if limit is None else chosen[:limit]
