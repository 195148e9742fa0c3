"""The one exception hierarchy of buttress; the Rust core raises these through one mapping."""

from __future__ import annotations

__all__ = [
    "AggregateNotFoundError",
    "AuditChainError",
    "AuditWriteError",
    "BulkheadFullError",
    "ButtressError",
    "CircuitOpenError",
    "DuplicateEventError",
    "EmptyRingError",
    "EventStoreClosedError",
    "EventStoreError",
    "EventStoreFailedError",
    "FieldDecryptionError",
    "InvalidTokenError",
    "KeySetUnavailableError",
    "NoHandlerError",
    "NoHealthyBackendError",
    "OAuthError",
    "PoolClosedError",
    "PoolError",
    "PoolFullError",
    "PoolTimeoutError",
    "QuorumNotReachedError",
    "RebalanceError",
    "SecurityError",
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


class SecurityError(ButtressError):
    """Base class of the errors the security package (tokens, zero trust) raises."""


class InvalidTokenError(SecurityError):
    """A bearer token was refused: malformed, badly signed, expired, or not meant for us.

    Raised as ``InvalidTokenError(reason, description)``. ``reason`` is a short code
    (``malformed``, ``algorithm_not_allowed``, ``wrong_token_type``, ``unknown_key``,
    ``key_mismatch``, ``bad_signature``, ``expired``, ``not_yet_valid``, ``issued_in_future``,
    ``wrong_issuer``, ``wrong_audience``, ``missing_claim``, ``invalid_claim``, ``revoked``);
    ``error`` is RFC 6750's ``invalid_token`` for the ``WWW-Authenticate`` header of the 401
    response; ``description`` says what was wrong in a sentence safe to send to the client.

    >>> error = InvalidTokenError("expired", "The token has expired.")
    >>> error.error, error.reason, str(error)
    ('invalid_token', 'expired', 'The token has expired.')
    """

    @property
    def reason(self) -> str:
        """Why the token was refused, as a short code."""
        return str(self.args[0])

    @property
    def description(self) -> str:
        """What was wrong, as a sentence."""
        return str(self.args[1])

    @property
    def error(self) -> str:
        """The RFC 6750 error code: always ``invalid_token``."""
        return "invalid_token"

    def __str__(self) -> str:
        return self.description


class KeySetUnavailableError(SecurityError):
    """The issuer's key set (JWKS) could not be fetched, so no token can be checked; answer
    503 rather than 401, the token may well be good.

    Raised as ``KeySetUnavailableError(url, detail)``.

    >>> error = KeySetUnavailableError("https://issuer.example/jwks", "it answered HTTP 500")
    >>> str(error)
    'The key set at https://issuer.example/jwks could not be fetched: it answered HTTP 500. ...'
    """

    @property
    def url(self) -> str:
        """The JWKS URL."""
        return str(self.args[0])

    def __str__(self) -> str:
        return (
            f"The key set at {self.url} could not be fetched: {self.args[1]}. Check that the "
            "issuer is up and the URL is right; the fetch is retried later."
        )


class FieldDecryptionError(SecurityError):
    """An encrypted field could not be decrypted.

    Raised as ``FieldDecryptionError(reason, description)``; ``reason`` is ``malformed``,
    ``unsupported_version``, ``unknown_key`` or ``authentication_failed`` (the value was
    altered, or was made for another record or field).

    >>> str(FieldDecryptionError("unknown_key", "The key 'k0' is not in the keyring."))
    "The key 'k0' is not in the keyring."
    """

    @property
    def reason(self) -> str:
        """Why decryption failed, as a short code."""
        return str(self.args[0])

    def __str__(self) -> str:
        return str(self.args[1])


class AuditChainError(SecurityError):
    """An audit log's hash chain is broken: an entry was altered, removed or reordered.

    Raised as ``AuditChainError(stream, index, problem)``; ``index`` is the first entry (its
    version in the stream) that does not check out.

    >>> str(AuditChainError("audit", 3, "its hash does not match its content"))
    "The audit log 'audit' is broken at entry 3: its hash does not match its content."
    """

    @property
    def stream(self) -> str:
        """The audit log's stream."""
        return str(self.args[0])

    @property
    def index(self) -> int:
        """The first entry that does not check out."""
        return int(self.args[1])

    @property
    def problem(self) -> str:
        """What is wrong with it."""
        return str(self.args[2])

    def __str__(self) -> str:
        return f"The audit log '{self.stream}' is broken at entry {self.index}: {self.problem}."


class AuditWriteError(SecurityError):
    """An audit entry could not be appended: other writers kept winning the race for the
    chain's head for longer than the writer may wait.

    Raised as ``AuditWriteError(stream, attempts)``.
    """

    def __str__(self) -> str:
        return (
            f"The audit entry could not be appended to '{self.args[0]}' after {self.args[1]} "
            "attempts: other writers kept appending first. Retry, or give the log a longer "
            "append_timeout."
        )


class OAuthError(SecurityError):
    """An OAuth 2.0 request was refused with one of the error codes of RFC 6749 (or RFC 6750).

    Raised by the Python API of ``buttress.security.oauth`` as
    ``OAuthError(error, description, status_code, redirect_to)``: ``error`` is the RFC code
    (``"invalid_grant"``, ``"invalid_client"``, ...), ``status_code`` the HTTP status the same
    refusal gets over HTTP, and ``redirect_to`` the URL an authorization error is delivered to
    (None when it must not be redirected).

    >>> error = OAuthError("invalid_grant", "The authorization code was already used.", 400, None)
    >>> error.error, str(error)
    ('invalid_grant', 'invalid_grant: The authorization code was already used.')
    """

    @property
    def error(self) -> str:
        """The RFC 6749 error code, e.g. ``"invalid_grant"``."""
        return str(self.args[0])

    @property
    def description(self) -> str:
        """What was wrong, in a sentence."""
        return str(self.args[1])

    @property
    def status_code(self) -> int:
        """The HTTP status the same refusal gets from the HTTP endpoint."""
        return int(self.args[2])

    @property
    def redirect_to(self) -> str | None:
        """Where an authorization error is sent back to the client, or None."""
        return None if self.args[3] is None else str(self.args[3])

    def __str__(self) -> str:
        return f"{self.error}: {self.description}"
