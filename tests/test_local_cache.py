"""buttress.LocalCache, the in-process cache (S3-FIFO eviction in ``rust/cache.rs``, binding in
``rust/cache_py.rs``).

- A hypothesis state machine runs the cache on a manual clock beside a model (a dict of
  key -> (value, deadline)). The model does not guess which key eviction picks: when it expects
  one eviction it asks the cache (``in``, which has no side effects) which key went, and checks
  that exactly one did. Everything else (every read, every count in ``stats()``) it predicts.
- On a Zipf trace the hit ratio is at least that of an LRU of the same size, and a scan of
  one-off keys does not flush a hot set.
- Threads hammer one cache for about a second; values whose finaliser calls back into the
  cache neither deadlock nor crash (run in a child process, so a deadlock that holds the GIL
  fails the test instead of hanging the run); a value -> cache -> value cycle is collected.
- Bad arguments raise errors naming the argument and change nothing stored; keys behave as
  dict keys.
"""

from __future__ import annotations

import functools
import gc
import itertools
import math
import os
import pathlib
import random
import subprocess
import sys
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import pytest
import support
from buttress import LocalCache, ManualClock
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

SECOND = 1_000_000_000
MISSING = object()
NAN = math.nan  # one NaN object: found again by identity, as a dict finds it
COUNTERS = ("hits", "misses", "inserts", "updates", "deletes", "evictions", "expirations")


def assert_names(error: pytest.ExceptionInfo[BaseException], argument: str) -> None:
    assert argument in str(error.value), f"{argument!r} not named in {str(error.value)!r}"


# ---- the state machine -------------------------------------------------------------------

# 1, True and 1.0 are one key, as are 0 and False; -1 and -2 share a hash in CPython, and so do
# 2**70 and 512 (2**70 mod 2**61 - 1): equal hashes must not make different keys one.
KEY_POOL: list[Hashable] = [
    0,
    False,
    1,
    True,
    1.0,
    2,
    3,
    4,
    5,
    -1,
    -2,
    512,
    2**70,
    2.5,
    "a",
    "b",
    b"a",
    None,
    NAN,
    (),
    (1, "a"),
    (1.0, "a"),
    ((1, 2), b"x", None),
]
KEYS = st.sampled_from(KEY_POOL)
TTLS = st.sampled_from([None, None, 0.5, 1.0, 1.5, 3.0])  # dyadic: exact in nanoseconds


class Value:
    """A value nobody else could have stored: a serial, compared by identity."""

    __slots__ = ("__weakref__", "serial")

    def __init__(self, serial: int) -> None:
        self.serial = serial

    def __repr__(self) -> str:
        return f"Value({self.serial})"


