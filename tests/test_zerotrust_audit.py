"""The tamper-evident audit log: a hash chain in an event store stream.

Tampering is done where an attacker would do it: in the durable log's files on disk (records
rewritten with valid checksums, so the store opens them without complaint), by appending forged
events through the store, and with SQL on PostgreSQL. The verifier must name the first entry
that was altered, removed or reordered. Concurrent writers (threads, separate ``AuditLog``
objects, asyncio tasks) must keep the chain valid.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from buttress import EventStore, NewEvent
from buttress.errors import AuditChainError, AuditWriteError, WrongExpectedVersionError
from buttress.security import AuditAnchor, AuditLog, canonical_json
from event_postgres import drop_event_tables
from support import crc32c

# -- the durable log's files (docs/event-log-format.md) ----------------------------------------


def segment(directory: Path) -> Path:
    (path,) = sorted(directory.glob("*.events"))
    return path


def read_records(directory: Path) -> list[dict[str, Any]]:
    """Every record of the (single) segment, decoded."""
    raw = segment(directory).read_bytes()
    assert raw[:8] == b"BTRSEVT1"
    offset = 8
    records = []
    while offset < len(raw):
        length, checksum = struct.unpack_from("<II", raw, offset)
        payload = raw[offset + 8 : offset + 8 + length]
        assert crc32c(payload) == checksum
        offset += 8 + length
        first, count, timestamp = struct.unpack_from("<QIq", payload, 0)
        at = 20
        events = []
        for _ in range(count):
            (version,) = struct.unpack_from("<Q", payload, at)
            event_id = payload[at + 8 : at + 24]
            at += 24
            fields = []
            for _ in range(4):
                (size,) = struct.unpack_from("<I", payload, at)
                fields.append(payload[at + 4 : at + 4 + size])
                at += 4 + size
            stream, kind, data, metadata = fields
            events.append(
                {
                    "version": version,
                    "id": event_id,
                    "stream": stream,
                    "type": kind,
                    "data": data,
                    "metadata": metadata,
                }
            )
        records.append({"first": first, "timestamp": timestamp, "events": events})
    return records


def write_records(directory: Path, records: list[dict[str, Any]]) -> None:
    """Writes the records back as a valid segment (checksums recomputed)."""
    out = bytearray(b"BTRSEVT1")
    for record in records:
        payload = bytearray(
            struct.pack("<QIq", record["first"], len(record["events"]), record["timestamp"])
        )
        for event in record["events"]:
            payload += struct.pack("<Q", event["version"]) + event["id"]
            for name in ("stream", "type", "data", "metadata"):
                payload += struct.pack("<I", len(event[name])) + event[name]
        out += struct.pack("<II", len(payload), crc32c(bytes(payload))) + payload
    segment(directory).write_bytes(bytes(out))


def renumber(records: list[dict[str, Any]], stream: bytes) -> None:
    """Makes positions and the stream's versions consecutive again (what a careful attacker
    does after removing or moving records, so the store opens the log)."""
    position = 0
    version = 0
    for record in records:
        record["first"] = position
        position += len(record["events"])
        for event in record["events"]:
            if event["stream"] == stream:
                event["version"] = version
                version += 1


def fill(directory: Path, count: int = 5, **options: Any) -> AuditLog:
    store = EventStore(str(directory))
    log = AuditLog(store, **options)
    for number in range(count):
        log.record({"decision": "deny" if number % 2 else "allow", "subject": f"user-{number}"})
    store.close()
    return log


def reopen(directory: Path, **options: Any) -> tuple[EventStore, AuditLog]:
    store = EventStore(str(directory))
    return store, AuditLog(store, **options)


# -- the chain -----------------------------------------------------------------------------------


def test_entries_chain_and_verify() -> None:
    store = EventStore()
    times = iter(range(1_700_000_000, 1_800_000_000))
    log = AuditLog(store, stream="audit-api", clock=lambda: float(next(times)))
    anchors = [log.record({"decision": "allow", "n": number}) for number in range(3)]
    assert [anchor.index for anchor in anchors] == [0, 1, 2]
    result = log.verify()
    assert result.valid
    assert result.entries == 3
    assert result.first_invalid is None
    assert result.head == anchors[-1] == log.head()
    entries = list(log.entries())
    assert entries[0].prev == "0" * 64
    assert entries[1].prev == entries[0].hash
    assert entries[0].entry == {"decision": "allow", "n": 0, "time": "2023-11-14T22:13:20.000000Z"}
    # The hash is what the module docstring says it is.
    first = json.loads(store.read_stream("audit-api")[0].data)
    body = {"chain": "audit-api", "entry": first["entry"], "index": 0, "prev": "0" * 64}
    expected = hashlib.sha256(b"buttress-audit-v1" + bytes(32) + canonical_json(body)).hexdigest()
    assert first["hash"] == expected
    assert log.check() == anchors[-1]


def test_an_empty_log_is_valid() -> None:
    result = AuditLog(EventStore()).verify()
    assert result.valid
    assert result.entries == 0
    assert result.head is None


def test_entries_must_be_json_without_floats() -> None:
    log = AuditLog(EventStore())
    with pytest.raises(TypeError, match="float"):
        log.record({"latency": 0.5})
    with pytest.raises(TypeError, match="JSON values"):
        log.record({"when": object()})
    with pytest.raises(TypeError, match="entry must be a mapping"):
        log.record(["decision"])  # type: ignore[arg-type]
    assert log.verify().entries == 0


def test_an_altered_entry_on_disk_is_found(tmp_path: Path) -> None:
    fill(tmp_path)
    records = read_records(tmp_path)
    event = records[3]["events"][0]
    assert b'"subject":"user-3"' in event["data"]
    event["data"] = event["data"].replace(b'"decision":"deny"', b'"decision":"allow"')
    write_records(tmp_path, records)
    store, log = reopen(tmp_path)
    with store:
        result = log.verify()
        assert not result.valid
        assert result.first_invalid == 3
        assert "hash does not match" in (result.problem or "")
        assert result.head == AuditAnchor(2, list(log.entries())[2].hash)
        with pytest.raises(AuditChainError) as caught:
            log.check()
        assert caught.value.index == 3
        assert "entry 3" in str(caught.value)


def test_an_altered_entry_with_its_hash_recomputed_is_found_at_the_next_one(
    tmp_path: Path,
) -> None:
    fill(tmp_path)
    records = read_records(tmp_path)
    fields = json.loads(records[1]["events"][0]["data"])
    fields["entry"]["decision"] = "allow"
    body = {name: fields[name] for name in ("chain", "entry", "index", "prev")}
    fields["hash"] = hashlib.sha256(
        b"buttress-audit-v1" + bytes.fromhex(fields["prev"]) + canonical_json(body)
    ).hexdigest()
    records[1]["events"][0]["data"] = canonical_json(fields)
    write_records(tmp_path, records)
    store, log = reopen(tmp_path)
    with store:
        result = log.verify()
        assert result.first_invalid == 2
        assert "previous hash differs" in (result.problem or "")


def test_a_removed_entry_on_disk_is_found(tmp_path: Path) -> None:
    fill(tmp_path)
    records = read_records(tmp_path)
    del records[2]
    renumber(records, b"audit")
    write_records(tmp_path, records)
    store, log = reopen(tmp_path)
    with store:
        result = log.verify()
        assert result.first_invalid == 2
        assert "entries were removed or reordered" in (result.problem or "")


def test_reordered_entries_on_disk_are_found(tmp_path: Path) -> None:
    fill(tmp_path)
    records = read_records(tmp_path)
    records[1], records[2] = records[2], records[1]
    renumber(records, b"audit")
    write_records(tmp_path, records)
    store, log = reopen(tmp_path)
    with store:
        assert log.verify().first_invalid == 1


def test_the_first_entry_replaced_is_found(tmp_path: Path) -> None:
    fill(tmp_path)
    records = read_records(tmp_path)
    records[0]["events"][0]["data"] = canonical_json({"forged": True})
    write_records(tmp_path, records)
    store, log = reopen(tmp_path)
    with store:
        result = log.verify()
        assert result.first_invalid == 0
        assert "not an audit entry" in (result.problem or "")


def test_a_truncated_log_is_found_with_an_anchor(tmp_path: Path) -> None:
    log = fill(tmp_path)
    store, log = reopen(tmp_path)
    with store:
        anchor = log.head()
    assert anchor is not None
    assert anchor.index == 4
    records = read_records(tmp_path)
    write_records(tmp_path, records[:3])
    store, log = reopen(tmp_path)
    with store:
        assert log.verify().valid  # a hash chain alone cannot see a cut-off end...
        result = log.verify(anchor=anchor)  # ...an anchor kept elsewhere can
        assert result.first_invalid == 3
        assert "cut off the end" in (result.problem or "")


def test_a_rewritten_log_is_found_with_an_anchor_or_a_key(tmp_path: Path) -> None:
    """An attacker who rewrites the whole chain from some entry on (recomputing every hash)
    passes a keyless verify, but not an anchor, nor a keyed (HMAC) chain."""
    key = b"audit-key-kept-in-a-vault-000000"
    for options in ({}, {"key": key}):
        directory = tmp_path / ("keyed" if options else "plain")
        directory.mkdir()
        fill(directory, **options)
        store, log = reopen(directory, **options)
        with store:
            anchor = log.head()
        records = read_records(directory)
        prev = "0" * 64
        for index, record in enumerate(records):
            fields = json.loads(record["events"][0]["data"])
            if index == 1:
                fields["entry"]["decision"] = "allow"
            fields["prev"] = prev
            body = {name: fields[name] for name in ("chain", "entry", "index", "prev")}
            fields["hash"] = prev = hashlib.sha256(
                b"buttress-audit-v1" + bytes.fromhex(prev) + canonical_json(body)
            ).hexdigest()
            record["events"][0]["data"] = canonical_json(fields)
        write_records(directory, records)
        store, log = reopen(directory, **options)
        with store:
            if options:
                assert log.verify().first_invalid == 0  # the attacker has no key
            else:
                assert log.verify().valid
            result = log.verify(anchor=anchor)
            assert not result.valid
            assert result.first_invalid in (0, 4)


def test_forged_events_appended_through_the_store_are_found() -> None:
    store = EventStore()
    log = AuditLog(store)
    for number in range(3):
        log.record({"decision": "allow", "n": number})
    # A copy of an earlier entry, replayed at the end.
    replay = store.read_stream("audit")[1].data
    store.append("audit", [NewEvent("AuditEntry", replay)])
    result = log.verify()
    assert result.first_invalid == 3
    assert "says it is entry 1" in (result.problem or "")


@pytest.mark.parametrize(
    ("event", "problem"),
    [
        (NewEvent("Other", b"{}"), "type 'Other'"),
        (NewEvent("AuditEntry", b"not json"), "not an audit entry"),
        (
            NewEvent(
                "AuditEntry",
                b'{"chain":"audit","entry":{},"hash":"00","index":2,"prev":"' + b"0" * 64 + b'"}',
            ),
            "previous hash differs",
        ),
    ],
)
def test_forged_events_of_every_kind(event: NewEvent, problem: str) -> None:
    store = EventStore()
    log = AuditLog(store)
    log.record({"decision": "allow"})
    log.record({"decision": "allow"})
    store.append("audit", [event])
    result = log.verify()
    assert result.first_invalid == 2
    assert problem in (result.problem or "")


def test_an_entry_of_another_chain_is_found() -> None:
    store = EventStore()
    other = AuditLog(store, stream="other")
    other.record({"decision": "allow"})
    store.append("audit", [NewEvent("AuditEntry", store.read_stream("other")[0].data)])
    result = AuditLog(store).verify()
    assert result.first_invalid == 0
    assert "chain 'other'" in (result.problem or "")


def test_a_broken_head_stops_appends() -> None:
    store = EventStore()
    AuditLog(store).record({"decision": "allow"})
    store.append("audit", [NewEvent("AuditEntry", b"garbage")])
    with pytest.raises(AuditChainError, match="newest entry is not an audit entry"):
        AuditLog(store).record({"decision": "allow"})


# -- concurrent writers -------------------------------------------------------------------------


class SlowStore(EventStore):
    """An event store whose appends take a moment (as over a network), so that writers really
    do race for the head of the chain; it counts the races lost."""

    conflicts = 0

    def append(self, stream: str, events: Any, expected_version: Any = None) -> Any:
        time.sleep(0.0005)
        try:
            return super().append(stream, events, expected_version)
        except WrongExpectedVersionError:
            type(self).conflicts += 1
            raise


@pytest.mark.parametrize("durable", [False, True])
def test_concurrent_writers_keep_the_chain_valid(tmp_path: Path, durable: bool) -> None:
    SlowStore.conflicts = 0
    store = SlowStore(str(tmp_path)) if durable else SlowStore()
    writers, per_writer = 6, 25
    barrier = threading.Barrier(writers)
    failures: list[BaseException] = []

    def write(number: int) -> None:
        log = AuditLog(store)  # one object per writer: they race through the store
        barrier.wait()
        try:
            for index in range(per_writer):
                log.record({"writer": number, "n": index})
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=write, args=(number,)) for number in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures
    assert SlowStore.conflicts > 0  # the writers did collide, and retried
    with store:
        result = AuditLog(store).verify()
        assert result.valid, result.problem
        assert result.entries == writers * per_writer
        seen = {(entry.entry["writer"], entry.entry["n"]) for entry in AuditLog(store).entries()}
        assert len(seen) == writers * per_writer


def test_one_log_shared_by_threads_and_tasks() -> None:
    store = EventStore()
    log = AuditLog(store)

    async def tasks() -> None:
        await asyncio.gather(*(log.record_async({"task": number}) for number in range(50)))

    thread = threading.Thread(target=lambda: [log.record({"thread": n}) for n in range(50)])
    thread.start()
    asyncio.run(tasks())
    thread.join(30)
    assert log.verify().entries == 100


def test_a_writer_that_never_wins_gives_up() -> None:
    class AlwaysLosing(EventStore):
        def append(self, stream: str, events: Any, expected_version: Any = None) -> Any:
            raise WrongExpectedVersionError(stream, str(expected_version), 99)

    log = AuditLog(AlwaysLosing(), append_timeout=0.05)
    with pytest.raises(AuditWriteError, match=r"after \d+ attempts"):
        log.record({"decision": "allow"})


@pytest.mark.parametrize(
    ("options", "error", "argument"),
    [
        ({"store": {}}, TypeError, "store"),
        ({"stream": ""}, TypeError, "stream"),
        ({"key": "secret"}, TypeError, "key"),
        ({"key": b"short"}, ValueError, "key"),
        ({"append_timeout": 0}, ValueError, "append_timeout"),
        ({"clock": "now"}, TypeError, "clock"),
    ],
)
def test_bad_options_name_the_argument(
    options: dict[str, Any], error: type[Exception], argument: str
) -> None:
    settings: dict[str, Any] = {"store": EventStore()}
    settings.update(options)
    store = settings.pop("store")
    with pytest.raises(error) as caught:
        AuditLog(store, **settings)
    assert argument in str(caught.value)
    assert str(caught.value).endswith(".")
    with pytest.raises(TypeError, match="anchor"):
        AuditLog(EventStore()).verify(anchor=(0, "x"))  # type: ignore[arg-type]


# -- PostgreSQL ----------------------------------------------------------------------------------


@pytest.fixture
def postgres_store(postgres_url: str) -> Iterator[Any]:
    from buttress.backends.postgres_events import PostgresEventStore

    prefix = f"bt_ztaudit_{uuid.uuid4().hex[:8]}"
    try:
        with PostgresEventStore(postgres_url, table_prefix=prefix, max_size=8) as store:
            yield store
    finally:
        drop_event_tables(postgres_url, prefix)


def test_postgres_concurrent_writers_and_tampering(postgres_store: Any, postgres_url: str) -> None:
    writers, per_writer = 4, 15
    failures: list[BaseException] = []

    def write(number: int) -> None:
        log = AuditLog(postgres_store, stream="audit-pg")
        try:
            for index in range(per_writer):
                log.record({"writer": number, "n": index})
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=write, args=(number,)) for number in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures
    log = AuditLog(postgres_store, stream="audit-pg")
    assert log.verify().entries == writers * per_writer
    assert asyncio.run(log.record_async({"async": True})).index == writers * per_writer

    # An administrator with SQL access edits one entry in place.
    table = f"{postgres_store._prefix}_events"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        row = conn.execute(
            f"select data from {table} where stream = 'audit-pg' and version = 7"
        ).fetchone()
        assert row is not None
        edited = bytes(row[0]).replace(b'"n":', b'"n":1')
        conn.execute(
            f"update {table} set data = %s where stream = 'audit-pg' and version = 7", (edited,)
        )
    result = log.verify()
    assert result.first_invalid == 7
    assert "hash does not match" in (result.problem or "")
