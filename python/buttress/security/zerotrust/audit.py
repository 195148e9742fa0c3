"""A tamper-evident audit log: a hash chain of entries in an event store stream.

Each entry is one event (type ``AuditEntry``) in the stream ``stream`` of any
``EventStoreLike`` store (``buttress.EventStore`` in memory or on disk,
``buttress.backends.postgres_events.PostgresEventStore``). Entry ``n`` is the stream's
version ``n``, and its data is the canonical JSON of::

    {"chain": <stream>, "entry": {...}, "hash": <hex>, "index": n, "prev": <hex>}

where ``prev`` is the ``hash`` of entry ``n - 1`` (64 zeros for entry 0) and::

    hash = SHA-256(b"buttress-audit-v1" + bytes.fromhex(prev)
                   + canonical({"chain": ..., "entry": ..., "index": n, "prev": ...}))

or HMAC-SHA-256 with the same input when the log has a ``key``. *Canonical JSON* is UTF-8
JSON with keys sorted, no spaces (``separators=(",", ":")``), non-ASCII characters kept as
they are, and no floats (so any language reproduces the bytes).

Appends take the stream's version as the expected version, so two writers (threads,
processes, machines) can never both extend the chain from the same entry: the loser gets
``WrongExpectedVersionError``, reads the new head, re-seals its entry and tries again.

``verify()`` walks the stream from the start and names the first entry that was altered
(hash mismatch), removed or reordered (index or previous-hash mismatch), or forged (not an
audit entry, or not chained). Two limits of any hash chain, and their cures:

- whoever can rewrite the whole store can recompute every hash after the entry they altered.
  Give the log a secret ``key`` (HMAC) held away from the store, or record ``head()`` anchors
  elsewhere (a ticket, another store) and pass one to ``verify(anchor=...)``;
- cutting entries off the *end* leaves a shorter, valid chain; an anchor catches that too.

>>> from buttress import EventStore
>>> log = AuditLog(EventStore(), stream="audit")
>>> log.record({"decision": "allow", "subject": "alice"}).index
0
>>> log.record({"decision": "deny", "subject": "mallory"}).index
1
>>> log.verify().valid
True
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import hmac
import json
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from buttress._core import NewEvent, RecordedEvent
from buttress.errors import AuditChainError, AuditWriteError, WrongExpectedVersionError
from buttress.events.store import EventStoreLike, ExpectedVersion

__all__ = [
    "AuditAnchor",
    "AuditEntry",
    "AuditLog",
    "AuditVerification",
    "canonical_json",
]

EVENT_TYPE = "AuditEntry"
GENESIS = "0" * 64
_DOMAIN = b"buttress-audit-v1"
_PAGE = 1000


def _check_json(value: Any, where: str) -> None:
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        raise TypeError(
            f"{where} is a float; audit entries hold no floats so that their canonical encoding "
            "is the same in every language. Store it as an int or a str."
        )
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_json(item, f"{where}[{index}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has a key {key!r} that is not a str.")
            _check_json(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__name__}; audit entries hold only JSON values "
        "(str, int, bool, None, lists and dicts with str keys)."
    )


def canonical_json(value: Any) -> bytes:
    """The canonical encoding the chain hashes: sorted keys, no spaces, UTF-8, no floats.

    >>> canonical_json({"b": 1, "a": ["é", None]})
    b'{"a":["\\xc3\\xa9",null],"b":1}'
    """
    _check_json(value, "the value")
    return _encode(value)


def _encode(value: Any) -> bytes:
    """``canonical_json`` of a value already checked (an entry is checked once, then encoded
    twice: for its hash and for the store)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


@dataclasses.dataclass(frozen=True)
class AuditAnchor:
    """A point of the chain: the entry ``index`` and its ``hash``. Keep the newest one outside
    the store to detect a rewritten or truncated log.

    >>> AuditAnchor(0, "ab" * 32).index
    0
    """

    index: int
    hash: str