class LocalCacheMachine(RuleBasedStateMachine):
    """The model follows the core's rules for when entries leave:

    - a read or a delete of an expired entry drops it (an expiration, and a miss or False);
    - every write first drops every expired entry (each an expiration);
    - a write of a new key into a full cache then evicts exactly one other entry;
    - ``expire()`` and ``len()`` drop every expired entry; ``in`` and ``stats()`` drop nothing;
    - ``clear()`` drops everything without counting it.
    """

    @initialize(
        max_size=st.sampled_from([1, 2, 3, 5, 8]),
        default_ttl=st.sampled_from([None, None, 1.0, 2.5]),
        start=st.sampled_from([0.0, 7.25]),
    )
    def create(self, max_size: int, default_ttl: float | None, start: float) -> None:
        self.clock = ManualClock(start)
        self.cache = LocalCache(max_size, ttl=default_ttl, clock=self.clock)
        assert self.cache.max_size == max_size
        assert self.cache.ttl == default_ttl
        assert self.cache.clock is self.clock
        self.max_size = max_size
        self.default_ttl = default_ttl
        self.now = round(start * SECOND)
        # The entries the cache holds, expired ones not dropped yet included.
        self.entries: dict[Hashable, tuple[Value, int | None]] = {}
        self.expected = dict.fromkeys(COUNTERS, 0)
        self.cleared = 0  # entries dropped by clear(), which no counter records
        self.retired: set[int] = set()  # serials that must never be read again
        self.serials = itertools.count()
        self.since_clear: dict[Hashable, None] = {}  # distinct keys written since clear()
        self.evictions_at_clear = 0

    # -- model helpers ---------------------------------------------------------------------

    def _expired(self, deadline: int | None) -> bool:
        return deadline is not None and self.now >= deadline

    def _live(self, key: Hashable) -> bool:
        return key in self.entries and not self._expired(self.entries[key][1])

    def _retire(self, value: Value) -> None:
        self.retired.add(value.serial)

    def _drop_expired(self) -> int:
        expired = [key for key, (_, deadline) in self.entries.items() if self._expired(deadline)]
        for key in expired:
            self._retire(self.entries.pop(key)[0])
            self.expected["expirations"] += 1
        return len(expired)

    def _store(self, key: Hashable, ttl: float | None, write: Callable[[Value], None]) -> None:
        value = Value(next(self.serials))
        lifetime = ttl if ttl is not None else self.default_ttl
        deadline = None if lifetime is None else self.now + round(lifetime * SECOND)
        self._drop_expired()
        evicting = False
        if key in self.entries:
            self.expected["updates"] += 1
            self._retire(self.entries[key][0])
        else:
            self.expected["inserts"] += 1
            evicting = len(self.entries) >= self.max_size
        write(value)
        if evicting:
            # Which key goes is the policy's choice; that exactly one other key went is not.
            self.expected["evictions"] += 1
            gone = [stored for stored in self.entries if stored not in self.cache]
            assert len(gone) == 1, f"one eviction should drop one key, dropped {gone!r}"
            self._retire(self.entries.pop(gone[0])[0])
        self.entries[key] = (value, deadline)
        self.since_clear[key] = None

    def _read(self, key: Hashable) -> object:
        if key not in self.entries:
            self.expected["misses"] += 1
            return MISSING
        value, deadline = self.entries[key]
        if self._expired(deadline):
            del self.entries[key]
            self._retire(value)
            self.expected["expirations"] += 1
            self.expected["misses"] += 1
            return MISSING
        self.expected["hits"] += 1
        return value

    # -- rules -----------------------------------------------------------------------------

    @rule(key=KEYS, ttl=TTLS)
    def set_value(self, key: Hashable, ttl: float | None) -> None:
        self._store(key, ttl, lambda value: self.cache.set(key, value, ttl=ttl))

    @rule(key=KEYS)
    def set_item(self, key: Hashable) -> None:
        self._store(key, None, lambda value: self.cache.__setitem__(key, value))

    @rule()
    def set_a_nan_of_its_own(self) -> None:
        key = float("nan")  # equal to no other key, itself included: only found by identity
        self._store(key, None, lambda value: self.cache.set(key, value))
        other = float("nan")
        assert other not in self.cache
        assert self.cache.get(other, MISSING) is MISSING
        self.expected["misses"] += 1

    @rule(key=KEYS, how=st.sampled_from(["get", "item"]))
    def get_value(self, key: Hashable, how: str) -> None:
        expected = self._read(key)
        got: object
        if how == "get":
            got = self.cache.get(key, MISSING)
        else:
            try:
                got = self.cache[key]
            except KeyError:
                got = MISSING
        assert got is expected, f"read {key!r}: got {got!r}, expected {expected!r}"
        if isinstance(got, Value):
            assert got.serial not in self.retired

    @rule(key=KEYS, how=st.sampled_from(["delete", "del"]))
    def delete_key(self, key: Hashable, how: str) -> None:
        expected = False
        if key in self.entries:
            value, deadline = self.entries.pop(key)
            self._retire(value)
            if self._expired(deadline):
                self.expected["expirations"] += 1
            else:
                self.expected["deletes"] += 1
                expected = True
        if how == "delete":
            assert self.cache.delete(key) is expected
        elif expected:
            del self.cache[key]
        else:
            with pytest.raises(KeyError):
                del self.cache[key]

    @rule(key=KEYS)
    def contains_key(self, key: Hashable) -> None:
        assert (key in self.cache) == self._live(key)

    @rule(seconds=st.sampled_from([0.25, 0.5, 1.0, 2.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.now += round(seconds * SECOND)

    @rule()
    def expire_all(self) -> None:
        expected = self._drop_expired()
        assert self.cache.expire() == expected

    @rule()
    def length(self) -> None:
        self._drop_expired()
        assert len(self.cache) == len(self.entries)

    @rule()
    def clear_all(self) -> None:
        self.cache.clear()
        self.cleared += len(self.entries)
        for value, _ in self.entries.values():
            self._retire(value)
        self.entries.clear()
        self.since_clear.clear()
        self.evictions_at_clear = self.expected["evictions"]

    # -- what must hold after every step ---------------------------------------------------

    @invariant()
    def stats_agree(self) -> None:
        stats = self.cache.stats()
        assert stats == {**self.expected, "size": len(self.entries), "max_size": self.max_size}
        assert stats["size"] <= self.max_size
        # Every entry that left is explained by a count (or by clear()).
        explained = stats["deletes"] + stats["evictions"] + stats["expirations"] + self.cleared
        assert stats["inserts"] - explained == stats["size"]

    @invariant()
    def nothing_evicted_while_everything_fits(self) -> None:
        # (The model then holds every live key written, and membership_agrees checks that
        # the cache finds each one.)
        if len(self.since_clear) <= self.max_size:
            assert self.expected["evictions"] == self.evictions_at_clear
            assert self.cache.stats()["evictions"] == self.evictions_at_clear

    @invariant()
    def membership_agrees(self) -> None:
        for key in self.entries:
            assert (key in self.cache) == self._live(key), key
        for key in KEY_POOL:
            if key not in self.entries:
                assert key not in self.cache, key


TestLocalCacheAgreesWithModel = LocalCacheMachine.TestCase
TestLocalCacheAgreesWithModel.settings = settings(stateful_step_count=60)


# ---- hit ratio ---------------------------------------------------------------------------

TRACE_KEYS = 100_000
TRACE_REQUESTS = 200_000


@functools.cache
def zipf_trace(alpha: float) -> tuple[int, ...]:
    """A fixed request trace over TRACE_KEYS keys whose popularity follows Zipf's law."""
    rng = random.Random(20_240_601)
    cumulative = list(itertools.accumulate(1.0 / rank**alpha for rank in range(1, TRACE_KEYS + 1)))
    keys = list(range(TRACE_KEYS))
    rng.shuffle(keys)  # popularity unrelated to the key's value (and hash)
    return tuple(rng.choices(keys, cum_weights=cumulative, k=TRACE_REQUESTS))


def lru_hits(trace: Sequence[Hashable], size: int) -> int:
    """Hits of a plain LRU of `size` entries used read-through on `trace`."""
    entries: OrderedDict[Hashable, bool] = OrderedDict()
    hits = 0
    for key in trace:
        if key in entries:
            entries.move_to_end(key)
            hits += 1
        else:
            entries[key] = True
            if len(entries) > size:
                entries.popitem(last=False)
    return hits


def local_cache_hits(trace: Sequence[Hashable], cache: LocalCache) -> int:
    """Hits of `cache` used read-through on `trace`."""
    hits = 0
    get, put = cache.get, cache.set
    for key in trace:
        if get(key) is None:
            put(key, True)
        else:
            hits += 1
    return hits


@pytest.mark.parametrize("alpha", [0.8, 1.0])
@pytest.mark.parametrize("share", [0.01, 0.1])
def test_hit_ratio_on_a_zipf_trace_is_at_least_lru(alpha: float, share: float) -> None:
    trace = zipf_trace(alpha)
    size = int(TRACE_KEYS * share)
    cache = LocalCache(size)
    hits = local_cache_hits(trace, cache)
    lru = lru_hits(trace, size)
    stats = cache.stats()
    assert stats["hits"] == hits
    assert stats["hits"] + stats["misses"] == len(trace)
    assert stats["size"] == size
    assert hits >= lru, f"S3-FIFO hit ratio {hits / len(trace):.3f} < LRU {lru / len(trace):.3f}"


def test_a_scan_of_one_off_keys_does_not_flush_a_hot_set() -> None:
    size = 1000
    hot = [("hot", n) for n in range(size // 2)]
    scan = [("scan", n) for n in range(10 * size)]
    # Warm up: each hot key written, then read twice, as a read-through cache would see it.
    trace: list[Hashable] = [*hot, *hot, *hot, *scan]
    cache = LocalCache(size)
    local_cache_hits(trace, cache)
    kept = sum(key in cache for key in hot)
    assert kept == len(hot), f"the scan flushed {len(hot) - kept} of {len(hot)} hot keys"
    # The same trace flushes an LRU completely: the scan is a real threat.
    entries: OrderedDict[Hashable, bool] = OrderedDict()
    for key in trace:
        entries[key] = True
        entries.move_to_end(key)
        if len(entries) > size:
            entries.popitem(last=False)
    assert not any(key in entries for key in hot)
    # And the hot set still hits afterwards, with the scan's keys the ones evicted.
    assert local_cache_hits(hot, cache) == len(hot)
    assert cache.stats()["evictions"] == len(hot) + len(scan) - size


# ---- threads -----------------------------------------------------------------------------

THREADS = 8
RUN_FOR = 1.0


@pytest.mark.timeout(30)
def test_threads_hammering_one_cache() -> None:
    cache = LocalCache(8, ttl=0.0002)
    keys: list[Hashable] = [*range(12), "a", b"a", (1, "a")]
    written: list[set[tuple[Hashable, int, int]]] = [set() for _ in range(THREADS)]
    read: list[list[tuple[Hashable, object]]] = [[] for _ in range(THREADS)]
    counts = [dict.fromkeys(("gets", "hits", "sets", "deleted"), 0) for _ in range(THREADS)]
    deadline = time.monotonic() + RUN_FOR

    def worker(index: int) -> None:
        rng = random.Random(index)
        mine, seen, count = written[index], read[index], counts[index]
        serial = 0
        while time.monotonic() < deadline:
            for _ in range(50):
                key = rng.choice(keys)
                roll = rng.random()
                if roll < 0.35:
                    value = (key, index, serial)
                    serial += 1
                    mine.add(value)  # before the write, so a reader can never see it first
                    count["sets"] += 1
                    if roll < 0.15:
                        cache[key] = value
                    else:
                        cache.set(key, value, ttl=rng.choice([None, 1e-5, 1e-4, 0.01]))
                elif roll < 0.75:
                    count["gets"] += 1
                    got = cache.get(key, MISSING)
                    if got is not MISSING:
                        count["hits"] += 1
                        seen.append((key, got))
                elif roll < 0.85:
                    count["deleted"] += cache.delete(key)
                elif roll < 0.9:
                    assert len(cache) <= 8
                elif roll < 0.95:
                    _ = key in cache
                elif roll < 0.98:
                    assert cache.expire() >= 0
                elif roll < 0.995:
                    assert cache.stats()["size"] <= 8
                else:
                    cache.clear()

    support.run_threads(worker, THREADS, RUN_FOR + 15)

    every_write = set().union(*written)
    for key, got in itertools.chain.from_iterable(read):
        assert isinstance(got, tuple)
        assert got[0] == key, f"read {got!r} under {key!r}"
        assert got in every_write, f"read {got!r}, which no thread wrote"
    stats = cache.stats()
    total = {name: sum(count[name] for count in counts) for name in counts[0]}
    assert total["gets"] > 1000, "the threads barely ran"
    assert stats["evictions"] > 0, "the stress never filled the cache"
    assert stats["expirations"] > 0, "the stress never outlived a ttl"
    assert stats["hits"] == total["hits"]
    assert stats["hits"] + stats["misses"] == total["gets"]
    assert stats["inserts"] + stats["updates"] == total["sets"]
    assert stats["deletes"] == total["deleted"]
    assert stats["size"] <= 8
    assert len(cache) <= 8


# ---- finalisers that call back, and reference cycles ---------------------------------------


class CallsBack:
    """A value whose finaliser uses the cache that holds it."""

    def __init__(self, cache: LocalCache, action: Callable[[LocalCache], object]) -> None:
        self.cache = cache
        self.action = action

    def __del__(self) -> None:
        FINALISED.append(self.action(self.cache))


FINALISED: list[object] = []

CALLBACKS: dict[str, Callable[[LocalCache], object]] = {
    "get": lambda cache: cache.get("probe"),
    "set": lambda cache: cache.set(("from finaliser", len(FINALISED)), 1),
    "delete": lambda cache: cache.delete("probe"),
    "contains": lambda cache: "probe" in cache,
    "len": len,
    "expire": lambda cache: cache.expire(),
    "clear": lambda cache: cache.clear(),
    "stats": lambda cache: cache.stats(),
}


def drop_one_value(path: str, action: Callable[[LocalCache], object]) -> None:
    """Stores one `CallsBack` value and lets the cache drop it by `path`; checks that its
    finaliser ran at once (or, for a cycle, at the next collection) and the cache still works."""
    clock = ManualClock()
    cache = LocalCache(3, clock=clock)
    cache.set("probe", 0)
    before = len(FINALISED)
    cache.set("victim", CallsBack(cache, action), ttl=1.0 if path.startswith("expired") else None)
    if path == "evicted":
        for n in range(6):
            cache.set(n, n)
    elif path == "replaced":
        cache.set("victim", 1)
    elif path == "deleted":
        assert cache.delete("victim")
    elif path == "del":
        del cache["victim"]
    elif path == "cleared":
        cache.clear()
    else:
        clock.advance(2.0)
        if path == "expired on read":
            assert cache.get("victim") is None
        elif path == "expired by expire":
            assert cache.expire() == 1
        elif path == "expired by len":
            assert len(cache) <= 2
        elif path == "expired on write":
            cache.set("other", 1)
        elif path == "expired on delete":
            assert not cache.delete("victim")
        else:
            raise AssertionError(path)
    assert len(FINALISED) == before + 1, f"{path}: the finaliser did not run at once"
    cache.set("after", 2)
    assert cache.get("after") == 2
    assert len(cache) <= 3
    # A cycle: the value holds the cache, the cache holds the value; the collector's clear
    # runs the finaliser, which calls back into the cache being cleared.
    # (A LocalCache takes no weak reference, so a value only it holds tells that it went.)
    cache.set("cycle", CallsBack(cache, action))
    held = Value(-1)
    cache.set("held", held)
    reference = weakref.ref(held)
    del cache, held
    gc.collect()
    assert reference() is None, f"{path}: the cache in a cycle was not collected"
    assert len(FINALISED) == before + 2, f"{path}: the cycle's finaliser did not run"


DROP_PATHS = [
    "evicted",
    "replaced",
    "deleted",
    "del",
    "cleared",
    "expired on read",
    "expired by expire",
    "expired by len",
    "expired on write",
    "expired on delete",
]


def run_reentrant_finalisers() -> None:
    """Every way a value can leave the cache, with every kind of call back; then threads that
    store such values in one shared cache. Run in a child process by the test below."""
    unraisable: list[Any] = []
    sys.unraisablehook = unraisable.append
    for path in DROP_PATHS:
        for action in CALLBACKS.values():
            drop_one_value(path, action)
    shared = LocalCache(4, ttl=0.001)
    deadline = time.monotonic() + 0.5

    def worker(index: int) -> None:
        rng = random.Random(index)
        actions = list(CALLBACKS.values())
        while time.monotonic() < deadline:
            key = rng.randrange(8)
            roll = rng.random()
            if roll < 0.6:
                shared.set(key, CallsBack(shared, rng.choice(actions)))
            elif roll < 0.8:
                shared.get(key)
            elif roll < 0.95:
                shared.delete(key)
            else:
                shared.clear()

    support.run_threads(worker, 4, 10.0)
    shared.clear()
    gc.collect()
    assert not unraisable, [str(hook.exc_value) for hook in unraisable]
    print("finalisers ran:", len(FINALISED))


def test_finalisers_that_call_back_into_the_cache_neither_deadlock_nor_crash() -> None:
    # A child process: a deadlock on the cache's lock would hold the GIL, and nothing in this
    # process (pytest-timeout included) could then stop it.
    tests = pathlib.Path(__file__).resolve().parent
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), *sys.path])}
    code = (
        "import faulthandler; faulthandler.dump_traceback_later(20, exit=True)\n"
        "import test_local_cache; test_local_cache.run_reentrant_finalisers()\n"
    )
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-c", code],
        cwd=tests,
        env=environment,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "finalisers ran:" in done.stdout


def test_a_value_cache_value_cycle_is_collected() -> None:
    class Owner:
        """Holds a cache that holds it back, as a service caching its own results would."""

        def __init__(self) -> None:
            self.cache = LocalCache(4, clock=ManualClock())
            self.cache.set("owner", self)
            self.cache.set(("owner", 2), [self, self.cache])
            self.only_in_the_cache = Value(0)
            self.cache.set("value", self.only_in_the_cache)

    owner = Owner()
    owner_ref = weakref.ref(owner)
    # A LocalCache takes no weak reference; a value only the cache holds tells that it went.
    value_ref = weakref.ref(owner.only_in_the_cache)
    del owner.only_in_the_cache
    assert value_ref() is not None
    del owner
    gc.collect()
    assert owner_ref() is None
    assert value_ref() is None


def test_a_cache_takes_a_weak_reference() -> None:
    cache = LocalCache(4)
    reference = weakref.ref(cache)
    assert reference() is cache
    del cache
    assert reference() is None


# ---- bad input ---------------------------------------------------------------------------


def case(*values: object, name: str, bug: str | None = None) -> Any:
    """A parametrize case with a readable id; `bug` marks a known bug (a strict xfail)."""
    marks = [pytest.mark.xfail(strict=True, reason=f"bug: {bug}")] if bug else []
    return pytest.param(*values, id=name, marks=marks)


EITHER = (TypeError, ValueError)  # a bool is refused; which of the two is not the point

CONSTRUCTOR_BAD: list[Any] = [
    case({"max_size": 0}, ValueError, "max_size", name="max_size=0"),
    case({"max_size": -1}, ValueError, "max_size", name="max_size=-1"),
    case({"max_size": 2**32 - 1}, ValueError, "max_size", name="max_size=2**32-1"),
    case({"max_size": 2**32}, ValueError, "max_size", name="max_size=2**32"),
    case({"max_size": 2**64}, ValueError, "max_size", name="max_size=2**64"),
    case({"max_size": 1.0}, TypeError, "max_size", name="max_size=1.0"),
    case({"max_size": 10.5}, TypeError, "max_size", name="max_size=10.5"),
    case({"max_size": "10"}, TypeError, "max_size", name="max_size='10'"),
    case({"max_size": None}, TypeError, "max_size", name="max_size=None"),
    case({"max_size": False}, EITHER, "max_size", name="max_size=False"),
    case(
        {"max_size": True},
        EITHER,
        "max_size",
        name="max_size=True",
    ),
    case({"max_size": 10, "clock": 5}, TypeError, "clock", name="clock=5"),
    case({"max_size": 10, "clock": "manual"}, TypeError, "clock", name="clock='manual'"),
    case({"max_size": 10, "clock": ManualClock}, TypeError, "clock", name="clock=ManualClock"),
    case({"max_size": 10, "clock": time.monotonic}, TypeError, "clock", name="clock=monotonic"),
]

TTL_BAD: list[Any] = [
    case(0, ValueError, name="0"),
    case(0.0, ValueError, name="0.0"),
    case(-1, ValueError, name="-1"),
    case(-0.5, ValueError, name="-0.5"),
    case(math.nan, ValueError, name="nan"),
    case(math.inf, ValueError, name="inf"),
    case(-math.inf, ValueError, name="-inf"),
    case(1e30, ValueError, name="1e30"),
    case("1", TypeError, name="'1'"),
    case([1], TypeError, name="[1]"),
    case(False, EITHER, name="False"),
    case(True, EITHER, name="True"),
    case(
        1e-12,
        ValueError,
        name="1e-12",
    ),
]


@pytest.mark.parametrize(("options", "error", "argument"), CONSTRUCTOR_BAD)
def test_constructor_rejects_bad_arguments(
    options: dict[str, Any], error: type[Exception], argument: str
) -> None:
    with pytest.raises(error) as caught:
        LocalCache(**options)
    assert_names(caught, argument)


@pytest.mark.parametrize(("ttl", "error"), TTL_BAD)
def test_constructor_rejects_a_bad_ttl(ttl: object, error: type[Exception]) -> None:
    with pytest.raises(error) as caught:
        LocalCache(10, ttl=ttl)  # type: ignore[arg-type]
    assert_names(caught, "ttl")


def test_the_largest_max_size_is_accepted() -> None:
    # No memory is set aside up front, so the largest size costs nothing until used.
    assert LocalCache(2**32 - 2).max_size == 2**32 - 2


def stored_cache() -> LocalCache:
    cache = LocalCache(5, ttl=60.0, clock=ManualClock())
    cache.set("a", 1)
    cache.set(2, "two", ttl=5.0)
    cache.set((1, "x"), [3])
    assert cache.get("a") == 1
    assert cache.get("zzz") is None
    return cache


def snapshot(cache: LocalCache) -> tuple[dict[str, int], list[bool]]:
    """What the cache holds and has counted, read without counting anything."""
    return cache.stats(), [key in cache for key in ("a", 2, (1, "x"), "zzz")]


@pytest.mark.parametrize(("ttl", "error"), TTL_BAD)
def test_set_rejects_a_bad_ttl_and_changes_nothing(ttl: object, error: type[Exception]) -> None:
    cache = stored_cache()
    before = snapshot(cache)
    with pytest.raises(error) as caught:
        cache.set("a", "new", ttl=ttl)  # type: ignore[arg-type]
    assert_names(caught, "ttl")
    with pytest.raises(error):
        cache.set("new key", "new", ttl=ttl)  # type: ignore[arg-type]
    assert snapshot(cache) == before
    assert cache.get("a") == 1


class StrSubclass(str):
    pass


class IntSubclass(int):
    pass


class CustomKey:
    def __hash__(self) -> int:
        return 1

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CustomKey)


