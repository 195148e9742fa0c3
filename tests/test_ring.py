"""The consistent-hash ring: placements equal to uhashring's ketama mode (so libketama's),
replicas, minimal movement, point counts and collisions, the distribution over 100 nodes, bad
input, and lookups on threads while nodes come and go.

Only str and int keys are compared with uhashring: it hashes ``str(key)``, so for bytes it hashes
``"b'...'"``, where buttress (like libketama) hashes the bytes themselves.
"""

from __future__ import annotations

import faulthandler
import hashlib
import random
import string
import struct
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest
import uhashring
from buttress import ButtressError, EmptyRingError, HashRing, rebalance_plan
from hypothesis import assume, given
from hypothesis import strategies as st
from support import JOIN, run_threads

VNODES = 40
REPLICAS = 4
POINTS_PER_NODE = VNODES * REPLICAS  # with equal weights, barring a collision

Nodes = Sequence[str] | Mapping[str, int]

# ---- references ----------------------------------------------------------------------------


def peer(nodes: Nodes, *, vnodes: int = VNODES, replicas: int = REPLICAS) -> Any:
    """uhashring's ketama ring for the same nodes (a mapping gives weights)."""
    if isinstance(nodes, Mapping):
        conf: Any = {name: {"weight": weight} for name, weight in nodes.items()}
    else:
        conf = list(nodes)
    return uhashring.HashRing(conf, hash_fn="ketama", vnodes=vnodes, replicas=replicas)


def weights_of(nodes: Nodes) -> dict[str, int]:
    return dict(nodes) if isinstance(nodes, Mapping) else dict.fromkeys(nodes, 1)


def label_points(name: str, labels: int, replicas: int = REPLICAS) -> list[int]:
    """The points of a node's first `labels` labels, computed here with hashlib."""
    points: list[int] = []
    for number in range(labels):
        digest = hashlib.md5(f"{name}-{number}".encode()).digest()
        points.extend(struct.unpack("<4I", digest)[:replicas])
    return points


def key_point(key: str) -> int:
    return int(struct.unpack_from("<I", hashlib.md5(key.encode()).digest())[0])


def reference_points(
    nodes: Nodes, *, vnodes: int = VNODES, replicas: int = REPLICAS
) -> dict[str, int]:
    """Points owned by each node, by libketama's formula: a point two nodes share goes to the
    node added later."""
    weights = weights_of(nodes)
    total = sum(weights.values())
    owner: dict[int, str] = {}
    for name, weight in weights.items():
        labels = vnodes * len(weights) * weight // total
        for point in label_points(name, labels, replicas):
            owner[point] = name
    counts = Counter(owner.values())
    return {name: counts[name] for name in weights}


def placements(ring: HashRing, keys: Sequence[str | int]) -> list[str]:
    return [ring.get_node(key) for key in keys]


# ---- strategies ----------------------------------------------------------------------------

NAME_ALPHABET = string.ascii_letters + string.digits + "-_.:"
names = st.text(NAME_ALPHABET, min_size=1, max_size=12)
name_lists = st.lists(names, min_size=1, max_size=30, unique=True)
weighted_nodes = st.dictionaries(names, st.integers(1, 10), min_size=1, max_size=30)
any_nodes: st.SearchStrategy[Nodes] = name_lists | weighted_nodes
# Up to 200 characters: past MD5's one-block limit (55 bytes) and its two-block one (119).
text_keys = st.text(max_size=200)
int_keys = st.integers(-(2**80), 2**80) | st.booleans()
peer_keys: st.SearchStrategy[str | int] = text_keys | int_keys
peer_key_lists = st.lists(peer_keys, min_size=1, max_size=40)
# What buttress takes but uhashring hashes otherwise: bytes too.
any_keys: st.SearchStrategy[str | int | bytes] = peer_keys | st.binary(max_size=200)


# ---- placements: uhashring's ---------------------------------------------------------------


@given(nodes=any_nodes, keys=peer_key_lists)
def test_placements_equal_uhashrings(nodes: Nodes, keys: list[str | int]) -> None:
    ring = HashRing(nodes)
    theirs = peer(nodes)
    expected = [theirs.get_node(key) for key in keys]
    assert placements(ring, keys) == expected
    assert ring.get_node_many(keys) == expected


@given(
    nodes=any_nodes,
    vnodes=st.integers(1, 80),
    replicas=st.integers(1, 4),
    keys=peer_key_lists,
)
def test_placements_equal_uhashrings_for_any_vnodes_and_replicas(
    nodes: Nodes, vnodes: int, replicas: int, keys: list[str | int]
) -> None:
    ring = HashRing(nodes, vnodes=vnodes, replicas=replicas)
    assert (ring.vnodes, ring.replicas) == (vnodes, replicas)
    theirs = peer(nodes, vnodes=vnodes, replicas=replicas)
    assert placements(ring, keys) == [theirs.get_node(key) for key in keys]
    assert ring.points == reference_points(nodes, vnodes=vnodes, replicas=replicas)


