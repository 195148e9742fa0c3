"""Behaviour of the synchronous bulkhead and the bulkhead registry.

Waits here are real but short (about 50 ms); threads are always joined with a timeout.
"""

from __future__ import annotations

import _thread
import inspect
import pickle
import signal
import threading
import time

import pytest
from buttress import Bulkhead, BulkheadFullError, BulkheadRegistry, BulkheadStats, ButtressError
from hypothesis import given
from hypothesis import strategies as st
from support import background, bulkhead_stats, wait_until

SHORT = 0.05
JOIN = 5.0


class Boom(Exception):
    """The failure the tests raise inside bulkheads."""


def raise_(error: BaseException) -> None:
    raise error


def test_defaults_and_properties() -> None:
    bulkhead = Bulkhead()
    assert bulkhead.name == "default"
    assert bulkhead.max_concurrent == 25
    assert bulkhead.max_waiting == 100
    assert bulkhead.max_wait == 0.0
    custom = Bulkhead("db", max_concurrent=3, max_waiting=0, max_wait=None)
    assert (custom.name, custom.max_concurrent, custom.max_waiting) == ("db", 3, 0)
    assert custom.max_wait is None
    assert Bulkhead(max_wait=1.5).max_wait == 1.5
    assert repr(custom) == "Bulkhead(name='db', max_concurrent=3, active=0, waiting=0)"


# ---- limits ------------------------------------------------------------------------------


def test_try_acquire_enforces_max_concurrent() -> None:
    bulkhead = Bulkhead("b", max_concurrent=3)
    assert [bulkhead.try_acquire() for _ in range(4)] == [True, True, True, False]
    assert bulkhead.stats().active == 3
    bulkhead.release()
    assert bulkhead.try_acquire() is True
    assert bulkhead.try_acquire() is False
    assert bulkhead_stats(bulkhead) == (3, 0, 3, 4, 2, 0)


def test_acquire_without_waiting_raises_full_at_once() -> None:
    bulkhead = Bulkhead("b", max_concurrent=1, max_wait=0.0)
    bulkhead.acquire()
    start = time.monotonic()
    with pytest.raises(BulkheadFullError) as caught:
        bulkhead.acquire()
    assert time.monotonic() - start < SHORT
    assert caught.value.reason == "full"
    assert caught.value.name == "b"
    assert caught.value.max_concurrent == 1
    with pytest.raises(BulkheadFullError, match="permits are taken"):
        bulkhead.acquire(timeout=0)


def test_blocking_acquire_gets_a_released_permit() -> None:
    bulkhead = Bulkhead("b", max_concurrent=1, max_wait=JOIN)
    bulkhead.acquire()

    def release_later() -> None:
        time.sleep(SHORT)
        bulkhead.release()

    start = time.monotonic()
    with background(release_later):
        bulkhead.acquire()
    elapsed = time.monotonic() - start
    assert SHORT * 0.8 <= elapsed < JOIN
    assert bulkhead_stats(bulkhead) == (1, 0, 1, 2, 0, 0)
    bulkhead.release()


def test_blocking_acquire_times_out() -> None:
    bulkhead = Bulkhead("b", max_concurrent=1, max_wait=SHORT)
    bulkhead.acquire()
    start = time.monotonic()
    with pytest.raises(BulkheadFullError) as caught:
        bulkhead.acquire()
    elapsed = time.monotonic() - start
    assert caught.value.reason == "timeout"
    assert SHORT * 0.9 <= elapsed < 1.0
    assert "longest wait" in str(caught.value)
    stats = bulkhead.stats()
    assert (stats.active, stats.waiting, stats.rejected, stats.timed_out) == (1, 0, 1, 1)