BAD_KEYS: list[Any] = [
    [1],
    {"a": 1},
    {1},
    frozenset({1}),
    bytearray(b"a"),
    object(),
    CustomKey(),
    StrSubclass("a"),  # equal to "a" and hashed like it, yet its == could run Python code
    IntSubclass(2),
    (1, [2]),
    ("a", (1, object())),
    ("a", StrSubclass("a")),
]

KEY_OPERATIONS: dict[str, Callable[[LocalCache, Any], object]] = {
    "get": lambda cache, key: cache.get(key),
    "get with default": lambda cache, key: cache.get(key, "default"),
    "set": lambda cache, key: cache.set(key, "new"),
    "set with ttl": lambda cache, key: cache.set(key, "new", ttl=1.0),
    "delete": lambda cache, key: cache.delete(key),
    "in": lambda cache, key: key in cache,
    "[]": lambda cache, key: cache[key],
    "[]=": lambda cache, key: cache.__setitem__(key, "new"),
    "del []": lambda cache, key: cache.__delitem__(key),
}


@pytest.mark.parametrize("operation", list(KEY_OPERATIONS), ids=str)
@pytest.mark.parametrize("key", BAD_KEYS, ids=lambda key: type(key).__name__)
def test_a_key_that_is_not_plain_is_refused_and_changes_nothing(
    key: object, operation: str
) -> None:
    cache = stored_cache()
    before = snapshot(cache)
    with pytest.raises(TypeError, match=r"\bkey\b") as caught:
        KEY_OPERATIONS[operation](cache, key)
    assert type(key).__name__ in str(caught.value)
    assert snapshot(cache) == before
    assert cache.get("a") == 1
    assert cache.get(2) == "two"