def test_keys_of_every_length_around_the_md5_blocks() -> None:
    # One MD5 block holds up to 55 bytes, two up to 119: every length to past both.
    nodes = [f"cache-{number}" for number in range(7)]
    ring, theirs = HashRing(nodes), peer(nodes)
    rng = random.Random(0)
    for length in range(131):
        keys = [
            "k" * length,
            "é" * (length // 2) + "k" * (length % 2),  # `length` bytes of UTF-8
            "".join(rng.choices(string.printable, k=length)),
        ]
        expected = [theirs.get_node(key) for key in keys]
        assert placements(ring, keys) == expected, length
        assert ring.get_node_many(keys) == expected, length
        assert ring.get_node_many([key.encode() for key in keys]) == expected, length


def test_known_placements() -> None:
    # As uhashring 2.x places them (and the Rust core's unit test).
    ring = HashRing(["node1", "node2", "node3"])
    assert placements(ring, ["alpha", "beta", "gamma", "user:42"]) == [
        "node2",
        "node2",
        "node3",
        "node1",
    ]


@given(nodes=any_nodes, keys=st.lists(text_keys, max_size=20))
def test_bytes_keys_hash_raw_like_their_utf8_text(nodes: Nodes, keys: list[str]) -> None:
    ring = HashRing(nodes)
    assert [ring.get_node(key.encode()) for key in keys] == placements(ring, keys)


@given(nodes=any_nodes, keys=st.lists(int_keys, max_size=20))
def test_int_keys_hash_as_their_str(nodes: Nodes, keys: list[int]) -> None:
    ring = HashRing(nodes)
    assert placements(ring, keys) == [ring.get_node(str(key)) for key in keys]


# ---- determinism -----------------------------------------------------------------------------


@given(nodes=any_nodes, keys=st.lists(any_keys, max_size=40))
def test_placements_are_deterministic(nodes: Nodes, keys: list[str | int | bytes]) -> None:
    first, second = HashRing(nodes), HashRing(nodes)
    once = first.get_node_many(keys)
    assert first.get_node_many(keys) == once
    assert second.get_node_many(keys) == once
    assert first.points == second.points
    # A ring rebuilt from what the first reports about itself.
    assert HashRing(first.weights).get_node_many(keys) == once


@given(nodes=any_nodes, keys=st.lists(any_keys, max_size=60))
def test_get_node_many_is_get_node_for_each_key(
    nodes: Nodes, keys: list[str | int | bytes]
) -> None:
    ring = HashRing(nodes)
    expected = [ring.get_node(key) for key in keys]
    assert ring.get_node_many(keys) == expected
    assert ring.get_node_many(tuple(keys)) == expected
    assert ring.get_node_many(iter(keys)) == expected
    assert ring.get_node_many(key for key in keys) == expected
    counts = ring.distribution(keys)
    assert list(counts) == list(ring)
    assert counts == {name: expected.count(name) for name in ring}


# ---- get_nodes: the owner and the next distinct nodes clockwise ----------------------------


@given(nodes=any_nodes, key=peer_keys, data=st.data())
def test_get_nodes_equal_uhashrings_range(
    nodes: Nodes, key: str | int, data: st.DataObject
) -> None:
    ring = HashRing(nodes)
    theirs = peer(nodes)
    n = data.draw(st.integers(1, len(ring)), label="n")
    found = ring.get_nodes(key, n)
    assert len(found) == n
    assert len(set(found)) == n
    assert found[0] == ring.get_node(key)
    assert found == [conf["nodename"] for conf in theirs.range(key, n)]
    assert ring.get_nodes(key, 0) == []
    # The first n of a longer walk.
    assert ring.get_nodes(key, len(ring))[:n] == found


@given(nodes=any_nodes, key=st.binary(max_size=80))
def test_get_nodes_of_a_bytes_key_start_with_its_owner(nodes: Nodes, key: bytes) -> None:
    ring = HashRing(nodes)
    everyone = ring.get_nodes(key, len(ring))
    assert sorted(everyone) == sorted(ring)
    assert everyone[0] == ring.get_node(key)


# ---- minimal movement ----------------------------------------------------------------------
# With equal weights every node keeps its labels whatever the others do, so only keys of the
# node that comes or goes move. (With unequal weights libketama's formula gives every node a
# new share of labels when the node count or the total weight changes: keys also move between
# nodes that stayed, in buttress as in uhashring.)


@given(nodes=name_lists, new=names, keys=st.lists(peer_keys, min_size=1, max_size=200))
def test_adding_a_node_moves_keys_only_to_it(
    nodes: list[str], new: str, keys: list[str | int]
) -> None:
    assume(new not in nodes)
    ring = HashRing(nodes)
    before = ring.get_node_many(keys)
    ring.add_node(new)
    after = ring.get_node_many(keys)
    for key, was, now in zip(keys, before, after, strict=True):
        assert now in (was, new), f"{key!r} moved from {was} to {now}, not to {new}"
    assert after == [peer([*nodes, new]).get_node(key) for key in keys]


@given(nodes=name_lists, data=st.data(), keys=st.lists(peer_keys, min_size=1, max_size=200))
def test_removing_a_node_moves_only_its_keys(
    nodes: list[str], data: st.DataObject, keys: list[str | int]
) -> None:
    assume(len(nodes) >= 2)
    gone = data.draw(st.sampled_from(nodes), label="gone")
    ring = HashRing(nodes)
    before = ring.get_node_many(keys)
    ring.remove_node(gone)
    after = ring.get_node_many(keys)
    for key, was, now in zip(keys, before, after, strict=True):
        if was == gone:
            assert now != gone
        else:
            assert now == was, f"{key!r} moved from {was} to {now} though {gone} went"
    remaining = [name for name in nodes if name != gone]
    assert after == [peer(remaining).get_node(key) for key in keys]


@given(nodes=weighted_nodes, data=st.data(), keys=st.lists(peer_keys, min_size=1, max_size=60))
def test_weighted_rings_follow_uhashring_through_adds_and_removes(
    nodes: dict[str, int], data: st.DataObject, keys: list[str | int]
) -> None:
    ring = HashRing(nodes)
    theirs = peer(nodes)
    for _ in range(4):
        name = data.draw(names, label="name")
        if name in ring and len(ring) > 1:
            ring.remove_node(name)
            theirs.remove_node(name)
        elif name not in ring:
            weight = data.draw(st.integers(1, 10), label="weight")
            ring.add_node(name, weight)
            theirs.add_node(name, {"weight": weight})
        assert placements(ring, keys) == [theirs.get_node(key) for key in keys]


@given(nodes=any_nodes, data=st.data(), keys=st.lists(peer_keys, min_size=1, max_size=60))
def test_set_weight_and_back_restores_placements(
    nodes: Nodes, data: st.DataObject, keys: list[str | int]
) -> None:
    ring = HashRing(nodes)
    before, points = ring.get_node_many(keys), ring.points
    name = data.draw(st.sampled_from(list(ring)), label="name")
    old, new = ring.weight(name), data.draw(st.integers(1, 10), label="weight")
    ring.set_weight(name, new)
    assert ring.weight(name) == new
    assert list(ring) == list(weights_of(nodes)), "set_weight moved the node in the order"
    # The same as uhashring's add_node on an existing name, which keeps its place too.
    theirs = peer(nodes)
    theirs.add_node(name, {"weight": new})
    assert placements(ring, keys) == [theirs.get_node(key) for key in keys]
    ring.set_weight(name, old)
    assert ring.get_node_many(keys) == before
    assert ring.points == points


@given(nodes=any_nodes, keys=st.lists(any_keys, max_size=60))
def test_adding_nodes_one_at_a_time_builds_the_same_ring(
    nodes: Nodes, keys: list[str | int | bytes]
) -> None:
    together = HashRing(nodes)
    one_by_one = HashRing()
    for name, weight in weights_of(nodes).items():
        one_by_one.add_node(name, weight)
    assert list(one_by_one) == list(together)
    assert one_by_one.weights == together.weights
    assert one_by_one.points == together.points
    assert one_by_one.get_node_many(keys) == together.get_node_many(keys)


# ---- points --------------------------------------------------------------------------------

# Names whose 160 points are all distinct, among themselves too (checked below).
CACHES = [f"cache-{number}" for number in range(12)]
EXTRAS = [f"extra-{number}" for number in range(6)]


def test_names_used_for_exact_point_counts_have_no_collisions() -> None:
    points = [point for name in CACHES + EXTRAS for point in label_points(name, VNODES)]
    assert len(set(points)) == len(points) == POINTS_PER_NODE * len(CACHES + EXTRAS)


def test_equal_weights_give_every_node_vnodes_times_replicas_points() -> None:
    ring = HashRing(CACHES)
    assert ring.points == dict.fromkeys(CACHES, POINTS_PER_NODE)
    for extra in EXTRAS:
        ring.add_node(extra)
        assert set(ring.points.values()) == {POINTS_PER_NODE}
    for gone in [*CACHES[::3], *EXTRAS[1::2]]:
        ring.remove_node(gone)
        assert set(ring.points.values()) == {POINTS_PER_NODE}
    assert len(ring) == len(CACHES) + len(EXTRAS) - 4 - 3


@pytest.mark.parametrize(("vnodes", "replicas"), [(1, 1), (3, 2), (40, 4), (100, 3)])
def test_points_follow_vnodes_and_replicas(vnodes: int, replicas: int) -> None:
    ring = HashRing(CACHES, vnodes=vnodes, replicas=replicas)
    assert ring.points == dict.fromkeys(CACHES, vnodes * replicas)


@given(nodes=any_nodes)
def test_points_equal_libketamas_share(nodes: Nodes) -> None:
    ring = HashRing(nodes)
    points = ring.points
    assert points == reference_points(nodes)
    assert sum(points.values()) <= VNODES * REPLICAS * len(ring)
    if not isinstance(nodes, Mapping):
        assert all(count <= POINTS_PER_NODE for count in points.values())


# Two nodes with one point in common, found by hashing labels with hashlib: word 2 of
# "node601-31" and word 3 of "node1174-1" are both 2608162388.
COLLIDING = ("node601", "node1174")
SHARED_POINT = 2_608_162_388


@pytest.mark.parametrize("order", [COLLIDING, COLLIDING[::-1]], ids=["601-first", "1174-first"])
def test_a_point_two_nodes_share_goes_to_the_later_node(order: tuple[str, str]) -> None:
    earlier, later = order
    assert SHARED_POINT in label_points(earlier, VNODES)
    assert SHARED_POINT in label_points(later, VNODES)
    ring = HashRing(order)
    assert ring.points == {earlier: POINTS_PER_NODE - 1, later: POINTS_PER_NODE}
    assert sum(ring.points.values()) < POINTS_PER_NODE * len(ring)
    # A key that hashes just below the shared point belongs to it.
    every = sorted(set(label_points(earlier, VNODES) + label_points(later, VNODES)))
    below = every[every.index(SHARED_POINT) - 1]
    key = next(
        key
        for key in (f"probe-{number}" for number in range(200_000))
        if below <= key_point(key) < SHARED_POINT
    )
    theirs = peer(order)
    assert ring.get_node(key) == later == theirs.get_node(key)
    assert ring.get_nodes(key, 2) == [later, earlier]
    assert ring.get_nodes(key, 2) == [conf["nodename"] for conf in theirs.range(key, 2)]
    assert HashRing(order).get_node(key) == later  # deterministic
    # Without the later node, the earlier one has its point back.
    ring.remove_node(later)
    assert ring.points == {earlier: POINTS_PER_NODE}
    assert ring.get_node(key) == earlier
    ring.add_node(later)
    assert ring.points == {earlier: POINTS_PER_NODE - 1, later: POINTS_PER_NODE}
    assert ring.get_node(key) == later


# ---- distribution over 100 nodes (recorded, not timed) -------------------------------------

DISTRIBUTION_NODES = [f"node-{number}" for number in range(100)]
DISTRIBUTION_KEYS = [f"key-{number}" for number in range(200_000)]


def test_distribution_over_100_nodes_and_what_removing_one_moves() -> None:
    ring = HashRing(DISTRIBUTION_NODES)
    counts = ring.distribution(DISTRIBUTION_KEYS)
    assert list(counts) == DISTRIBUTION_NODES
    assert sum(counts.values()) == len(DISTRIBUTION_KEYS)
    mean = len(DISTRIBUTION_KEYS) / len(DISTRIBUTION_NODES)
    spread = max(counts.values()) / mean
    # Measured: 1.222 (min/mean 0.796). Ketama's 160 points a node give about 1.2; the 1.10
    # target is for a later native mode, not for ketama-compatible placement.
    assert spread < 1.5
    before = ring.get_node_many(DISTRIBUTION_KEYS)
    gone = "node-42"
    ring.remove_node(gone)
    after = ring.get_node_many(DISTRIBUTION_KEYS)
    moved = sum(was != now for was, now in zip(before, after, strict=True))
    # Minimal movement: exactly the keys the node owned, no others. Measured: 0.011625.
    assert moved == counts[gone]
    assert all(was == gone for was, now in zip(before, after, strict=True) if was != now)
    moved_fraction = moved / len(DISTRIBUTION_KEYS)
    print(
        f"\nketama, {len(DISTRIBUTION_NODES)} nodes, {len(DISTRIBUTION_KEYS):,} keys: "
        f"max/mean {spread:.3f}, min/mean {min(counts.values()) / mean:.3f}; "
        f"removing {gone} moved {moved_fraction:.4%} of the keys (its share)"
    )
    # The same placements as uhashring, on a sample.
    theirs = peer(DISTRIBUTION_NODES)
    sample = DISTRIBUTION_KEYS[::100]
    assert HashRing(DISTRIBUTION_NODES).get_node_many(sample) == [
        theirs.get_node(key) for key in sample
    ]


# ---- the API's small parts -----------------------------------------------------------------


def test_container_protocol_and_properties() -> None:
    ring = HashRing({"b": 2, "a": 1, "c": 3}, vnodes=10, replicas=2)
    assert len(ring) == 3
    assert list(ring) == ["b", "a", "c"]
    assert "a" in ring
    assert "z" not in ring
    assert 5 not in ring
    assert ring.weights == {"b": 2, "a": 1, "c": 3}
    assert ring.weight("c") == 3
    assert (ring.vnodes, ring.replicas) == (10, 2)
    assert list(ring.points) == ["b", "a", "c"]
    assert HashRing().vnodes == VNODES
    assert HashRing(None).replicas == REPLICAS
    # Any iterable of names.
    assert list(HashRing(name for name in ("x", "y"))) == ["x", "y"]
    assert list(HashRing(("x", "y"))) == ["x", "y"]
    ring.add_node("d")
    assert list(ring) == ["b", "a", "c", "d"]
    ring.remove_node("a")
    assert list(ring) == ["b", "c", "d"]


def test_nodes_whose_names_nest_stay_apart() -> None:
    # "a-1" is node "a-1", not label 1 of node "a".
    ring = HashRing(["a", "a-1", "a-1-0", ""])
    theirs = peer(["a", "a-1", "a-1-0", ""])
    keys = [f"k{number}" for number in range(500)]
    assert ring.get_node_many(keys) == [theirs.get_node(key) for key in keys]
    assert set(ring.get_node_many(keys)) == {"a", "a-1", "a-1-0", ""}


def test_one_node_owns_every_key() -> None:
    ring = HashRing(["only"])
    assert set(ring.get_node_many([*range(100), "x", b"y"])) == {"only"}
    assert ring.get_nodes("x", 1) == ["only"]


# ---- bad input -----------------------------------------------------------------------------

PROBES: list[str | int | bytes] = [*(f"probe-{number}" for number in range(200)), 1, -7, b"raw"]


def snapshot(ring: HashRing) -> tuple[object, ...]:
    return (list(ring), len(ring), ring.weights, ring.points, ring.get_node_many(PROBES))


def assert_names(error: pytest.ExceptionInfo[BaseException], argument: str) -> None:
    assert argument in str(error.value), f"{argument!r} not named in {str(error.value)!r}"


def test_empty_ring_lookups_raise_empty_ring_error() -> None:
    ring = HashRing()
    assert issubclass(EmptyRingError, ButtressError)
    assert issubclass(EmptyRingError, LookupError)
    with pytest.raises(EmptyRingError):
        ring.get_node("k")
    with pytest.raises(EmptyRingError):
        ring.get_node(b"k")
    with pytest.raises(EmptyRingError):
        ring.get_nodes("k", 1)
    with pytest.raises(EmptyRingError):
        ring.get_node_many(["k"])
    with pytest.raises(EmptyRingError):
        ring.get_node_many(iter(["k"]))
    with pytest.raises(EmptyRingError):
        ring.distribution(["k"])
    assert ring.get_nodes("k", 0) == []
    assert ring.get_node_many([]) == []
    assert ring.distribution([]) == {}
    assert (len(ring), list(ring), ring.weights, ring.points) == (0, [], {}, {})
    # Emptied by removals, the same.
    ring = HashRing(["a"])
    ring.remove_node("a")
    with pytest.raises(EmptyRingError):
        ring.get_node("k")
    assert ring.get_nodes("k", 0) == []


def test_wrong_key_type_on_an_empty_ring_is_a_type_error() -> None:
    ring: Any = HashRing()
    with pytest.raises(TypeError) as caught:
        ring.get_node(1.5)
    assert_names(caught, "key")


# The ring is typed Any: these calls break its stubs on purpose.
BadCall = Callable[[Any], object]

BAD_CALLS: list[tuple[str, BadCall, type[Exception], str]] = [
    # unknown nodes: KeyError naming the node
    ("remove_node(ghost)", lambda r: r.remove_node("ghost"), KeyError, "ghost"),
    ("set_weight(ghost)", lambda r: r.set_weight("ghost", 2), KeyError, "ghost"),
    ("weight(ghost)", lambda r: r.weight("ghost"), KeyError, "ghost"),
    # names
    ("add_node(existing)", lambda r: r.add_node("a"), ValueError, "name"),
    ("add_node(existing, 3)", lambda r: r.add_node("b", 3), ValueError, "name"),
    ("add_node(5)", lambda r: r.add_node(5), TypeError, "name"),
    ("add_node(None)", lambda r: r.add_node(None), TypeError, "name"),
    ("remove_node(5)", lambda r: r.remove_node(5), TypeError, "name"),
    # weights
    ("add_node(weight=0)", lambda r: r.add_node("new", 0), ValueError, "weight"),
    ("add_node(weight=-1)", lambda r: r.add_node("new", -1), ValueError, "weight"),
    ("add_node(weight=2**32)", lambda r: r.add_node("new", 2**32), ValueError, "weight"),
    ("add_node(weight=1.5)", lambda r: r.add_node("new", 1.5), TypeError, "weight"),
    ("add_node(weight='2')", lambda r: r.add_node("new", "2"), TypeError, "weight"),
    ("add_node(weight=None)", lambda r: r.add_node("new", None), TypeError, "weight"),
    ("set_weight(0)", lambda r: r.set_weight("a", 0), ValueError, "weight"),
    ("set_weight(-1)", lambda r: r.set_weight("a", -1), ValueError, "weight"),
    ("set_weight(1.5)", lambda r: r.set_weight("a", 1.5), TypeError, "weight"),
    ("set_weight('2')", lambda r: r.set_weight("a", "2"), TypeError, "weight"),
    # n
    ("get_nodes(n=len+1)", lambda r: r.get_nodes("k", len(r) + 1), ValueError, "n"),
    ("get_nodes(n=100)", lambda r: r.get_nodes("k", 100), ValueError, "n"),
    ("get_nodes(n=-1)", lambda r: r.get_nodes("k", -1), ValueError, "n"),
    ("get_nodes(n=1.0)", lambda r: r.get_nodes("k", 1.0), TypeError, "n"),
    ("get_nodes(n='1')", lambda r: r.get_nodes("k", "1"), TypeError, "n"),
    # keys
    ("get_node(1.5)", lambda r: r.get_node(1.5), TypeError, "key"),
    ("get_node(None)", lambda r: r.get_node(None), TypeError, "key"),
    ("get_node(tuple)", lambda r: r.get_node(("a",)), TypeError, "key"),
    ("get_node(bytearray)", lambda r: r.get_node(bytearray(b"a")), TypeError, "key"),
    ("get_nodes(None, 1)", lambda r: r.get_nodes(None, 1), TypeError, "key"),
    ("get_nodes(1.5, 0)", lambda r: r.get_nodes(1.5, 0), TypeError, "key"),
    ("get_node_many([ok, None])", lambda r: r.get_node_many(["ok", None]), TypeError, "key"),
    ("get_node_many([ok, 1.5])", lambda r: r.get_node_many(iter(["ok", 1.5])), TypeError, "key"),
    ("distribution([ok, None])", lambda r: r.distribution(["ok", None]), TypeError, "key"),
]


@pytest.mark.parametrize(
    ("call", "error", "named"),
    [case[1:] for case in BAD_CALLS],
    ids=[case[0] for case in BAD_CALLS],
)
def test_refused_calls_name_the_argument_and_change_nothing(
    call: BadCall, error: type[Exception], named: str
) -> None:
    ring = HashRing({"a": 1, "b": 2, "c": 1})
    before = snapshot(ring)
    with pytest.raises(error) as caught:
        call(ring)
    assert_names(caught, named)
    assert snapshot(ring) == before


def test_non_iterable_keys_are_a_type_error() -> None:
    ring: Any = HashRing(["a"])
    with pytest.raises(TypeError):
        ring.get_node_many(5)
    with pytest.raises(TypeError):
        ring.distribution(5)


CONSTRUCTOR_BAD: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"nodes": "abc"}, TypeError, "nodes"),
    ({"nodes": b"abc"}, TypeError, "nodes"),
    ({"nodes": 5}, TypeError, "nodes"),
    ({"nodes": ["a", "b", "a"]}, ValueError, "nodes"),
    ({"nodes": iter(["x", "x"])}, ValueError, "nodes"),
    ({"nodes": [5]}, TypeError, "name"),
    ({"nodes": ["a", None]}, TypeError, "name"),
    ({"nodes": {"a": 0}}, ValueError, "weight"),
    ({"nodes": {"a": 1, "b": -1}}, ValueError, "weight"),
    ({"nodes": {"a": 1.5}}, TypeError, "weight"),
    ({"nodes": {"a": "2"}}, TypeError, "weight"),
    ({"nodes": {5: 1}}, TypeError, "name"),
    ({"vnodes": 0}, ValueError, "vnodes"),
    ({"vnodes": -1}, ValueError, "vnodes"),
    ({"vnodes": 1.5}, TypeError, "vnodes"),
    ({"replicas": 0}, ValueError, "replicas"),
    ({"replicas": 5}, ValueError, "replicas"),
    ({"replicas": -1}, ValueError, "replicas"),
    ({"replicas": "4"}, TypeError, "replicas"),
]


