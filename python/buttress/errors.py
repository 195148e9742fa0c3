"""The one exception hierarchy of buttress; the Rust core raises these through one mapping."""

from __future__ import annotations

__all__ = [
    "AggregateNotFoundError",
    "BulkheadFullError",
    "ButtressError",
    "CircuitOpenError",
    "DuplicateEventError",
    "EmptyRingError",
    "EventStoreClosedError",
    "EventStoreError",
    "EventStoreFailedError",
    "NoHandlerError",
    "NoHealthyBackendError",
    "PoolClosedError",
    "PoolError",
    "PoolFullError",
    "PoolTimeoutError",
    "QuorumNotReachedError",
    "RebalanceError",
    "ShardUnavailableError",
    "ShardingError",
    "StoreCorruptedError",
    "StoreLockedError",
    "WriteQueueFullError",
    "WrongExpectedVersionError",
]


class ButtressError(Exception):
    """Base class of every error buttress raises on purpose."""


class CircuitOpenError(ButtressError):
    """A circuit breaker refused the call.

    Raised as ``CircuitOpenError(name, retry_after)``: ``name`` is the breaker's name,
    ``retry_after`` the seconds until it admits a trial call (``0.0`` when it is half-open and
    every trial slot is taken, ``None`` while it is forced open).

    >>> error = CircuitOpenError("payments", 2.5)
    >>> str(error)
    "Circuit breaker 'payments' is open; retry in 2.500 seconds."
    """

    # Built as ``CircuitOpenError(name, retry_after)``. No ``__init__`` of its own: the
    # arguments stay in ``args``, so raising costs no Python frame and pickling rebuilds it.

    @property
    def name(self) -> str:
        """The name of the breaker that refused the call."""
        return str(self.args[0])

    @property
    def retry_after(self) -> float | None:
        """Seconds until the breaker admits a trial call; None while it is forced open."""
        value = self.args[1]
        return None if value is None else float(value)

    def __str__(self) -> str:
        if self.retry_after is None:
            return (
                f"Circuit breaker '{self.name}' is forced open; "
                "it admits no call until it is reset."
            )
        if self.retry_after == 0.0:
            return (
                f"Circuit breaker '{self.name}' is half-open and every trial call slot is "
                "taken; retry once a trial call has finished."
            )
        return f"Circuit breaker '{self.name}' is open; retry in {self.retry_after:.3f} seconds."


class BulkheadFullError(ButtressError):
    """A bulkhead had no permit to give within its limits.

    Raised as ``BulkheadFullError(name, max_concurrent, reason)``: ``reason`` is ``"full"`` when
    every permit was taken and the caller could not wait, or ``"timeout"`` when it waited the
    longest it was allowed.
    """

    # Built as ``BulkheadFullError(name, max_concurrent, reason)``, arguments kept in ``args``.

    @property
    def name(self) -> str:
        """The name of the bulkhead that had no permit."""
        return str(self.args[0])

    @property
    def max_concurrent(self) -> int:
        """How many calls the bulkhead admits at once."""
        return int(self.args[1])

    @property
    def reason(self) -> str:
        """``"full"`` (could not wait) or ``"timeout"`` (waited the longest allowed)."""
        return str(self.args[2])

    def __str__(self) -> str:
        if self.reason == "timeout":
            return (
                f"Bulkhead '{self.name}' is full: all {self.max_concurrent} permits stayed "
                "taken for the longest wait allowed."
            )
        return (
            f"Bulkhead '{self.name}' is full: all {self.max_concurrent} permits are taken "
            "and no more callers may wait."
        )


class PoolError(ButtressError):
    """A connection pool could not lend a connection; ``name`` is the pool's name."""

    @property
    def name(self) -> str:
        """The name of the pool."""
        return str(self.args[0])