# ---- key semantics -----------------------------------------------------------------------


def test_one_one_point_oh_and_true_are_one_key() -> None:
    cache = LocalCache(10)
    cache.set(1, "int")
    assert cache.get(1.0) == "int"
    assert cache.get(True) == "int"
    cache.set(True, "bool")
    cache[1.0] = "float"
    assert len(cache) == 1
    assert cache[1] == "float"
    stats = cache.stats()
    assert (stats["inserts"], stats["updates"]) == (1, 2)
    assert cache.delete(True)
    assert 1 not in cache
    cache.set(0, "zero")
    assert cache.get(False) == cache.get(0.0) == cache.get(-0.0) == "zero"


def test_bytes_and_str_are_different_keys() -> None:
    cache = LocalCache(10)
    cache.set(b"a", "bytes")
    cache.set("a", "str")
    assert len(cache) == 2
    assert (cache[b"a"], cache["a"]) == ("bytes", "str")
    assert cache.delete("a")
    assert cache[b"a"] == "bytes"


def test_tuples_are_keys_by_value() -> None:
    cache = LocalCache(10)
    cache.set((1, "a", (b"x", None)), "nested")
    assert cache.get((1.0, "a", (b"x", None))) == "nested"
    assert cache.get((True, "a", (b"x", None))) == "nested"
    assert cache.get((1, "a", (b"x",))) is None
    cache.set((1,), "one-tuple")
    cache.set(1, "one")
    cache.set((), "empty")
    assert (cache[(1,)], cache[1], cache[()]) == ("one-tuple", "one", "empty")
    assert len(cache) == 4