def test_timeout_argument_overrides_max_wait() -> None:
    never_waits = Bulkhead("a", max_concurrent=1, max_wait=0.0)
    never_waits.acquire()
    start = time.monotonic()
    with pytest.raises(BulkheadFullError) as caught:
        never_waits.acquire(timeout=SHORT)
    assert caught.value.reason == "timeout"
    assert time.monotonic() - start >= SHORT * 0.9

    waits_forever = Bulkhead("b", max_concurrent=1, max_wait=None)
    waits_forever.acquire()
    with pytest.raises(BulkheadFullError) as caught:
        waits_forever.acquire(timeout=SHORT)
    assert caught.value.reason == "timeout"
    with pytest.raises(BulkheadFullError) as caught:
        waits_forever.acquire(timeout=0)
    assert caught.value.reason == "full"


def test_max_wait_none_waits_as_long_as_it_takes() -> None:
    bulkhead = Bulkhead("b", max_concurrent=1, max_wait=None)
    bulkhead.acquire()

    def release_later() -> None:
        time.sleep(3 * SHORT)
        bulkhead.release()

    with background(release_later):
        bulkhead.acquire()
    assert bulkhead.stats().timed_out == 0
    bulkhead.release()


def test_max_waiting_bound_refuses_at_once() -> None:
    bulkhead = Bulkhead("b", max_concurrent=1, max_waiting=1, max_wait=JOIN)
    bulkhead.acquire()
    got = []
    with background(lambda: got.append(bulkhead.acquire())):
        wait_until(lambda: bulkhead.stats().waiting == 1)
        start = time.monotonic()
        with pytest.raises(BulkheadFullError) as caught:
            bulkhead.acquire(timeout=JOIN)
        assert time.monotonic() - start < 1.0
        assert caught.value.reason == "full"
        assert "no more callers may wait" in str(caught.value)
        bulkhead.release()  # hands the permit to the queued thread
    assert got == [None]
    stats = bulkhead.stats()
    assert (stats.active, stats.waiting, stats.rejected, stats.timed_out) == (1, 0, 1, 0)
    bulkhead.release()


def test_max_waiting_zero_never_queues() -> None:
    bulkhead = Bulkhead("b", max_concurrent=1, max_waiting=0, max_wait=JOIN)
    bulkhead.acquire()
    start = time.monotonic()
    with pytest.raises(BulkheadFullError) as caught:
        bulkhead.acquire()
    assert time.monotonic() - start < 1.0
    assert caught.value.reason == "full"


def test_fifo_hand_off_among_waiting_threads() -> None:
    bulkhead = Bulkhead("b", max_concurrent=1, max_waiting=10, max_wait=JOIN)
    bulkhead.acquire()
    order: list[int] = []
    threads = []
    for ident in range(5):

        def take(ident: int = ident) -> None:
            bulkhead.acquire()
            order.append(ident)
            time.sleep(0.002)
            bulkhead.release()

        thread = threading.Thread(target=take, daemon=True)
        thread.start()
        threads.append(thread)
        wait_until(lambda ident=ident: bulkhead.stats().waiting == ident + 1)
    bulkhead.release()
    for thread in threads:
        thread.join(JOIN)
        assert not thread.is_alive()
    assert order == [0, 1, 2, 3, 4]
    assert bulkhead_stats(bulkhead) == (0, 0, 1, 6, 0, 0)


def test_a_newcomer_cannot_overtake_a_waiter() -> None:
    bulkhead = Bulkhead("b", max_concurrent=1, max_wait=JOIN)
    bulkhead.acquire()
    got = threading.Event()
    proceed = threading.Event()

    def waiter() -> None:
        bulkhead.acquire()
        got.set()
        proceed.wait(JOIN)
        bulkhead.release()

    with background(waiter):
        wait_until(lambda: bulkhead.stats().waiting == 1)
        bulkhead.release()  # handed straight to the waiter: never free in between
        assert bulkhead.try_acquire() is False
        assert bulkhead.stats().active == 1
        assert got.wait(JOIN)
        proceed.set()
    assert bulkhead.stats().active == 0


def test_over_release_raises_runtime_error() -> None:
    bulkhead = Bulkhead("b", max_concurrent=2)
    with pytest.raises(RuntimeError, match="released more times"):
        bulkhead.release()
    bulkhead.acquire()
    bulkhead.release()
    before = bulkhead_stats(bulkhead)
    with pytest.raises(RuntimeError):
        bulkhead.release()
    assert bulkhead_stats(bulkhead) == before
    with pytest.raises(RuntimeError):
        bulkhead.__exit__(None, None, None)