@pytest.mark.parametrize(
    ("options", "error", "argument"),
    CONSTRUCTOR_BAD,
    ids=[
        f"{next(iter(options))}={next(iter(options.values()))!r}"
        for options, _, _ in CONSTRUCTOR_BAD
    ],
)
def test_constructor_rejects_bad_arguments(
    options: dict[str, Any], error: type[Exception], argument: str
) -> None:
    with pytest.raises(error) as caught:
        HashRing(**options)
    assert_names(caught, argument)


def test_an_unencodable_str_key_is_refused_and_changes_nothing() -> None:
    ring = HashRing(["a", "b"])
    before = snapshot(ring)
    with pytest.raises(UnicodeEncodeError):
        ring.get_node("\ud800")
    with pytest.raises(UnicodeEncodeError):
        ring.get_node_many(["ok", "\ud800"])
    assert snapshot(ring) == before


# ---- threads -------------------------------------------------------------------------------

RUN_FOR = 0.5  # seconds of lookups while nodes come and go


def test_lookups_on_threads_while_nodes_come_and_go() -> None:
    base = [f"base-{number}" for number in range(4)]
    extras = [f"extra-{number}" for number in range(8)]
    ever = set(base) | set(extras)
    ring = HashRing(base)
    keys = [f"key-{number}" for number in range(64)] + list(range(16))
    deadline = time.monotonic() + RUN_FOR
    lookups = [0] * 5
    changes = [0]

    def change(rng: random.Random) -> None:
        while time.monotonic() < deadline:
            name = rng.choice(extras)
            if name in ring:
                ring.remove_node(name)
            else:
                ring.add_node(name, rng.randint(1, 4))
            if rng.random() < 0.2:
                ring.set_weight(rng.choice(base), rng.randint(1, 4))
            changes[0] += 1

    def look_up(index: int, rng: random.Random) -> None:
        while time.monotonic() < deadline:
            key = rng.choice(keys)
            assert ring.get_node(key) in ever
            # Every base node stays, and with weights 1 to 4 every node has points.
            found = ring.get_nodes(key, 3)
            assert len(set(found)) == 3
            assert set(found) <= ever
            owners = ring.get_node_many(keys)
            assert len(owners) == len(keys)
            assert set(owners) <= ever
            counts = ring.distribution(keys)
            assert sum(counts.values()) == len(keys)
            assert set(counts) <= ever
            assert set(ring) <= ever
            assert set(ring.points) <= ever
            assert len(ring) >= len(base)
            lookups[index] += 1

    def worker(index: int) -> None:
        rng = random.Random(index)
        if index == 0:
            change(rng)
        else:
            look_up(index, rng)

    # A deadlock would hold the GIL and stop pytest's own timeout from firing: end the process
    # with every thread's traceback instead.
    faulthandler.dump_traceback_later(RUN_FOR + 4 * JOIN, exit=True)
    try:
        run_threads(worker, 5, RUN_FOR + JOIN)
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert changes[0] > 0
    assert all(count > 0 for count in lookups[1:]), lookups
    # Placements are whole afterwards: the same as a ring built from the final nodes.
    rebuilt = HashRing(ring.weights)
    assert ring.get_node_many(keys) == rebuilt.get_node_many(keys)


