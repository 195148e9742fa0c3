"""Types of the Rust extension module; `python -m mypy.stubtest buttress._core` keeps them true."""

from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from os import PathLike
from pathlib import Path
from types import GenericAlias, TracebackType
from typing import Any, ClassVar, Final, Generic, Literal, TypeAlias, TypeVar, final
from uuid import UUID

from typing_extensions import Self, disjoint_base

from buttress.resilience._state import CircuitState

_CacheKey: TypeAlias = str | bytes | int | float | bool | tuple[Any, ...] | None

__all__ = [
    "AppendResult",
    "BreakerFunction",
    "BreakerMetrics",
    "Bulkhead",
    "BulkheadStats",
    "BulkheadWaiter",
    "CachedWriter",
    "CircuitBreaker",
    "CircuitPermit",
    "ConnectionPool",
    "EventStore",
    "HashRing",
    "LocalCache",
    "ManualClock",
    "NewEvent",
    "PoolLease",
    "PoolStats",
    "PoolWaiter",
    "RecordedEvent",
    "WriteQueue",
    "__version__",
]

__version__: Final[str]

_C = TypeVar("_C")

@final
class ManualClock:
    """A clock that moves only when told to: pass it as `clock=` so tests never sleep."""

    def __new__(cls, start: float = 0.0) -> ManualClock: ...
    def now(self) -> float:
        """The clock's reading in seconds."""
    def advance(self, seconds: float) -> None:
        """Moves the clock forward by `seconds`."""
    def set(self, seconds: float) -> None:
        """Moves the clock to `seconds`; an earlier time than now raises ValueError."""

@disjoint_base
class CircuitBreaker:
    """A circuit breaker: stops calling a failing dependency, then lets trial calls test it."""

    def __new__(
        cls,
        name: str = "default",
        *,
        failure_threshold: int | None = 5,
        failure_rate_threshold: float | None = None,
        slow_call_rate_threshold: float | None = None,
        slow_call_duration: float = 60.0,
        window_type: str = "count",
        window_size: int = 100,
        minimum_calls: int = 10,
        reset_timeout: float = 30.0,
        backoff_multiplier: float = 1.0,
        max_reset_timeout: float | None = None,
        jitter: float = 0.0,
        half_open_max_calls: int = 1,
        success_threshold: int = 1,
        record_exceptions: type[BaseException] | tuple[type[BaseException], ...] | None = None,
        ignore_exceptions: type[BaseException] | tuple[type[BaseException], ...] | None = None,
        result_is_failure: Callable[[Any], object] | None = None,
        fallback: Callable[..., Any] | None = None,
        clock: ManualClock | None = None,
    ) -> CircuitBreaker: ...
    @property
    def name(self) -> str:
        """The breaker's name, carried by `CircuitOpenError`."""
    @property
    def state(self) -> CircuitState:
        """The current state; an open breaker whose wait is over reads as half-open."""
    @property
    def retry_after(self) -> float | None:
        """Seconds until an open breaker admits a trial call; None while forced open."""
    @property
    def fallback(self) -> Callable[..., Any] | None:
        """What a refused call returns instead of raising, or None."""
    @property
    def clock(self) -> ManualClock | None:
        """The manual clock this breaker reads, or None for the monotonic clock."""
    def call(self, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Calls `func(*args, **kwargs)` through the breaker and records how it ended."""
    def try_acquire(self) -> CircuitPermit | None:
        """Admits a call without raising: a permit to record the outcome on, or None."""
    def acquire(self) -> CircuitPermit:
        """Admits a call or raises `CircuitOpenError`."""
    def __enter__(self) -> None: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
        /,
    ) -> bool: ...
    def force_open(self) -> None:
        """Forces the breaker open: every call is refused until `reset()`."""
    def disable(self) -> None:
        """Disables the breaker: every call is admitted and nothing is counted until `reset()`."""
    def reset(self) -> None:
        """Closes the breaker and starts a fresh window, whatever its state."""
    def add_listener(self, listener: Callable[[Any, CircuitState, CircuitState], object]) -> None:
        """Calls `listener(breaker, old_state, new_state)` after every transition."""
    def remove_listener(
        self, listener: Callable[[Any, CircuitState, CircuitState], object]
    ) -> None:
        """Stops calling `listener`; raises ValueError when it was not added."""
    def metrics(self) -> BreakerMetrics:
        """A snapshot of the state, the window's rates and the lifetime counts."""

@final
class CircuitPermit:
    """One admitted call's ticket: record its outcome exactly once."""

    def success(self) -> None:
        """Records a success."""
    def failure(self) -> None:
        """Records a failure."""
    def ignore(self) -> None:
        """Releases the permit without counting the call either way."""
    def record_exception(self, error: BaseException) -> None:
        """Records `error` as the breaker classifies it."""
    def record_result(self, value: object) -> None:
        """Records a returned value, asking the breaker's `result_is_failure` when it has one."""
    @property
    def recorded(self) -> bool:
        """True once an outcome was recorded."""
    def __enter__(self) -> CircuitPermit: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
        /,
    ) -> bool: ...

