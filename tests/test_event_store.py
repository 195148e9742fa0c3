"""The event store (``buttress.EventStore``): appends and their expected versions, idempotent
retries, the durable log through crashes and damage, the directory lock, concurrent appenders,
catch-up subscriptions (blocking and asyncio), bad input, and a closed store.

The crash tests run a child process that appends from several threads and prints every
acknowledged event, kill it with SIGKILL at a random moment, and check that the reopened log
holds every acknowledged event, in order, with gapless positions. The damage tests edit the
segment files by hand, locating records with a reader written from ``docs/event-log-format.md``.
"""

from __future__ import annotations

import asyncio
import random
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from buttress import (
    AppendResult,
    DuplicateEventError,
    EventStore,
    EventStoreClosedError,
    EventStoreError,
    NewEvent,
    RecordedEvent,
    StoreCorruptedError,
    StoreLockedError,
    Subscription,
    WrongExpectedVersionError,
)
from support import JOIN, background, crc32c, run_threads, wait_until

MAGIC = b"BTRSEVT1"
SMALL_SEGMENT = 4096


def event(type_: str = "Happened", data: bytes = b"", *, n: int | None = None) -> NewEvent:
    """A NewEvent; with `n`, its id is fixed (``uuid.UUID(int=n)``)."""
    return NewEvent(type_, data, b"", id=None if n is None else uuid.UUID(int=n))


def vp(result: AppendResult | list[AppendResult]) -> Any:
    """An append's result(s) as (version, position) pairs."""
    if isinstance(result, list):
        return [vp(r) for r in result]
    assert isinstance(result, AppendResult)
    return (result.version, result.position)


def snapshot(store: EventStore) -> tuple[Any, ...]:
    """Everything a reader can see of a store, to compare before and after a refused call."""
    return (
        store.head,
        store.streams(),
        [
            (e.stream, e.version, e.position, e.id, e.type, e.data, e.metadata)
            for e in store.read_all()
        ],
    )


def check_log(store: EventStore) -> list[RecordedEvent]:
    """Positions gapless from 0, every stream's versions gapless from 0, ids unique."""
    everything = store.read_all()
    assert [e.position for e in everything] == list(range(store.head))
    versions: dict[str, int] = {}
    for e in everything:
        assert e.version == versions.get(e.stream, 0), f"gap in stream {e.stream!r} at {e!r}"
        versions[e.stream] = e.version + 1
    assert len({e.id for e in everything}) == len(everything), "an id is stored twice"
    assert sorted(versions) == store.streams()
    for stream, count in versions.items():
        assert store.stream_version(stream) == count - 1
    return everything