def test_equal_hashes_do_not_make_keys_equal() -> None:
    cache = LocalCache(100)
    colliding = [-1, -2, 2**61 - 1 + 5, 5, 2**70, 512]
    assert hash(-1) == hash(-2)
    assert hash(2**70) == hash(512)
    for key in colliding:
        cache.set(key, ("value", key))
    for key in colliding:
        assert cache[key] == ("value", key)
    assert cache.delete(-1)
    assert cache[-2] == ("value", -2)
    assert -1 not in cache


def test_nan_keys_behave_as_in_a_dict() -> None:
    nan = float("nan")
    other = float("nan")
    cache = LocalCache(10)
    reference = {nan: "nan"}
    cache.set(nan, "nan")
    assert (nan in cache) is (nan in reference) is True
    assert (other in cache) is (other in reference) is False
    assert cache.get(nan) == "nan"
    assert cache.get(other) is None
    # In a tuple the same NaN object is found too (tuple equality checks identity first).
    cache.set((nan, 1), "tuple")
    assert cache.get((nan, 1)) == "tuple"
    assert cache.get((other, 1)) is None
    cache.set(other, "other")
    assert len(cache) == 3
    assert cache.delete(nan)
    assert cache.get(other) == "other"


def test_none_is_a_key() -> None:
    cache = LocalCache(10)
    cache.set(None, "none")
    assert None in cache
    assert cache[None] == "none"
    assert cache.get(None, "default") == "none"
    del cache[None]
    assert cache.get(None, "default") == "default"