@final
class BreakerFunction:
    """A function wrapped by `@breaker`: each call goes through the breaker, all in Rust."""

    def __new__(cls, breaker: CircuitBreaker, func: Callable[..., Any]) -> BreakerFunction: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
    def __get__(self, instance: object, owner: type | None = None, /) -> Any: ...
    @property
    def breaker(self) -> CircuitBreaker:
        """The breaker this function calls through."""

@final
class BreakerMetrics:
    """A snapshot of a breaker: state, window rates and lifetime counts."""

    @property
    def state(self) -> CircuitState: ...
    @property
    def failure_rate(self) -> float | None: ...
    @property
    def slow_call_rate(self) -> float | None: ...
    @property
    def window_calls(self) -> int: ...
    @property
    def window_failures(self) -> int: ...
    @property
    def window_slow_calls(self) -> int: ...
    @property
    def calls(self) -> int: ...
    @property
    def successes(self) -> int: ...
    @property
    def failures(self) -> int: ...
    @property
    def slow_calls(self) -> int: ...
    @property
    def ignored(self) -> int: ...
    @property
    def rejected(self) -> int: ...
    @property
    def transitions(self) -> int: ...
    @property
    def consecutive_failures(self) -> int: ...
    @property
    def consecutive_trips(self) -> int: ...