# ---- Python code run during a call must not hang the process -------------------------------
#
# These run in a subprocess, killed when it hangs. In the build these were written against, a
# lookup holds the ring's lock while it runs Python code (iterating a generator of keys,
# calling an int subclass's __str__); if that code changes the ring, or gives up the GIL to a
# thread that changes it, the writer waits for the lock while holding the GIL, and the process
# deadlocks: no thread, not even the main one, runs again.

HANG_LIMIT = 3.0

REENTRANT_PROLOGUE = """
import threading
from buttress import HashRing
ring = HashRing(["a", "b"])
"""

REENTRANT: dict[str, str] = {
    "get_node_many(generator that adds a node)": """
        def keys():
            yield "k1"
            ring.add_node("c")
            yield "k2"
        ring.get_node_many(keys())
    """,
    "distribution(generator that adds a node)": """
        def keys():
            yield "k1"
            ring.add_node("c")
            yield "k2"
        ring.distribution(keys())
    """,
    "get_node(int subclass whose __str__ adds a node)": """
        class Key(int):
            def __str__(self):
                ring.add_node("c")
                return "7"
        ring.get_node(Key(7))
    """,
    "distribution(generator) while a thread adds and removes nodes": """
        stop = False
        def churn():
            number = 0
            while not stop:
                ring.add_node(f"x{number}")
                ring.remove_node(f"x{number}")
                number += 1
        thread = threading.Thread(target=churn, daemon=True)
        thread.start()
        for _ in range(20):
            ring.distribution(f"k{number}" for number in range(20_000))
        stop = True
        thread.join()
    """,
}


