"""Threaded and asyncio stress in bounded time: the limits hold under contention and every
permit comes back. Each test runs for well under a second of wall time and fails, rather than
hangs, if a thread does not finish."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pytest
import support
from buttress import (
    Bulkhead,
    BulkheadFullError,
    BulkheadRegistry,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    ManualClock,
)

THREADS = 8
RUN_FOR = 0.6  # seconds of hammering per test
JOIN = 10.0


class Boom(Exception):
    """The failure the stressed functions raise."""


def run_threads(worker: Callable[[int], None], count: int = THREADS) -> None:
    """Runs `worker(index)` on `count` threads for about RUN_FOR seconds; fails on a hang."""
    support.run_threads(worker, count, RUN_FOR + JOIN)


def raise_boom() -> None:
    raise Boom


class Peak:
    """Counts the callers inside a section and remembers the most at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.inside = 0
        self.peak = 0
        self.entries = 0

    @contextmanager
    def section(self) -> Iterator[None]:
        with self._lock:
            self.inside += 1
            self.entries += 1
            self.peak = max(self.peak, self.inside)
        try:
            yield
        finally:
            with self._lock:
                self.inside -= 1


# ---- half-open admission -----------------------------------------------------------------


def half_open_breaker(clock: ManualClock) -> CircuitBreaker:
    breaker = CircuitBreaker(
        "stress",
        failure_threshold=1,
        reset_timeout=1.0,
        half_open_max_calls=2,
        success_threshold=65535,
        clock=clock,
    )
    breaker.acquire().failure()
    clock.advance(1.0)
    assert breaker.state is CircuitState.HALF_OPEN
    return breaker


def test_failing_trials_never_exceed_half_open_max_calls() -> None:
    clock = ManualClock()
    breaker = half_open_breaker(clock)
    stop_at = time.monotonic() + RUN_FOR
    peak = Peak()
    counts = {"failed": 0, "refused": 0}
    counts_lock = threading.Lock()
    done = threading.Event()

    def trial() -> None:
        with peak.section():
            time.sleep(0.001)
        raise Boom

    def worker(index: int) -> None:
        # The driver moves the clock on as soon as the breaker is open, while trial calls of
        # the period that just ended may still be running: they keep their slots.
        if index == 0:
            reopened = 0
            while time.monotonic() < stop_at:
                if breaker.state is CircuitState.OPEN:
                    clock.advance(1.0)
                    reopened += 1
                else:
                    time.sleep(0.0005)
            done.set()
            assert reopened >= 5
            return
        while not done.is_set():
            try:
                breaker.call(trial)
            except Boom:
                outcome = "failed"
            except CircuitOpenError:
                outcome = "refused"
            with counts_lock:
                counts[outcome] += 1
            if outcome == "refused":
                time.sleep(0.0002)

    run_threads(worker, THREADS + 1)  # eight callers and the driver
    assert 1 <= peak.peak <= 2
    assert counts["failed"] >= 5
    assert counts["refused"] > 0
    # Every trial permit came back: a fresh half-open period admits exactly two.
    clock.advance(1_000.0)
    permits = [breaker.try_acquire() for _ in range(3)]
    assert permits[0] is not None
    assert permits[1] is not None
    assert permits[2] is None


def test_succeeding_trials_never_exceed_half_open_max_calls() -> None:
    clock = ManualClock()
    breaker = half_open_breaker(clock)
    stop_at = time.monotonic() + RUN_FOR
    peak = Peak()
    admitted = [0] * THREADS
    retry_afters: set[float | None] = set()

    def trial() -> None:
        with peak.section():
            time.sleep(0.001)

    def worker(index: int) -> None:
        while time.monotonic() < stop_at:
            try:
                breaker.call(trial)
            except CircuitOpenError as error:
                retry_afters.add(error.retry_after)
                time.sleep(0.0002)
            else:
                admitted[index] += 1

    run_threads(worker)
    assert 1 <= peak.peak <= 2
    assert sum(admitted) == peak.entries
    assert retry_afters == {0.0}  # refused only because both trial slots were busy
    assert breaker.state is CircuitState.HALF_OPEN  # success_threshold is out of reach
    metrics = breaker.metrics()
    assert metrics.successes == sum(admitted)
    first, second = breaker.try_acquire(), breaker.try_acquire()
    assert first is not None
    assert second is not None
    assert breaker.try_acquire() is None


# ---- closed breaker accounting -----------------------------------------------------------


