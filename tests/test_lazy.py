"""Lazy values, collections and properties: load once under concurrency, never cache a failure."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from buttress import AsyncLazy, AsyncLazyCollection, Lazy, LazyCollection, lazy_property
from hypothesis import given
from hypothesis import strategies as st

THREADS = 8


class Counter:
    """A loader that counts its calls, optionally slow, optionally failing the first n times."""

    def __init__(self, value: object = 42, *, delay: float = 0.0, failures: int = 0) -> None:
        self.value = value
        self.delay = delay
        self.failures = failures
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self) -> object:
        with self._lock:
            self.calls += 1
            fail = self.calls <= self.failures
        time.sleep(self.delay)
        if fail:
            raise ConnectionError("the source is down")
        return self.value


def race(target: object, count: int = THREADS) -> list[object]:
    """Calls `target()` from `count` threads released at once; returns every result."""
    barrier = threading.Barrier(count)
    results: list[object] = []
    lock = threading.Lock()

    def run() -> None:
        barrier.wait()
        value = target()  # type: ignore[operator]
        with lock:
            results.append(value)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
        assert not thread.is_alive(), "a thread hung: a lazy load deadlocked"
    return results


# ---- Lazy -----------------------------------------------------------------------------------


def test_lazy_loads_once_under_a_thread_race() -> None:
    loader = Counter(delay=0.02)
    lazy = Lazy(loader)
    assert race(lazy.get) == [42] * THREADS
    assert loader.calls == 1
    assert lazy.loaded


def test_lazy_does_not_cache_a_failure() -> None:
    loader = Counter(failures=1)
    lazy = Lazy(loader)
    with pytest.raises(ConnectionError):
        lazy.get()
    assert not lazy.loaded
    assert lazy() == 42
    assert loader.calls == 2


def test_lazy_reset_loads_again() -> None:
    loader = Counter()
    lazy = Lazy(loader)
    lazy.get()
    lazy.reset()
    assert not lazy.loaded
    lazy.get()
    assert loader.calls == 2


def test_lazy_caches_none_and_falsy_values() -> None:
    for value in (None, 0, "", []):
        loader = Counter(value)
        lazy = Lazy(loader)
        assert lazy.get() == value
        assert lazy.get() == value
        assert loader.calls == 1


@given(st.lists(st.booleans(), max_size=20))
def test_lazy_retries_until_the_first_success(outcomes: list[bool]) -> None:
    """Whatever sequence of failures and successes the source gives, the value is the first
    success, and the loader runs once per failure plus once."""
    calls = 0

    class SourceDown(Exception):
        pass

    def loader() -> int:
        nonlocal calls
        calls += 1
        if calls <= len(outcomes) and not outcomes[calls - 1]:
            raise SourceDown(calls)
        return calls

    lazy = Lazy(loader)
    first_success = next((index + 1 for index, ok in enumerate(outcomes) if ok), len(outcomes) + 1)
    for _ in range(first_success - 1):
        with pytest.raises(SourceDown):
            lazy.get()
    assert lazy.get() == first_success
    assert lazy.get() == first_success
    assert calls == first_success


@pytest.mark.parametrize("bad", [None, 5, "load"])
def test_non_callable_loaders_are_refused(bad: object) -> None:
    for kind in (Lazy, AsyncLazy, LazyCollection, AsyncLazyCollection, lazy_property):
        with pytest.raises(TypeError, match="loader must be callable"):
            kind(bad)  # type: ignore[arg-type]


# ---- LazyCollection ---------------------------------------------------------------------------


def test_collection_loads_on_first_use_once() -> None:
    loader = Counter([3, 1, 2], delay=0.01)
    rows: LazyCollection[int] = LazyCollection(loader)  # type: ignore[arg-type]
    assert not rows.loaded
    assert race(lambda: list(rows)) == [[3, 1, 2]] * THREADS
    assert (len(rows), rows[0], rows[-1], list(rows[1:])) == (3, 3, 2, [1, 2])
    assert 1 in rows
    assert loader.calls == 1


def test_collection_takes_a_generator_and_retries_a_failure() -> None:
    attempts = 0

    def rows() -> object:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionError("down")
        return (n * n for n in range(4))

    collection: LazyCollection[int] = LazyCollection(rows)  # type: ignore[arg-type]
    with pytest.raises(ConnectionError):
        len(collection)
    assert list(collection) == [0, 1, 4, 9]
    assert list(collection) == [0, 1, 4, 9]  # the generator was materialised once


# ---- lazy_property ----------------------------------------------------------------------------


class Report:
    def __init__(self, loader: Counter) -> None:
        self.loader = loader

    @lazy_property
    def total(self) -> object:
        """The expensive total."""
        return self.loader()


def test_property_computes_once_per_instance_under_a_thread_race() -> None:
    loader = Counter(delay=0.02)
    report = Report(loader)
    assert race(lambda: report.total) == [42] * THREADS
    assert loader.calls == 1
    other = Report(loader)
    assert other.total == 42
    assert loader.calls == 2


def test_property_caches_in_the_instance_dict_and_can_be_forgotten() -> None:
    report = Report(Counter())
    assert "total" not in vars(report)
    assert report.total == 42
    assert vars(report)["total"] == 42
    del report.total
    assert report.total == 42
    assert report.loader.calls == 2


def test_property_does_not_cache_a_failure() -> None:
    report = Report(Counter(failures=1))
    with pytest.raises(ConnectionError):
        _ = report.total
    assert report.total == 42


def test_property_on_the_class_is_the_descriptor_with_its_docstring() -> None:
    descriptor = Report.__dict__["total"]
    assert Report.total is descriptor  # type: ignore[comparison-overlap]
    assert descriptor.__doc__ == "The expensive total."


def test_property_needs_an_instance_dict() -> None:
    class Slotted:
        __slots__ = ()

        @lazy_property
        def value(self) -> int:
            return 1

    with pytest.raises(TypeError, match="__dict__"):
        _ = Slotted().value


def test_property_leaves_no_lock_behind() -> None:
    descriptor = Report.__dict__["total"]
    reports = [Report(Counter()) for _ in range(50)]
    for report in reports:
        _ = report.total
    assert descriptor._locks == {}


# ---- asyncio twins ----------------------------------------------------------------------------


async def test_async_lazy_loads_once_for_concurrent_tasks() -> None:
    calls = 0

    async def fetch() -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return 7

    lazy = AsyncLazy(fetch)
    assert await asyncio.gather(*(lazy.get() for _ in range(20))) == [7] * 20
    assert await lazy == 7
    assert calls == 1
    assert lazy.loaded


async def test_async_lazy_does_not_cache_a_failure() -> None:
    calls = 0

    async def fetch() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("down")
        return 7

    lazy = AsyncLazy(fetch)
    with pytest.raises(ConnectionError):
        await lazy.get()
    assert await lazy.get() == 7
    assert calls == 2


async def test_a_cancelled_caller_does_not_cancel_the_load_for_others() -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    calls = 0

    async def fetch() -> int:
        nonlocal calls
        calls += 1
        started.set()
        await release.wait()
        return 9

    lazy = AsyncLazy(fetch)
    impatient = asyncio.ensure_future(lazy.get())
    patient = asyncio.ensure_future(lazy.get())
    await started.wait()
    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    release.set()
    assert await patient == 9
    assert calls == 1


async def test_async_collection_and_iteration() -> None:
    calls = 0

    async def fetch() -> list[str]:
        nonlocal calls
        calls += 1
        return ["a", "b"]

    rows = AsyncLazyCollection(fetch)
    assert not rows.loaded
    assert await rows.all() == ("a", "b")
    assert [row async for row in rows] == ["a", "b"]
    assert calls == 1
    rows.reset()
    assert await rows.all() == ("a", "b")
    assert calls == 2


async def test_async_property_loads_once_per_instance() -> None:
    calls = 0

    class Profile:
        @lazy_property
        async def avatar(self) -> str:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.01)
            return "avatar.png"

    profile = Profile()
    loader = profile.avatar
    assert isinstance(loader, AsyncLazy)
    assert profile.avatar is loader  # one loader per instance, kept in its __dict__
    assert await asyncio.gather(*(loader.get() for _ in range(10))) == ["avatar.png"] * 10
    assert await profile.avatar == "avatar.png"
    assert calls == 1