@pytest.mark.parametrize("key", ["missing", 7, b"m", 2.5, 10**30])
def test_a_missing_key_raises_key_error_carrying_the_key(key: Hashable) -> None:
    cache = LocalCache(10)
    cache.set("present", 1)
    with pytest.raises(KeyError) as caught:
        cache[key]
    assert caught.value.args == (key,)
    with pytest.raises(KeyError) as caught:
        del cache[key]
    assert caught.value.args == (key,)
    assert cache.stats()["deletes"] == 0
    assert cache["present"] == 1


@pytest.mark.parametrize("key", [(1, 2), (), ("a",), None], ids=repr)
def test_a_missing_tuple_or_none_key_raises_key_error_carrying_the_key(key: Hashable) -> None:
    cache = LocalCache(10)
    with pytest.raises(KeyError) as caught:
        cache[key]
    assert caught.value.args == (key,)
    with pytest.raises(KeyError) as caught:
        del cache[key]
    assert caught.value.args == (key,)


# ---- stats, repr, properties and lifetimes -----------------------------------------------


def test_properties_repr_and_stats() -> None:
    clock = ManualClock()
    cache = LocalCache(3, ttl=60, clock=clock)
    assert cache.max_size == 3
    assert cache.ttl == 60.0
    assert cache.clock is clock
    assert LocalCache.blocking is False
    assert cache.blocking is False
    assert repr(cache) == "LocalCache(max_size=3, size=0)"
    plain = LocalCache(5)
    assert plain.ttl is None
    assert plain.clock is None
    assert LocalCache(5, ttl=0.25).ttl == 0.25
    assert LocalCache(5, clock=None).clock is None
    assert plain.stats() == {**dict.fromkeys(COUNTERS, 0), "size": 0, "max_size": 5}

    for key in "abc":
        cache.set(key, key.upper())
    assert repr(cache) == "LocalCache(max_size=3, size=3)"
    cache["b"] = "B2"
    assert cache.get("b") == "B2"
    assert cache.get("zzz") is None
    assert "c" in cache  # counts nothing
    assert cache.delete("b")
    assert not cache.delete("b")
    cache.set("d", "D")
    cache.set("e", "E")  # the cache is full: one entry is evicted
    assert len(cache) == 3
    assert cache.stats() == {
        "hits": 1,
        "misses": 1,
        "inserts": 5,
        "updates": 1,
        "deletes": 1,
        "evictions": 1,
        "expirations": 0,
        "size": 3,
        "max_size": 3,
    }
    before = cache.stats()
    cache.clear()
    assert cache.stats() == {**before, "size": 0}, "clear() keeps the counts"
    assert len(cache) == 0
    assert repr(cache) == "LocalCache(max_size=3, size=0)"