def test_closed_breaker_counts_every_outcome_under_contention() -> None:
    breaker = CircuitBreaker(
        "hammer",
        failure_threshold=None,
        record_exceptions=Boom,
        ignore_exceptions=KeyError,
        result_is_failure=lambda value: value == "bad",
    )
    stop_at = time.monotonic() + RUN_FOR
    tallies = [{"successes": 0, "failures": 0, "ignored": 0} for _ in range(THREADS)]

    @breaker
    def decorated(kind: str) -> str:
        return act(kind)

    def act(kind: str) -> str:
        if kind == "boom":
            raise Boom
        if kind == "ignored":
            raise KeyError(kind)
        if kind == "other":
            raise ValueError(kind)  # not recorded: a success
        return kind

    counted_as = {
        "ok": "successes",
        "bad": "failures",
        "boom": "failures",
        "ignored": "ignored",
        "other": "successes",
    }

    def worker(index: int) -> None:
        rng = random.Random(index)
        tally = tallies[index]
        while time.monotonic() < stop_at:
            kind = rng.choice(list(counted_as))
            form = rng.randrange(4)
            try:
                if form == 0:
                    breaker.call(act, kind)
                elif form == 1:
                    decorated(kind)
                elif form == 2:
                    with breaker:
                        if act(kind) == "bad":
                            # `with` has no result to judge: record the bad result as a
                            # failure by raising one.
                            raise Boom
                else:
                    with breaker.acquire() as permit:
                        permit.record_result(act(kind))
            except (Boom, KeyError, ValueError):
                pass
            tally[counted_as[kind]] += 1

    run_threads(worker)
    metrics = breaker.metrics()
    expected = {key: sum(tally[key] for tally in tallies) for key in tallies[0]}
    assert metrics.state is CircuitState.CLOSED
    assert metrics.successes == expected["successes"]
    assert metrics.failures == expected["failures"]
    assert metrics.ignored == expected["ignored"]
    assert metrics.calls == expected["successes"] + expected["failures"]
    assert (metrics.rejected, metrics.transitions) == (0, 0)


def test_tripping_under_contention_opens_once_and_counts_every_call() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker(
        "trip",
        failure_threshold=None,
        failure_rate_threshold=0.5,
        window_size=50,
        minimum_calls=50,
        reset_timeout=1.0,
        clock=clock,
    )
    transitions: list[tuple[str, str]] = []
    lock = threading.Lock()

    def listener(_: CircuitBreaker, old: CircuitState, new: CircuitState) -> None:
        with lock:
            transitions.append((old.value, new.value))

    breaker.add_listener(listener)
    attempts = [0] * THREADS

    def worker(index: int) -> None:
        for _ in range(300):
            attempts[index] += 1
            with suppress(Boom, CircuitOpenError):
                breaker.call(raise_boom)

    run_threads(worker)
    metrics = breaker.metrics()
    assert transitions == [("closed", "open")]
    assert metrics.state is CircuitState.OPEN
    assert metrics.calls + metrics.rejected == sum(attempts)
    assert metrics.calls >= 50


# ---- bulkhead ----------------------------------------------------------------------------


def test_bulkhead_never_exceeds_max_concurrent_and_returns_every_permit() -> None:
    limit = 3
    bulkhead = Bulkhead("stress", max_concurrent=limit, max_waiting=4, max_wait=0.002)
    stop_at = time.monotonic() + RUN_FOR
    peak = Peak()
    tallies = [{"entered": 0, "full": 0, "timeout": 0} for _ in range(THREADS)]

    def body(rng: random.Random) -> None:
        with peak.section():
            time.sleep(rng.choice([0, 0, 0.0005, 0.001]))
            if rng.random() < 0.3:
                raise Boom

    def worker(index: int) -> None:
        rng = random.Random(index)
        tally = tallies[index]
        while time.monotonic() < stop_at:
            form = rng.randrange(5)
            try:
                if form == 0:
                    bulkhead.call(body, rng)
                elif form == 1:
                    with bulkhead:
                        body(rng)
                elif form == 2:
                    bulkhead.acquire(timeout=rng.choice([0, 0.001, 0.003]))
                    try:
                        body(rng)
                    finally:
                        bulkhead.release()
                elif form == 3:
                    if not bulkhead.try_acquire():
                        tally["full"] += 1
                        continue
                    try:
                        body(rng)
                    finally:
                        bulkhead.release()
                else:
                    bulkhead(body)(rng)
            except BulkheadFullError as error:
                tally[error.reason] += 1
                continue
            except Boom:
                pass
            tally["entered"] += 1

    run_threads(worker)
    totals = {key: sum(tally[key] for tally in tallies) for key in tallies[0]}
    stats = bulkhead.stats()
    assert peak.peak <= limit
    assert 1 <= stats.max_observed <= limit
    assert (stats.active, stats.waiting) == (0, 0)
    assert stats.accepted == totals["entered"] == peak.entries
    assert stats.rejected == totals["full"] + totals["timeout"]
    assert stats.timed_out == totals["timeout"]
    assert totals["entered"] > 0
    assert bulkhead.try_acquire() is True