def test_signal_interrupts_a_blocked_acquire_without_keeping_a_permit() -> None:
    bulkhead = Bulkhead("b", max_concurrent=1, max_wait=None)
    bulkhead.acquire()

    def handler(signum: int, frame: object) -> None:
        raise Boom("interrupted")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        timer = threading.Timer(SHORT, _thread.interrupt_main)
        timer.start()
        start = time.monotonic()
        with pytest.raises(Boom, match="interrupted"):
            bulkhead.acquire()
        assert time.monotonic() - start < 2.0
        timer.join(JOIN)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (bulkhead.stats().active, bulkhead.stats().waiting) == (1, 0)
    bulkhead.release()
    assert bulkhead.try_acquire() is True


# ---- call, with, decorator ---------------------------------------------------------------


def test_call_holds_a_permit_during_the_call() -> None:
    bulkhead = Bulkhead("b", max_concurrent=2)
    seen = []

    def work(a: int, *, b: int) -> int:
        seen.append(bulkhead.stats().active)
        return a + b

    assert bulkhead.call(work, 1, b=2) == 3
    assert seen == [1]
    assert bulkhead.stats().active == 0
    assert bulkhead.call(dict, func=1) == {"func": 1}


def test_call_releases_on_exception() -> None:
    bulkhead = Bulkhead("b", max_concurrent=1)
    error = Boom("x")

    def broken() -> None:
        raise error

    with pytest.raises(Boom) as caught:
        bulkhead.call(broken)
    assert caught.value is error
    with pytest.raises(KeyboardInterrupt):
        bulkhead.call(raise_, KeyboardInterrupt())
    assert bulkhead.stats().active == 0
    assert bulkhead.call(lambda: "again") == "again"


def test_call_refused_does_not_run_the_function() -> None:
    bulkhead = Bulkhead("b", max_concurrent=1)
    bulkhead.acquire()
    ran = []
    with pytest.raises(BulkheadFullError):
        bulkhead.call(ran.append, 1)
    assert ran == []
    assert bulkhead.stats().active == 1


def test_with_block_holds_and_releases() -> None:
    bulkhead = Bulkhead("b", max_concurrent=1)
    with bulkhead as entered:
        assert entered is None
        assert bulkhead.stats().active == 1
        with pytest.raises(BulkheadFullError), bulkhead:
            pass
    assert bulkhead.stats().active == 0
    with pytest.raises(Boom), bulkhead:
        raise Boom
    assert bulkhead.stats().active == 0


def test_decorator_keeps_metadata_and_releases_on_exception() -> None:
    bulkhead = Bulkhead("b", max_concurrent=1)

    @bulkhead
    def work(x: int, fail: bool = False) -> int:
        """Does work."""
        assert bulkhead.stats().active == 1
        if fail:
            raise Boom
        return x * 2

    assert work.__name__ == "work"
    assert work.__doc__ == "Does work."
    assert work.__wrapped__.__name__ == "work"
    assert inspect.signature(work) == inspect.signature(work.__wrapped__)
    assert work(2) == 4
    with pytest.raises(Boom):
        work(2, fail=True)
    assert bulkhead.stats().active == 0
    assert bulkhead.stats().accepted == 2


def test_decorator_on_methods_binds_self() -> None:
    bulkhead = Bulkhead("b", max_concurrent=1)

    class Repo:
        def __init__(self, name: str) -> None:
            self.name = name

        @bulkhead
        def load(self, key: str) -> str:
            return f"{self.name}:{key}"

    assert Repo("r").load("k") == "r:k"
    assert Repo.load.__name__ == "load"
    assert bulkhead.stats().active == 0