@pytest.mark.parametrize("body", list(REENTRANT.values()), ids=list(REENTRANT))
def test_python_code_run_during_a_lookup_does_not_hang(body: str) -> None:
    script = REENTRANT_PROLOGUE + textwrap.dedent(body)
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, timeout=HANG_LIMIT, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the process hung for {HANG_LIMIT} s")
    # Raising (say, that the ring changed during the call) would do; crashing would not.
    assert done.returncode >= 0, done.stderr.decode()


def test_get_nodes_refuses_more_nodes_than_own_points() -> None:
    ring = HashRing({"a": 1, "b": 10}, vnodes=1)
    assert ring.points["a"] == 0  # too light for any point at vnodes=1
    with pytest.raises(ValueError, match="n must not be more than the 1 nodes that own points"):
        ring.get_nodes("k", 2)
    assert ring.get_nodes("k", 1) == ["b"]


@pytest.mark.parametrize("method", ["get_node_many", "distribution"])
def test_a_batch_that_is_not_iterable_names_keys(method: str) -> None:
    ring = HashRing(["a"])
    with pytest.raises(TypeError, match="keys must be an iterable"):
        getattr(ring, method)(5)


# ---- rendezvous, jump and bounded loads ------------------------------------------------------

ALGORITHMS = ["ketama", "rendezvous", "jump"]


