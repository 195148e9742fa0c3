"""Helpers shared by the test modules."""

from __future__ import annotations

from typing import Any

from buttress import Bulkhead, CircuitBreaker, ManualClock


def make_breaker(clock: ManualClock, **options: Any) -> CircuitBreaker:
    """A breaker on `clock` that trips on the first failure and waits 10 s, unless told else."""
    options.setdefault("failure_threshold", 1)
    options.setdefault("reset_timeout", 10.0)
    return CircuitBreaker("svc", clock=clock, **options)


def bulkhead_stats(bulkhead: Bulkhead) -> tuple[int, int, int, int, int, int]:
    """Every field of `bulkhead.stats()`, to compare snapshots in one assertion."""
    stats = bulkhead.stats()
    return (
        stats.active,
        stats.waiting,
        stats.max_observed,
        stats.accepted,
        stats.rejected,
        stats.timed_out,
    )