@disjoint_base
class Bulkhead:
    """A partition that admits at most `max_concurrent` calls at once."""

    def __new__(
        cls,
        name: str = "default",
        *,
        max_concurrent: int = 25,
        max_waiting: int = 100,
        max_wait: float | None = 0.0,
    ) -> Bulkhead: ...
    @property
    def name(self) -> str: ...
    @property
    def max_concurrent(self) -> int: ...
    @property
    def max_waiting(self) -> int: ...
    @property
    def max_wait(self) -> float | None:
        """The default longest wait in seconds; None waits as long as it takes."""
    def try_acquire(self) -> bool:
        """Takes a permit if one is free now; never waits."""
    def acquire(self, timeout: float | None = None) -> None:
        """Takes a permit, waiting up to `timeout` seconds (default: `max_wait`)."""
    def release(self) -> None:
        """Gives a permit back (to the longest waiter, if any)."""
    def call(self, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Calls `func(*args, **kwargs)` holding a permit, returned however the call ends."""
    def __enter__(self) -> None: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
        /,
    ) -> bool: ...
    def _enqueue(
        self, wake: Callable[[], object], timeout: float | None = None
    ) -> BulkheadWaiter | None: ...
    def _abandon(self, waiter: BulkheadWaiter, timed_out: bool) -> bool: ...
    def stats(self) -> BulkheadStats:
        """A snapshot of active and waiting calls and lifetime counts."""

@final
class BulkheadWaiter:
    """A queued asyncio caller of a bulkhead."""

    @property
    def granted(self) -> bool: ...

@final
class BulkheadStats:
    """A snapshot of a bulkhead's load."""

    @property
    def active(self) -> int: ...
    @property
    def waiting(self) -> int: ...
    @property
    def max_observed(self) -> int: ...
    @property
    def accepted(self) -> int: ...
    @property
    def rejected(self) -> int: ...
    @property
    def timed_out(self) -> int: ...

@disjoint_base
class ConnectionPool(Generic[_C]):
    """A pool of connections made by `create`, generic over what it makes."""

    def __new__(
        cls,
        create: Callable[[], _C],
        *,
        close: Callable[[_C], object] | None = None,
        check: Callable[[_C], object] | None = None,
        reset: Callable[[_C], object] | None = None,
        is_broken: Callable[[_C, BaseException], object] | None = None,
        name: str = "pool",
        min_size: int = 0,
        max_size: int = 10,
        timeout: float | None = 30.0,
        max_waiting: int = 0,
        max_lifetime: float | None = None,
        lifetime_jitter: float = 0.1,
        max_idle: float | None = None,
        check_interval: float = 0.5,
        leak_threshold: float | None = None,
        clock: ManualClock | None = None,
    ) -> ConnectionPool[_C]: ...
    def __class_getitem__(cls, key: Any) -> GenericAlias: ...
    def acquire(self, timeout: float | None = None) -> _C:
        """Checks out a connection, waiting up to `timeout` seconds (default: the pool's)."""
    def release(self, conn: _C, *, broken: bool = False) -> None:
        """Returns a connection taken with `acquire`; `broken=True` closes it instead."""
    def connection(self, timeout: float | None = None) -> PoolLease[_C]:
        """A context manager that checks out a connection and always returns it."""
    def _enqueue(
        self, wake: Callable[[], object], may_wait: bool
    ) -> tuple[_C, int] | PoolWaiter: ...
    def _claim(self, waiter: PoolWaiter) -> tuple[_C, int]: ...
    def _leave(self, waiter: PoolWaiter, timed_out: bool) -> bool: ...
    def _give_back(
        self, conn: _C, lease: int, *, broken: bool = False, suspect: bool = False
    ) -> None: ...
    def _housekeep(self) -> float | None: ...
    def _wait_for_attention(self, seconds: float) -> None: ...
    def resize(self, min_size: int | None = None, max_size: int | None = None) -> None:
        """Changes the pool's sizes."""
    def close(self, timeout: float | None = 5.0) -> bool:
        """Closes the pool; returns whether every borrowed connection came back in time."""
    @property
    def closed(self) -> bool: ...
    @property
    def name(self) -> str: ...
    @property
    def min_size(self) -> int: ...
    @property
    def max_size(self) -> int: ...
    @property
    def timeout(self) -> float | None: ...
    @property
    def max_waiting(self) -> int: ...
    @property
    def leak_threshold(self) -> float | None: ...
    @property
    def _needs_housekeeping(self) -> bool: ...
    @property
    def clock(self) -> ManualClock | None: ...
    def stats(self) -> PoolStats:
        """A snapshot of the pool's sizes and lifetime counts."""
    def __enter__(self) -> ConnectionPool[_C]: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
        /,
    ) -> Literal[False]: ...

@final
class PoolLease(Generic[_C]):
    """Holds one checkout of a pool for a `with` or `async with` block."""

    def __class_getitem__(cls, key: Any) -> GenericAlias: ...
    @property
    def pool(self) -> ConnectionPool[_C]: ...
    @property
    def timeout(self) -> float | None: ...
    def __enter__(self) -> _C: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
        /,
    ) -> Literal[False]: ...
    def _hold(self, conn: _C, lease: int) -> None: ...
    def __aenter__(self) -> Awaitable[_C]: ...
    def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
        /,
    ) -> Awaitable[bool]: ...