@pytest.mark.parametrize("algorithm", ["rendezvous", "jump"])
def test_a_hundred_nodes_share_keys_evenly_and_a_removal_moves_only_its_keys(
    algorithm: str,
) -> None:
    names = [f"node-{number}" for number in range(100)]
    keys = [f"key-{number}" for number in range(200_000)]
    ring = HashRing(names, algorithm=algorithm)
    owners = ring.get_node_many(keys)
    counts = Counter(owners)
    # Measured: rendezvous 1.06, jump 1.05 (ketama's 160 points per node give 1.22).
    assert max(counts.values()) / (len(keys) / len(names)) <= 1.10
    smaller = HashRing(names, algorithm=algorithm)
    smaller.remove_node("node-99")
    after = smaller.get_node_many(keys)
    moved = [(was, now) for was, now in zip(owners, after, strict=True) if was != now]
    assert all(was == "node-99" for was, _ in moved)
    assert len(moved) == counts["node-99"]
    assert len(moved) / len(keys) <= 0.012


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_answers_the_same_interface(algorithm: str) -> None:
    ring = HashRing(["a", "b", "c", "d"], algorithm=algorithm)
    assert ring.algorithm == algorithm
    keys = [f"k{number}" for number in range(500)] + [7, b"raw", True]
    owners = ring.get_node_many(keys)
    assert owners == [ring.get_node(key) for key in keys]
    for key in keys[:100]:
        nodes = ring.get_nodes(key, 4)
        assert sorted(nodes) == ["a", "b", "c", "d"]
        assert nodes[0] == ring.get_node(key)
    assert sum(ring.distribution(keys).values()) == len(keys)
    ring.add_node("e")
    assert "e" in ring
    assert len(ring) == 5