@dataclasses.dataclass(frozen=True)
class AuditEntry:
    """An entry as read back: its index, what it records, its chain hashes and its event.

    >>> from buttress import EventStore
    >>> log = AuditLog(EventStore())
    >>> _ = log.record({"decision": "allow", "time": "2024-06-01T12:00:00.000000Z"})
    >>> next(log.entries()).entry
    {'decision': 'allow', 'time': '2024-06-01T12:00:00.000000Z'}
    """

    index: int
    entry: dict[str, Any]
    prev: str
    hash: str
    event: RecordedEvent


@dataclasses.dataclass(frozen=True)
class AuditVerification:
    """What ``AuditLog.verify`` found: whether the chain holds, how many entries checked out,
    and the first bad entry (its index, what is wrong with it) when one is.

    >>> AuditVerification(True, 3, None, None, None).valid
    True
    """

    valid: bool
    entries: int
    first_invalid: int | None
    problem: str | None
    head: AuditAnchor | None
    stream: str = ""

    def raise_if_broken(self) -> None:
        """Raises ``AuditChainError`` naming the first bad entry when the chain is broken.

        >>> AuditVerification(False, 2, 2, "its hash does not match its content", None,
        ...                   "audit").raise_if_broken()
        Traceback (most recent call last):
        ...
        buttress.errors.AuditChainError: The audit log 'audit' is broken at entry 2: its hash ...
        """
        if not self.valid:
            raise AuditChainError(self.stream, self.first_invalid, self.problem)


