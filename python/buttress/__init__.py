"""buttress: production-grade distributed-systems patterns for Python, with Rust hot paths.

>>> import buttress
>>> breaker = buttress.CircuitBreaker("search", failure_threshold=5)
>>> breaker.call(sum, [1, 2, 3])
6
"""

from buttress import _core
from buttress._core import ManualClock
from buttress.errors import (
    BulkheadFullError,
    ButtressError,
    CircuitOpenError,
    DuplicateEventError,
    EmptyRingError,
    EventStoreClosedError,
    EventStoreError,
    EventStoreFailedError,
    NoHealthyBackendError,
    PoolClosedError,
    PoolError,
    PoolFullError,
    PoolTimeoutError,
    QuorumNotReachedError,
    RebalanceError,
    ShardingError,
    ShardUnavailableError,
    StoreCorruptedError,
    StoreLockedError,
    WrongExpectedVersionError,
)
from buttress.events import AppendResult, EventStore, NewEvent, RecordedEvent, Subscription
from buttress.lazy import AsyncLazy, AsyncLazyCollection, Lazy, LazyCollection, lazy_property
from buttress.pool import ConnectionPool, PoolLease, PoolStats
from buttress.resilience import (
    BreakerMetrics,
    Bulkhead,
    BulkheadRegistry,
    BulkheadStats,
    CircuitBreaker,
    CircuitPermit,
    CircuitState,
)
from buttress.routing import (
    HashRing,
    LoadBalancer,
    RebalancePlan,
    ShardedStore,
    ShardMove,
    ShardPlan,
    rebalance_plan,
)

__version__: str = _core.__version__

__all__ = [
    "AppendResult",
    "AsyncLazy",
    "AsyncLazyCollection",
    "BreakerMetrics",
    "Bulkhead",
    "BulkheadFullError",
    "BulkheadRegistry",
    "BulkheadStats",
    "ButtressError",
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitPermit",
    "CircuitState",
    "ConnectionPool",
    "DuplicateEventError",
    "EmptyRingError",
    "EventStore",
    "EventStoreClosedError",
    "EventStoreError",
    "EventStoreFailedError",
    "HashRing",
    "Lazy",
    "LazyCollection",
    "LoadBalancer",
    "ManualClock",
    "NewEvent",
    "NoHealthyBackendError",
    "PoolClosedError",
    "PoolError",
    "PoolFullError",
    "PoolLease",
    "PoolStats",
    "PoolTimeoutError",
    "QuorumNotReachedError",
    "RebalanceError",
    "RebalancePlan",
    "RecordedEvent",
    "ShardMove",
    "ShardPlan",
    "ShardUnavailableError",
    "ShardedStore",
    "ShardingError",
    "StoreCorruptedError",
    "StoreLockedError",
    "Subscription",
    "WrongExpectedVersionError",
    "__version__",
    "lazy_property",
    "rebalance_plan",
]