def test_rendezvous_shares_keys_by_weight() -> None:
    ring = HashRing({"small": 1, "large": 3}, algorithm="rendezvous")
    counts = ring.distribution(f"key-{number}" for number in range(40_000))
    assert abs(counts["large"] / 40_000 - 0.75) < 0.01
    before = ring.get_node_many([f"key-{number}" for number in range(5_000)])
    ring.set_weight("large", 1)
    after = ring.get_node_many([f"key-{number}" for number in range(5_000)])
    # Lowering a weight only moves keys away from that node.
    assert all(was == now or was == "large" for was, now in zip(before, after, strict=True))


def test_jump_only_removes_its_last_node_and_keeps_weights_at_one() -> None:
    ring = HashRing(["a", "b", "c"], algorithm="jump")
    placements = ring.get_node_many([f"k{number}" for number in range(1_000)])
    with pytest.raises(ValueError, match="name 'a' is not the last node"):
        ring.remove_node("a")
    with pytest.raises(ValueError, match="weight must be 1 with the jump algorithm"):
        ring.add_node("d", weight=2)
    with pytest.raises(ValueError, match="weight must be 1 with the jump algorithm"):
        HashRing({"a": 2}, algorithm="jump")
    assert ring.get_node_many([f"k{number}" for number in range(1_000)]) == placements
    ring.remove_node("c")
    assert list(ring) == ["a", "b"]