def test_stats_fields() -> None:
    bulkhead = Bulkhead("b", max_concurrent=2, max_waiting=5, max_wait=SHORT)
    stats = bulkhead.stats()
    assert isinstance(stats, BulkheadStats)
    assert bulkhead_stats(bulkhead) == (0, 0, 0, 0, 0, 0)
    bulkhead.acquire()
    bulkhead.acquire()
    assert bulkhead.try_acquire() is False
    with pytest.raises(BulkheadFullError):
        bulkhead.acquire()  # waits SHORT, times out
    with pytest.raises(BulkheadFullError):
        bulkhead.acquire(timeout=0)
    bulkhead.release()
    bulkhead.call(lambda: None)
    stats = bulkhead.stats()
    assert stats.active == 1
    assert stats.waiting == 0
    assert stats.max_observed == 2
    assert stats.accepted == 3
    assert stats.rejected == 3
    assert stats.timed_out == 1
    assert repr(stats) == (
        "BulkheadStats(active=1, waiting=0, max_observed=2, accepted=3, rejected=3, timed_out=1)"
    )


def test_stats_waiting_counts_queued_threads() -> None:
    bulkhead = Bulkhead("b", max_concurrent=1, max_waiting=5, max_wait=JOIN)
    bulkhead.acquire()
    threads = [
        threading.Thread(target=lambda: bulkhead.call(time.sleep, 0), daemon=True) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    wait_until(lambda: bulkhead.stats().waiting == 3)
    assert bulkhead.stats().active == 1
    bulkhead.release()
    for thread in threads:
        thread.join(JOIN)
        assert not thread.is_alive()
    assert bulkhead_stats(bulkhead) == (0, 0, 1, 4, 0, 0)


@given(ops=st.lists(st.sampled_from(["try", "acquire", "release", "call"]), max_size=50))
def test_any_sequence_keeps_active_within_limits(ops: list[str]) -> None:
    limit = 3
    bulkhead = Bulkhead("p", max_concurrent=limit, max_waiting=0, max_wait=0.0)
    active = accepted = rejected = peak = 0
    reasons: set[str] = set()
    for op in ops:
        if op == "release":
            if active == 0:
                with pytest.raises(RuntimeError):
                    bulkhead.release()
            else:
                bulkhead.release()
                active -= 1
        elif op == "try":
            if bulkhead.try_acquire():
                active += 1
                accepted += 1
            else:
                rejected += 1
        elif op == "acquire":
            try:
                bulkhead.acquire()
            except BulkheadFullError as error:
                reasons.add(error.reason)
                rejected += 1
            else:
                active += 1
                accepted += 1
        else:
            try:
                bulkhead.call(lambda: None)
            except BulkheadFullError:
                rejected += 1
            else:
                accepted += 1
                peak = max(peak, active + 1)
        peak = max(peak, active)
        assert 0 <= active <= limit
        assert bulkhead_stats(bulkhead) == (active, 0, peak, accepted, rejected, 0)
    assert reasons <= {"full"}


# ---- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("reason", ["full", "timeout"])
def test_bulkhead_full_error_pickles(reason: str) -> None:
    error = BulkheadFullError("db", 4, reason)
    assert isinstance(error, ButtressError)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is BulkheadFullError
    assert (copy.name, copy.max_concurrent, copy.reason) == ("db", 4, reason)
    assert str(copy) == str(error)
    message = str(error)
    assert "db" in message
    assert "4" in message
    assert message[0].isupper()
    assert message.endswith(".")


def test_raised_bulkhead_full_error_pickles() -> None:
    bulkhead = Bulkhead("db", max_concurrent=1)
    bulkhead.acquire()
    with pytest.raises(BulkheadFullError) as caught:
        bulkhead.acquire()
    copy = pickle.loads(pickle.dumps(caught.value))
    assert (copy.name, copy.max_concurrent, copy.reason) == ("db", 1, "full")


# ---- registry ----------------------------------------------------------------------------


def test_registry_creates_once_and_returns_the_same_bulkhead() -> None:
    registry = BulkheadRegistry(max_concurrent=4, max_waiting=7, max_wait=0.5)
    payments = registry.get("payments")
    assert isinstance(payments, Bulkhead)
    assert (payments.name, payments.max_concurrent, payments.max_waiting) == ("payments", 4, 7)
    assert payments.max_wait == 0.5
    assert registry.get("payments") is payments
    assert registry.get("payments", max_concurrent=4, max_wait=0.5) is payments
    assert registry["payments"] is payments
    search = registry.get("search", max_concurrent=2, max_wait=None)
    assert (search.max_concurrent, search.max_waiting, search.max_wait) == (2, 7, None)
    assert search is not payments


def test_registry_refuses_conflicting_limits() -> None:
    registry = BulkheadRegistry()
    first = registry.get("db", max_concurrent=3)
    for conflict in ({"max_concurrent": 4}, {"max_waiting": 1}, {"max_wait": None}):
        with pytest.raises(ValueError, match="db"):
            registry.get("db", **conflict)
    assert registry.get("db") is first
    assert len(registry) == 1


def test_registry_defaults_apply_when_asked_without_limits() -> None:
    registry = BulkheadRegistry()
    bulkhead = registry.get("x")
    assert (bulkhead.max_concurrent, bulkhead.max_waiting, bulkhead.max_wait) == (25, 100, 0.0)


def test_registry_collection_protocols() -> None:
    registry = BulkheadRegistry(max_concurrent=2)
    assert len(registry) == 0
    assert list(registry) == []
    assert "a" not in registry
    a = registry.get("a")
    registry.get("b")
    assert len(registry) == 2
    assert sorted(registry) == ["a", "b"]
    assert "a" in registry
    assert 5 not in registry
    with pytest.raises(KeyError):
        registry["missing"]
    assert "missing" not in registry  # a failed lookup creates nothing
    a.acquire()
    stats = registry.stats()
    assert set(stats) == {"a", "b"}
    assert stats["a"].active == 1
    assert stats["b"].active == 0
    assert repr(registry) == "BulkheadRegistry(['a', 'b'])"
    a.release()


def test_registry_iteration_survives_creation_during_iteration() -> None:
    registry = BulkheadRegistry()
    registry.get("a")
    for name in registry:
        registry.get(name + "x")
    assert sorted(registry) == ["a", "ax"]


def test_registry_partitions_are_isolated() -> None:
    registry = BulkheadRegistry(max_concurrent=1)
    slow = registry.get("slow")
    fast = registry.get("fast")
    slow.acquire()
    with pytest.raises(BulkheadFullError):
        slow.acquire()
    assert fast.call(lambda: "ok") == "ok"
    slow.release()


def test_registry_creation_is_thread_safe() -> None:
    registry = BulkheadRegistry(max_concurrent=3)
    threads_count = 16
    barrier = threading.Barrier(threads_count)
    got: list[Bulkhead] = []
    lock = threading.Lock()

    def get() -> None:
        barrier.wait(JOIN)
        for name in ("shared", "other", "shared"):
            bulkhead = registry.get(name)
            with lock:
                got.append(bulkhead)

    threads = [threading.Thread(target=get, daemon=True) for _ in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN)
        assert not thread.is_alive()
    assert len(got) == 3 * threads_count
    assert len({id(bulkhead) for bulkhead in got}) == 2
    assert len(registry) == 2
    assert registry.get("shared") in got


def test_registry_rejects_bad_defaults_up_front() -> None:
    with pytest.raises(ValueError, match="max_concurrent"):
        BulkheadRegistry(max_concurrent=0)


@pytest.mark.parametrize("max_wait", [1.0000000001, 1e-10, 0.123456789123])
def test_registry_same_max_wait_twice_returns_the_same_bulkhead(max_wait: float) -> None:
    registry = BulkheadRegistry()
    first = registry.get("x", max_wait=max_wait)
    assert registry.get("x", max_wait=max_wait) is first


def test_registry_same_round_max_wait_twice_returns_the_same_bulkhead() -> None:
    registry = BulkheadRegistry()
    for max_wait in (0.1, 0.3, 2.5, 1e-3):
        first = registry.get(str(max_wait), max_wait=max_wait)
        assert registry.get(str(max_wait), max_wait=max_wait) is first