class PoolTimeoutError(PoolError):
    """No connection came within the caller's timeout.

    Raised as ``PoolTimeoutError(name, timeout)``; ``timeout`` is the wait in seconds.

    >>> str(PoolTimeoutError("db", 2.0)).split(";")[0]
    "Pool 'db' lent no connection within 2.000 seconds"
    """

    @property
    def timeout(self) -> float:
        """How long the caller waited, in seconds."""
        return float(self.args[1])

    def __str__(self) -> str:
        if self.timeout == 0.0:
            return (
                f"Pool '{self.name}' had no free connection and the caller could not wait. "
                "Pass a timeout to wait for one."
            )
        return (
            f"Pool '{self.name}' lent no connection within {self.timeout:.3f} seconds; every "
            "connection stayed in use. Raise max_size, return connections sooner, or wait longer."
        )


class PoolFullError(PoolError):
    """Too many callers were already waiting for a connection.

    Raised as ``PoolFullError(name, max_waiting)``.
    """

    @property
    def max_waiting(self) -> int:
        """How many callers may wait at once."""
        return int(self.args[1])

    def __str__(self) -> str:
        return (
            f"Pool '{self.name}' already has {self.max_waiting} callers waiting for a "
            "connection, the most it allows (max_waiting); try again later."
        )


class PoolClosedError(PoolError):
    """The pool was closed before or while the caller waited.

    Raised as ``PoolClosedError(name)``.
    """

    def __str__(self) -> str:
        return f"Pool '{self.name}' is closed; it lends no more connections."


class EmptyRingError(ButtressError, LookupError):
    """A hash ring with no nodes was asked where a key goes."""


class NoHealthyBackendError(ButtressError):
    """A load balancer had no backend left to route to: all unhealthy or ejected.

    Raised as ``NoHealthyBackendError(name, backends)``.
    """

    @property
    def name(self) -> str:
        """The balancer's name."""
        return str(self.args[0])

    @property
    def backends(self) -> int:
        """How many backends the balancer has (none of them available)."""
        return int(self.args[1])

    def __str__(self) -> str:
        return (
            f"Load balancer '{self.name}' has no available backend: all {self.backends} are "
            "unhealthy or ejected. Fix them, wait for their ejection to end, or set "
            "panic_threshold to route to them anyway."
        )


class ShardingError(ButtressError):
    """Base class of the errors a ``ShardedStore`` raises."""


class ShardUnavailableError(ShardingError):
    """No node that holds a shard could answer (or none could without going back on the
    caller's own recent write).

    Raised as ``ShardUnavailableError(shard, nodes, reason)``; the last failure is chained as
    ``__cause__``.
    """

    @property
    def shard(self) -> int:
        """The logical shard."""
        return int(self.args[0])

    @property
    def nodes(self) -> tuple[str, ...]:
        """The nodes that were tried, in order."""
        return tuple(self.args[1])

    @property
    def reason(self) -> str:
        """Why none of them would do."""
        return str(self.args[2])

    def __str__(self) -> str:
        tried = ", ".join(f"'{node}'" for node in self.nodes)
        return f"Shard {self.shard} is unavailable: {self.reason} (tried {tried})."


class QuorumNotReachedError(ShardingError):
    """A write reached the primary but fewer nodes than the write quorum acknowledged it.

    The write is NOT lost: it is durable on the primary, which also holds a record of every
    replica still owed it, and the store's replicator keeps retrying those. Raised as
    ``QuorumNotReachedError(key, acknowledged, quorum, failed)``.
    """

    @property
    def key(self) -> str:
        """The key written."""
        return str(self.args[0])

    @property
    def acknowledged(self) -> int:
        """How many nodes, the primary included, have the write."""
        return int(self.args[1])

    @property
    def quorum(self) -> int:
        """How many were needed."""
        return int(self.args[2])

    @property
    def failed(self) -> tuple[str, ...]:
        """The replicas that did not acknowledge it; the replicator retries them."""
        return tuple(self.args[3])

    def __str__(self) -> str:
        failed = ", ".join(f"'{node}'" for node in self.failed)
        return (
            f"The write of key {self.key!r} reached {self.acknowledged} of the {self.quorum} "
            f"nodes its quorum needs ({failed} failed). It is durable on the primary and "
            "queued for the failed replicas, which the replicator keeps retrying."
        )


