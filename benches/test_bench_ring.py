"""Consistent-hash ring: one lookup, and a batch of 1,000, beside uhashring's ketama mode (which
places keys as buttress does), with jump consistent hash as a reference point."""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable
from typing import Any

import buttress
import jump
import pytest
import uhashring
from _harness import BARE_FORM, BASELINE, BUTTRESS, FLOOR, Bench, Case, Counts, Made, registrar

UHASHRING = "uhashring"
NODES = [f"cache-{number}" for number in range(10)]
# 1,000 distinct keys, looked up in turn, so no cache (buttress's, the CPU's) holds one answer.
KEYS = [f"user:{number}" for number in range(1_000)]
# jump consistent hash takes an integer key and numbered buckets (0 to n - 1): no node names, no
# weights, and only the last bucket can be removed. So it is a floor for the cost of choosing
# a bucket, not a peer. Its keys are the CRC-32s of KEYS, computed here once: it pays no
# string hashing in the timed body.
INT_KEYS = [zlib.crc32(key.encode()) for key in KEYS]
BUCKETS = len(NODES)


def _uhashring_ring() -> Any:
    return uhashring.HashRing(NODES, hash_fn="ketama")


# Where uhashring places KEYS: both libs' cases are checked against it.
EXPECTED = [_uhashring_ring().get_node(key) for key in KEYS]


def _buttress_placed(ring: buttress.HashRing) -> Callable[[], str]:
    def verify() -> str:
        assert [ring.get_node(key) for key in KEYS] == EXPECTED
        assert ring.get_node_many(KEYS) == EXPECTED
        return f"{len(KEYS):,} keys placed as uhashring places them"

    return verify


def _uhashring_placed(ring: Any) -> Callable[[], str]:
    def verify() -> str:
        assert [ring.get_node(key) for key in KEYS] == EXPECTED
        assert buttress.HashRing(NODES).get_node_many(KEYS) == EXPECTED
        return f"{len(KEYS):,} keys placed as buttress places them"

    return verify


def _jump_in_buckets() -> str:
    buckets = [jump.hash(key, BUCKETS) for key in INT_KEYS]
    assert buckets == [jump.hash(key, BUCKETS) for key in INT_KEYS]
    assert set(buckets) == set(range(BUCKETS))
    return f"{len(KEYS):,} int keys in {BUCKETS} numbered buckets, deterministic"


# --- ring-lookup: one key's node ---------------------------------------------------------------
#
# Every case takes the next key with the same `next(keys)` over an itertools.cycle, so the bare
# call is that alone and each case's overhead is its lookup.

LOOKUP: list[Case] = []
lookup = registrar(LOOKUP)


@lookup(BASELINE, BARE_FORM)
def _() -> Made:
    keys = itertools.cycle(KEYS)

    def run() -> bool:
        return next(keys) is not None

    return run, lambda: "returned True"


@lookup(BUTTRESS, "get_node(key)")
def _() -> Made:
    ring = buttress.HashRing(NODES)
    keys = itertools.cycle(KEYS)

    def run() -> bool:
        return ring.get_node(next(keys)) is not None

    return run, _buttress_placed(ring)


def _spread_over_every_node(ring: buttress.HashRing) -> Callable[[], str]:
    def verify() -> str:
        owners = ring.get_node_many(KEYS)
        assert owners == [ring.get_node(key) for key in KEYS]
        assert set(owners) == set(NODES)
        return f"{len(KEYS):,} keys on all {len(NODES)} nodes, deterministic"

    return verify


# The other algorithms place keys elsewhere than ketama (no peer places them alike): these rows
# show what choosing one costs, next to ketama's MD5.
for _algorithm in ("rendezvous", "jump"):

    @lookup(BUTTRESS, f"get_node(key), {_algorithm}")
    def _(algorithm: str = _algorithm) -> Made:
        ring = buttress.HashRing(NODES, algorithm=algorithm)
        keys = itertools.cycle(KEYS)

        def run() -> bool:
            return ring.get_node(next(keys)) is not None

        return run, _spread_over_every_node(ring)


@lookup(UHASHRING, "get_node(key)")
def _() -> Made:
    ring = _uhashring_ring()
    keys = itertools.cycle(KEYS)

    def run() -> bool:
        return ring.get_node(next(keys)) is not None

    return run, _uhashring_placed(ring)


@lookup(FLOOR, "jump.hash(int key, 10)")
def _() -> Made:
    keys = itertools.cycle(INT_KEYS)

    def run() -> bool:
        return jump.hash(next(keys), BUCKETS) is not None

    return run, _jump_in_buckets


@pytest.mark.benchmark(group="ring-lookup")
@pytest.mark.parametrize("case", LOOKUP, ids=lambda case: case.id)
def test_ring_lookup(bench: Bench, case: Case) -> None:
    bench(case, expect=True)


# --- ring-batch: the nodes of 1,000 keys ------------------------------------------------------
#
# One run() is one batch of 1,000 keys, so a median is per batch; the ratio of two medians is
# the ratio per key. A batch takes from about 0.1 ms to 1 ms: fewer timed calls than the default.

BATCH_COUNTS = Counts(
    rounds=200, iterations=1, warmup_rounds=10, interleaved_rounds=200, interleaved_calls=1
)
BATCH: list[Case] = []
batch = registrar(BATCH, BATCH_COUNTS)


@batch(BUTTRESS, "get_node_many(keys)")
def _() -> Made:
    ring = buttress.HashRing(NODES)

    def run() -> int:
        return len(ring.get_node_many(KEYS))

    return run, _buttress_placed(ring)


@batch(BUTTRESS, "[get_node(key) for key in keys]")
def _() -> Made:
    ring = buttress.HashRing(NODES)

    def run() -> int:
        return len([ring.get_node(key) for key in KEYS])

    return run, _buttress_placed(ring)


@batch(UHASHRING, "[get_node(key) for key in keys]")
def _() -> Made:
    ring = _uhashring_ring()

    def run() -> int:
        return len([ring.get_node(key) for key in KEYS])

    return run, _uhashring_placed(ring)


@batch(FLOOR, "[jump.hash(int key, 10) for key in keys]")
def _() -> Made:
    def run() -> int:
        return len([jump.hash(key, BUCKETS) for key in INT_KEYS])

    return run, _jump_in_buckets


@pytest.mark.benchmark(group="ring-batch")
@pytest.mark.parametrize("case", BATCH, ids=lambda case: case.id)
def test_ring_batch(bench: Bench, case: Case) -> None:
    bench(case, expect=len(KEYS))
