"""Event sourcing: the event store (Rust core) with durable log and catch-up subscriptions."""

from __future__ import annotations

from buttress.events.store import (
    AppendResult,
    EventStore,
    ExpectedVersion,
    NewEvent,
    RecordedEvent,
    Subscription,
)

__all__ = [
    "AppendResult",
    "EventStore",
    "ExpectedVersion",
    "NewEvent",
    "RecordedEvent",
    "Subscription",
]