@pytest.fixture(params=["memory", "durable"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EventStore]:
    """An in-memory store and a durable one (group commit)."""
    opened = EventStore() if request.param == "memory" else EventStore(tmp_path / "log")
    yield opened
    opened.close()


# ---- the log format, read independently of the store --------------------------------------------


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.events"))


def records(path: Path) -> list[tuple[int, int]]:
    """(offset, total size) of every record of a segment, per the documented format."""
    data = path.read_bytes()
    assert data[:8] == MAGIC
    found = []
    offset = 8
    while offset < len(data):
        (length,) = struct.unpack_from("<I", data, offset)
        found.append((offset, 8 + length))
        offset += 8 + length
    assert offset == len(data)
    return found


def decode_segment(path: Path) -> list[tuple[int, str, int, bytes, str, bytes, bytes, int]]:
    """Every event of a segment: (position, stream, version, id, type, data, metadata, µs)."""
    data = path.read_bytes()
    out = []
    for offset, size in records(path):
        length, checksum = struct.unpack_from("<II", data, offset)
        payload = data[offset + 8 : offset + size]
        assert len(payload) == length
        assert crc32c(payload) == checksum, f"bad CRC-32C at {offset}"
        first, count, timestamp = struct.unpack_from("<QIq", payload, 0)
        at = 20
        for index in range(count):
            (version,) = struct.unpack_from("<Q", payload, at)
            ident = payload[at + 8 : at + 24]
            at += 24
            fields = []
            for _ in range(4):
                (size_,) = struct.unpack_from("<I", payload, at)
                fields.append(payload[at + 4 : at + 4 + size_])
                at += 4 + size_
            stream, type_, body, metadata = fields
            out.append(
                (
                    first + index,
                    stream.decode(),
                    version,
                    ident,
                    type_.decode(),
                    body,
                    metadata,
                    timestamp,
                )
            )
        assert at == len(payload)
    return out


def test_crc32c_reference() -> None:
    assert crc32c(b"123456789") == 0xE3069283


def test_log_files_follow_the_documented_format(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    with EventStore(directory, segment_size=SMALL_SEGMENT) as store:
        for n in range(60):
            store.append_many(
                [
                    (f"s{n % 3}", [event("T", bytes([n]) * 100, n=2 * n + 1)], None),
                    ("ü-other", [NewEvent("Ü", b"", b"m" * n, id=uuid.UUID(int=2 * n + 2))], None),
                ]
            )
        expected = [
            (e.position, e.stream, e.version, e.id.bytes, e.type, e.data, e.metadata)
            for e in store.read_all()
        ]
        timestamps = [e.timestamp for e in store.read_all()]
    assert (directory / "LOCK").exists()
    files = segments(directory)
    assert len(files) > 2, "a small segment size rolls over"
    decoded = []
    for path in files:
        events = decode_segment(path)
        # A segment is named after the position of its first event, in 20 digits.
        assert path.name == f"{events[0][0]:020d}.events"
        decoded.extend(events)
    assert [d[:7] for d in decoded] == expected
    # The events of one append share its timestamp (µs since the epoch).
    assert [d[7] / 1e6 for d in decoded] == pytest.approx(timestamps)
    assert all(abs(d[7] / 1e6 - time.time()) < 600 for d in decoded)
    for first, second in zip(decoded[::2], decoded[1::2], strict=True):
        assert first[7] == second[7]


# ---- basics and expected versions ---------------------------------------------------------------


def test_appends_get_versions_and_positions(store: EventStore) -> None:
    assert (store.head, store.streams(), store.read_all()) == (0, [], [])
    assert store.stream_version("order-1") is None
    placed = NewEvent("Placed", b'{"total": 30}', b'{"by": "ann"}', id=uuid.UUID(int=7))
    first = store.append("order-1", [placed, event("Priced")], expected_version="no_stream")
    assert vp(first) == (1, 1)
    assert isinstance(first, AppendResult)
    assert repr(first) == "AppendResult(version=1, position=1)"
    assert vp(store.append("cart-9", event("Opened"))) == (0, 2)
    assert vp(store.append("order-1", [event("Paid")], expected_version=1)) == (2, 3)
    assert vp(store.append("order-1", [event("Shipped")], "stream_exists")) == (3, 4)
    assert vp(store.append("order-1", (event("Closed"),), "any")) == (4, 5)
    assert vp(store.append("cart-9", [event("Closed")], None)) == (1, 6)
    assert store.head == 7
    assert store.streams() == ["cart-9", "order-1"]
    assert store.stream_version("order-1") == 4
    assert store.stream_version("cart-9") == 1

    stored = store.read_stream("order-1")
    assert [(e.type, e.version, e.position) for e in stored] == [
        ("Placed", 0, 0),
        ("Priced", 1, 1),
        ("Paid", 2, 3),
        ("Shipped", 3, 4),
        ("Closed", 4, 5),
    ]
    head = stored[0]
    assert isinstance(head, RecordedEvent)
    assert head.id == uuid.UUID(int=7)
    assert (head.stream, head.data, head.metadata) == (
        "order-1",
        b'{"total": 30}',
        b'{"by": "ann"}',
    )
    assert abs(head.timestamp - time.time()) < 60
    assert head.timestamp == stored[1].timestamp, "the events of one append share a timestamp"
    assert head == store.read_all(limit=1)[0]
    assert hash(head) == hash(store.read_all(limit=1)[0])
    assert head != stored[1]
    assert "order-1" in repr(head)
    assert [e.stream for e in store.read_all()] == ["order-1"] * 2 + ["cart-9"] + [
        "order-1"
    ] * 3 + ["cart-9"]
    assert "head=7" in repr(store)


def test_reads_forwards_backwards_from_and_limited(store: EventStore) -> None:
    for n in range(10):
        store.append("even" if n % 2 == 0 else "odd", [event(data=bytes([n]))])

    def versions(events: list[RecordedEvent]) -> list[int]:
        return [e.version for e in events]

    assert versions(store.read_stream("even")) == [0, 1, 2, 3, 4]
    assert versions(store.read_stream("even", 3)) == [3, 4]
    assert versions(store.read_stream("even", from_version=9)) == []
    assert versions(store.read_stream("even", limit=2)) == [0, 1]
    assert versions(store.read_stream("even", 1, limit=0)) == []
    assert versions(store.read_stream("even", backwards=True)) == [4, 3, 2, 1, 0]
    assert versions(store.read_stream("even", 1, backwards=True)) == [1, 0]
    assert versions(store.read_stream("even", 99, backwards=True, limit=2)) == [4, 3]
    assert versions(store.read_stream("even", 0, backwards=True)) == [0]
    assert store.read_stream("nothing-here") == []
    assert store.read_stream("nothing-here", 3, backwards=True) == []
    assert [e.data for e in store.read_stream("odd", 2)] == [b"\x05", b"\x07", b"\x09"]
    assert [e.position for e in store.read_all(7)] == [7, 8, 9]
    assert [e.position for e in store.read_all(2, limit=3)] == [2, 3, 4]
    assert [e.position for e in store.read_all(limit=0)] == []
    assert store.read_all(10) == []
    assert store.read_all(10**12) == []


def test_data_and_names_round_trip(store: EventStore) -> None:
    everything = bytes(range(256))
    store.append(
        "ストリーム/ü 1",
        [
            NewEvent("Ünïcode type", everything, everything[::-1]),
            NewEvent("Empty"),
            NewEvent("Views", bytearray(b"ba"), memoryview(b"mv")),
        ],
    )
    got = store.read_stream("ストリーム/ü 1")
    assert [(e.type, e.data, e.metadata) for e in got] == [
        ("Ünïcode type", everything, everything[::-1]),
        ("Empty", b"", b""),
        ("Views", b"ba", b"mv"),
    ]
    assert store.streams() == ["ストリーム/ü 1"]


EMPTY_CASES = [("stream_exists", "to exist"), (0, "at version 0"), (3, "at version 3")]


@pytest.mark.parametrize(("expected", "phrase"), EMPTY_CASES)
def test_wrong_expected_version_of_a_missing_stream(
    store: EventStore, expected: str | int, phrase: str
) -> None:
    store.append("other", [event()])
    before = snapshot(store)
    with pytest.raises(WrongExpectedVersionError) as raised:
        store.append("order-7", [event()], expected_version=expected)
    error = raised.value
    assert isinstance(error, EventStoreError)
    assert (error.stream, error.expected, error.actual) == ("order-7", str(expected), None)
    message = str(error)
    assert "'order-7'" in message
    assert phrase in message
    assert "it has no events" in message
    assert snapshot(store) == before


EXISTING_CASES = [
    ("no_stream", "to have no events"),
    (0, "at version 0"),
    (2, "at version 2"),
    (2**63, f"at version {2**63}"),
]


@pytest.mark.parametrize(("expected", "phrase"), EXISTING_CASES)
def test_wrong_expected_version_of_an_existing_stream(
    store: EventStore, expected: str | int, phrase: str
) -> None:
    store.append("order-7", [event(), event()])
    before = snapshot(store)
    with pytest.raises(WrongExpectedVersionError) as raised:
        store.append("order-7", [event()], expected_version=expected)
    error = raised.value
    assert (error.stream, error.expected, error.actual) == ("order-7", str(expected), 1)
    assert phrase in str(error)
    assert "it is at version 1" in str(error)
    assert snapshot(store) == before


def test_a_failed_expectation_in_append_many_stores_nothing(store: EventStore) -> None:
    store.append("a", [event()])
    before = snapshot(store)
    with pytest.raises(WrongExpectedVersionError) as raised:
        store.append_many(
            [
                ("b", [event(), event()], "no_stream"),
                ("a", [event()], 0),
                ("c", [event()], "stream_exists"),
            ]
        )
    # The first request that does not hold is the one reported.
    assert (raised.value.stream, raised.value.expected, raised.value.actual) == (
        "c",
        "stream_exists",
        None,
    )
    with pytest.raises(WrongExpectedVersionError) as raised:
        store.append_many([("b", [event()], None), ("a", [event()], "no_stream")])
    assert (raised.value.stream, raised.value.expected, raised.value.actual) == (
        "a",
        "no_stream",
        0,
    )
    assert snapshot(store) == before
    assert store.stream_version("b") is None
    results = store.append_many(
        [("b", [event(), event()], "no_stream"), ("a", [event()], 0), ("c", event(), None)]
    )
    assert vp(results) == [(1, 2), (1, 3), (0, 4)]
    # One append, one position range: the events of append_many are consecutive.
    assert [e.stream for e in store.read_all(1)] == ["b", "b", "a", "c"]


# ---- idempotency --------------------------------------------------------------------------------


def test_a_retried_append_returns_the_original_result(store: EventStore) -> None:
    first = [event(n=1), event(n=2)]
    original = store.append("s", first, expected_version="no_stream")
    store.append("s", [event(n=3)], expected_version=1)
    store.append("t", [event(n=4)])
    before = snapshot(store)
    # The same NewEvent objects, with the original (now stale) expected version.
    assert store.append("s", first, expected_version="no_stream") == original
    # New objects with the same ids are the same retry.
    assert store.append("s", [event(n=1), event(n=2)], expected_version=5) == original
    assert vp(store.append("s", (event(n=3),))) == (2, 2)
    assert vp(store.append("s", event(n=3), expected_version="stream_exists")) == (2, 2)
    assert snapshot(store) == before


def test_a_retried_append_many_returns_the_original_results(store: EventStore) -> None:
    appends = [("a", [event(n=1)], "no_stream"), ("b", [event(n=2), event(n=3)], "no_stream")]
    original = store.append_many(appends)
    store.append("a", [event(n=4)])
    before = snapshot(store)
    again = store.append_many(appends)
    assert again == original
    assert vp(again) == [(0, 0), (1, 2)]
    # The exact retry plus anything new is not a retry.
    with pytest.raises(DuplicateEventError):
        store.append_many([*appends, ("c", [event(n=5)], None)])
    assert snapshot(store) == before


PARTIAL_REUSE = {
    "stored then new": lambda: ("s", [event(n=2), event(n=9)]),
    "new then stored": lambda: ("s", [event(n=9), event(n=1)]),
    "another order": lambda: ("s", [event(n=2), event(n=1)]),
    "another stream": lambda: ("t", [event(n=1), event(n=2)]),
    "the whole and more": lambda: ("s", [event(n=1), event(n=2), event(n=3), event(n=9)]),
}


@pytest.mark.parametrize("attempt", PARTIAL_REUSE.values(), ids=PARTIAL_REUSE.keys())
def test_reusing_ids_other_than_as_a_retry_is_refused(
    store: EventStore, attempt: Callable[[], tuple[str, list[NewEvent]]]
) -> None:
    store.append("s", [event(n=1), event(n=2)])
    store.append("s", [event(n=3)])
    before = snapshot(store)
    stream, events = attempt()
    with pytest.raises(DuplicateEventError) as raised:
        store.append(stream, events)
    error = raised.value
    assert isinstance(error, EventStoreError)
    assert uuid.UUID(error.event_id) in {e.id for e in events}
    assert "repeat the original exactly" in str(error)
    assert error.event_id in str(error)
    assert snapshot(store) == before
    # The ids that were not stored are still free.
    assert vp(store.append("u", [event(n=9)])) == (0, 3)


@pytest.mark.parametrize("attempt", ["stored then new", "new then stored"])
def test_the_duplicate_error_names_a_reused_id(store: EventStore, attempt: str) -> None:
    store.append("s", [event(n=1), event(n=2)])
    stream, events = PARTIAL_REUSE[attempt]()
    with pytest.raises(DuplicateEventError) as raised:
        store.append(stream, events)
    assert uuid.UUID(raised.value.event_id) in {uuid.UUID(int=1), uuid.UUID(int=2)}


@pytest.mark.parametrize("part", [[1], [2, 3], [1, 2]])
def test_a_part_of_an_earlier_append_is_not_a_retry(store: EventStore, part: list[int]) -> None:
    store.append("s", [event(n=1), event(n=2), event(n=3)])
    before = snapshot(store)
    with pytest.raises(DuplicateEventError):
        store.append("s", [event(n=n) for n in part])
    assert snapshot(store) == before


@pytest.mark.parametrize("how", ["as one append", "in one append_many", "a part and another"])
def test_earlier_appends_combined_are_not_a_retry(store: EventStore, how: str) -> None:
    store.append("s", [event(n=1), event(n=2)])
    store.append("s", [event(n=3)])
    before = snapshot(store)
    attempts: dict[str, Callable[[], Any]] = {
        "as one append": lambda: store.append("s", [event(n=1), event(n=2), event(n=3)]),
        "in one append_many": lambda: store.append_many(
            [("s", [event(n=1), event(n=2)], None), ("s", [event(n=3)], None)]
        ),
        "a part and another": lambda: store.append("s", [event(n=2), event(n=3)]),
    }
    with pytest.raises((DuplicateEventError, ValueError)):
        attempts[how]()
    assert snapshot(store) == before


@pytest.mark.parametrize("fsync", ["always", "group", "never"])
def test_retries_are_recognised_after_a_reopen(tmp_path: Path, fsync: str) -> None:
    directory = tmp_path / "log"
    with EventStore(directory, fsync=fsync) as store:
        one = store.append("s", [event(n=1), event(n=2)], expected_version="no_stream")
        many = store.append_many([("s", [event(n=3)], 1), ("t", [event(n=4)], "no_stream")])
        before = snapshot(store)
    with EventStore(directory, fsync=fsync) as store:
        assert store.recovered_truncated_bytes == 0
        assert snapshot(store) == before
        assert store.append("s", [event(n=1), event(n=2)], expected_version="no_stream") == one
        assert store.append_many([("s", [event(n=3)], 1), ("t", [event(n=4)], "no_stream")]) == many
        with pytest.raises(DuplicateEventError):
            store.append("s", [event(n=2), event(n=1)])
        with pytest.raises(DuplicateEventError):
            store.append("other", [event(n=4)])
        assert snapshot(store) == before
        assert vp(store.append("s", [event(n=5)], expected_version=2)) == (3, 4)


# ---- durability: a writer killed with SIGKILL ---------------------------------------------------

# Appends from several threads and prints each acknowledged event as
# "ack <stream> <version> <id hex> <position>", one flushed line per append; a reader thread
# prints "seen <head>" now and then.
CRASH_CHILD = r"""
import random, sys, threading, uuid
from buttress import EventStore, NewEvent, WrongExpectedVersionError

directory, fsync, run, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
store = EventStore(directory, fsync=fsync, segment_size=16384)
print("ready", store.head, store.recovered_truncated_bytes, flush=True)
out = threading.Lock()

def acknowledge(stream, result, events):
    first_version = result.version - len(events) + 1
    first_position = result.position - len(events) + 1
    lines = "".join(
        f"ack {stream} {first_version + k} {e.id.hex} {first_position + k}\n"
        for k, e in enumerate(events)
    )
    with out:
        sys.stdout.write(lines)
        sys.stdout.flush()

def make(rng, count):
    # Sizes up to a few pages: records straddle pages, and segments roll often.
    return [NewEvent("T", rng.randbytes(rng.choice([0, 10, 700, 5000]))) for _ in range(count)]

def worker(t):
    rng = random.Random(f"{run}-{t}")
    own, version = f"{run}-own-{t}", None
    while True:
        kind = rng.randrange(3)
        events = make(rng, rng.randint(1, 3))
        if kind == 0:
            result = store.append(own, events, "no_stream" if version is None else version)
            version = result.version
            acknowledge(own, result, events)
        elif kind == 1:
            while True:
                seen = store.stream_version("shared")
                try:
                    result = store.append("shared", events, "no_stream" if seen is None else seen)
                    break
                except WrongExpectedVersionError:
                    pass
            acknowledge("shared", result, events)
        else:
            extra = make(rng, 1)
            mine, other = store.append_many(
                [(own, events, "no_stream" if version is None else version), ("multi", extra, None)]
            )
            version = mine.version
            acknowledge(own, mine, events)
            acknowledge("multi", other, extra)

def reader():
    # What readers see must be durable: every position below a head seen survives the kill.
    while True:
        head = store.head
        with out:
            sys.stdout.write(f"seen {head}\n")
            sys.stdout.flush()
        threading.Event().wait(0.002)

for t in range(threads):
    threading.Thread(target=worker, args=(t,), daemon=True).start()
threading.Thread(target=reader, daemon=True).start()
threading.Event().wait()
"""


def run_and_kill(
    directory: Path, fsync: str, run: int, rng: random.Random
) -> tuple[list[list[str]], int]:
    """Runs the crash child until it acknowledged a random number of events, then kills it
    at a random moment; returns the acknowledged events as [stream, version, id hex, position]
    and the highest head its reader saw."""
    lines: list[str] = []
    command = [sys.executable, "-c", CRASH_CHILD, str(directory), fsync, str(run), "3"]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as child:
        assert child.stdout is not None
        stdout = child.stdout

        def read() -> None:
            lines.extend(stdout)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        wanted = rng.randint(1, 150)
        try:
            wait_until(lambda: child.poll() is not None or len(lines) > wanted, timeout=30)
            assert child.poll() is None, "the child died on its own"
            time.sleep(rng.uniform(0, 0.25))
        finally:
            child.kill()
            child.wait(JOIN)
            reader.join(JOIN)
        assert child.returncode == -9
        assert child.stderr is not None
        errors = child.stderr.read()
    assert not errors, errors
    assert lines[0].startswith("ready "), lines[:1]
    # A line cut by the kill (no newline) is not counted.
    whole = [line.split() for line in lines[1:] if line.endswith("\n")]
    acknowledged = [words[1:] for words in whole if words[0] == "ack"]
    # (The kill may come before the reader thread printed anything.)
    seen = max((int(words[1]) for words in whole if words[0] == "seen"), default=0)
    return acknowledged, seen


def check_acknowledged(store: EventStore, acknowledged: list[list[str]]) -> None:
    everything = check_log(store)
    for stream, version, ident, position in acknowledged:
        assert int(position) < len(everything), f"acknowledged event at {position} lost"
        stored = everything[int(position)]
        assert (stored.stream, stored.version, stored.id.hex) == (stream, int(version), ident)


@pytest.mark.parametrize(("fsync", "runs"), [("group", 3), ("always", 1)])
def test_every_acknowledged_append_survives_a_kill(tmp_path: Path, fsync: str, runs: int) -> None:
    seed = random.randrange(2**32)
    print(f"seed {seed}")  # shown when the test fails
    rng = random.Random(seed)
    directory = tmp_path / "log"
    acknowledged: list[list[str]] = []
    for run in range(runs):
        # Each run reopens the log the previous kill left behind and keeps appending to it.
        acknowledged_now, seen = run_and_kill(directory, fsync, run, rng)
        assert acknowledged_now, "nothing was acknowledged"
        acknowledged += acknowledged_now
        with EventStore(directory, fsync=fsync, segment_size=16384) as store:
            truncated = store.recovered_truncated_bytes
            assert isinstance(truncated, int)
            assert truncated >= 0
            check_acknowledged(store, acknowledged)
            assert store.head >= seen, "a reader saw events the kill took back"
            print(
                f"run {run}: {len(acknowledged)} acknowledged, {store.head} stored, cut {truncated}"
            )
        # Opening again finds nothing more to cut, and the same events.
        with EventStore(directory, fsync=fsync, segment_size=16384) as store:
            assert store.recovered_truncated_bytes == 0
            check_acknowledged(store, acknowledged)
    # Usually several: segments roll at 16 KiB (a kill early in a run may leave just one).
    print(f"{len(segments(directory))} segments")


# ---- damage to the log --------------------------------------------------------------------------


def write_log(directory: Path, appends: int, segment_size: int = 1 << 20) -> list[tuple[Any, ...]]:
    """A closed log of `appends` one-event appends (ids 1, 2, ...); returns its events."""
    with EventStore(directory, segment_size=segment_size) as store:
        for n in range(1, appends + 1):
            store.append(f"s{n % 3}", [event("T", bytes([n % 256]) * 150, n=n)])
        return snapshot(store)[2]


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def open_corrupted(directory: Path, **options: Any) -> StoreCorruptedError:
    """Opens a damaged log, which must be refused; checks that nothing was changed."""
    before = {path.name: path.read_bytes() for path in segments(directory)}
    with pytest.raises(StoreCorruptedError) as raised:
        EventStore(directory, **options)
    assert {path.name: path.read_bytes() for path in segments(directory)} == before
    error = raised.value
    assert isinstance(error, EventStoreError)
    assert error.path in str(error)
    assert f"byte {error.offset}" in str(error)
    return error


@pytest.mark.parametrize("where", ["length", "checksum", "payload", "last payload byte"])
def test_a_damaged_record_before_the_tail_is_refused(tmp_path: Path, where: str) -> None:
    directory = tmp_path / "log"
    write_log(directory, 6)
    (path,) = segments(directory)
    offset, size = records(path)[2]
    within = {"length": 0, "checksum": 5, "payload": 30, "last payload byte": size - 1}[where]
    flip(path, offset + within)
    error = open_corrupted(directory)
    assert Path(error.path) == path
    assert error.offset == offset
    # Nothing was cut and the lock was let go: with the byte restored, everything is there.
    flip(path, offset + within)
    with EventStore(directory) as store:
        assert store.head == 6
        assert store.recovered_truncated_bytes == 0


@pytest.mark.parametrize("length_byte", [1, 2])
def test_a_damaged_length_before_the_tail_is_refused(tmp_path: Path, length_byte: int) -> None:
    directory = tmp_path / "log"
    write_log(directory, 6)
    (path,) = segments(directory)
    offset, _ = records(path)[1]
    flip(path, offset + length_byte)
    error = open_corrupted(directory)
    assert error.offset == offset


def test_damage_in_an_older_segment_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    write_log(directory, 60, segment_size=SMALL_SEGMENT)
    files = segments(directory)
    assert len(files) >= 3
    offset, _ = records(files[1])[3]
    flip(files[1], offset + 40)
    error = open_corrupted(directory, segment_size=SMALL_SEGMENT)
    assert Path(error.path) == files[1]
    assert error.offset == offset


TORN = ["cut 1 byte", "cut 7 bytes", "cut into the header", "cut to the header", "damaged"]


@pytest.mark.parametrize("how", TORN)
def test_a_torn_last_record_is_cut_and_appends_go_on(tmp_path: Path, how: str) -> None:
    directory = tmp_path / "log"
    events = write_log(directory, 5)
    (path,) = segments(directory)
    offset, size = records(path)[-1]
    data = path.read_bytes()
    assert offset + size == len(data)
    keep = {
        "cut 1 byte": len(data) - 1,
        "cut 7 bytes": len(data) - 7,
        "cut into the header": offset + 5,
        "cut to the header": offset + 8,
        "damaged": len(data),
    }[how]
    path.write_bytes(data[:keep])
    if how == "damaged":
        flip(path, offset + size // 2)
    torn = path.stat().st_size - offset
    with EventStore(directory) as store:
        assert store.recovered_truncated_bytes == torn
        # The last append is gone, ids and all; the rest is intact.
        assert snapshot(store)[2] == events[:-1]
        assert store.stream_version("s2") == 0
        assert path.stat().st_size == offset
        assert vp(store.append("s2", [event("T", n=5)])) == (1, 4), "its id is free again"
        assert vp(store.append("new", [event(n=99)], "no_stream")) == (0, 5)
        after = snapshot(store)
    with EventStore(directory) as store:
        assert store.recovered_truncated_bytes == 0
        assert snapshot(store) == after
        check_log(store)


@pytest.mark.parametrize("zeros", [1, 3, 8, 100, 4096])
def test_zeros_after_the_last_record_are_cut(tmp_path: Path, zeros: int) -> None:
    directory = tmp_path / "log"
    events = write_log(directory, 5)
    (path,) = segments(directory)
    size = path.stat().st_size
    with path.open("ab") as file:
        file.write(bytes(zeros))
    with EventStore(directory) as store:
        assert store.recovered_truncated_bytes == zeros
        assert snapshot(store)[2] == events, "nothing acknowledged is lost"
        assert path.stat().st_size == size
        assert vp(store.append("s0", [event(n=6)])) == (1, 5)
        after = snapshot(store)
    with EventStore(directory) as store:
        assert store.recovered_truncated_bytes == 0
        assert snapshot(store) == after


@pytest.mark.parametrize("how", ["cut 1 byte", "zeros"])
def test_a_torn_end_in_an_older_segment_is_refused(tmp_path: Path, how: str) -> None:
    directory = tmp_path / "log"
    write_log(directory, 60, segment_size=SMALL_SEGMENT)
    files = segments(directory)
    assert len(files) >= 3
    older = files[0]
    offset, _ = records(older)[-1]
    data = older.read_bytes()
    older.write_bytes(data[:-1] if how == "cut 1 byte" else data + bytes(64))
    error = open_corrupted(directory, segment_size=SMALL_SEGMENT)
    assert Path(error.path) == older
    assert error.offset == (offset if how == "cut 1 byte" else len(data))
    assert "not the newest" in str(error)


def test_a_missing_segment_and_a_bad_magic_are_refused(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    write_log(directory, 60, segment_size=SMALL_SEGMENT)
    files = segments(directory)
    moved = files[1].rename(tmp_path / files[1].name)
    error = open_corrupted(directory, segment_size=SMALL_SEGMENT)
    assert (Path(error.path), error.offset) == (files[2], 0)
    moved.rename(files[1])
    flip(files[1], 0)
    error = open_corrupted(directory, segment_size=SMALL_SEGMENT)
    assert (Path(error.path), error.offset) == (files[1], 0)
    flip(files[1], 0)
    with EventStore(directory, segment_size=SMALL_SEGMENT) as store:
        assert store.head == 60
        check_log(store)


# ---- the directory lock -------------------------------------------------------------------------


def test_a_second_store_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    first = EventStore(directory)
    first.append("s", [event(n=1)])
    with pytest.raises(StoreLockedError) as raised:
        EventStore(directory)
    assert isinstance(raised.value, EventStoreError)
    assert str(directory / "LOCK") in str(raised.value)
    assert "locked by another writer" in str(raised.value)
    # Refused again, whatever the options; the first store is unharmed.
    with pytest.raises(StoreLockedError):
        EventStore(str(directory), fsync="always", segment_size=SMALL_SEGMENT)
    assert vp(first.append("s", [event(n=2)])) == (1, 1)
    first.close()
    # Closed, the lock is free even though the object is still alive.
    with EventStore(directory) as second:
        assert second.head == 2
    assert first.closed
    assert first.head == 2


# Opens the store, says so, waits for a line on stdin, appends one event, closes.
LOCK_CHILD = r"""
import sys, uuid
from buttress import EventStore, NewEvent, StoreLockedError
try:
    store = EventStore(sys.argv[1])
except StoreLockedError as error:
    print("locked", error.args[0], flush=True)
    sys.exit(3)
print("open", store.head, flush=True)
sys.stdin.readline()
store.append("child", [NewEvent("FromChild", id=uuid.UUID(int=77))])
store.close()
print("closed", flush=True)
"""


def start_lock_child(directory: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", LOCK_CHILD, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_the_lock_holds_across_processes(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    store = EventStore(directory)
    with start_lock_child(directory) as child:
        out, err = child.communicate(timeout=30)
    assert child.returncode == 3, err
    assert out.split() == ["locked", str(directory / "LOCK")]
    store.append("parent", [event(n=1)])
    store.close()

    with start_lock_child(directory) as child:
        assert child.stdout is not None
        assert child.stdin is not None
        assert child.stdout.readline().split() == ["open", "1"]
        with pytest.raises(StoreLockedError):
            EventStore(directory)
        out, err = child.communicate("go\n", timeout=30)
    assert (child.returncode, out.split()) == (0, ["closed"]), err
    with EventStore(directory) as store:
        assert [(e.stream, e.id) for e in store.read_all()] == [
            ("parent", uuid.UUID(int=1)),
            ("child", uuid.UUID(int=77)),
        ]


def test_a_killed_writer_leaves_no_lock_behind(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    with start_lock_child(directory) as child:
        assert child.stdout is not None
        assert child.stdout.readline().split() == ["open", "0"]
        with pytest.raises(StoreLockedError):
            EventStore(directory)
        child.kill()
        child.communicate(timeout=30)
    with EventStore(directory) as store:
        assert store.head == 0
        store.append("s", [event()])


# ---- concurrent appenders -----------------------------------------------------------------------


def open_kind(kind: str, tmp_path: Path) -> EventStore:
    return EventStore() if kind == "memory" else EventStore(tmp_path / "log", fsync=kind)


@pytest.mark.parametrize("kind", ["memory", "group", "always"])
def test_concurrent_appenders_lose_and_duplicate_nothing(tmp_path: Path, kind: str) -> None:
    threads, rounds = 4, 25
    store = open_kind(kind, tmp_path)
    acknowledged: list[list[tuple[str, int, uuid.UUID, int]]] = [[] for _ in range(threads)]
    conflicts = [0] * threads

    def worker(t: int) -> None:
        mine: list[tuple[str, int, uuid.UUID, int]] = acknowledged[t]
        own_version: int | None = None
        for n in range(rounds):
            # Its own stream, at the version it knows.
            own = event("Own", f"{t}:{n}".encode())
            expected = "no_stream" if own_version is None else own_version
            result = store.append(f"own-{t}", [own], expected_version=expected)
            own_version = result.version
            mine.append((f"own-{t}", result.version, own.id, result.position))
            # The shared stream: read its version, append at it, start over when beaten.
            shared = [event("Shared", f"{t}:{n}:{k}".encode()) for k in range(1 + n % 2)]
            while True:
                seen = store.stream_version("shared")
                try:
                    result = store.append(
                        "shared", shared, expected_version="no_stream" if seen is None else seen
                    )
                    break
                except WrongExpectedVersionError as error:
                    beaten = error
                # Someone appended since the version was read.
                assert beaten.stream == "shared"
                assert seen is None or (beaten.actual is not None and beaten.actual > seen)
                conflicts[t] += 1
                time.sleep(0.0005)
            first = result.position - len(shared) + 1
            for k, e in enumerate(shared):
                mine.append(("shared", result.version - len(shared) + 1 + k, e.id, first + k))
            # What an append acknowledged, its appender can read at once.
            assert store.read_stream("shared", result.version, limit=1)[0].id == shared[-1].id

    try:
        run_threads(worker, threads, within=60)
        everything = check_log(store)
        total = sum(len(mine) for mine in acknowledged)
        assert store.head == total == len(everything)
        for mine in acknowledged:
            positions = [position for _, _, _, position in mine]
            assert positions == sorted(set(positions)), "one thread's appends are in order"
            for stream, version, ident, position in mine:
                stored = everything[position]
                assert (stored.stream, stored.version, stored.id) == (stream, version, ident)
        assert len(store.read_stream("shared")) == threads * (rounds + rounds // 2)
        for t in range(threads):
            assert [e.data for e in store.read_stream(f"own-{t}")] == [
                f"{t}:{n}".encode() for n in range(rounds)
            ]
        before = snapshot(store)
    finally:
        store.close()
    if kind != "memory":
        with EventStore(tmp_path / "log") as reopened:
            assert snapshot(reopened) == before
            print(f"{sum(conflicts)} conflicts")


def race_one_append(store: EventStore, stream: str, threads: int) -> list[tuple[int, int]]:
    """`threads` threads append the very same events at once; returns what each was told."""
    events = [event(), event()]
    barrier = threading.Barrier(threads)
    results: list[tuple[int, int]] = []

    def worker(_: int) -> None:
        barrier.wait(JOIN)
        result = store.append(stream, events, expected_version="no_stream")
        # Even a caller that got the retry's answer reads the events at once.
        assert [e.id for e in store.read_stream(stream)] == [e.id for e in events]
        results.append(vp(result))

    run_threads(worker, threads, within=30)
    return results


@pytest.mark.parametrize("kind", ["memory", "group", "never"])
def test_concurrent_retries_of_one_append_store_it_once(tmp_path: Path, kind: str) -> None:
    store = open_kind(kind, tmp_path)
    threads = 4
    try:
        for round_ in range(15):
            results = race_one_append(store, f"s{round_}", threads)
            assert results == [(1, 2 * round_ + 1)] * threads
        assert store.head == 30
        check_log(store)
    finally:
        store.close()


# ---- subscriptions ------------------------------------------------------------------------------


def take(subscription: Subscription, count: int) -> list[RecordedEvent]:
    got = []
    for _ in range(count):
        found = subscription.next(timeout=JOIN)
        assert found is not None, f"only {len(got)} of {count} events came"
        got.append(found)
    return got


def test_a_subscription_gives_history_then_new_events(store: EventStore) -> None:
    for n in range(3):
        store.append(f"s{n}", [event(data=bytes([n]))])
    subscription = store.subscribe()
    assert isinstance(subscription, Subscription)
    assert [e.position for e in take(subscription, 3)] == [0, 1, 2]
    assert subscription.position == 3

    def later() -> None:
        time.sleep(0.05)
        store.append("live", [event("A"), event("B")])

    with background(later):
        assert [e.type for e in take(subscription, 2)] == ["A", "B"]
    assert subscription.position == 5
    assert "position=5" in repr(subscription)


def test_subscription_filters(store: EventStore) -> None:
    store.append("order-1", [event("Placed"), event("Paid")])
    store.append("cart-1", [event("Paid")])
    store.append("order-2", [event("Placed")])
    orders = store.subscribe(stream_prefix="order-")
    paid = store.subscribe(event_types={"Paid"})
    paid_orders = store.subscribe(stream_prefix="order", event_types=["Paid", "Refunded"])
    nothing = store.subscribe(event_types=[])
    store.append("order-3", [event("Refunded")])
    store.append("cart-2", [event("Refunded")])
    assert [(e.stream, e.type) for e in take(orders, 4)] == [
        ("order-1", "Placed"),
        ("order-1", "Paid"),
        ("order-2", "Placed"),
        ("order-3", "Refunded"),
    ]
    assert [(e.stream, e.position) for e in take(paid, 2)] == [("order-1", 1), ("cart-1", 2)]
    assert [(e.stream, e.type) for e in take(paid_orders, 2)] == [
        ("order-1", "Paid"),
        ("order-3", "Refunded"),
    ]
    for subscription in (orders, paid, paid_orders, nothing):
        assert subscription.next(timeout=0.02) is None
    assert nothing.position == store.head, "a filter skips past events it does not want"


@pytest.mark.parametrize("batch_size", [1, 2, 256])
def test_a_subscription_resumes_from_its_position(store: EventStore, batch_size: int) -> None:
    for n in range(8):
        store.append("a" if n % 2 == 0 else "b", [event(data=bytes([n]))])
    first = store.subscribe(stream_prefix="a", batch_size=batch_size)
    assert [e.position for e in take(first, 2)] == [0, 2]
    saved = first.position
    assert saved in (3, 4)  # past position 2; with a buffer, where its next event is
    resumed = store.subscribe(saved, stream_prefix="a", batch_size=batch_size)
    assert [e.position for e in take(resumed, 2)] == [4, 6]
    assert [e.position for e in take(first, 2)] == [4, 6]
    everything = store.subscribe(saved)
    assert [e.position for e in take(everything, 8 - saved)] == list(range(saved, 8))
    # A position past the head waits for the events that will be there.
    ahead = store.subscribe(10)
    assert ahead.next(timeout=0.02) is None
    store.append("c", [event(), event(), event()])
    assert [e.position for e in take(ahead, 1)] == [10]


def test_next_returns_none_on_timeout(store: EventStore) -> None:
    subscription = store.subscribe()
    started = time.monotonic()
    assert subscription.next(timeout=0) is None
    assert subscription.next(timeout=0.1) is None
    elapsed = time.monotonic() - started
    assert 0.09 <= elapsed < JOIN
    store.append("s", [event()])
    assert subscription.next(timeout=0) is not None


def test_blocking_iteration_ends_when_the_store_closes(store: EventStore) -> None:
    subscription = store.subscribe()
    got: list[RecordedEvent] = []

    def consume() -> None:
        got.extend(subscription)

    with background(consume):
        for n in range(3):
            store.append("s", [event(data=bytes([n]))])
        wait_until(lambda: len(got) == 3)
        time.sleep(0.05)  # the consumer is waiting for more
        store.close()
    assert [e.data for e in got] == [b"\x00", b"\x01", b"\x02"]
    assert subscription.next(timeout=0.01) is None
    assert list(subscription) == []


def test_a_closed_subscription_gives_nothing_more(store: EventStore) -> None:
    store.append("s", [event(), event(), event()])
    subscription = store.subscribe(batch_size=2)
    assert take(subscription, 1)[0].position == 0
    subscription.close()
    assert subscription.next(timeout=0.01) is None
    assert list(subscription) == []
    store.append("s", [event()])
    assert subscription.next(timeout=0.01) is None


def test_closing_a_subscription_from_another_thread_is_prompt(store: EventStore) -> None:
    subscription = store.subscribe()
    got: list[RecordedEvent] = []
    consumer = threading.Thread(target=lambda: got.extend(subscription), daemon=True)
    closer = threading.Thread(target=subscription.close, daemon=True)
    consumer.start()
    try:
        store.append("s", [event()])
        wait_until(lambda: len(got) == 1)
        # The consumer is back in next(), waiting for more.
        time.sleep(0.1)
        closer.start()
        closer.join(0.3)
        assert not closer.is_alive(), "close() is still blocked"
        consumer.join(0.2)
        assert not consumer.is_alive(), "the iteration goes on"
    finally:
        # Closing the store ends the iteration at once, which frees close() too.
        store.close()
        consumer.join(JOIN)
        if closer.ident is not None:
            closer.join(JOIN)
    assert not consumer.is_alive()
    assert not closer.is_alive()


def test_a_subscription_drains_what_was_stored_before_the_close(store: EventStore) -> None:
    for n in range(5):
        store.append("s", [event(data=bytes([n]))])
    behind = store.subscribe(batch_size=2)
    assert take(behind, 1)[0].position == 0
    store.close()
    assert [e.position for e in behind] == [1, 2, 3, 4]
    assert [e.position for e in store.subscribe()] == [0, 1, 2, 3, 4]


async def collect(subscription: Subscription, count: int) -> list[RecordedEvent]:
    got = []
    async for found in subscription:
        got.append(found)
        if len(got) == count:
            break
    return got


async def test_async_iteration_gets_events_appended_from_another_thread(
    store: EventStore,
) -> None:
    store.append("s", [event("Old")])
    subscription = store.subscribe(event_types={"Old", "New"})

    def append_later() -> None:
        for n in range(3):
            time.sleep(0.02)
            store.append("s", [event("Ignored"), event("New", bytes([n]))])

    with background(append_later):
        got = await asyncio.wait_for(collect(subscription, 4), JOIN)
    assert [(e.type, e.data) for e in got] == [
        ("Old", b""),
        ("New", b"\x00"),
        ("New", b"\x01"),
        ("New", b"\x02"),
    ]


async def test_async_iteration_gets_events_appended_from_its_own_loop(store: EventStore) -> None:
    subscription = store.subscribe(stream_prefix="mine")
    task = asyncio.create_task(collect(subscription, 4))
    await asyncio.sleep(0.02)
    assert not task.done()
    store.append("mine-1", [event("Sync")])
    store.append("other", [event("Skipped")])
    await store.append_async("mine-2", [event("Async")], expected_version="no_stream")
    results = await store.append_many_async(
        [("mine-3", [event("Many")], None), ("other", event("Skipped"), None)]
    )
    assert vp(results) == [(0, 3), (1, 4)]
    await asyncio.sleep(0.02)
    store.append("mine-1", [event("Last")])
    got = await asyncio.wait_for(task, JOIN)
    assert [(e.stream, e.type) for e in got] == [
        ("mine-1", "Sync"),
        ("mine-2", "Async"),
        ("mine-3", "Many"),
        ("mine-1", "Last"),
    ]


async def test_async_iteration_ends_when_the_store_closes(store: EventStore) -> None:
    subscription = store.subscribe()
    task = asyncio.create_task(collect(subscription, 100))
    store.append("s", [event()])
    await asyncio.sleep(0.05)
    assert not task.done()
    await store.close_async()
    got = await asyncio.wait_for(task, JOIN)
    assert len(got) == 1
    with pytest.raises(StopAsyncIteration):
        await subscription.__anext__()


async def test_async_iteration_ends_when_a_thread_closes_the_store(store: EventStore) -> None:
    subscription = store.subscribe()
    task = asyncio.create_task(collect(subscription, 100))
    await asyncio.sleep(0.02)

    def close_later() -> None:
        time.sleep(0.05)
        store.close()

    with background(close_later):
        got = await asyncio.wait_for(task, JOIN)
    assert got == []


# ---- bad input ----------------------------------------------------------------------------------

KNOWN = uuid.UUID(int=1)

# (call on a store holding events, exception, text the message must hold)
BAD_CALLS: dict[str, tuple[Callable[[EventStore], Any], type[Exception], str]] = {
    # stream names
    "empty stream": (lambda s: s.append("", [event()]), ValueError, "stream"),
    "int stream": (lambda s: s.append(1, [event()]), TypeError, "stream"),
    "bytes stream": (lambda s: s.append(b"s", [event()]), TypeError, "stream"),
    "None stream": (lambda s: s.append(None, [event()]), TypeError, "stream"),
    "empty stream in many": (
        lambda s: s.append_many([("", [event()], None)]),
        ValueError,
        "stream",
    ),
    "empty stream read": (lambda s: s.read_stream(""), ValueError, "stream"),
    "int stream read": (lambda s: s.read_stream(5), TypeError, "stream"),
    "empty stream version": (lambda s: s.stream_version(""), ValueError, "stream"),
    "None stream version": (lambda s: s.stream_version(None), TypeError, "stream"),
    # events
    "str in events": (lambda s: s.append("s", ["Placed"]), TypeError, "events"),
    "object after a good event": (
        lambda s: s.append("s", [event(), object()]),
        TypeError,
        "events",
    ),
    "str as events": (lambda s: s.append("s", "Placed"), TypeError, "events"),
    "bytes as events": (lambda s: s.append("s", b"x"), TypeError, "events"),
    "int as events": (lambda s: s.append("s", 5), TypeError, "events"),
    "None as events": (lambda s: s.append("s", None), TypeError, "events"),
    "dict as events": (lambda s: s.append("s", {"type": "T"}), TypeError, "events"),
    "empty events": (lambda s: s.append("s", []), ValueError, "no events"),
    "empty events tuple": (lambda s: s.append("s", ()), ValueError, "no events"),
    "empty events iterator": (lambda s: s.append("s", iter([])), ValueError, "no events"),
    "empty events in many": (
        lambda s: s.append_many([("a", [event()], None), ("s", [], None)]),
        ValueError,
        "no events",
    ),
    "bad events in many": (
        lambda s: s.append_many([("a", [event()], None), ("b", ["x"], None)]),
        TypeError,
        "events",
    ),
    # expected versions
    **{
        f"expected {value!r}": (
            lambda s, value=value: s.append("s", [event()], expected_version=value),
            ValueError,
            "expected_version",
        )
        for value in [-1, 2**64, True, False, "latest", "", "ANY", "no-stream", 1.0, [0]]
    },
    "expected in many": (
        lambda s: s.append_many([("a", [event()], None), ("b", [event()], -1)]),
        ValueError,
        "expected_version",
    ),
    # reads
    "negative from_version": (lambda s: s.read_stream("s", -1), ValueError, "from_version"),
    "huge from_version": (lambda s: s.read_stream("s", 2**64), ValueError, "from_version"),
    "str from_version": (lambda s: s.read_stream("s", "0"), TypeError, "from_version"),
    "bool from_version": (lambda s: s.read_stream("s", True), TypeError, "from_version"),
    "float from_version": (lambda s: s.read_stream("s", 1.0), TypeError, "from_version"),
    "negative limit": (lambda s: s.read_stream("s", limit=-1), ValueError, "limit"),
    "str limit": (lambda s: s.read_stream("s", limit="2"), TypeError, "limit"),
    "float limit": (lambda s: s.read_all(limit=1.0), TypeError, "limit"),
    "negative read_all limit": (lambda s: s.read_all(limit=-5), ValueError, "limit"),
    "negative from_position": (lambda s: s.read_all(-1), ValueError, "from_position"),
    "str from_position": (lambda s: s.read_all("0"), TypeError, "from_position"),
    "bool from_position": (lambda s: s.read_all(False), TypeError, "from_position"),
    # append_many's shape
    "no appends": (lambda s: s.append_many([]), ValueError, "at least one stream"),
    "int appends": (lambda s: s.append_many(5), TypeError, "appends"),
    "pair in appends": (lambda s: s.append_many([("s", [event()])]), TypeError, "appends"),
    "list in appends": (lambda s: s.append_many([["s", [event()], None]]), TypeError, "appends"),
    "str in appends": (lambda s: s.append_many(["s"]), TypeError, "appends"),
    "a stream twice": (
        lambda s: s.append_many([("s", [event()], None), ("s", [event()], None)]),
        ValueError,
        "'s' appears twice",
    ),
    # ids
    "an id twice in one append": (
        lambda s: s.append("s", [event(n=5), event(n=5)]),
        DuplicateEventError,
        "twice",
    ),
    "an id twice across streams": (
        lambda s: s.append_many([("a", [event(n=5)], None), ("b", [event(n=5)], None)]),
        DuplicateEventError,
        "twice",
    ),
    "a stored id with a new one": (
        lambda s: s.append("s", [event(n=1), event(n=6)]),
        DuplicateEventError,
        "already stored",
    ),
    # subscriptions
    "negative subscribe position": (lambda s: s.subscribe(-1), ValueError, "from_position"),
    "str subscribe position": (lambda s: s.subscribe("0"), TypeError, "from_position"),
    "bool subscribe position": (lambda s: s.subscribe(True), TypeError, "from_position"),
    "int prefix": (lambda s: s.subscribe(stream_prefix=5), TypeError, "stream_prefix"),
    "str event_types": (lambda s: s.subscribe(event_types="Paid"), TypeError, "event_types"),
    "int in event_types": (lambda s: s.subscribe(event_types=[1]), TypeError, "event_types"),
    "zero batch_size": (lambda s: s.subscribe(batch_size=0), ValueError, "batch_size"),
    "bool batch_size": (lambda s: s.subscribe(batch_size=True), ValueError, "batch_size"),
    "negative timeout": (lambda s: s.subscribe().next(timeout=-1), ValueError, "timeout"),
    "nan timeout": (lambda s: s.subscribe().next(timeout=float("nan")), ValueError, "timeout"),
}


@pytest.mark.parametrize(("call", "error", "text"), BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_input_is_refused_and_changes_nothing(
    store: EventStore, call: Callable[[EventStore], Any], error: type[Exception], text: str
) -> None:
    store.append("s", [event(n=1), event(n=2)])
    store.append("a", [event(n=3)])
    before = snapshot(store)
    with pytest.raises(error) as raised:
        call(store)
    assert text in str(raised.value), f"{text!r} not in {str(raised.value)!r}"
    assert snapshot(store) == before
    # The store goes on as before.
    assert vp(store.append("s", [event(n=4)], expected_version=1)) == (2, 3)


@pytest.mark.parametrize("read", ["read_stream", "read_all"])
def test_a_bool_limit_is_refused(store: EventStore, read: str) -> None:
    store.append("s", [event(), event()])
    reader: Callable[..., Any] = getattr(store, read)
    arguments = ("s",) if read == "read_stream" else ()
    with pytest.raises(TypeError, match="limit"):
        reader(*arguments, limit=True)


BAD_EVENTS: dict[str, tuple[Callable[[], Any], type[Exception], str]] = {
    "empty type": (lambda: NewEvent(""), ValueError, "type"),
    "None type": (lambda: NewEvent(None), TypeError, "type"),
    "bytes type": (lambda: NewEvent(b"T"), TypeError, "type"),
    "str data": (lambda: NewEvent("T", "text"), TypeError, "data"),
    "int data": (lambda: NewEvent("T", 5), TypeError, "data"),
    "list data": (lambda: NewEvent("T", [1, 2]), TypeError, "data"),
    "str metadata": (lambda: NewEvent("T", b"", "m"), TypeError, "metadata"),
    "dict metadata": (lambda: NewEvent("T", b"", {}), TypeError, "metadata"),
    "short id": (lambda: NewEvent("T", id=b"short"), ValueError, "id"),
    "long id": (lambda: NewEvent("T", id=bytes(17)), ValueError, "id"),
    "str id": (lambda: NewEvent("T", id=str(uuid.uuid4())), TypeError, "id"),
    "int id": (lambda: NewEvent("T", id=5), TypeError, "id"),
}


@pytest.mark.parametrize(("make", "error", "text"), BAD_EVENTS.values(), ids=BAD_EVENTS.keys())
def test_bad_new_events_are_refused(
    make: Callable[[], Any], error: type[Exception], text: str
) -> None:
    with pytest.raises(error) as raised:
        make()
    assert text in str(raised.value)


def test_new_event_accepts_ids_as_uuid_or_16_bytes_and_buffers_as_data() -> None:
    raw = bytes(range(16))
    assert NewEvent("T", id=raw).id == uuid.UUID(bytes=raw)
    assert NewEvent("T", id=uuid.UUID(bytes=raw)).id == uuid.UUID(bytes=raw)
    assert NewEvent("T").id.version == 4
    assert NewEvent("T").id != NewEvent("T").id
    made = NewEvent("T", bytearray(b"ab"), memoryview(b"cd"))
    assert (made.type, made.data, made.metadata) == ("T", b"ab", b"cd")
    assert (NewEvent("T").data, NewEvent("T").metadata) == (b"", b"")
    assert "T" in repr(made)


BAD_OPTIONS: dict[str, tuple[dict[str, Any], type[Exception], str]] = {
    "unknown fsync": ({"fsync": "sometimes"}, ValueError, "fsync"),
    "empty fsync": ({"fsync": ""}, ValueError, "fsync"),
    "upper-case fsync": ({"fsync": "ALWAYS"}, ValueError, "fsync"),
    "zero segment_size": ({"segment_size": 0}, ValueError, "segment_size"),
    "small segment_size": ({"segment_size": 4095}, ValueError, "segment_size"),
}


@pytest.mark.parametrize(("options", "error", "text"), BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
@pytest.mark.parametrize("durable", [False, True])
def test_bad_store_options_are_refused(
    tmp_path: Path, options: dict[str, Any], error: type[Exception], text: str, durable: bool
) -> None:
    directory = tmp_path / "log"
    with pytest.raises(error) as raised:
        EventStore(directory if durable else None, **options)
    assert text in str(raised.value)
    assert not directory.exists(), "nothing is created for a refused store"


@pytest.mark.parametrize(
    ("options", "text"),
    [
        ({"segment_size": "big"}, "segment_size"),
        ({"segment_size": 4096.0}, "segment_size"),
        ({"fsync": 1}, "fsync"),
        ({"fsync": None}, "fsync"),
        ({"path": 5}, "path"),
    ],
)
def test_badly_typed_store_options_are_refused(
    tmp_path: Path, options: dict[str, Any], text: str
) -> None:
    options.setdefault("path", tmp_path / "log")
    # PyO3 names the argument in a note (PEP 678), which pytest's match also searches.
    with pytest.raises(TypeError, match=text):
        EventStore(**options)
    assert not (tmp_path / "log").exists()


@pytest.mark.parametrize("segment_size", [-1, 2**64])
def test_an_out_of_range_segment_size_is_a_value_error(tmp_path: Path, segment_size: int) -> None:
    with pytest.raises(ValueError, match="segment_size"):
        EventStore(tmp_path / "log", segment_size=segment_size)


def test_a_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"not a directory")
    with pytest.raises(OSError, match="file"):
        EventStore(path)
    assert path.read_bytes() == b"not a directory"


def test_the_smallest_segment_size_and_an_event_bigger_than_a_segment(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    big = bytes(range(256)) * 64  # 16 KiB, four times the segment size
    with EventStore(directory, fsync="always", segment_size=4096) as store:
        assert store.fsync == "always"
        assert store.path == directory
        for n in range(4):
            store.append("big", [event("Big", big, n=n + 1)])
    with EventStore(directory, segment_size=4096) as store:
        assert [e.data for e in store.read_stream("big")] == [big] * 4
    assert len(segments(directory)) == 4


# ---- a closed store -----------------------------------------------------------------------------


def test_a_closed_store_refuses_appends_and_still_reads(store: EventStore) -> None:
    retry = [event(n=1), event(n=2)]
    store.append("s", retry)
    store.append_many([("s", [event(n=3)], 1), ("t", [event(n=4)], None)])
    before = snapshot(store)
    assert not store.closed
    store.close()
    assert store.closed
    for attempt in (
        lambda: store.append("s", [event()]),
        lambda: store.append("s", retry),  # even an exact retry
        lambda: store.append_many([("u", [event()], None)]),
        lambda: store.append("s", [event()], expected_version=99),
    ):
        with pytest.raises(EventStoreClosedError) as raised:
            attempt()
        assert isinstance(raised.value, EventStoreError)
        assert str(raised.value) == "The event store is closed."
    # What was stored can still be read.
    assert snapshot(store) == before
    assert [e.id for e in store.read_stream("s", 1, backwards=True)] == [
        uuid.UUID(int=2),
        uuid.UUID(int=1),
    ]
    assert store.stream_version("t") == 0
    assert "head=4" in repr(store)
    store.close()  # closing again is harmless
    assert store.closed


async def test_a_closed_store_refuses_async_appends(store: EventStore) -> None:
    await store.close_async()
    with pytest.raises(EventStoreClosedError):
        await store.append_async("s", [event()])
    with pytest.raises(EventStoreClosedError):
        await store.append_many_async([("s", [event()], None)])


def test_a_closed_durable_store_frees_its_directory(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    store = EventStore(directory, fsync="never")
    store.append("s", [event(n=1)])
    store.close()
    with EventStore(directory) as again:
        assert [e.id for e in again.read_all()] == [uuid.UUID(int=1)]
        again.append("s", [event(n=2)])
    # The first object still answers reads from what it held.
    assert store.head == 1


# ---- context managers ---------------------------------------------------------------------------


def test_the_context_manager_closes_the_store(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    with EventStore(directory) as store:
        assert isinstance(store, EventStore)
        store.append("s", [event()])
    assert store.closed

    def fail_inside() -> None:
        with EventStore(directory) as store:
            store.append("s", [event()])
            opened.append(store)
            raise RuntimeError("inside the block")

    opened: list[EventStore] = []
    with pytest.raises(RuntimeError, match="inside"):
        fail_inside()
    assert opened[0].closed
    with EventStore() as memory:
        memory.append("s", [event()])
    assert memory.closed
    with EventStore(directory) as store:
        assert store.head == 2


async def test_the_async_context_manager_closes_the_store(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    async with EventStore(directory) as store:
        assert isinstance(store, EventStore)
        assert vp(await store.append_async("s", [event()], "no_stream")) == (0, 0)
        assert vp(await store.append_many_async([("s", [event()], 0)])) == [(1, 1)]
    assert store.closed

    async def fail_inside() -> None:
        async with EventStore(directory) as store:
            opened.append(store)
            raise RuntimeError("inside the block")

    opened: list[EventStore] = []
    with pytest.raises(RuntimeError, match="inside"):
        await fail_inside()
    assert opened[0].closed
    async with EventStore() as memory:
        assert vp(await memory.append_async("s", event())) == (0, 0)
    assert memory.closed
    with EventStore(directory) as store:
        assert store.head == 2