class AuditLog:
    """Appends hash-chained entries to a stream of an event store, and verifies the chain.

    - ``store``: any ``EventStoreLike`` (``EventStore``, ``PostgresEventStore``).
    - ``stream``: the stream holding this chain.
    - ``key``: optional secret (16 bytes or more) that turns the hashes into HMACs, so that
      only its holders can extend or rewrite the chain undetected.
    - ``append_timeout``: how long an append may keep losing races to other writers before
      ``AuditWriteError``.
    - ``clock``: seconds since the epoch, for the entries' ``time``.

    >>> from buttress import EventStore
    >>> log = AuditLog(EventStore(), stream="audit-api", key=b"k" * 32)
    >>> log.record({"decision": "allow"}).index
    0
    >>> log.head().index
    0
    """

    def __init__(
        self,
        store: EventStoreLike,
        *,
        stream: str = "audit",
        key: bytes | None = None,
        append_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(store, EventStoreLike):
            raise TypeError(
                "store must be an event store (buttress.EventStore, PostgresEventStore or "
                f"another EventStoreLike); got {type(store).__name__}."
            )
        if not isinstance(stream, str) or not stream:
            raise TypeError(f"stream must be a non-empty str (got {stream!r}).")
        if key is not None:
            if not isinstance(key, (bytes, bytearray)):
                raise TypeError(f"key must be bytes or None (got {type(key).__name__}).")
            if len(key) < 16:
                raise ValueError(f"key must be at least 16 bytes (got {len(key)}).")
        if (
            isinstance(append_timeout, bool)
            or not isinstance(append_timeout, (int, float))
            or not append_timeout > 0
        ):
            raise ValueError(
                f"append_timeout must be a positive number of seconds (got {append_timeout!r})."
            )
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds (got {clock!r}).")
        self.store = store
        self.stream = stream
        self._key = None if key is None else bytes(key)
        self._append_timeout = float(append_timeout)
        self._clock = clock
        # Writers in this process take turns, so they do not race each other for the head;
        # writers elsewhere are kept honest by the expected version.
        self._lock = threading.Lock()
        self._head: AuditAnchor | None = None

    # -- writing ---------------------------------------------------------------------------

    def record(self, entry: Mapping[str, Any]) -> AuditAnchor:
        """Appends ``entry`` (a JSON object; a ``time`` is added unless it has one) as the
        chain's next entry; returns its index and hash.

        >>> from buttress import EventStore
        >>> AuditLog(EventStore()).record({"decision": "deny", "time": "t"}).index
        0
        """
        if not isinstance(entry, Mapping):
            raise TypeError(f"entry must be a mapping (got {type(entry).__name__}).")
        body = dict(entry)
        body.setdefault("time", _timestamp(self._clock()))
        _check_json(body, "entry")
        deadline = time.monotonic() + self._append_timeout
        attempts = 0
        with self._lock:
            while True:
                attempts += 1
                head = self._head if self._head is not None else self._read_head()
                index = 0 if head is None else head.index + 1
                prev = GENESIS if head is None else head.hash
                digest = self._digest(index, prev, body)
                data = _encode(
                    {
                        "chain": self.stream,
                        "entry": body,
                        "hash": digest,
                        "index": index,
                        "prev": prev,
                    }
                )
                expected: ExpectedVersion = "no_stream" if head is None else head.index
                try:
                    self.store.append(self.stream, [NewEvent(EVENT_TYPE, data)], expected)
                except WrongExpectedVersionError:
                    self._head = None
                    if time.monotonic() >= deadline:
                        raise AuditWriteError(self.stream, attempts) from None
                    if attempts > 3:
                        # Several losses in a row: back off a little, at random, so the
                        # writers stop colliding.
                        time.sleep(random.uniform(0, min(0.001 * attempts, 0.02)))
                    continue
                except BaseException:
                    self._head = None  # the append may or may not have happened
                    raise
                self._head = AuditAnchor(index, digest)
                return self._head

    async def record_async(self, entry: Mapping[str, Any]) -> AuditAnchor:
        """``record`` for asyncio: a store that waits on I/O is written from a worker thread.

        >>> from buttress import EventStore
        >>> asyncio.run(AuditLog(EventStore()).record_async({"decision": "allow"})).index
        0
        """
        if self.store.blocks:
            return await asyncio.to_thread(self.record, entry)
        return self.record(entry)

    def head(self) -> AuditAnchor | None:
        """The newest entry's index and hash as stored (None for an empty log); keep it
        elsewhere to verify against later."""
        return self._read_head()

    # -- reading and verifying ---------------------------------------------------------------

    def entries(self, from_index: int = 0) -> Iterator[AuditEntry]:
        """The entries from ``from_index`` on, as stored (not verified; see ``verify``)."""
        for event in self._events(from_index):
            fields = _decode(event)
            if fields is None:
                raise AuditChainError(self.stream, event.version, "it is not an audit entry")
            yield AuditEntry(event.version, fields["entry"], fields["prev"], fields["hash"], event)

    def verify(self, *, anchor: AuditAnchor | None = None) -> AuditVerification:
        """Walks the whole chain and reports the first entry that does not check out.

        With ``anchor`` (an earlier ``head()``), also checks that the entry at its index
        still has its hash: a log rewritten or cut short since then is reported.

        >>> from buttress import EventStore
        >>> store = EventStore()
        >>> log = AuditLog(store)
        >>> _ = log.record({"decision": "allow"})
        >>> _ = store.append("audit", [NewEvent("AuditEntry", b"{}")])
        >>> result = log.verify()
        >>> result.first_invalid, result.problem
        (1, 'it is not an audit entry (not canonical JSON with chain, entry, hash, index and prev)')
        """
        if anchor is not None and not isinstance(anchor, AuditAnchor):
            raise TypeError(f"anchor must be an AuditAnchor or None (got {type(anchor).__name__}).")
        expected_index = 0
        prev = GENESIS
        last: AuditAnchor | None = None

        def broken(index: int, problem: str) -> AuditVerification:
            return AuditVerification(False, index, index, problem, last, self.stream)

        for event in self._events(0):
            if event.version != expected_index:
                return broken(
                    expected_index,
                    f"it is missing: the stream goes from version {expected_index - 1} to "
                    f"{event.version}",
                )
            if event.type != EVENT_TYPE:
                return broken(expected_index, f"it is an event of type {event.type!r}")
            fields = _decode(event)
            if fields is None:
                return broken(
                    expected_index,
                    "it is not an audit entry (not canonical JSON with chain, entry, hash, "
                    "index and prev)",
                )
            if fields["chain"] != self.stream:
                return broken(
                    expected_index, f"it belongs to the chain {fields['chain']!r}, not this one"
                )
            if fields["index"] != expected_index:
                return broken(
                    expected_index,
                    f"it says it is entry {fields['index']}: entries were removed or reordered",
                )
            if fields["prev"] != prev:
                return broken(
                    expected_index,
                    "it does not follow the entry before it (its previous hash differs): an "
                    "entry before it was removed, replaced or reordered, or it was forged",
                )
            digest = self._digest(expected_index, prev, fields["entry"])
            if not hmac.compare_digest(digest, fields["hash"]):
                return broken(expected_index, "its hash does not match its content: it was altered")
            if (
                anchor is not None
                and anchor.index == expected_index
                and not hmac.compare_digest(anchor.hash, digest)
            ):
                return broken(
                    expected_index,
                    "its hash differs from the anchor kept for it: the log was rewritten",
                )
            prev = digest
            last = AuditAnchor(expected_index, digest)
            expected_index += 1
        if anchor is not None and anchor.index >= expected_index:
            return broken(
                expected_index,
                f"it is missing, yet the anchor kept says the log reached entry {anchor.index}: "
                "entries were cut off the end",
            )
        return AuditVerification(True, expected_index, None, None, last, self.stream)

    def check(self, *, anchor: AuditAnchor | None = None) -> AuditAnchor | None:
        """``verify``, raising ``AuditChainError`` when the chain is broken; returns the head.

        >>> from buttress import EventStore
        >>> AuditLog(EventStore()).check() is None
        True
        """
        result = self.verify(anchor=anchor)
        result.raise_if_broken()
        return result.head

    # -- internals -------------------------------------------------------------------------

    def _digest(self, index: int, prev: str, entry: Any) -> str:
        message = (
            _DOMAIN
            + bytes.fromhex(prev)
            + _encode({"chain": self.stream, "entry": entry, "index": index, "prev": prev})
        )
        if self._key is not None:
            return hmac.new(self._key, message, hashlib.sha256).hexdigest()
        return hashlib.sha256(message).hexdigest()

    def _events(self, from_index: int) -> Iterator[RecordedEvent]:
        start = from_index
        while True:
            page = self.store.read_stream(self.stream, start, limit=_PAGE)
            yield from page
            if len(page) < _PAGE:
                return
            start = page[-1].version + 1

    def _read_head(self) -> AuditAnchor | None:
        newest = self.store.read_stream(self.stream, backwards=True, limit=1)
        if not newest:
            return None
        fields = _decode(newest[0])
        if fields is None:
            raise AuditChainError(
                self.stream,
                newest[0].version,
                "the newest entry is not an audit entry, so no entry can be chained after it; "
                "verify() the log and restore it from a backup",
            )
        return AuditAnchor(newest[0].version, fields["hash"])


def _decode(event: RecordedEvent) -> dict[str, Any] | None:
    try:
        fields = json.loads(event.data)
    except ValueError:
        return None
    if (
        not isinstance(fields, dict)
        or set(fields) != {"chain", "entry", "hash", "index", "prev"}
        or not isinstance(fields["entry"], dict)
        or not isinstance(fields["index"], int)
        or not all(isinstance(fields[name], str) for name in ("chain", "hash", "prev"))
        or len(fields["prev"]) != 64
    ):
        return None
    try:
        bytes.fromhex(fields["prev"])
        if canonical_json(fields) != event.data:
            return None
    except (TypeError, ValueError):
        return None
    return fields


def _timestamp(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")