def test_the_default_ttl_applies_and_a_ttl_per_set_overrides_it() -> None:
    clock = ManualClock()
    cache = LocalCache(10, ttl=5.0, clock=clock)
    cache.set("default", 1)
    cache["item"] = 2
    cache.set("longer", 3, ttl=10.0)
    cache.set("shorter", 4, ttl=1.0)
    clock.advance(1.0)
    assert "shorter" not in cache
    assert cache.get("default") == 1
    clock.advance(3.999)
    assert (cache.get("default"), cache.get("item")) == (1, 2)
    clock.advance(0.001)
    assert cache.get("default") is None
    assert cache.get("item") is None
    assert cache.get("longer") == 3
    clock.advance(5.0)
    assert cache.get("longer") is None
    stats = cache.stats()
    assert stats["expirations"] == 3  # "shorter" is still stored: nothing dropped it yet
    assert stats["size"] == 1
    assert cache.expire() == 1
    assert len(cache) == 0


def test_rewriting_a_key_without_ttl_takes_the_default_not_the_old_deadline() -> None:
    clock = ManualClock()
    cache = LocalCache(10, ttl=5.0, clock=clock)
    cache.set("a", 1, ttl=100.0)
    cache.set("b", 1, ttl=100.0)
    clock.advance(50.0)
    cache.set("a", 2)
    cache["b"] = 2
    clock.advance(5.0)
    assert cache.get("a") is None
    assert cache.get("b") is None
    # And with no default, a rewrite without ttl lives for ever.
    plain = LocalCache(10, clock=clock)
    plain.set("a", 1, ttl=1.0)
    plain.set("a", 2)
    clock.advance(1000.0)
    assert plain.get("a") == 2