def test_registry_get_under_contention_while_partitions_are_used() -> None:
    registry = BulkheadRegistry(max_concurrent=2, max_wait=0.001)
    stop_at = time.monotonic() + RUN_FOR / 2
    names = [f"p{i}" for i in range(4)]

    def worker(index: int) -> None:
        rng = random.Random(index)
        while time.monotonic() < stop_at:
            bulkhead = registry.get(rng.choice(names))
            with suppress(BulkheadFullError):
                bulkhead.call(time.sleep, 0)

    run_threads(worker)
    assert sorted(registry) == names
    for stats in registry.stats().values():
        assert (stats.active, stats.waiting) == (0, 0)
        assert stats.max_observed <= 2


# ---- asyncio -----------------------------------------------------------------------------


async def test_asyncio_tasks_cancelled_at_random_points_return_every_permit() -> None:
    rng = random.Random(2024)
    clock = ManualClock()
    limit = 3
    breaker = CircuitBreaker(
        "async-stress",
        failure_threshold=1,
        reset_timeout=1.0,
        half_open_max_calls=limit,
        success_threshold=65535,
        record_exceptions=Boom,  # timeouts and KeyErrors below count as successes
        clock=clock,
    )
    breaker.acquire().failure()
    clock.advance(1.0)
    bulkhead = Bulkhead("async-stress", max_concurrent=limit, max_waiting=1000, max_wait=None)
    inside = peak = 0
    outcomes: dict[str, int] = {}

    async def body(delay: float) -> None:
        nonlocal inside, peak
        inside += 1
        peak = max(peak, inside)
        try:
            await asyncio.sleep(delay)
            if delay > 0.003:
                raise KeyError("ignored by the breaker")  # any non-Boom path out
        finally:
            inside -= 1

    async def one(delay: float, timeout: float | None) -> None:
        form = rng.randrange(3)
        if form == 0:
            async with bulkhead:
                await body(delay)
        elif form == 1:
            await bulkhead.acquire_async(timeout=timeout)
            try:
                await body(delay)
            finally:
                bulkhead.release()
        else:
            await bulkhead.call_async(body, delay)

    async def through_breaker(delay: float, timeout: float | None) -> None:
        try:
            async with breaker:
                await one(delay, timeout)
        except CircuitOpenError:
            await one(delay, timeout)  # refused by the breaker: use the bulkhead alone

    tasks = [
        asyncio.create_task(
            through_breaker(rng.choice([0, 0.001, 0.002, 0.005]), rng.choice([None, 0.002]))
        )
        for _ in range(300)
    ]
    for _ in range(150):
        await asyncio.sleep(rng.choice([0, 0, 0.0005]))
        victim = rng.choice(tasks)
        victim.cancel()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), JOIN)
    for result in results:
        kind = type(result).__name__ if result is not None else "ok"
        outcomes[kind] = outcomes.get(kind, 0) + 1
    assert set(outcomes) <= {"ok", "CancelledError", "KeyError", "BulkheadFullError"}
    assert outcomes.get("CancelledError", 0) > 0
    assert peak <= limit
    stats = bulkhead.stats()
    assert (stats.active, stats.waiting) == (0, 0)
    assert stats.max_observed <= limit
    assert breaker.state is CircuitState.HALF_OPEN
    permits = [breaker.try_acquire() for _ in range(limit + 1)]
    assert all(permit is not None for permit in permits[:limit])
    assert permits[limit] is None


@pytest.mark.parametrize("seed", range(3))
async def test_asyncio_timeouts_racing_releases_keep_the_count(seed: int) -> None:
    rng = random.Random(seed)
    bulkhead = Bulkhead("race", max_concurrent=2, max_waiting=1000, max_wait=0.001)
    inside = peak = 0

    async def worker() -> str:
        nonlocal inside, peak
        try:
            await bulkhead.acquire_async(timeout=rng.choice([0.0005, 0.001, 0.002]))
        except BulkheadFullError as error:
            return error.reason
        inside += 1
        peak = max(peak, inside)
        try:
            await asyncio.sleep(rng.choice([0, 0.0005, 0.001]))
        finally:
            inside -= 1
            bulkhead.release()
        return "ok"

    results: list[Any] = await asyncio.wait_for(
        asyncio.gather(*(worker() for _ in range(400))), JOIN
    )
    stats = bulkhead.stats()
    assert peak <= 2
    assert (stats.active, stats.waiting) == (0, 0)
    assert stats.accepted == results.count("ok")
    assert stats.timed_out == results.count("timeout")
    assert stats.rejected == results.count("timeout") + results.count("full")