@final
class PoolWaiter:
    """A queued asyncio caller of a pool."""

    @property
    def granted(self) -> bool: ...

@final
class PoolStats:
    """A snapshot of a connection pool."""

    @property
    def min_size(self) -> int: ...
    @property
    def max_size(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def idle(self) -> int: ...
    @property
    def in_use(self) -> int: ...
    @property
    def waiting(self) -> int: ...
    @property
    def requests(self) -> int: ...
    @property
    def created(self) -> int: ...
    @property
    def closed(self) -> int: ...
    @property
    def broken(self) -> int: ...
    @property
    def create_failures(self) -> int: ...
    @property
    def timeouts(self) -> int: ...
    @property
    def rejected(self) -> int: ...
    @property
    def waits(self) -> int: ...
    @property
    def total_wait(self) -> float: ...
    @property
    def max_wait(self) -> float: ...
    @property
    def leaks(self) -> int: ...

@final
class HashRing:
    """Consistent-hash ring that places keys exactly as libketama and uhashring's ketama mode do."""

    def __new__(
        cls,
        nodes: Iterable[str] | Mapping[str, int] | None = None,
        *,
        algorithm: str = "ketama",
        vnodes: int = 40,
        replicas: int = 4,
    ) -> HashRing: ...
    def get_node(self, key: str | bytes | int) -> str:
        """The node that owns `key` (a str, bytes or int)."""
    def get_nodes(self, key: str | bytes | int, n: int) -> list[str]:
        """The key's owner and the next `n - 1` distinct nodes clockwise."""
    def get_node_many(self, keys: Iterable[str | bytes | int]) -> list[str]:
        """The owner of every key in `keys`, in order, in one call."""
    def add_node(self, name: str, weight: int = 1) -> None:
        """Adds a node with a weight."""
    def remove_node(self, name: str) -> None:
        """Removes a node; only the keys it owned move."""
    def set_weight(self, name: str, weight: int) -> None:
        """Changes a node's weight."""
    def weight(self, name: str) -> int:
        """A node's weight."""
    @property
    def weights(self) -> dict[str, int]:
        """Every node's weight, in the order the nodes were added."""
    @property
    def points(self) -> dict[str, int]:
        """How many points each node owns on the ring."""
    def distribution(self, keys: Iterable[str | bytes | int]) -> dict[str, int]:
        """How many keys of `keys` each node owns."""
    def copy(self) -> HashRing:
        """An independent copy, to try a change before making it."""
    @property
    def algorithm(self) -> str:
        """The placement algorithm: 'ketama', 'rendezvous' or 'jump'."""
    def get_node_bounded(
        self, key: str | bytes | int, loads: Mapping[str, int], *, epsilon: float = 0.25
    ) -> str:
        """The key's node with bounded loads: no node above about `1 + epsilon` times the mean."""
    @property
    def vnodes(self) -> int:
        """Labels per node at average weight."""
    @property
    def replicas(self) -> int:
        """Points per label."""
    def __len__(self) -> int: ...
    def __contains__(self, name: object, /) -> bool: ...
    def __iter__(self) -> Iterator[str]: ...

@final
class NewEvent:
    """An event to append: a type, data and metadata (bytes), and an id (a new UUID v4 unless
    given; give your own to make a retried append idempotent)."""

    def __new__(
        cls,
        type: str,
        data: bytes | bytearray | memoryview | None = None,
        metadata: bytes | bytearray | memoryview | None = None,
        *,
        id: UUID | bytes | None = None,
    ) -> NewEvent: ...
    @property
    def id(self) -> UUID:
        """The event's id."""
    @property
    def type(self) -> str:
        """The event's type name."""
    @property
    def data(self) -> bytes:
        """The event's payload."""
    @property
    def metadata(self) -> bytes:
        """The event's metadata."""

@final
class RecordedEvent:
    """An event as stored: its stream, version in the stream, and global position too."""

    def __new__(
        cls,
        *,
        stream: str,
        version: int,
        position: int,
        type: str,
        data: bytes,
        metadata: bytes,
        id: UUID | bytes,
        timestamp: float,
    ) -> RecordedEvent: ...
    @property
    def id(self) -> UUID:
        """The event's id."""
    @property
    def type(self) -> str:
        """The event's type name."""
    @property
    def data(self) -> bytes:
        """The event's payload."""
    @property
    def metadata(self) -> bytes:
        """The event's metadata."""
    @property
    def stream(self) -> str:
        """The stream the event belongs to."""
    @property
    def version(self) -> int:
        """The event's version in its stream (the first is 0)."""
    @property
    def position(self) -> int:
        """The event's position in the store's global order (the first is 0)."""
    @property
    def timestamp(self) -> float:
        """When the event was appended, in seconds since the epoch (UTC)."""
    def __eq__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@final
class AppendResult:
    """Where an append put a stream's events: the version of its last event and that event's
    global position."""

    def __new__(cls, version: int, position: int) -> AppendResult: ...
    @property
    def version(self) -> int:
        """The stream's version after the append (the version of its last event)."""
    @property
    def position(self) -> int:
        """The global position of the stream's last appended event."""
    def __eq__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...

_Expected = int | Literal["any", "no_stream", "stream_exists"]

@disjoint_base
class EventStore:
    """Streams of events with optimistic concurrency, in memory or in a durable log."""

    def __new__(
        cls,
        path: str | PathLike[str] | None = None,
        *,
        fsync: Literal["always", "group", "never"] = "group",
        segment_size: int = 67108864,
    ) -> Self: ...
    def append(
        self,
        stream: str,
        events: NewEvent | Iterable[NewEvent],
        expected_version: _Expected | None = None,
    ) -> AppendResult:
        """Appends `events` to `stream` if it is at `expected_version`; all of them or none."""
    def append_many(
        self, appends: Iterable[tuple[str, NewEvent | Iterable[NewEvent], _Expected | None]]
    ) -> list[AppendResult]:
        """Appends to several streams atomically."""
    def read_stream(
        self,
        stream: str,
        from_version: int | None = None,
        *,
        backwards: bool = False,
        limit: int | None = None,
    ) -> list[RecordedEvent]:
        """A stream's events from `from_version`, forwards or backwards."""
    def read_all(
        self, from_position: int | None = None, *, limit: int | None = None
    ) -> list[RecordedEvent]:
        """Every stream's events in global order, from `from_position`."""
    def stream_version(self, stream: str) -> int | None:
        """The version of a stream's last event, or None when it has none."""
    def streams(self) -> list[str]:
        """The names of the streams that have events, sorted."""
    @property
    def head(self) -> int:
        """The position the next event will get: how many events the store holds."""
    @property
    def path(self) -> Path | None:
        """The log directory, or None for an in-memory store."""
    @property
    def fsync(self) -> str | None:
        """The fsync policy of a durable store, or None in memory."""
    @property
    def recovered_truncated_bytes(self) -> int:
        """Bytes of a torn last record cut from the log when it was opened."""
    def poll(
        self,
        from_position: int,
        limit: int,
        timeout: float | None,
        stream_prefix: str | None = None,
        event_types: set[str] | None = None,
    ) -> tuple[list[RecordedEvent], int]:
        """Up to `limit` matching events from `from_position`, and where to continue."""
    def _watch(self, after: int, callback: Callable[[], object]) -> None: ...
    def close(self) -> None:
        """Writes what is queued, syncs, and closes the log."""
    @property
    def closed(self) -> bool:
        """Whether the store was closed."""

@final
class LocalCache:
    """A bounded, thread-safe in-process cache with an optional expiry per entry (S3-FIFO)."""

    blocking: ClassVar[bool]
    def __new__(
        cls, max_size: int, *, ttl: float | None = None, clock: ManualClock | None = None
    ) -> LocalCache: ...
    def get(self, key: _CacheKey, default: Any = None) -> Any:
        """The value cached for `key`, or `default` when there is none (or it expired)."""
    def set(self, key: _CacheKey, value: object, ttl: float | None = None) -> None:
        """Caches `key = value` for `ttl` seconds (None: the cache's own `ttl`)."""
    def delete(self, key: _CacheKey) -> bool:
        """Drops the entry of `key`; whether a live one was there."""
    def __getitem__(self, key: _CacheKey, /) -> Any: ...
    def __setitem__(self, key: _CacheKey, value: object, /) -> None: ...
    def __delitem__(self, key: _CacheKey, /) -> None: ...
    def __contains__(self, key: object, /) -> bool: ...
    def __len__(self) -> int: ...
    def expire(self) -> int:
        """Drops every expired entry now and returns how many."""
    def clear(self) -> None:
        """Empties the cache; the counts in `stats()` stay."""
    @property
    def max_size(self) -> int:
        """The most entries the cache holds."""
    @property
    def ttl(self) -> float | None:
        """The default lifetime of an entry in seconds, or None."""
    @property
    def clock(self) -> ManualClock | None:
        """The manual clock this cache reads, or None for the monotonic clock."""
    def stats(self) -> dict[str, int]:
        """Lifetime counts and the current size."""

@final
class CachedWriter:
    """A write-behind's `set(key, value)` over a `LocalCache`: queues the write and fills the
    cache in one call."""

    def set(self, key: str | bytes | int, value: object) -> None:
        """Queues `key = value` and caches it, as `WriteQueue.put_cached` does."""

@final
class WriteQueue:
    """The bounded, coalescing queue of pending writes behind `buttress.WriteBehind`."""

    def __new__(cls, capacity: int, *, max_attempts: int = 5) -> WriteQueue: ...
    def put(
        self,
        key: str | bytes | int,
        value: object,
        *,
        block: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Queues `key = value`; a newer write of a waiting key replaces it."""
    def put_cached(
        self,
        key: str | bytes | int,
        value: object,
        cache: LocalCache,
        *,
        block: bool = False,
        timeout: float | None = None,
    ) -> None:
        """`put`, then `cache.set(key, value)` in the same call, so no other write of the key
        can come between."""
    def cached_writer(
        self, cache: LocalCache, *, block: bool = False, timeout: float | None = None
    ) -> CachedWriter:
        """`put_cached` with `cache`, `block` and `timeout` bound once."""
    def delete(
        self, key: str | bytes | int, *, block: bool = False, timeout: float | None = None
    ) -> None:
        """Queues the deletion of `key`."""
    def take(
        self, max_batch: int, timeout: float, *, linger: float = 0.0
    ) -> list[tuple[Any, Any, int, bool]]:
        """Up to `max_batch` writes as `(key, value, attempts, deleted)`, oldest first; with a
        `linger`, waits for a full batch but holds the oldest write back no longer than that."""
    def done(self, keys: Iterable[str | bytes | int]) -> int:
        """Settles writes the database has."""
    def failed(self, key: str | bytes | int) -> tuple[str, Any, bool] | None:
        """Settles a write that failed: retried, superseded, or a dead letter."""
    def read(self, key: str | bytes | int) -> tuple[Any, bool] | None:
        """The newest unsettled write of `key` as `(value, deleted)`, or None."""
    def wait_idle(self, timeout: float) -> bool:
        """Waits until no write is waiting or in flight; False after `timeout`."""
    def unsettled(self) -> list[tuple[Any, Any, bool]]:
        """Every unsettled write as `(key, value, deleted)`."""
    def close(self) -> None:
        """Refuses new writes; what is queued can still be taken and settled."""
    @property
    def closed(self) -> bool:
        """Whether `close()` was called."""
    def writes_to(self, key: str | bytes | int) -> int:
        """A count that moves whenever a write of `key` is accepted."""
    def stats(self) -> dict[str, int]:
        """The queue's counters."""
