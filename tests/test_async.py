"""The asyncio forms of the breaker and the bulkhead: permits per task, cancellation, waiting
without blocking the loop, and sync threads and tasks queued on one bulkhead."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from buttress import (
    Bulkhead,
    BulkheadFullError,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    ManualClock,
)
from support import cancel, make_breaker, until

SHORT = 0.05
JOIN = 5.0


class Boom(Exception):
    """The failure the tests raise through breakers and bulkheads."""


def trip(clock: ManualClock, breaker: CircuitBreaker) -> None:
    permit = breaker.acquire()
    permit.failure()
    assert breaker.state is CircuitState.OPEN


def half_open(clock: ManualClock, **options: Any) -> CircuitBreaker:
    breaker = make_breaker(clock, **options)
    trip(clock, breaker)
    clock.advance(breaker.retry_after or 0.0)
    assert breaker.state is CircuitState.HALF_OPEN
    return breaker


async def forever() -> None:
    await asyncio.Event().wait()


def active_waiting(bulkhead: Bulkhead) -> tuple[int, int]:
    stats = bulkhead.stats()
    return stats.active, stats.waiting


# ---- async with breaker ------------------------------------------------------------------


async def test_async_with_records_success_and_failure(clock: ManualClock) -> None:
    breaker = make_breaker(clock, failure_threshold=2)
    async with breaker as entered:
        assert entered is None
    error = Boom()

    async def failing() -> None:
        async with breaker:
            await asyncio.sleep(0)
            raise error

    with pytest.raises(Boom) as caught:
        await failing()
    assert caught.value is error
    metrics = breaker.metrics()
    assert (metrics.successes, metrics.failures) == (1, 1)


async def test_async_with_on_open_breaker_raises_before_the_body(clock: ManualClock) -> None:
    breaker = make_breaker(clock)
    trip(clock, breaker)
    ran = []
    with pytest.raises(CircuitOpenError) as caught:
        async with breaker:
            ran.append(1)
    assert ran == []
    assert caught.value.retry_after == pytest.approx(10.0)


async def test_async_with_ignores_cancellation_and_records_ignored_exceptions(
    clock: ManualClock,
) -> None:
    breaker = make_breaker(clock, ignore_exceptions=KeyError)
    with pytest.raises(KeyError):
        async with breaker:
            raise KeyError
    with pytest.raises(asyncio.CancelledError):
        async with breaker:
            raise asyncio.CancelledError
    assert breaker.state is CircuitState.CLOSED
    assert breaker.metrics().ignored == 2


async def test_aexit_without_aenter_raises(clock: ManualClock) -> None:
    breaker = make_breaker(clock)
    with pytest.raises(RuntimeError, match="svc"):
        await breaker.__aexit__(None, None, None)


async def test_aexit_by_another_task_raises(clock: ManualClock) -> None:
    breaker = make_breaker(clock)
    entered = asyncio.Event()

    async def other_task() -> None:
        await entered.wait()
        with pytest.raises(RuntimeError, match="did not enter"):
            await breaker.__aexit__(None, None, None)

    other = asyncio.create_task(other_task())  # its context is copied before the enter
    await breaker.__aenter__()
    entered.set()
    await asyncio.wait_for(other, JOIN)
    assert breaker.metrics().calls == 0
    await breaker.__aexit__(None, None, None)  # the entering task can still exit
    assert breaker.metrics().successes == 1


async def test_nested_async_breakers(clock: ManualClock) -> None:
    outer = make_breaker(clock, failure_threshold=5)
    inner = CircuitBreaker("inner", failure_threshold=5, clock=clock)
    async with outer, inner:
        pass
    with pytest.raises(Boom):
        async with outer, inner:
            raise Boom
    for breaker in (outer, inner):
        metrics = breaker.metrics()
        assert (metrics.successes, metrics.failures) == (1, 1)


# ---- @breaker on async def and call_async ------------------------------------------------


async def test_decorator_on_async_def_keeps_metadata(clock: ManualClock) -> None:
    breaker = make_breaker(clock)

    async def fetch(item: str, count: int = 1) -> str:
        """Fetches an item."""
        await asyncio.sleep(0)
        return item * count

    guarded = breaker(fetch)
    assert inspect.iscoroutinefunction(guarded)
    assert guarded.__name__ == "fetch"
    assert guarded.__qualname__ == fetch.__qualname__
    assert guarded.__doc__ == "Fetches an item."
    assert guarded.__wrapped__ is fetch
    assert inspect.signature(guarded) == inspect.signature(fetch)
    assert await guarded("ab", count=2) == "abab"
    assert breaker.metrics().successes == 1


async def test_decorator_on_async_def_records_failures(clock: ManualClock) -> None:
    breaker = make_breaker(clock, failure_threshold=2)
    calls = []

    @breaker
    async def flaky(x: int) -> None:
        calls.append(x)
        await asyncio.sleep(0)
        raise Boom

    for x in (1, 2):
        with pytest.raises(Boom):
            await flaky(x)
    assert breaker.state is CircuitState.OPEN
    with pytest.raises(CircuitOpenError):
        await flaky(3)
    assert calls == [1, 2]


async def test_decorator_on_async_method_binds_self(clock: ManualClock) -> None:
    breaker = make_breaker(clock)

    class Client:
        def __init__(self, base: str) -> None:
            self.base = base

        @breaker
        async def get(self, path: str) -> str:
            return self.base + path

    assert await Client("a:").get("/x") == "a:/x"
    assert Client.get.__name__ == "get"


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_async_fallback_may_be_sync_or_async(clock: ManualClock, kind: str) -> None:
    got = []

    def sync_fallback(*args: Any, **kwargs: Any) -> str:
        got.append((args, kwargs))
        return "fallback"

    async def async_fallback(*args: Any, **kwargs: Any) -> str:
        await asyncio.sleep(0)
        return sync_fallback(*args, **kwargs)

    breaker = make_breaker(clock, fallback=sync_fallback if kind == "sync" else async_fallback)

    @breaker
    async def fetch(x: int, *, key: str) -> str:
        raise Boom

    with pytest.raises(Boom):  # admitted: the fallback is not for failures
        await fetch(1, key="a")
    assert got == []
    assert await fetch(2, key="b") == "fallback"
    assert await breaker.call_async(fetch.__wrapped__, 3, key="c") == "fallback"
    assert got == [((2,), {"key": "b"}), ((3,), {"key": "c"})]


async def test_call_async_passes_arguments_and_records(clock: ManualClock) -> None:
    breaker = make_breaker(clock, failure_threshold=2)

    async def add(a: int, b: int, *, scale: int = 1) -> int:
        await asyncio.sleep(0)
        return (a + b) * scale

    async def broken() -> None:
        raise Boom

    assert await breaker.call_async(add, 1, 2, scale=3) == 9
    with pytest.raises(Boom):
        await breaker.call_async(broken)
    metrics = breaker.metrics()
    assert (metrics.successes, metrics.failures) == (1, 1)


async def test_call_async_refuses_when_open(clock: ManualClock) -> None:
    breaker = make_breaker(clock)
    trip(clock, breaker)
    ran = []

    async def work() -> None:
        ran.append(1)

    with pytest.raises(CircuitOpenError) as caught:
        await breaker.call_async(work)
    assert ran == []
    assert caught.value.name == "svc"
    assert caught.value.retry_after == pytest.approx(10.0)


async def test_call_async_asks_result_is_failure(clock: ManualClock) -> None:
    breaker = make_breaker(clock, result_is_failure=lambda value: value == "bad")

    async def answer(value: str) -> str:
        return value

    assert await breaker.call_async(answer, "good") == "good"
    assert breaker.state is CircuitState.CLOSED
    assert await breaker.call_async(answer, "bad") == "bad"
    assert breaker.state is CircuitState.OPEN


async def test_call_async_rejects_non_callables(clock: ManualClock) -> None:
    breaker = make_breaker(clock)
    with pytest.raises(TypeError, match="func"):
        await breaker.call_async(5)  # type: ignore[arg-type]
    assert breaker.metrics().calls == 0


# ---- permits per task --------------------------------------------------------------------


async def test_interleaved_tasks_each_get_their_own_half_open_permit(clock: ManualClock) -> None:
    breaker = half_open(clock, half_open_max_calls=2, success_threshold=2)
    inside = 0
    release = {"a": asyncio.Event(), "b": asyncio.Event()}

    async def trial(tag: str, error: BaseException | None) -> None:
        nonlocal inside
        async with breaker:
            inside += 1
            await release[tag].wait()
            if error is not None:
                raise error

    a = asyncio.create_task(trial("a", None))
    b = asyncio.create_task(trial("b", Boom()))
    await until(lambda: inside == 2)
    with pytest.raises(CircuitOpenError) as caught:
        async with breaker:
            pass
    assert caught.value.retry_after == 0.0
    release["a"].set()
    await asyncio.wait_for(a, JOIN)
    assert breaker.state is CircuitState.HALF_OPEN  # one success of two
    release["b"].set()
    with pytest.raises(Boom):
        await asyncio.wait_for(b, JOIN)
    assert breaker.state is CircuitState.OPEN
    metrics = breaker.metrics()
    assert (metrics.successes, metrics.failures, metrics.rejected) == (1, 2, 1)


async def test_outcomes_are_attributed_to_the_task_that_entered(clock: ManualClock) -> None:
    # Task "early" enters while closed; the breaker then trips and goes half-open, and task
    # "trial" enters with a half-open permit. Each exit must record on its own permit: the
    # early failure is stale and must not reopen; the trial's success must close.
    breaker = make_breaker(clock)
    entered = {"early": asyncio.Event(), "trial": asyncio.Event()}
    leave = {"early": asyncio.Event(), "trial": asyncio.Event()}

    async def run(tag: str, error: BaseException | None) -> None:
        async with breaker:
            entered[tag].set()
            await leave[tag].wait()
            if error is not None:
                raise error

    early = asyncio.create_task(run("early", Boom()))
    await entered["early"].wait()
    trip(clock, breaker)
    clock.advance(10.0)
    trial = asyncio.create_task(run("trial", None))
    await entered["trial"].wait()
    leave["early"].set()
    with pytest.raises(Boom):
        await asyncio.wait_for(early, JOIN)
    assert breaker.state is CircuitState.HALF_OPEN
    leave["trial"].set()
    await asyncio.wait_for(trial, JOIN)
    assert breaker.state is CircuitState.CLOSED


async def test_many_tasks_interleaving_on_a_closed_breaker(clock: ManualClock) -> None:
    breaker = make_breaker(clock, failure_threshold=None)

    async def run(index: int) -> None:
        async with breaker:
            for _ in range(index % 3):
                await asyncio.sleep(0)
            if index % 2:
                raise Boom

    results = await asyncio.gather(*(run(i) for i in range(50)), return_exceptions=True)
    assert sum(isinstance(result, Boom) for result in results) == 25
    metrics = breaker.metrics()
    assert (metrics.successes, metrics.failures) == (25, 25)


# ---- cancellation ------------------------------------------------------------------------


def guarded_forms(
    breaker: CircuitBreaker, body: Callable[[], Awaitable[None]]
) -> dict[str, Callable[[], Awaitable[None]]]:
    async def with_block() -> None:
        async with breaker:
            await body()

    return {
        "async_with": with_block,
        "call_async": lambda: breaker.call_async(body),
        "decorator": breaker(body),
    }


@pytest.mark.parametrize("form", ["async_with", "call_async", "decorator"])
async def test_cancelled_call_returns_its_half_open_permit(clock: ManualClock, form: str) -> None:
    breaker = half_open(clock)
    started = asyncio.Event()

    async def body() -> None:
        started.set()
        await forever()

    task = asyncio.create_task(guarded_forms(breaker, body)[form]())
    await started.wait()
    assert breaker.try_acquire() is None
    await cancel(task)
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.metrics().ignored == 1
    permit = breaker.try_acquire()
    assert permit is not None
    permit.success()
    assert breaker.state is CircuitState.CLOSED


def bulkhead_forms(
    bulkhead: Bulkhead, body: Callable[[], Awaitable[None]]
) -> dict[str, Callable[[], Awaitable[None]]]:
    async def with_block() -> None:
        async with bulkhead:
            await body()

    async def acquire_release() -> None:
        await bulkhead.acquire_async()
        try:
            await body()
        finally:
            bulkhead.release()

    return {
        "async_with": with_block,
        "call_async": lambda: bulkhead.call_async(body),
        "decorator": bulkhead(body),
        "acquire_async": acquire_release,
    }


@pytest.mark.parametrize("form", ["async_with", "call_async", "decorator", "acquire_async"])
async def test_cancelled_holder_returns_its_bulkhead_permit(form: str) -> None:
    bulkhead = Bulkhead("b", max_concurrent=1, max_wait=None)
    started = asyncio.Event()

    async def body() -> None:
        started.set()
        await forever()

    task = asyncio.create_task(bulkhead_forms(bulkhead, body)[form]())
    await started.wait()
    assert active_waiting(bulkhead) == (1, 0)
    await cancel(task)
    assert active_waiting(bulkhead) == (0, 0)
    assert bulkhead.try_acquire() is True


async def test_cancelled_call_through_breaker_and_bulkhead_returns_both(
    clock: ManualClock,
) -> None:
    breaker = half_open(clock)
    bulkhead = Bulkhead("b", max_concurrent=1, max_wait=None)
    started = asyncio.Event()

    @breaker
    @bulkhead
    async def call() -> None:
        started.set()
        await forever()

    task = asyncio.create_task(call())
    await started.wait()
    await cancel(task)
    assert active_waiting(bulkhead) == (0, 0)
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.try_acquire() is not None


async def test_cancelled_while_waiting_for_the_bulkhead_inside_the_breaker(
    clock: ManualClock,
) -> None:
    breaker = half_open(clock)
    bulkhead = Bulkhead("b", max_concurrent=1, max_wait=None)
    bulkhead.acquire()

    @breaker
    @bulkhead
    async def call() -> None:
        raise AssertionError("never admitted")

    task = asyncio.create_task(call())
    await until(lambda: bulkhead.stats().waiting == 1)
    await cancel(task)
    assert active_waiting(bulkhead) == (1, 0)
    assert breaker.try_acquire() is not None
    bulkhead.release()


# ---- Bulkhead.acquire_async --------------------------------------------------------------


async def test_acquire_async_waits_without_blocking_the_loop() -> None:
    bulkhead = Bulkhead("b", max_concurrent=1, max_wait=None)
    await bulkhead.acquire_async()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.002)

    ticking = asyncio.create_task(ticker())
    loop = asyncio.get_running_loop()
    loop.call_later(SHORT, bulkhead.release)
    start = time.monotonic()
    await asyncio.wait_for(bulkhead.acquire_async(), JOIN)
    elapsed = time.monotonic() - start
    ticking.cancel()
    assert elapsed >= SHORT * 0.8
    assert ticks >= 5
    assert active_waiting(bulkhead) == (1, 0)
    bulkhead.release()


async def test_acquire_async_times_out() -> None:
    bulkhead = Bulkhead("b", max_concurrent=1, max_wait=SHORT)
    await bulkhead.acquire_async()
    start = time.monotonic()
    with pytest.raises(BulkheadFullError) as caught:
        await bulkhead.acquire_async()
    assert time.monotonic() - start >= SHORT * 0.8
    assert caught.value.reason == "timeout"
    assert caught.value.name == "b"
    stats = bulkhead.stats()
    assert (stats.active, stats.waiting, stats.rejected, stats.timed_out) == (1, 0, 1, 1)
    with pytest.raises(BulkheadFullError) as caught:
        await bulkhead.acquire_async(timeout=SHORT / 2)
    assert caught.value.reason == "timeout"
    bulkhead.release()
    assert active_waiting(bulkhead) == (0, 0)


async def test_acquire_async_without_waiting_is_full_at_once() -> None:
    never = Bulkhead("never", max_concurrent=1, max_wait=0.0)
    await never.acquire_async()
    with pytest.raises(BulkheadFullError) as caught:
        await never.acquire_async()
    assert caught.value.reason == "full"
    patient = Bulkhead("patient", max_concurrent=1, max_wait=None)
    await patient.acquire_async()
    with pytest.raises(BulkheadFullError) as caught:
        await patient.acquire_async(timeout=0)
    assert caught.value.reason == "full"
    assert active_waiting(patient) == (1, 0)


async def test_acquire_async_max_waiting_is_full_at_once() -> None:
    bulkhead = Bulkhead("b", max_concurrent=1, max_waiting=1, max_wait=None)
    await bulkhead.acquire_async()
    queued = asyncio.create_task(bulkhead.acquire_async())
    await until(lambda: bulkhead.stats().waiting == 1)
    start = time.monotonic()
    with pytest.raises(BulkheadFullError) as caught:
        await bulkhead.acquire_async(timeout=JOIN)
    assert time.monotonic() - start < 1.0
    assert caught.value.reason == "full"
    bulkhead.release()
    await asyncio.wait_for(queued, JOIN)
    assert active_waiting(bulkhead) == (1, 0)
    bulkhead.release()


async def test_acquire_async_fifo_among_tasks() -> None:
    bulkhead = Bulkhead("b", max_concurrent=1, max_waiting=20, max_wait=None)
    await bulkhead.acquire_async()
    order: list[int] = []

    async def take(ident: int) -> None:
        await bulkhead.acquire_async()
        order.append(ident)
        await asyncio.sleep(0)
        bulkhead.release()

    tasks = []
    for ident in range(6):
        tasks.append(asyncio.create_task(take(ident)))
        await until(lambda ident=ident: bulkhead.stats().waiting == ident + 1)
    bulkhead.release()
    await asyncio.wait_for(asyncio.gather(*tasks), JOIN)
    assert order == list(range(6))
    assert active_waiting(bulkhead) == (0, 0)


async def test_cancelled_waiter_leaves_the_queue() -> None:
    bulkhead = Bulkhead("b", max_concurrent=1, max_wait=None)
    await bulkhead.acquire_async()
    first = asyncio.create_task(bulkhead.acquire_async())
    second = asyncio.create_task(bulkhead.acquire_async())
    await until(lambda: bulkhead.stats().waiting == 2)
    await cancel(first)
    assert active_waiting(bulkhead) == (1, 1)
    bulkhead.release()
    await asyncio.wait_for(second, JOIN)
    assert active_waiting(bulkhead) == (1, 0)
    bulkhead.release()
    assert active_waiting(bulkhead) == (0, 0)
    assert bulkhead.stats().timed_out == 0


@pytest.mark.parametrize("max_wait", [None, JOIN], ids=["no-timeout", "with-timeout"])
async def test_waiter_cancelled_just_after_the_hand_off_passes_the_permit_on(
    max_wait: float | None,
) -> None:
    # With a timeout too: asyncio.wait_for (before 3.12) could swallow this cancel and let the
    # task go on holding the permit.
    bulkhead = Bulkhead("b", max_concurrent=1, max_wait=max_wait)
    await bulkhead.acquire_async()
    first = asyncio.create_task(bulkhead.acquire_async())
    second = asyncio.create_task(bulkhead.acquire_async())
    await until(lambda: bulkhead.stats().waiting == 2)
    bulkhead.release()  # handed to `first`, whose wake-up is still queued on the loop
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, JOIN)
    assert active_waiting(bulkhead) == (1, 0)
    bulkhead.release()
    assert active_waiting(bulkhead) == (0, 0)
    assert bulkhead.stats().timed_out == 0


class AsyncCallable:
    """An object whose __call__ is a coroutine function (like many client objects)."""

    def __init__(self, bulkhead: Bulkhead | None = None) -> None:
        self.bulkhead = bulkhead
        self.active_inside: list[int] = []

    async def __call__(self, fail: bool = False) -> str:
        await asyncio.sleep(0)
        if self.bulkhead is not None:
            self.active_inside.append(self.bulkhead.stats().active)
        if fail:
            raise Boom
        return "done"


async def test_breaker_decorating_an_async_callable_object_records_its_failures(
    clock: ManualClock,
) -> None:
    breaker = make_breaker(clock)
    guarded = breaker(AsyncCallable())
    with pytest.raises(Boom):
        await guarded(fail=True)
    assert breaker.state is CircuitState.OPEN


async def test_bulkhead_decorating_an_async_callable_object_holds_the_permit() -> None:
    bulkhead = Bulkhead("b", max_concurrent=1)
    target = AsyncCallable(bulkhead)
    guarded = bulkhead(target)
    assert await guarded() == "done"
    assert target.active_inside == [1]


async def test_bulkhead_decorator_on_async_def() -> None:
    bulkhead = Bulkhead("b", max_concurrent=2, max_waiting=20, max_wait=None)
    inside = peak = 0

    @bulkhead
    async def work(x: int) -> int:
        """Works."""
        nonlocal inside, peak
        inside += 1
        peak = max(peak, inside)
        await asyncio.sleep(0.001)
        inside -= 1
        if x == 3:
            raise Boom
        return x

    assert inspect.iscoroutinefunction(work)
    assert work.__name__ == "work"
    assert work.__doc__ == "Works."
    results = await asyncio.wait_for(
        asyncio.gather(*(work(x) for x in range(10)), return_exceptions=True), JOIN
    )
    assert [r for r in results if not isinstance(r, Boom)] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert peak == 2
    assert active_waiting(bulkhead) == (0, 0)
    assert bulkhead.stats().accepted == 10


async def test_bulkhead_call_async() -> None:
    bulkhead = Bulkhead("b", max_concurrent=1)

    async def work(a: int, *, b: int) -> tuple[int, int]:
        return a + b, bulkhead.stats().active

    assert await bulkhead.call_async(work, 1, b=2) == (3, 1)
    with pytest.raises(TypeError, match="func"):
        await bulkhead.call_async(5)  # type: ignore[arg-type]
    assert active_waiting(bulkhead) == (0, 0)


async def test_release_from_another_thread_wakes_an_async_waiter() -> None:
    bulkhead = Bulkhead("b", max_concurrent=1, max_wait=None)
    bulkhead.acquire()
    waiter = asyncio.create_task(bulkhead.acquire_async())
    await until(lambda: bulkhead.stats().waiting == 1)
    thread = threading.Thread(target=bulkhead.release)
    thread.start()
    await asyncio.wait_for(waiter, JOIN)
    await asyncio.to_thread(thread.join, JOIN)
    assert active_waiting(bulkhead) == (1, 0)
    bulkhead.release()


async def test_mixed_thread_and_task_waiters_share_one_fifo_queue() -> None:
    bulkhead = Bulkhead("b", max_concurrent=1, max_waiting=10, max_wait=JOIN)
    bulkhead.acquire()
    order: list[str] = []
    threads: list[threading.Thread] = []
    tasks: list[asyncio.Task[None]] = []

    def thread_waiter(tag: str) -> None:
        bulkhead.acquire()
        order.append(tag)
        time.sleep(0.001)
        bulkhead.release()

    async def task_waiter(tag: str) -> None:
        await bulkhead.acquire_async()
        order.append(tag)
        await asyncio.sleep(0.001)
        bulkhead.release()

    for position, tag in enumerate(["thread-1", "task-1", "thread-2", "task-2", "task-3"]):
        if tag.startswith("thread"):
            thread = threading.Thread(target=thread_waiter, args=(tag,), daemon=True)
            thread.start()
            threads.append(thread)
        else:
            tasks.append(asyncio.create_task(task_waiter(tag)))
        await until(lambda position=position: bulkhead.stats().waiting == position + 1)
    bulkhead.release()
    await asyncio.wait_for(asyncio.gather(*tasks), JOIN)
    for thread in threads:
        await asyncio.to_thread(thread.join, JOIN)
        assert not thread.is_alive()
    assert order == ["thread-1", "task-1", "thread-2", "task-2", "task-3"]
    assert active_waiting(bulkhead) == (0, 0)
    assert bulkhead.stats().accepted == 6