class RebalanceError(ShardingError):
    """A rebalance could not be carried out; the shards it had not switched keep their old
    nodes, so no data is lost or hidden."""


class EventStoreError(ButtressError):
    """Base class of the errors an ``EventStore`` raises."""


class WrongExpectedVersionError(EventStoreError):
    """An append's expected version did not match its stream: someone else wrote first.

    Raised as ``WrongExpectedVersionError(stream, expected, actual)``.
    """

    @property
    def stream(self) -> str:
        """The stream appended to."""
        return str(self.args[0])

    @property
    def expected(self) -> str:
        """What the append expected: a version, 'no_stream', 'stream_exists' or 'any'."""
        return str(self.args[1])

    @property
    def actual(self) -> int | None:
        """The version of the stream's last event, or None when the stream has none."""
        return None if self.args[2] is None else int(self.args[2])

    def __str__(self) -> str:
        actual = "it has no events" if self.actual is None else f"it is at version {self.actual}"
        expected = {
            "no_stream": "to have no events",
            "stream_exists": "to exist",
            "any": "at any version",
        }.get(self.expected, f"at version {self.expected}")
        return (
            f"Stream '{self.stream}' was expected {expected}, but {actual}. Another writer "
            "got there first: reload the stream and decide again (or retry the command)."
        )


class DuplicateEventError(EventStoreError):
    """An append reused event ids, but not as an exact retry of the append that stored them.

    Raised as ``DuplicateEventError(event_id, message)``.
    """

    @property
    def event_id(self) -> str:
        """The first id at fault, as a UUID string."""
        return str(self.args[0])

    def __str__(self) -> str:
        return f"{self.args[1]} (event id {self.event_id})"


class StoreCorruptedError(EventStoreError):
    """A log file holds a damaged record that is not a torn tail; the store refuses to open
    rather than skip it.

    Raised as ``StoreCorruptedError(path, offset, reason)``.
    """

    @property
    def path(self) -> str:
        """The damaged file."""
        return str(self.args[0])

    @property
    def offset(self) -> int:
        """The byte offset of the damaged record."""
        return int(self.args[1])

    def __str__(self) -> str:
        return (
            f"The event log file {self.path} is damaged at byte {self.offset}: {self.args[2]}. "
            "Restore it from a backup or a replica; nothing after this point was read."
        )


class StoreLockedError(EventStoreError):
    """Another process (or store object) has the log directory open for writing.

    Raised as ``StoreLockedError(lock_path)``.
    """

    def __str__(self) -> str:
        return (
            f"The event log is locked by another writer ({self.args[0]}); one process writes "
            "a log directory at a time. Close the other store first."
        )


class EventStoreFailedError(EventStoreError):
    """A write to the log failed; the store takes no more appends until it is reopened."""


class EventStoreClosedError(EventStoreError):
    """The event store was closed."""

    def __str__(self) -> str:
        return "The event store is closed."


class AggregateNotFoundError(ButtressError, KeyError):
    """No events (and no snapshot) exist for the aggregate asked for.

    Raised as ``AggregateNotFoundError(aggregate_id, stream)``.
    """

    def __str__(self) -> str:
        return f"No aggregate with id {self.args[0]!r} was found in stream {self.args[1]!r}."


class NoHandlerError(ButtressError, LookupError):
    """A command or query bus was given a message of a type no handler is registered for.

    Raised as ``NoHandlerError(bus_kind, message_type_name)``.
    """

    def __str__(self) -> str:
        return (
            f"The {self.args[0]} has no handler for {self.args[1]}; register one with "
            "register() or the handles() decorator."
        )


class WriteQueueFullError(ButtressError):
    """A write-behind queue had no room for another key (and the caller would not wait, or
    waited as long as it was allowed to).

    Raised as ``WriteQueueFullError(capacity)``.
    """

    @property
    def capacity(self) -> int:
        """How many writes the queue holds at most."""
        return int(self.args[0])

    def __str__(self) -> str:
        return (
            f"The write-behind queue is full ({self.capacity} writes waiting or in flight). "
            "Let the flusher catch up, raise max_pending, or use on_full='block' with a timeout."
        )
