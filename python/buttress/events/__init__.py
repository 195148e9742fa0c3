"""Event sourcing and CQRS: the event store (Rust core) with its durable log and catch-up
subscriptions, aggregates and their repository, command and query buses, and projections."""

from __future__ import annotations

from buttress.events.aggregate import Aggregate, Event, Repository, applies
from buttress.events.cqrs import (
    CommandBus,
    LoggingMiddleware,
    Middleware,
    QueryBus,
    RetryOnConflict,
    ValidationMiddleware,
)
from buttress.events.projection import Projection, ProjectionRunner
from buttress.events.store import (
    AppendResult,
    EventStore,
    ExpectedVersion,
    NewEvent,
    RecordedEvent,
    Snapshot,
    Subscription,
)

__all__ = [
    "Aggregate",
    "AppendResult",
    "CommandBus",
    "Event",
    "EventStore",
    "ExpectedVersion",
    "LoggingMiddleware",
    "Middleware",
    "NewEvent",
    "Projection",
    "ProjectionRunner",
    "QueryBus",
    "RecordedEvent",
    "Repository",
    "RetryOnConflict",
    "Snapshot",
    "Subscription",
    "ValidationMiddleware",
    "applies",
]