def test_an_unknown_algorithm_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="algorithm must be 'ketama', 'rendezvous' or 'jump'"):
        HashRing(["a"], algorithm="maglev")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_bounded_loads_keep_every_node_near_the_mean(algorithm: str) -> None:
    ring = HashRing([f"n{number}" for number in range(10)], algorithm=algorithm)
    loads: dict[str, int] = {}
    for number in range(10_000):
        node = ring.get_node_bounded(f"key-{number}", loads, epsilon=0.1)
        loads[node] = loads.get(node, 0) + 1
    # Each placement sees a cap of ceil(1.1 * (placed + 1) / 10), so no node passes it.
    assert max(loads.values()) <= -(-(1.1 * 10_000) // 10) + 1
    # With room everywhere the key goes to its own node.
    assert ring.get_node_bounded("key-1", {}) == ring.get_node("key-1")


def test_bounded_loads_refuse_bad_arguments() -> None:
    ring = HashRing(["a", "b"])
    with pytest.raises(ValueError, match="epsilon must be a number above 0"):
        ring.get_node_bounded("k", {}, epsilon=0)
    with pytest.raises(TypeError, match="loads must map node names to whole numbers"):
        ring.get_node_bounded("k", {"a": "many", "b": "many"})
    with pytest.raises(EmptyRingError):
        HashRing().get_node_bounded("k", {})


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_plan_for_a_new_node_moves_keys_only_to_it(algorithm: str) -> None:
    before = HashRing([f"n{number}" for number in range(8)], algorithm=algorithm)
    after = before.copy()
    after.add_node("n8")
    assert "n8" not in before  # the copy is independent
    keys = [f"key-{number}" for number in range(20_000)]
    plan = rebalance_plan(before, after, keys)
    assert {target for _, target in plan.moves} == {"n8"}
    assert plan.moved == after.distribution(keys)["n8"]
    assert plan.total == len(keys)
    assert 0.07 < plan.fraction < 0.16  # about 1/9 of the keys
