"""In-process cache: ``buttress.LocalCache`` beside cachetools, moka-py and theine.

Every cache holds at most ``SIZE`` (10,000) entries, and every case starts from a cache filled
with the same 10,000 str keys (``KEYS``) and values (``VALUES``) by plain sets, no reads.

- cache-get-hit: one get of an existing key, keys cycling over ``KEYS``: buttress ``get()`` and
  ``[]``, cachetools' ``LRUCache`` ``get()`` and ``[]``, moka-py's ``get()`` (its default policy,
  TinyLFU), theine's ``get()`` (it returns ``(value, found)``; the body returns ``found``), and a
  plain dict's ``get()`` as a floor.
- cache-get-hit-ttl: the same hits on entries that expire in an hour: buttress
  ``LocalCache(ttl=3600)``, cachetools' ``TTLCache``, moka-py's ``Moka(ttl=3600)`` and theine's
  ``set(ttl=timedelta(hours=1))``. An expiry changes what a hit costs (a clock read, a check).
- cache-set-update: a set of an existing key, keys cycling over ``KEYS``: nothing is evicted.
- cache-set-insert: a set of a key the cache never saw into the full cache, so the cache must
  either evict an entry or turn the new key away. Keys come from ``NEW_KEYS``, one pass, never
  twice. Note that moka-py and theine admit by TinyLFU: a new key seen once is not more popular
  than the entries in the cache, so most of these sets are turned away (the check counts how many
  stayed), which is cheaper than an insert and an eviction. moka-py's ``policy="lru"`` is there
  to show an insert that evicts every time. Sets are split into two groups so that each ratio
  table sets like against like.

After timing, each case checks that what it timed was what it claims: every get hit (buttress:
``stats()`` counted 0 misses; theine: its ``stats()`` too; caches without counts: every key is
still cached with its value, and as the bodies only read, a key cached now was cached all
along), every update kept all 10,000 keys and changed the right ones, every insert evicted
(buttress: its counts; cachetools: the cache holds exactly the last 10,000 keys set).

Beside the timings, ``test_zipf_hit_ratio`` replays read-through traces (a get, then a set on a
miss) drawn from Zipf distributions and adds the hit ratio of every cache to the report (a
section printed after the groups' tables, through conftest's ``report_section`` fixture). It is
not a benchmark: pytest-benchmark's ``--benchmark-only`` skips it, and under
``--benchmark-disable`` it replays a trace a hundred times smaller.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import buttress
import cachetools
import moka_py
import pytest
import theine
from _harness import BARE_FORM, BASELINE, BUTTRESS, FLOOR, Bench, Case, Counts, Made, registrar

CACHETOOLS = "cachetools"
MOKA = "moka-py"
THEINE = "theine"

SIZE = 10_000
KEYS = [f"user:{number}" for number in range(SIZE)]
VALUES = [f"profile of {key}" for key in KEYS]
ITEMS = list(zip(KEYS, VALUES, strict=True))
UPDATED = "updated"  # what the update bodies set
NEW_VALUE = "new"  # what the insert bodies set
TTL = 3600.0


def _index(key: str) -> int:
    """The number of a key of KEYS or NEW_KEYS ("user:12" -> 12)."""
    return int(key.partition(":")[2])


def _fill(store: Callable[[str, str], object]) -> None:
    for key, value in ITEMS:
        store(key, value)


def _buttress(ttl: float | None = None) -> buttress.LocalCache:
    cache = buttress.LocalCache(SIZE, ttl=ttl)
    _fill(cache.set)
    return cache


def _lru() -> cachetools.LRUCache[str, str]:
    cache: cachetools.LRUCache[str, str] = cachetools.LRUCache(SIZE)
    _fill(cache.__setitem__)
    return cache


def _moka(**options: Any) -> Any:
    cache = moka_py.Moka(SIZE, **options)
    _fill(cache.set)
    return cache


def _theine(ttl: timedelta | None = None) -> theine.Cache[str, str]:
    cache: theine.Cache[str, str] = theine.Cache(SIZE)
    _fill(lambda key, value: cache.set(key, value, ttl))
    return cache


def _moka_size(cache: Any) -> int:
    cache.run_pending_tasks()  # its count lags behind pending evictions until then
    return int(cache.count())


def _all_cached(lookup: Callable[[str], object], size: int) -> str:
    """Every key is still cached with its own value (the bodies only read, so every get hit)."""
    assert size == SIZE, f"{size:,} entries cached, expected {SIZE:,}"
    wrong = [key for key, value in ITEMS if lookup(key) is not value]
    assert not wrong, f"{len(wrong):,} keys lost or changed, e.g. {wrong[0]!r}"
    return f"all {SIZE:,} keys still cached with their values"


def _buttress_hits(cache: buttress.LocalCache) -> Callable[[], str]:
    def verify() -> str:
        stats = cache.stats()  # before the check's own gets: the bodies' reads alone
        assert stats["misses"] == 0, f"{stats['misses']:,} misses"
        assert stats["expirations"] == stats["evictions"] == 0, stats
        assert stats["hits"] > 0, stats
        return f"{stats['hits']:,} hits, 0 misses; " + _all_cached(cache.get, len(cache))

    return verify


def _theine_hits(cache: theine.Cache[str, str]) -> Callable[[], str]:
    def verify() -> str:
        # Read once: each call of theine's stats() adds 1 to the hit and the miss counter of
        # each of its shards, so only the first call counts true.
        stats = cache.stats()
        try:
            assert stats.miss_count == 0, f"{stats.miss_count:,} misses"
            assert stats.hit_count > 0
            text = _all_cached(lambda key: cache.get(key)[0], len(cache))
        finally:
            cache.close()  # ends its maintenance task, which would keep it alive
        return f"{stats.hit_count:,} hits, 0 misses; {text}"

    return verify


NO_COUNTS = " (no hit counts; the body only reads, so no key was ever missing)"


def _mapping_hits(cache: Any) -> Callable[[], str]:
    return lambda: _all_cached(cache.get, len(cache)) + NO_COUNTS


def _moka_hits(cache: Any) -> Callable[[], str]:
    return lambda: _all_cached(cache.get, _moka_size(cache)) + NO_COUNTS


# --- cache-get-hit: one get of a cached key ---------------------------------------------------
#
# Every body takes the next key with the same `next(keys)` over an itertools.cycle of KEYS and
# returns whether the get found it, so the bare call is that alone.

GET: list[Case] = []
get = registrar(GET)


@get(BASELINE, BARE_FORM)
def _() -> Made:
    keys = itertools.cycle(KEYS)

    def run() -> bool:
        return next(keys) is not None

    return run, lambda: "returned True"


@get(BUTTRESS, "get()")
def _() -> Made:
    cache = _buttress()
    keys = itertools.cycle(KEYS)

    def run() -> bool:
        return cache.get(next(keys)) is not None

    return run, _buttress_hits(cache)


@get(BUTTRESS, "[]")
def _() -> Made:
    cache = _buttress()
    keys = itertools.cycle(KEYS)

    def run() -> bool:
        return cache[next(keys)] is not None

    return run, _buttress_hits(cache)


@get(CACHETOOLS, "get()")
def _() -> Made:
    cache = _lru()
    keys = itertools.cycle(KEYS)

    def run() -> bool:
        return cache.get(next(keys)) is not None

    return run, _mapping_hits(cache)


@get(CACHETOOLS, "[]")
def _() -> Made:
    cache = _lru()
    keys = itertools.cycle(KEYS)

    def run() -> bool:
        return cache[next(keys)] is not None

    return run, _mapping_hits(cache)


@get(MOKA, "get()")
def _() -> Made:
    cache = _moka()
    keys = itertools.cycle(KEYS)

    def run() -> bool:
        return cache.get(next(keys)) is not None

    return run, _moka_hits(cache)


@get(THEINE, "get()")
def _() -> Made:
    cache = _theine()
    keys = itertools.cycle(KEYS)

    def run() -> bool:
        return cache.get(next(keys))[1]  # (value, found)

    return run, _theine_hits(cache)


@get(FLOOR, "dict.get()")
def _() -> Made:
    cache = dict(ITEMS)
    keys = itertools.cycle(KEYS)

    def run() -> bool:
        return cache.get(next(keys)) is not None

    return run, _mapping_hits(cache)


@pytest.mark.benchmark(group="cache-get-hit")
@pytest.mark.parametrize("case", GET, ids=lambda case: case.id)
def test_cache_get_hit(bench: Bench, case: Case) -> None:
    bench(case, expect=True)


# --- cache-get-hit-ttl: one get of a cached key that expires in an hour ------------------------

GET_TTL: list[Case] = []
get_ttl = registrar(GET_TTL)


@get_ttl(BASELINE, BARE_FORM)
def _() -> Made:
    keys = itertools.cycle(KEYS)

    def run() -> bool:
        return next(keys) is not None

    return run, lambda: "returned True"


@get_ttl(BUTTRESS, "get(), ttl=3600")
def _() -> Made:
    cache = _buttress(ttl=TTL)
    keys = itertools.cycle(KEYS)

    def run() -> bool:
        return cache.get(next(keys)) is not None

    return run, _buttress_hits(cache)


@get_ttl(CACHETOOLS, "TTLCache.get()")
def _() -> Made:
    cache: cachetools.TTLCache[str, str] = cachetools.TTLCache(SIZE, ttl=TTL)
    _fill(cache.__setitem__)
    keys = itertools.cycle(KEYS)

    def run() -> bool:
        return cache.get(next(keys)) is not None

    return run, _mapping_hits(cache)


@get_ttl(MOKA, "get(), ttl=3600")
def _() -> Made:
    cache = _moka(ttl=TTL)
    keys = itertools.cycle(KEYS)

    def run() -> bool:
        return cache.get(next(keys)) is not None

    return run, _moka_hits(cache)


@get_ttl(THEINE, "get(), ttl=1 h")
def _() -> Made:
    cache = _theine(ttl=timedelta(seconds=TTL))
    keys = itertools.cycle(KEYS)

    def run() -> bool:
        return cache.get(next(keys))[1]

    return run, _theine_hits(cache)


@pytest.mark.benchmark(group="cache-get-hit-ttl")
@pytest.mark.parametrize("case", GET_TTL, ids=lambda case: case.id)
def test_cache_get_hit_ttl(bench: Bench, case: Case) -> None:
    bench(case, expect=True)


# --- cache-set-update: a set of a cached key ---------------------------------------------------
#
# Keys cycle over KEYS, and each set writes UPDATED: after a full pass every key holds it.


def _updated(keys: Iterator[str], lookup: Callable[[str], object], size: int) -> str:
    """All 10,000 keys still cached; the ones set hold UPDATED, the others their first value."""
    assert size == SIZE, f"{size:,} entries cached, expected {SIZE:,}"
    position = _index(next(keys))  # the next key a body would set: the sets made, mod SIZE
    stale = [number for number, key in enumerate(KEYS) if lookup(key) is not UPDATED]
    wrong = [number for number in stale if lookup(KEYS[number]) is not VALUES[number]]
    assert not wrong, f"{len(wrong):,} keys lost or holding a wrong value"
    # Fewer sets than SIZE update the first `position` keys; a full pass updates all of them.
    assert stale in ([], list(range(position, SIZE))), "the keys updated are not the keys set"
    assert len(stale) < SIZE, "no key was updated"
    return f"all {SIZE:,} keys still cached, {SIZE - len(stale):,} updated"


UPDATE: list[Case] = []
update = registrar(UPDATE)


@update(BASELINE, BARE_FORM)
def _() -> Made:
    keys = itertools.cycle(KEYS)

    def run() -> None:
        next(keys)

    return run, lambda: "returned None"


def _buttress_updated(cache: buttress.LocalCache, keys: Iterator[str]) -> Callable[[], str]:
    def verify() -> str:
        stats = cache.stats()
        text = _updated(keys, cache.get, len(cache))
        assert stats["inserts"] == SIZE, stats
        assert stats["evictions"] == stats["deletes"] == 0, stats
        assert stats["updates"] > 0, stats
        return f"{stats['updates']:,} updates, 0 evictions; {text}"

    return verify


@update(BUTTRESS, "set()")
def _() -> Made:
    cache = _buttress()
    keys = itertools.cycle(KEYS)

    def run() -> None:
        cache.set(next(keys), UPDATED)

    return run, _buttress_updated(cache, keys)


@update(BUTTRESS, "[]=")
def _() -> Made:
    cache = _buttress()
    keys = itertools.cycle(KEYS)

    def run() -> None:
        cache[next(keys)] = UPDATED

    return run, _buttress_updated(cache, keys)


@update(CACHETOOLS, "[]=")
def _() -> Made:
    cache = _lru()
    keys = itertools.cycle(KEYS)

    def run() -> None:
        cache[next(keys)] = UPDATED

    return run, lambda: _updated(keys, cache.get, len(cache))


@update(MOKA, "set()")
def _() -> Made:
    cache = _moka()
    keys = itertools.cycle(KEYS)

    def run() -> None:
        cache.set(next(keys), UPDATED)

    return run, lambda: _updated(keys, cache.get, _moka_size(cache))


@update(THEINE, "set()")
def _() -> Made:
    cache = _theine()
    keys = itertools.cycle(KEYS)

    def run() -> None:
        cache.set(next(keys), UPDATED)

    def verify() -> str:
        try:
            return _updated(keys, lambda key: cache.get(key)[0], len(cache))
        finally:
            cache.close()

    return run, verify


@update(FLOOR, "dict []=")
def _() -> Made:
    cache = dict(ITEMS)
    keys = itertools.cycle(KEYS)

    def run() -> None:
        cache[next(keys)] = UPDATED

    return run, lambda: _updated(keys, cache.get, len(cache))


@pytest.mark.benchmark(group="cache-set-update")
@pytest.mark.parametrize("case", UPDATE, ids=lambda case: case.id)
def test_cache_set_update(bench: Bench, case: Case) -> None:
    bench(case, expect=None)


# --- cache-set-insert: a set of a new key into the full cache ----------------------------------
#
# Each case sets keys of NEW_KEYS in order, once each: a key is never set twice, so every set
# is of a key the cache never held. The pool is as long as the most sets one case makes: a
# pytest-benchmark pass (warm-up, rounds and the one more call it makes for the result) or the
# interleaved pass, and one more for the check to read the position. Fewer calls than the
# default, so the pool stays small (about 200,000 keys).

INSERT_COUNTS = Counts(
    rounds=200, iterations=1000, warmup_rounds=10, interleaved_rounds=200, interleaved_calls=1000
)
_MOST_SETS = max(
    (INSERT_COUNTS.warmup_rounds + INSERT_COUNTS.rounds) * INSERT_COUNTS.iterations + 1,
    INSERT_COUNTS.interleaved_rounds * INSERT_COUNTS.interleaved_calls,
)
NEW_KEYS = [f"new:{number}" for number in range(_MOST_SETS + 1)]
# str objects keep their hash once computed: compute them now, so that the first case to use
# a key does not pay for hashing it and its peers do not.
_NEW_HASHES = [hash(key) for key in NEW_KEYS]


def _sets_made(keys: Iterator[str]) -> int:
    sets = _index(next(keys))  # the next key a body would set: the number of sets made
    assert sets > 0, "no set was made"
    return sets


def _lru_evicted(keys: Iterator[str], cached: set[str], size: int) -> str:
    """The cache holds exactly the SIZE keys set last: each set inserted and evicted the least
    recently used entry."""
    sets = _sets_made(keys)
    assert size == SIZE, f"{size:,} entries cached after {sets:,} sets"
    expected = set(KEYS[sets:]) | set(NEW_KEYS[max(0, sets - SIZE) : sets])
    assert cached == expected, f"{len(cached - expected):,} keys cached that LRU would not hold"
    return f"{sets:,} sets, each an insert evicting the least recent entry: the last {SIZE:,} held"


def _admitted(
    keys: Iterator[str], lookup: Callable[[str], object], size: int, limit: int = SIZE
) -> str:
    """The cache is still full (and no fuller than `limit`); how many of the new keys stayed."""
    sets = _sets_made(keys)
    assert SIZE <= size <= limit, f"{size:,} entries cached after {sets:,} sets"
    admitted = sum(lookup(key) is NEW_VALUE for key in NEW_KEYS[:sets])
    return f"{sets:,} sets of new keys; {size:,} cached after, {admitted:,} of the new keys"


INSERT: list[Case] = []
insert = registrar(INSERT, INSERT_COUNTS)


@insert(BASELINE, BARE_FORM)
def _() -> Made:
    keys = iter(NEW_KEYS)

    def run() -> None:
        next(keys)

    return run, lambda: "returned None"


def _buttress_evicted(cache: buttress.LocalCache, keys: Iterator[str]) -> Callable[[], str]:
    def verify() -> str:
        sets = _sets_made(keys)
        stats = cache.stats()
        assert stats["inserts"] == SIZE + sets, stats
        assert stats["evictions"] == sets, stats
        assert stats["updates"] == stats["deletes"] == 0, stats
        assert stats["size"] == len(cache) == SIZE, stats
        return f"{sets:,} sets: {sets:,} inserts, {sets:,} evictions, 0 updates; size {SIZE:,}"

    return verify


@insert(BUTTRESS, "set()")
def _() -> Made:
    cache = _buttress()
    keys = iter(NEW_KEYS)

    def run() -> None:
        cache.set(next(keys), NEW_VALUE)

    return run, _buttress_evicted(cache, keys)


@insert(BUTTRESS, "[]=")
def _() -> Made:
    cache = _buttress()
    keys = iter(NEW_KEYS)

    def run() -> None:
        cache[next(keys)] = NEW_VALUE

    return run, _buttress_evicted(cache, keys)


@insert(CACHETOOLS, "[]=")
def _() -> Made:
    cache = _lru()
    keys = iter(NEW_KEYS)

    def run() -> None:
        cache[next(keys)] = NEW_VALUE

    return run, lambda: _lru_evicted(keys, set(cache), len(cache))


@insert(MOKA, "set()")
def _() -> Made:
    cache = _moka()
    keys = iter(NEW_KEYS)

    def run() -> None:
        cache.set(next(keys), NEW_VALUE)

    return run, lambda: _admitted(keys, cache.get, _moka_size(cache)) + " (TinyLFU admission)"


@insert(MOKA, 'set(), policy="lru"')
def _() -> Made:
    cache = _moka(policy="lru")
    keys = iter(NEW_KEYS)

    def run() -> None:
        cache.set(next(keys), NEW_VALUE)

    def verify() -> str:
        size = _moka_size(cache)
        cached = {key for key in itertools.chain(KEYS, NEW_KEYS) if cache.get(key) is not None}
        return _lru_evicted(keys, cached, size)

    return run, verify


@insert(THEINE, "set()")
def _() -> Made:
    cache = _theine()
    keys = iter(NEW_KEYS)

    def run() -> None:
        cache.set(next(keys), NEW_VALUE)

    def verify() -> str:
        try:
            # theine sends writes to its policy through a buffer of 16, drained when its lock is
            # free: up to 16 entries can wait there for their eviction.
            size = len(cache)
            text = _admitted(keys, lambda key: cache.get(key)[0], size, limit=SIZE + 16)
        finally:
            cache.close()
        return text + " (TinyLFU admission)"

    return run, verify


@pytest.mark.benchmark(group="cache-set-insert")
@pytest.mark.parametrize("case", INSERT, ids=lambda case: case.id)
def test_cache_set_insert(bench: Bench, case: Case) -> None:
    bench(case, expect=None)


# --- hit ratio on Zipf traces (not a timing) ---------------------------------------------------
#
# A trace draws keys from KEYS_IN_TRACE keys, the key of popularity rank r with weight 1/r^alpha
# (random.choices bisects the cumulative weights). Ranks are shuffled over the key numbers, so
# a key's popularity says nothing of its value or its hash. Every cache replays each trace
# read-through: a get, and on a miss a set of the key. The caches are sized in entries, all
# with their default policy (buttress: S3-FIFO; cachetools: LRU and LFU; moka-py and theine:
# TinyLFU).

ZIPF_SEED = 6
ZIPF_KEYS = 100_000
ZIPF_REQUESTS = 300_000
ZIPF_ALPHAS = (0.7, 0.9, 1.0, 1.2)
ZIPF_SIZES = (1_000, 10_000)
SMOKE_SCALE = 100  # under --benchmark-disable: keys, requests and sizes divided by this


def zipf_trace(keys: int, requests: int, alpha: float, seed: int = ZIPF_SEED) -> list[int]:
    rng = random.Random(seed)
    by_rank = list(range(keys))
    rng.shuffle(by_rank)
    weights = itertools.accumulate(rank**-alpha for rank in range(1, keys + 1))
    return rng.choices(by_rank, cum_weights=list(weights), k=requests)


def _replay_get_set(cache: Any, trace: list[int]) -> int:
    get, store, hits = cache.get, cache.set, 0
    for key in trace:
        if get(key) is None:
            store(key, True)
        else:
            hits += 1
    return hits


def _replay_mapping(cache: Any, trace: list[int]) -> int:
    get, hits = cache.get, 0
    for key in trace:
        if get(key) is None:
            cache[key] = True
        else:
            hits += 1
    return hits


def _replay_theine(cache: Any, trace: list[int]) -> int:
    get, store, hits = cache.get, cache.set, 0
    for key in trace:
        if get(key)[1]:
            hits += 1
        else:
            store(key, True)
    return hits


def _hit_ratio_buttress(size: int, trace: list[int]) -> int:
    cache = buttress.LocalCache(size)
    hits = _replay_get_set(cache, trace)
    stats = cache.stats()
    assert (stats["hits"], stats["misses"]) == (hits, len(trace) - hits), stats
    assert stats["size"] <= size
    return hits


def _hit_ratio_cachetools(kind: Callable[[int], Any]) -> Callable[[int, list[int]], int]:
    def replay(size: int, trace: list[int]) -> int:
        cache = kind(size)
        hits = _replay_mapping(cache, trace)
        assert len(cache) <= size
        return hits

    return replay


def _hit_ratio_moka(size: int, trace: list[int]) -> int:
    cache: moka_py.Moka[int, bool] = moka_py.Moka(size)
    hits = _replay_get_set(cache, trace)
    assert _moka_size(cache) <= size
    return hits


def _hit_ratio_theine(size: int, trace: list[int]) -> int:
    cache: theine.Cache[int, bool] = theine.Cache(size)
    try:
        hits = _replay_theine(cache, trace)
        stats = cache.stats()  # the first call counts true (see _theine_hits)
        assert (stats.hit_count, stats.request_count) == (hits, len(trace))
        assert len(cache) <= size + 16  # up to 16 writes wait in its buffer for the policy
    finally:
        cache.close()
    return hits


HIT_RATIO_COLUMNS: dict[str, Callable[[int, list[int]], int]] = {
    BUTTRESS: _hit_ratio_buttress,
    "cachetools LRU": _hit_ratio_cachetools(cachetools.LRUCache),
    "cachetools LFU": _hit_ratio_cachetools(cachetools.LFUCache),
    MOKA: _hit_ratio_moka,
    THEINE: _hit_ratio_theine,
}


def test_zipf_hit_ratio(
    request: pytest.FixtureRequest, report_section: Callable[[str, list[str]], None]
) -> None:
    scale = SMOKE_SCALE if request.config.getoption("benchmark_disable") else 1
    keys, requests = ZIPF_KEYS // scale, ZIPF_REQUESTS // scale
    sizes = [size // scale for size in ZIPF_SIZES]
    width = max(12, *(len(name) + 2 for name in HIT_RATIO_COLUMNS))
    lines = [f"{'alpha':>5}{'size':>8}" + "".join(f"{name:>{width}}" for name in HIT_RATIO_COLUMNS)]
    for alpha in ZIPF_ALPHAS:
        trace = zipf_trace(keys, requests, alpha)
        for size in sizes:
            cells = []
            for replay in HIT_RATIO_COLUMNS.values():
                hits = replay(size, trace)
                assert 0 < hits < requests
                cells.append(f"{hits / requests:>{width}.1%}")
            lines.append(f"{alpha:>5}{size:>8,}" + "".join(cells))
    title = (
        f"cache hit ratio, Zipf traces: {keys:,} keys, {requests:,} requests, seed {ZIPF_SEED}, "
        "read-through (get, then set on a miss)"
    )
    if scale != 1:
        title += f"; benchmarks disabled, so a trace {scale}x smaller: not representative"
    lines.append(
        "buttress and cachetools replay the same trace alike every run; moka-py's and theine's "
        "ratios move by a few tenths of a point between runs (their policy upkeep depends on "
        "timing, and theine spreads reads over its buffers at random)."
    )
    report_section(title, lines)