def test_expired_entries_count_as_size_until_dropped() -> None:
    clock = ManualClock()
    cache = LocalCache(10, clock=clock)
    cache.set("a", 1, ttl=1.0)
    cache.set("b", 2, ttl=1.0)
    cache.set("c", 3)
    clock.advance(1.0)
    assert "a" not in cache
    assert cache.stats()["size"] == 3
    assert cache.stats()["expirations"] == 0
    assert not cache.delete("a")  # an expired entry: dropped, counted as an expiration
    assert cache.stats()["deletes"] == 0
    assert cache.stats()["expirations"] == 1
    assert len(cache) == 1  # len drops "b"
    assert cache.stats()["expirations"] == 2
    assert cache.expire() == 0


def test_a_full_cache_of_expired_entries_drops_them_rather_than_evicting() -> None:
    clock = ManualClock()
    cache = LocalCache(3, clock=clock)
    for key in range(3):
        cache.set(key, key, ttl=1.0)
    clock.advance(1.0)
    cache.set("new", 1)
    stats = cache.stats()
    assert (stats["evictions"], stats["expirations"], stats["size"]) == (0, 3, 1)


def test_ttl_is_a_keyword_of_the_constructor_and_set_takes_it_positionally() -> None:
    with pytest.raises(TypeError):
        LocalCache(10, 5.0)  # type: ignore[misc]
    clock = ManualClock()
    cache = LocalCache(10, clock=clock)
    cache.set("a", 1, 1.0)
    clock.advance(1.0)
    assert "a" not in cache
