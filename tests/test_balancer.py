"""The load balancer: each algorithm's choices, in-flight accounting on every path out of a pick,
outlier ejection and active health checks on a manual clock, no healthy backend and panic mode,
bad input, a state machine against a small model, and picks from many threads.

Time runs on a ManualClock wherever ejections are involved; the checker thread and the threaded
stress run in real time with short intervals and end by polling against a generous deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import random
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any

import pytest
from buttress import ButtressError, HashRing, LoadBalancer, ManualClock, NoHealthyBackendError
from buttress.routing import Algorithm, BackendStatus, Pick
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from support import JOIN, cancel, run_threads, until, wait_until

FOUR = ["a", "b", "c", "d"]
KEYS = [f"user-{number}" for number in range(600)]


class Boom(Exception):
    """The failure the tests raise inside `with lb.pick()` blocks."""


class Interrupt(BaseException):
    """Not an Exception, like KeyboardInterrupt: says nothing about the backend."""


def in_flight(lb: LoadBalancer[Any]) -> dict[Any, int]:
    return {status.backend: status.in_flight for status in lb.statuses()}


def outcomes(lb: LoadBalancer[Any]) -> dict[Any, tuple[int, int]]:
    """(successes, failures) of every backend."""
    return {status.backend: (status.successes, status.failures) for status in lb.statuses()}


def ejecting(clock: ManualClock, backends: Any, **options: Any) -> LoadBalancer[Any]:
    """A balancer on `clock` that ejects a backend for 10 s on its first failure."""
    options.setdefault("consecutive_failures", 1)
    options.setdefault("base_ejection_time", 10.0)
    return LoadBalancer(backends, clock=clock, **options)


def ring_next(backends: list[Any], key: str, skip: Hashable) -> Any:
    """Where the balancer's ring sends `key` once `skip` cannot take it: the next backend
    clockwise (the ring is a HashRing over the backends' reprs)."""
    ring = HashRing({repr(backend): 1 for backend in backends})
    by_name = {repr(backend): backend for backend in backends}
    return next(by_name[name] for name in ring.get_nodes(key, len(ring)) if name != repr(skip))


# ---- construction and snapshots -----------------------------------------------------------


def test_defaults_and_snapshots() -> None:
    lb = LoadBalancer({"a": 2, "b": 1})
    assert (lb.name, lb.algorithm, len(lb)) == ("lb", Algorithm.ROUND_ROBIN, 2)
    assert repr(lb) == "LoadBalancer(name='lb', algorithm='round_robin', backends=['a', 'b'])"
    statuses = lb.statuses()
    assert [status.backend for status in statuses] == ["a", "b"]
    assert statuses[0] == BackendStatus("a", 2, 0, True, None, 0, 0, 0)
    assert statuses[0].available
    assert lb.status("b") == statuses[1]
    with pytest.raises(dataclasses.FrozenInstanceError):
        statuses[0].in_flight = 3  # type: ignore[misc]


def test_algorithm_by_enum_or_name() -> None:
    for algorithm in Algorithm:
        assert LoadBalancer(FOUR, algorithm=algorithm).algorithm is algorithm
        assert LoadBalancer(FOUR, algorithm=algorithm.value).algorithm is algorithm


def test_any_hashable_backends() -> None:
    backends = [("10.0.0.1", 80), ("10.0.0.2", 80), 7]
    lb = LoadBalancer(backends)
    assert [lb.choose() for _ in range(6)] == backends * 2


# ---- round robin ---------------------------------------------------------------------------


def test_round_robin_visits_each_backend_once_per_cycle_in_order() -> None:
    lb = LoadBalancer(FOUR)
    assert [lb.choose() for _ in range(12)] == FOUR * 3
    picks = [lb.pick() for _ in range(4)]
    assert [pick.backend for pick in picks] == FOUR
    for pick in picks:
        pick.release()
    assert set(in_flight(lb).values()) == {0}


def test_round_robin_skips_unavailable_backends(clock: ManualClock) -> None:
    lb = ejecting(clock, FOUR)
    lb.record("b", failed=True)
    assert [lb.choose() for _ in range(6)] == ["a", "c", "d"] * 2
    clock.advance(10)
    cycle = [lb.choose() for _ in range(4)]
    assert "".join(cycle) in "abcdabcd", f"{cycle} is not the rotation in order"
    assert [lb.choose() for _ in range(8)] == cycle * 2


def test_round_robin_added_backend_joins_the_rotation() -> None:
    lb = LoadBalancer(["a", "b", "c"])
    assert [lb.choose() for _ in range(3)] == ["a", "b", "c"]
    lb.add_backend("d")
    cycle = [lb.choose() for _ in range(4)]
    assert sorted(cycle) == FOUR
    assert "".join(cycle) in "abcdabcd"


def test_round_robin_goes_on_after_the_last_backend_when_one_leaves_mid_cycle(
    clock: ManualClock,
) -> None:
    """A real rotation skips a backend that leaves: after a, b with a ejected, c is next.

    The cursor indexes the list of available backends, so when that list shrinks the cursor
    lands one place further: c is skipped and b comes twice within three picks."""
    lb = ejecting(clock, FOUR)
    assert [lb.choose(), lb.choose()] == ["a", "b"]
    lb.record("a", failed=True)  # ejected mid-cycle
    assert [lb.choose() for _ in range(5)] == ["c", "d", "b", "c", "d"]


# ---- smooth weighted round robin ----------------------------------------------------------


def test_weighted_round_robin_is_nginx_smooth_sequence() -> None:
    lb = LoadBalancer({"a": 5, "b": 1, "c": 1}, algorithm="weighted_round_robin")
    assert "".join(lb.choose() for _ in range(21)) == "aabacaa" * 3
    picks = [lb.pick() for _ in range(7)]
    assert "".join(pick.backend for pick in picks) == "aabacaa"
    for pick in picks:
        pick.release()


@given(
    weights=st.lists(st.integers(1, 8), min_size=1, max_size=5),
    offset=st.integers(0, 30),
)
def test_weighted_round_robin_every_cycle_matches_the_weights(
    weights: list[int], offset: int
) -> None:
    backends = {f"s{index}": weight for index, weight in enumerate(weights)}
    lb = LoadBalancer(backends, algorithm="weighted_round_robin")
    total = sum(weights)
    sequence = [lb.choose() for _ in range(offset + 2 * total)]
    for start in range(offset, offset + total + 1):
        assert Counter(sequence[start : start + total]) == backends, f"window at {start}"


def test_weighted_round_robin_skips_unavailable_backends(clock: ManualClock) -> None:
    lb = ejecting(clock, {"a": 5, "b": 2, "c": 1}, algorithm="weighted_round_robin")
    lb.record("a", failed=True)
    assert Counter(lb.choose() for _ in range(30)) == {"b": 20, "c": 10}


# ---- least connections ---------------------------------------------------------------------


def test_least_connections_picks_the_fewest_in_flight_per_weight() -> None:
    lb = LoadBalancer({"a": 1, "b": 2, "c": 1}, algorithm="least_connections")
    held: list[Pick[str]] = []
    for _ in range(8):
        loads = {status.backend: status.in_flight / status.weight for status in lb.statuses()}
        pick = lb.pick()
        assert loads[pick.backend] == min(loads.values()), (pick.backend, loads)
        held.append(pick)
    assert in_flight(lb) == {"a": 2, "b": 4, "c": 2}
    rng = random.Random(5)
    for _ in range(200):
        if held and rng.random() < 0.5:
            held.pop(rng.randrange(len(held))).release()
            continue
        loads = {status.backend: status.in_flight / status.weight for status in lb.statuses()}
        pick = lb.pick()
        assert loads[pick.backend] == min(loads.values()), (pick.backend, loads)
        held.append(pick)
    for pick in held:
        pick.release()
    assert in_flight(lb) == {"a": 0, "b": 0, "c": 0}


def test_least_connections_ties_go_round() -> None:
    lb = LoadBalancer(["a", "b", "c"], algorithm="least_connections")
    assert sorted(lb.choose() for _ in range(3)) == ["a", "b", "c"]


# ---- least request (power of two choices) ------------------------------------------------


def test_least_request_never_picks_the_busier_of_its_two_choices() -> None:
    """White-box: the balancer draws its two distinct choices from `random.Random(seed)` as
    `int(random() * 4)` then `int(random() * 3)`, skipping the first, so a twin generator knows
    them; picks held open make the loads uneven."""
    lb = LoadBalancer(FOUR, algorithm="least_request", seed=7)
    twin = random.Random(7)
    rng = random.Random(1)
    held: list[Pick[str]] = []
    for _ in range(400):
        loads = in_flight(lb)
        one = int(twin.random() * 4)
        other = int(twin.random() * 3)
        first, second = FOUR[one], FOUR[other + (other >= one)]
        pick = lb.pick()
        lighter = first if loads[first] <= loads[second] else second
        assert pick.backend == lighter, (first, second, loads, pick.backend)
        held.append(pick)
        if rng.random() < 0.4:
            held.pop(rng.randrange(len(held))).release()
    for pick in held:
        pick.release()
    assert set(in_flight(lb).values()) == {0}


def test_least_request_never_sends_to_the_busiest() -> None:
    lb = LoadBalancer(["a", "b", "c"], algorithm="round_robin", seed=3)
    held = [lb.pick() for _ in range(18)]  # six each, in turn
    released = [held[index] for index in (0, 3, 6, 9, 12, 15, 1, 4)]  # every a, two b
    for pick in released:
        pick.release()
    lb.algorithm = Algorithm.LEAST_REQUEST  # white-box: the loads were made in rotation
    assert in_flight(lb) == {"a": 0, "b": 4, "c": 6}
    chosen = Counter(lb.choose() for _ in range(3000))
    assert chosen["c"] == 0  # the busier of any pair it is in
    assert 1800 < chosen["a"] < 2200  # a wins both pairs it is in: 2/3
    for pick in held:
        if pick not in released:
            pick.release()
    assert in_flight(lb) == {"a": 0, "b": 0, "c": 0}


def test_least_request_with_two_backends_always_takes_the_lighter() -> None:
    lb = LoadBalancer(["a", "b"], algorithm="least_request", seed=1)
    held = [lb.pick() for _ in range(20)]
    assert in_flight(lb) == {"a": 10, "b": 10}
    extra = lb.pick()
    lighter = "b" if extra.backend == "a" else "a"
    assert all(lb.choose() == lighter for _ in range(50))
    for pick in [*held, extra]:
        pick.release()


def test_seeded_choices_repeat() -> None:
    for algorithm in ("least_request", "random"):
        runs = [LoadBalancer(FOUR, algorithm=algorithm, seed=42) for _ in range(2)]
        first, second = ([lb.choose() for _ in range(50)] for lb in runs)
        assert first == second
        assert set(first) == set(FOUR)


# ---- hash ----------------------------------------------------------------------------------


def test_hash_sends_a_key_to_the_same_backend() -> None:
    backends = ["a", "b", "c", "d", "e"]
    lb = LoadBalancer(backends, algorithm="hash")
    placed = {key: lb.choose(key) for key in KEYS}
    assert set(placed.values()) == set(backends)
    assert all(lb.choose(key) == placed[key] for key in KEYS)
    for key in KEYS[:50]:
        with lb.pick(key) as backend:
            assert backend == placed[key]
    ring = HashRing({repr(backend): 1 for backend in backends})
    assert [repr(placed[key]) for key in KEYS] == ring.get_node_many(KEYS)
    for key in (b"raw-bytes", 12345, -1):
        assert lb.choose(key) == lb.choose(key)


def test_hash_removing_a_backend_moves_only_its_keys() -> None:
    lb = LoadBalancer(["a", "b", "c", "d", "e"], algorithm="hash")
    before = {key: lb.choose(key) for key in KEYS}
    lb.remove_backend("c")
    after = {key: lb.choose(key) for key in KEYS}
    moved = {key for key in KEYS if before[key] != after[key]}
    assert moved == {key for key in KEYS if before[key] == "c"}
    assert "c" not in after.values()
    lb.add_backend("c")
    assert {key: lb.choose(key) for key in KEYS} == before


def test_hash_ejected_backend_keys_go_to_the_next_and_come_back(clock: ManualClock) -> None:
    backends = [("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.3", 80), ("10.0.0.4", 80)]
    lb = ejecting(clock, backends, algorithm="hash")
    before = {key: lb.choose(key) for key in KEYS}
    ejected = backends[1]
    lb.record(ejected, failed=True)
    assert not lb.status(ejected).available
    during = {key: lb.choose(key) for key in KEYS}
    for key in KEYS:
        if before[key] == ejected:
            assert during[key] == ring_next(backends, key, ejected), key
        else:
            assert during[key] == before[key], key
    assert len({during[key] for key in KEYS if before[key] == ejected}) > 1  # spread, not piled
    clock.advance(10)
    assert {key: lb.choose(key) for key in KEYS} == before


def test_hash_honours_weights() -> None:
    lb = LoadBalancer({"a": 1, "b": 4}, algorithm="hash")
    shares = Counter(lb.choose(key) for key in KEYS)
    assert shares["b"] > 2.5 * shares["a"]


# ---- random --------------------------------------------------------------------------------


def test_random_respects_weights() -> None:
    weights = {"a": 1, "b": 3, "c": 6}
    lb = LoadBalancer(weights, algorithm="random", seed=11)
    draws = 20_000
    counts = Counter(lb.choose() for _ in range(draws))
    for backend, weight in weights.items():
        assert abs(counts[backend] / draws - weight / 10) < 0.02, counts


def test_random_skips_unavailable_backends(clock: ManualClock) -> None:
    lb = ejecting(clock, {"a": 1, "b": 3, "c": 6}, algorithm="random", seed=2)
    lb.record("c", failed=True)
    counts = Counter(lb.choose() for _ in range(4000))
    assert set(counts) == {"a", "b"}
    assert 0.70 < counts["b"] / 4000 < 0.80


# ---- in flight on every path ---------------------------------------------------------------


def test_with_block_counts_in_flight_and_success() -> None:
    lb = LoadBalancer(["a", "b"])
    pick = lb.pick()
    assert isinstance(pick, Pick)
    assert in_flight(lb) == {"a": 1, "b": 0}  # counted from pick(), before the block
    with pick as backend:
        assert backend == pick.backend == "a"
        assert lb.status("a").in_flight == 1
    assert in_flight(lb) == {"a": 0, "b": 0}
    assert outcomes(lb)["a"] == (1, 0)


def test_exception_in_block_is_a_failure_and_propagates() -> None:
    lb = LoadBalancer(["a", "b"])
    with pytest.raises(Boom), lb.pick():
        raise Boom
    assert in_flight(lb) == {"a": 0, "b": 0}
    assert outcomes(lb)["a"] == (0, 1)


def test_fail_marks_a_failure_without_raising() -> None:
    lb = LoadBalancer(["a", "b"])
    pick = lb.pick()
    with pick as backend:
        assert backend == "a"
        pick.fail()
    assert in_flight(lb) == {"a": 0, "b": 0}
    assert outcomes(lb) == {"a": (0, 1), "b": (0, 0)}


def test_release_by_hand_and_only_once() -> None:
    lb = LoadBalancer(["a", "b", "c"])
    ok, failed, overridden = lb.pick(), lb.pick(), lb.pick()
    ok.release()
    failed.release(failed=True)
    overridden.fail()
    overridden.release(failed=False)  # an explicit outcome wins over fail()
    assert outcomes(lb) == {"a": (1, 0), "b": (0, 1), "c": (1, 0)}
    for pick in (ok, failed, overridden):
        with pytest.raises(RuntimeError, match="already released"):
            pick.release()
    with pytest.raises(RuntimeError, match="already released"):
        ok.__exit__(None, None, None)
    assert in_flight(lb) == {"a": 0, "b": 0, "c": 0}
    assert outcomes(lb) == {"a": (1, 0), "b": (0, 1), "c": (1, 0)}


async def test_async_with_counts_and_records() -> None:
    lb = LoadBalancer(["a", "b"])
    async with lb.pick() as backend:
        assert backend == "a"
        assert lb.status("a").in_flight == 1
    with pytest.raises(Boom):
        async with lb.pick():
            raise Boom
    assert in_flight(lb) == {"a": 0, "b": 0}
    assert outcomes(lb) == {"a": (1, 0), "b": (0, 1)}


async def test_cancelled_inside_async_with_is_released_and_not_a_failure(
    clock: ManualClock,
) -> None:
    lb = ejecting(clock, ["a", "b"])
    entered = asyncio.Event()

    async def call() -> None:
        async with lb.pick():
            entered.set()
            await asyncio.sleep(JOIN * 10)

    task = asyncio.create_task(call())
    await asyncio.wait_for(entered.wait(), JOIN)
    assert lb.status("a").in_flight == 1
    await cancel(task)
    status = lb.status("a")
    assert (status.in_flight, status.failures, status.ejections) == (0, 0, 0)
    assert status.available


def test_base_exception_in_block_is_released_and_not_a_failure(clock: ManualClock) -> None:
    lb = ejecting(clock, ["a", "b"])
    with pytest.raises(Interrupt), lb.pick():
        raise Interrupt
    status = lb.status("a")
    assert (status.in_flight, status.failures, status.ejections) == (0, 0, 0)


def test_choose_and_record_track_outcomes_without_in_flight() -> None:
    lb = LoadBalancer(["a", "b"])
    assert lb.choose() == "a"
    assert in_flight(lb) == {"a": 0, "b": 0}
    lb.record("a", failed=False)
    lb.record("b", failed=True)
    assert in_flight(lb) == {"a": 0, "b": 0}
    assert outcomes(lb) == {"a": (1, 0), "b": (0, 1)}
    with pytest.raises(KeyError, match="'z'"):
        lb.record("z", failed=True)
    assert outcomes(lb) == {"a": (1, 0), "b": (0, 1)}


def test_pick_on_a_removed_backend_finishes_normally() -> None:
    lb = LoadBalancer(["a", "b"])
    pick = lb.pick()
    lb.remove_backend("a")
    pick.release(failed=True)
    assert [status.backend for status in lb.statuses()] == ["b"]
    assert in_flight(lb) == {"b": 0}


def test_in_flight_returns_to_zero_when_is_failure_raises() -> None:
    """`is_failure` is user code: when it raises, the pick must still be released. It is
    called in `__exit__` before `release()`, so its error skips the release and the backend
    stays one call in flight for good (least_connections then shuns it)."""

    def is_failure(error: BaseException) -> bool:
        raise ValueError("is_failure is broken")

    lb = LoadBalancer(["a", "b"], is_failure=is_failure)
    with pytest.raises((ValueError, Boom)), lb.pick():
        raise Boom
    assert in_flight(lb) == {"a": 0, "b": 0}


# ---- outlier ejection ----------------------------------------------------------------------


def test_consecutive_failures_eject_until_the_time_passes(clock: ManualClock) -> None:
    lb = LoadBalancer(["a", "b"], consecutive_failures=3, base_ejection_time=10.0, clock=clock)
    for _ in range(2):
        pick = lb.pick()
        assert pick.backend == "a"
        with pytest.raises(Boom), pick:
            raise Boom
        lb.choose()  # b's turn, so the next pick is a again
    assert lb.status("a").available
    lb.record("a", failed=True)
    status = lb.status("a")
    assert (status.healthy, status.ejected_until, status.ejections) == (True, 10.0, 1)
    assert not status.available
    assert [lb.choose() for _ in range(4)] == ["b"] * 4
    clock.advance(9.5)
    assert not lb.status("a").available
    clock.advance(0.5)
    status = lb.status("a")
    assert status.available
    assert (status.ejected_until, status.ejections) == (None, 1)
    assert sorted(lb.choose() for _ in range(2)) == ["a", "b"]


def test_a_success_resets_the_run_of_failures(clock: ManualClock) -> None:
    lb = LoadBalancer(["a", "b"], consecutive_failures=3, clock=clock)
    for failed in (True, True, False, True, True):
        lb.record("a", failed=failed)
    assert lb.status("a").available
    lb.record("a", failed=True)
    assert not lb.status("a").available


def test_after_an_ejection_the_run_starts_over(clock: ManualClock) -> None:
    lb = LoadBalancer(["a", "b"], consecutive_failures=3, base_ejection_time=10.0, clock=clock)
    for _ in range(3):
        lb.record("a", failed=True)
    clock.advance(10)
    assert lb.status("a").available
    for _ in range(2):
        lb.record("a", failed=True)
    assert lb.status("a").available
    lb.record("a", failed=True)
    assert lb.status("a").ejections == 2


def test_ejection_time_grows_and_is_capped(clock: ManualClock) -> None:
    lb = ejecting(clock, ["a", "b"], base_ejection_time=10.0, max_ejection_time=25.0)
    for ejections, duration in [(1, 10.0), (2, 20.0), (3, 25.0), (4, 25.0)]:
        start = clock.now()
        lb.record("a", failed=True)
        status = lb.status("a")
        assert (status.ejections, status.ejected_until) == (ejections, start + duration)
        clock.advance(duration - 0.5)
        assert not lb.status("a").available
        clock.advance(0.5)
        assert lb.status("a").available


def test_failures_while_ejected_do_not_extend_the_ejection(clock: ManualClock) -> None:
    lb = ejecting(clock, ["a", "b"])
    lb.record("a", failed=True)
    clock.advance(5)
    for _ in range(3):
        lb.record("a", failed=True)
    status = lb.status("a")
    assert (status.ejections, status.ejected_until, status.failures) == (1, 10.0, 4)


def test_a_failure_just_after_the_ejection_counts_whoever_looked(clock: ManualClock) -> None:
    """After an ejection ends, the next failure starts a new run; with consecutive_failures=1 it
    ejects again (for 20 s, the second ejection). That must not depend on whether anything
    asked for a status or a pick in between: the ejection only ends lazily (in `status()`,
    `statuses()` or a pick), and `_finish` still sees the stale `ejected_until`, so an
    unobserved failure is dropped and the backend stays in rotation."""
    looked = ejecting(clock, ["a", "b"])
    unobserved = ejecting(clock, ["a", "b"])
    for lb in (looked, unobserved):
        lb.record("a", failed=True)
    clock.advance(10)
    looked.status("a")
    for lb in (looked, unobserved):
        lb.record("a", failed=True)
    assert looked.status("a").ejections == 2
    status = unobserved.status("a")
    assert (status.ejections, status.ejected_until) == (2, 30.0), status


def test_is_failure_decides_what_counts(clock: ManualClock) -> None:
    lb = ejecting(clock, ["a"], is_failure=lambda error: not isinstance(error, LookupError))
    with pytest.raises(KeyError), lb.pick():
        raise KeyError("not the backend's fault")
    assert outcomes(lb) == {"a": (1, 0)}
    assert lb.status("a").available
    with pytest.raises(Boom), lb.pick():
        raise Boom
    assert outcomes(lb) == {"a": (1, 1)}
    assert not lb.status("a").available


def test_no_outlier_ejection_when_disabled(clock: ManualClock) -> None:
    lb = LoadBalancer(["a"], consecutive_failures=None, clock=clock)
    for _ in range(50):
        lb.record("a", failed=True)
    status = lb.status("a")
    assert status.available
    assert (status.ejections, status.failures) == (0, 50)


# ---- active health checks ------------------------------------------------------------------


class Script:
    """A health check whose verdict per backend the test sets: a value to return, or an
    exception to raise. Counts its calls."""

    def __init__(self, **verdicts: object) -> None:
        self.verdicts: dict[str, object] = dict(verdicts)
        self.calls: Counter[str] = Counter()
        self.lock = threading.Lock()

    def __call__(self, backend: str) -> object:
        with self.lock:
            self.calls[backend] += 1
        verdict = self.verdicts.get(backend, True)
        if isinstance(verdict, BaseException):
            raise verdict
        return verdict


def test_unhealthy_after_k_failed_checks_healthy_after_m_passes() -> None:
    script = Script(b=False)
    lb = LoadBalancer(["a", "b"], health_check=script, healthy_threshold=2, unhealthy_threshold=3)
    for _ in range(2):
        lb.check_health()
    assert lb.status("b").healthy
    lb.check_health()
    status = lb.status("b")
    assert (status.healthy, status.available, status.ejected_until) == (False, False, None)
    assert [lb.choose() for _ in range(4)] == ["a"] * 4
    script.verdicts["b"] = True
    lb.check_health()
    assert not lb.status("b").healthy
    lb.check_health()
    assert lb.status("b").healthy
    assert sorted(lb.choose() for _ in range(2)) == ["a", "b"]
    assert script.calls == {"a": 5, "b": 5}


def test_a_pass_or_fail_breaks_the_run() -> None:
    script = Script()
    lb = LoadBalancer(["a"], health_check=script, healthy_threshold=2, unhealthy_threshold=2)
    for verdict in (False, True, False, True):
        script.verdicts["a"] = verdict
        lb.check_health()
    assert lb.status("a").healthy
    script.verdicts["a"] = False
    for _ in range(2):
        lb.check_health()
    assert not lb.status("a").healthy
    for verdict in (True, False, True):
        script.verdicts["a"] = verdict
        lb.check_health()
    assert not lb.status("a").healthy


@pytest.mark.parametrize("verdict", [False, None, ConnectionError("down"), Boom("check")])
def test_failing_verdicts(verdict: object) -> None:
    lb = LoadBalancer(["a", "b"], health_check=Script(a=verdict), unhealthy_threshold=1)
    lb.check_health()
    assert [status.healthy for status in lb.statuses()] == [False, True]


@pytest.mark.parametrize("verdict", [True, "ok", 200, object()])
def test_passing_verdicts(verdict: object) -> None:
    lb = LoadBalancer(["a"], health_check=Script(a=verdict), unhealthy_threshold=1)
    lb.check_health()
    assert lb.status("a").healthy


def test_unhealthy_and_ejected_back_only_when_both_clear(clock: ManualClock) -> None:
    script = Script(a=False)
    lb = ejecting(clock, ["a", "b"], health_check=script, unhealthy_threshold=1)
    lb.check_health()
    lb.record("a", failed=True)
    clock.advance(10)
    assert not lb.status("a").available  # ejection over, still unhealthy
    script.verdicts["a"] = True
    for _ in range(2):
        lb.check_health()
    assert lb.status("a").available


def test_check_health_needs_a_check() -> None:
    lb = LoadBalancer(["a"])
    with pytest.raises(RuntimeError, match="health_check"):
        lb.check_health()
    with pytest.raises(RuntimeError, match="health_check"):
        lb.start_health_checks()


async def test_check_health_async_needs_a_check() -> None:
    with pytest.raises(RuntimeError, match="health_check"):
        await LoadBalancer(["a"]).check_health_async()


def test_check_health_refuses_an_async_check() -> None:
    """The TypeError is right; but the coroutine the check returned must be closed, not left
    for the garbage collector to warn "coroutine ... was never awaited"."""

    async def check(backend: str) -> bool:
        return True

    lb = LoadBalancer(["a", "b"], health_check=check)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TypeError, match="check_health_async"):
            lb.check_health()
        gc.collect()
    assert [status.healthy for status in lb.statuses()] == [True, True]
    unawaited = [str(warning.message) for warning in caught if "never awaited" in str(warning)]
    assert not unawaited, f"check_health left the check's coroutine unawaited: {unawaited}"


async def test_check_health_async_checks_concurrently() -> None:
    started: list[str] = []
    everyone = asyncio.Event()

    async def check(backend: str) -> bool:
        started.append(backend)
        if len(started) == 3:
            everyone.set()
        # One check at a time would wait here until the timeout: a failed check.
        await asyncio.wait_for(everyone.wait(), JOIN)
        if backend == "c":
            raise ConnectionError("c is down")
        return backend != "b"

    lb = LoadBalancer(["a", "b", "c"], health_check=check, unhealthy_threshold=1)
    await lb.check_health_async()
    assert sorted(started) == ["a", "b", "c"]
    assert [status.healthy for status in lb.statuses()] == [True, False, False]


async def test_check_health_async_takes_plain_checks_too() -> None:
    lb = LoadBalancer(["a", "b"], health_check=Script(b=Boom()), unhealthy_threshold=1)
    await lb.check_health_async()
    assert [status.healthy for status in lb.statuses()] == [True, False]


async def test_run_health_checks_until_cancelled() -> None:
    script = Script(b=False)
    lb = LoadBalancer(["a", "b"], health_check=script, check_interval=0.005, unhealthy_threshold=2)
    task = asyncio.create_task(lb.run_health_checks())
    await until(lambda: not lb.status("b").healthy)
    script.verdicts["b"] = True
    await until(lambda: lb.status("b").healthy)
    await cancel(task)
    calls = sum(script.calls.values())
    await asyncio.sleep(0.03)
    assert sum(script.calls.values()) == calls


def checker_threads(name: str) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == f"buttress-lb-{name}"]


def test_checker_thread_runs_until_stopped() -> None:
    script = Script(b=False)
    lb = LoadBalancer(
        ["a", "b"],
        name="checker-thread",
        health_check=script,
        check_interval=0.005,
        unhealthy_threshold=2,
        healthy_threshold=2,
    )
    lb.start_health_checks()
    try:
        wait_until(lambda: not lb.status("b").healthy)
        script.verdicts["b"] = True
        wait_until(lambda: lb.status("b").healthy)
        lb.start_health_checks()  # already running: no second thread
        assert len(checker_threads("checker-thread")) == 1
        assert checker_threads("checker-thread")[0].daemon
    finally:
        lb.stop_health_checks()
    wait_until(lambda: not checker_threads("checker-thread"))
    calls = sum(script.calls.values())
    time.sleep(0.03)
    assert sum(script.calls.values()) == calls


def test_checker_thread_ends_with_its_balancer() -> None:
    lb = LoadBalancer(["a"], name="checker-gc", health_check=Script(), check_interval=0.005)
    lb.start_health_checks()
    wait_until(lambda: bool(checker_threads("checker-gc")))
    del lb
    gc.collect()
    wait_until(lambda: not checker_threads("checker-gc"))


def test_checker_thread_restarts_after_a_stop() -> None:
    """stop_health_checks() then start_health_checks() must leave checks running. start()
    returns early while the old thread is still alive (it has not yet woken to see the stop),
    and that thread then exits: no checker runs any more."""
    script = Script()
    lb = LoadBalancer(["a"], name="checker-restart", health_check=script, check_interval=0.005)
    lb.start_health_checks()
    try:
        wait_until(lambda: script.calls["a"] >= 2)
        lb.stop_health_checks()
        lb.start_health_checks()
        seen = script.calls["a"]
        deadline = time.monotonic() + JOIN
        while script.calls["a"] < seen + 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert script.calls["a"] >= seen + 3, (
            f"no health check ran after stop + start ({script.calls['a'] - seen} in {JOIN} s; "
            f"checker threads alive: {len(checker_threads('checker-restart'))})"
        )
    finally:
        lb.stop_health_checks()


# ---- no healthy backend, panic mode --------------------------------------------------------


def test_no_healthy_backend(clock: ManualClock) -> None:
    lb = ejecting(clock, ["a", "b"], name="orders")
    lb.record("a", failed=True)
    lb.record("b", failed=True)
    with pytest.raises(NoHealthyBackendError) as raised:
        lb.pick()
    error = raised.value
    assert isinstance(error, ButtressError)
    assert (error.name, error.backends) == ("orders", 2)
    assert str(error) == (
        "Load balancer 'orders' has no available backend: all 2 are unhealthy or ejected. "
        "Fix them, wait for their ejection to end, or set panic_threshold to route to them "
        "anyway."
    )
    with pytest.raises(NoHealthyBackendError):
        lb.choose()
    assert in_flight(lb) == {"a": 0, "b": 0}
    clock.advance(10)
    assert lb.choose() in ("a", "b")


def test_no_healthy_backend_by_health_checks() -> None:
    lb = LoadBalancer(["a"], name="checked", health_check=Script(a=False), unhealthy_threshold=1)
    lb.check_health()
    with pytest.raises(NoHealthyBackendError, match=r"'checked'.*all 1 are"):
        lb.pick()


def test_panic_mode_routes_to_every_backend_below_the_threshold(clock: ManualClock) -> None:
    lb = ejecting(clock, FOUR, panic_threshold=0.5)
    lb.record("a", failed=True)
    lb.record("b", failed=True)  # 2 of 4 available: not below half
    assert Counter(lb.choose() for _ in range(8)) == {"c": 4, "d": 4}
    lb.record("c", failed=True)  # 1 of 4: panic, every backend
    assert Counter(lb.choose() for _ in range(8)) == dict.fromkeys(FOUR, 2)
    lb.record("d", failed=True)  # none: still every backend, no error
    with lb.pick() as backend:
        assert backend in FOUR
    assert Counter(lb.choose() for _ in range(8)) == dict.fromkeys(FOUR, 2)
    clock.advance(10)
    assert all(status.available for status in lb.statuses())


# ---- bad input -----------------------------------------------------------------------------


def assert_names(error: pytest.ExceptionInfo[BaseException], argument: str) -> None:
    assert argument in str(error.value), f"{argument!r} not named in {str(error.value)!r}"


CONSTRUCTOR_BAD: list[tuple[Any, dict[str, Any], type[Exception], str]] = [
    ([], {}, ValueError, "backends"),
    ({}, {}, ValueError, "backends"),
    ("abc", {}, TypeError, "backends"),
    (b"abc", {}, TypeError, "backends"),
    (5, {}, TypeError, "backends"),
    ({"a": 0}, {}, ValueError, "weight"),
    ({"a": -1}, {}, ValueError, "weight"),
    ({"a": 1.5}, {}, TypeError, "weight"),
    ({"a": True}, {}, TypeError, "weight"),
    ({"a": "2"}, {}, TypeError, "weight"),
    (["a", "a"], {}, ValueError, "backend 'a'"),
    (FOUR, {"algorithm": "fastest"}, ValueError, "algorithm"),
    (FOUR, {"algorithm": None}, ValueError, "algorithm"),
    (FOUR, {"name": 3}, TypeError, "name"),
    (FOUR, {"panic_threshold": 0}, ValueError, "panic_threshold"),
    (FOUR, {"panic_threshold": 1.5}, ValueError, "panic_threshold"),
    (FOUR, {"panic_threshold": -0.5}, ValueError, "panic_threshold"),
    (FOUR, {"panic_threshold": float("nan")}, ValueError, "panic_threshold"),
    (FOUR, {"healthy_threshold": 0}, ValueError, "healthy_threshold"),
    (FOUR, {"unhealthy_threshold": 0}, ValueError, "unhealthy_threshold"),
    (FOUR, {"healthy_threshold": 1.0}, TypeError, "healthy_threshold"),
    (FOUR, {"consecutive_failures": 0}, ValueError, "consecutive_failures"),
    (FOUR, {"consecutive_failures": True}, TypeError, "consecutive_failures"),
    (FOUR, {"health_check": "http://x/health"}, TypeError, "health_check"),
    (FOUR, {"is_failure": None}, TypeError, "is_failure"),
    (FOUR, {"check_interval": 0}, ValueError, "check_interval"),
    (FOUR, {"check_interval": float("inf")}, ValueError, "check_interval"),
    (FOUR, {"check_interval": "1"}, TypeError, "check_interval"),
    (FOUR, {"base_ejection_time": -1}, ValueError, "base_ejection_time"),
    (FOUR, {"max_ejection_time": float("nan")}, ValueError, "max_ejection_time"),
    (FOUR, {"clock": time.monotonic}, TypeError, "clock"),
]


@pytest.mark.parametrize(("backends", "options", "kind", "argument"), CONSTRUCTOR_BAD)
def test_constructor_refuses_bad_input(
    backends: Any, options: dict[str, Any], kind: type[Exception], argument: str
) -> None:
    with pytest.raises(kind) as raised:
        LoadBalancer(backends, **options)
    assert_names(raised, argument)


def test_unknown_algorithm_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="algorithm") as raised:
        LoadBalancer(FOUR, algorithm="fastest")
    for algorithm in Algorithm:
        assert repr(algorithm.value) in str(raised.value)
    assert "'fastest'" in str(raised.value)


@pytest.mark.parametrize(
    ("change", "kind", "argument"),
    [
        (lambda lb: lb.add_backend("a"), ValueError, "backend 'a'"),
        (lambda lb: lb.add_backend("e", 0), ValueError, "weight"),
        (lambda lb: lb.add_backend("e", -1), ValueError, "weight"),
        (lambda lb: lb.add_backend("e", 1.5), TypeError, "weight"),
        (lambda lb: lb.add_backend("e", True), TypeError, "weight"),
        (lambda lb: lb.remove_backend("z"), KeyError, "backend 'z'"),
        (lambda lb: lb.set_weight("z", 2), KeyError, "backend 'z'"),
        (lambda lb: lb.set_weight("a", 0), ValueError, "weight"),
        (lambda lb: lb.set_weight("a", True), TypeError, "weight"),
    ],
)
def test_refused_changes_leave_the_balancer_as_it_was(
    change: Callable[[LoadBalancer[str]], None], kind: type[Exception], argument: str
) -> None:
    lb = LoadBalancer({"a": 1, "b": 2, "c": 1, "d": 1}, algorithm="weighted_round_robin")
    held = lb.pick()
    twin = LoadBalancer({"a": 1, "b": 2, "c": 1, "d": 1}, algorithm="weighted_round_robin")
    twin_held = twin.pick()
    before = lb.statuses()
    with pytest.raises(kind) as raised:
        change(lb)
    assert_names(raised, argument)
    assert lb.statuses() == before
    assert len(lb) == 4
    assert [lb.choose() for _ in range(12)] == [twin.choose() for _ in range(12)]
    held.release()
    twin_held.release()


def test_the_last_backend_stays() -> None:
    lb = LoadBalancer(["a", "b"])
    lb.remove_backend("b")
    with pytest.raises(ValueError, match="last") as raised:
        lb.remove_backend("a")
    assert_names(raised, "backend")
    assert [status.backend for status in lb.statuses()] == ["a"]
    assert lb.choose() == "a"


def test_status_of_an_unknown_backend() -> None:
    with pytest.raises(KeyError, match="backend 'z'"):
        LoadBalancer(["a"]).status("z")


@pytest.mark.parametrize(
    ("key", "kind", "text"),
    [
        (None, TypeError, "key must be given"),
        ([1, 2], TypeError, "list"),
        (1.5, TypeError, "float"),
        (("a", 1), TypeError, "tuple"),
    ],
)
def test_hash_needs_a_usable_key(key: object, kind: type[Exception], text: str) -> None:
    lb = LoadBalancer(FOUR, algorithm="hash")
    with pytest.raises(kind, match=text) as raised:
        lb.pick(key)
    assert_names(raised, "key")
    with pytest.raises(kind, match=text):
        lb.choose(key)
    assert in_flight(lb) == dict.fromkeys(FOUR, 0)


def test_set_weight_changes_the_share() -> None:
    lb = LoadBalancer(["a", "b"], algorithm="weighted_round_robin")
    lb.set_weight("a", 3)
    assert lb.status("a").weight == 3
    assert Counter(lb.choose() for _ in range(8)) == {"a": 6, "b": 2}


# ---- state machine -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    size: int
    weights: tuple[int, ...]
    algorithm: Algorithm
    healthy_threshold: int
    unhealthy_threshold: int
    consecutive_failures: int | None
    base_ejection_time: float
    max_ejection_time: float
    panic_threshold: float | None


@dataclasses.dataclass
class ModelBackend:
    """What the balancer should know about one backend."""

    name: str
    weight: int
    in_flight: int = 0
    healthy: bool = True
    checks_in_a_row: int = 0  # > 0: passes in a row; < 0: failures in a row
    failures_in_a_row: int = 0
    ejections: int = 0
    ejected_until: float | None = None
    successes: int = 0
    failures: int = 0

    @property
    def available(self) -> bool:
        return self.healthy and self.ejected_until is None

    def status(self) -> BackendStatus[str]:
        return BackendStatus(
            self.name,
            self.weight,
            self.in_flight,
            self.healthy,
            self.ejected_until,
            self.ejections,
            self.successes,
            self.failures,
        )


class BalancerModel:
    """The spec, written plainly: ejections end as soon as their time comes."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.backends: dict[str, ModelBackend] = {}
        self.now = 0.0

    def advance(self, now: float) -> None:
        self.now = now
        for backend in self.backends.values():
            if backend.ejected_until is not None and now >= backend.ejected_until:
                backend.ejected_until = None
                backend.failures_in_a_row = 0

    def routable(self) -> list[str]:
        """Where a pick may go (empty: NoHealthyBackendError)."""
        available = [name for name, backend in self.backends.items() if backend.available]
        panic = self.config.panic_threshold
        if panic is not None and len(available) < panic * len(self.backends):
            return list(self.backends)
        return available

    def finish(self, backend: ModelBackend, failed: bool | None) -> None:
        """`failed` None: a cancelled call, which says nothing about the backend."""
        backend.in_flight -= 1
        if failed is None:
            return
        if not failed:
            backend.successes += 1
            backend.failures_in_a_row = 0
            return
        backend.failures += 1
        backend.failures_in_a_row += 1
        limit = self.config.consecutive_failures
        already = backend.ejected_until is not None  # an ejection runs its course
        if limit is not None and backend.failures_in_a_row >= limit and not already:
            backend.ejections += 1
            backend.ejected_until = self.now + min(
                self.config.base_ejection_time * backend.ejections, self.config.max_ejection_time
            )

    def checked(self, backend: ModelBackend, passed: bool) -> None:
        if passed:
            backend.checks_in_a_row = max(backend.checks_in_a_row, 0) + 1
            if backend.checks_in_a_row >= self.config.healthy_threshold:
                backend.healthy = True
        else:
            backend.checks_in_a_row = min(backend.checks_in_a_row, 0) - 1
            if -backend.checks_in_a_row >= self.config.unhealthy_threshold:
                backend.healthy = False


@st.composite
def configs(draw: st.DrawFn) -> Config:
    size = draw(st.integers(1, 4))
    base = draw(st.sampled_from([1.0, 2.0, 5.0]))
    return Config(
        size=size,
        weights=tuple(draw(st.lists(st.integers(1, 3), min_size=size, max_size=size))),
        algorithm=draw(st.sampled_from(list(Algorithm))),
        healthy_threshold=draw(st.integers(1, 3)),
        unhealthy_threshold=draw(st.integers(1, 3)),
        consecutive_failures=draw(st.none() | st.integers(1, 3)),
        base_ejection_time=base,
        max_ejection_time=base * draw(st.sampled_from([1, 2, 3])),
        panic_threshold=draw(st.none() | st.sampled_from([0.5, 1.0])),
    )


# Exact in binary, so the clock's readings add up without rounding.
ADVANCES = st.sampled_from([0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 15.0])
VERDICTS = st.sampled_from([True, False, None, "raise"])


class BalancerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ready = False
        self.held: list[tuple[Pick[str], ModelBackend]] = []
        self.verdicts: dict[str, object] = {}

    def _check(self, backend: str) -> bool:
        verdict = self.verdicts.get(backend, True)
        if verdict == "raise":
            raise ConnectionError(f"{backend} is down")
        return verdict  # type: ignore[return-value]

    @initialize(config=configs())
    def build(self, config: Config) -> None:
        self.clock = ManualClock()
        names = [f"s{index}" for index in range(config.size)]
        self.added = config.size
        self.lb = LoadBalancer(
            dict(zip(names, config.weights, strict=True)),
            algorithm=config.algorithm,
            name="model",
            health_check=self._check,
            healthy_threshold=config.healthy_threshold,
            unhealthy_threshold=config.unhealthy_threshold,
            consecutive_failures=config.consecutive_failures,
            base_ejection_time=config.base_ejection_time,
            max_ejection_time=config.max_ejection_time,
            panic_threshold=config.panic_threshold,
            seed=0,
            clock=self.clock,
        )
        self.model = BalancerModel(config)
        for name, weight in zip(names, config.weights, strict=True):
            self.model.backends[name] = ModelBackend(name, weight)
        self.ready = True

    # -- rules -----------------------------------------------------------------------------------

    @precondition(lambda self: self.ready)
    @rule(key=st.integers(0, 30), track=st.booleans())
    def pick(self, key: int, track: bool) -> None:
        routable = self.model.routable()
        if not routable:
            call = self.lb.pick if track else self.lb.choose
            with pytest.raises(NoHealthyBackendError) as raised:
                call(key)
            assert (raised.value.name, raised.value.backends) == ("model", len(self.model.backends))
            return
        if not track:
            assert self.lb.choose(key) in routable
            return
        pick = self.lb.pick(key)
        assert pick.backend in routable, f"{pick.backend} picked; routable: {routable}"
        backend = self.model.backends[pick.backend]
        backend.in_flight += 1
        self.held.append((pick, backend))

    @precondition(lambda self: self.ready and self.lb.algorithm is Algorithm.ROUND_ROBIN)
    @rule()
    def sweep(self) -> None:
        """One turn of the rotation visits every backend a pick may go to, once: so in panic
        mode the unavailable ones too, and otherwise none of them."""
        routable = self.model.routable()
        if routable:
            chosen = [self.lb.choose() for _ in routable]
            assert sorted(chosen) == sorted(routable)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), how=st.sampled_from(["ok", "failed", "fail()", "raise", "cancel"]))
    def release(self, data: st.DataObject, how: str) -> None:
        index = data.draw(st.integers(0, len(self.held) - 1), label="held")
        pick, backend = self.held.pop(index)
        if how == "ok":
            pick.release()
        elif how == "failed":
            pick.release(failed=True)
        elif how == "fail()":
            pick.fail()
            pick.__exit__(None, None, None)
        elif how == "raise":
            pick.__exit__(Boom, Boom(), None)
        else:
            pick.__exit__(asyncio.CancelledError, asyncio.CancelledError(), None)
        self.model.finish(
            backend, failed=None if how == "cancel" else how in ("failed", "fail()", "raise")
        )

    @precondition(lambda self: self.ready)
    @rule(data=st.data(), failed=st.booleans())
    def record(self, data: st.DataObject, failed: bool) -> None:
        name = data.draw(st.sampled_from(list(self.model.backends)), label="backend")
        self.lb.record(name, failed=failed)
        backend = self.model.backends[name]
        backend.in_flight += 1
        self.model.finish(backend, failed)

    @precondition(lambda self: self.ready)
    @rule(seconds=ADVANCES)
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.model.advance(self.model.now + seconds)
        assert self.clock.now() == self.model.now

    @precondition(lambda self: self.ready)
    @rule(data=st.data())
    def check_health(self, data: st.DataObject) -> None:
        names = list(self.model.backends)
        verdicts = data.draw(st.lists(VERDICTS, min_size=len(names), max_size=len(names)))
        self.verdicts = dict(zip(names, verdicts, strict=True))
        self.lb.check_health()
        for name, verdict in self.verdicts.items():
            self.model.checked(self.model.backends[name], verdict is True)

    @precondition(lambda self: self.ready and len(self.model.backends) < 6)
    @rule(weight=st.integers(1, 3))
    def add_backend(self, weight: int) -> None:
        name = f"s{self.added}"
        self.added += 1
        self.lb.add_backend(name, weight)
        self.model.backends[name] = ModelBackend(name, weight)

    @precondition(lambda self: self.ready)
    @rule(data=st.data())
    def remove_backend(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(list(self.model.backends)), label="backend")
        if len(self.model.backends) == 1:
            with pytest.raises(ValueError, match="last"):
                self.lb.remove_backend(name)
            return
        self.lb.remove_backend(name)
        del self.model.backends[name]  # held picks on it still finish, on the model's entry

    # -- invariants ------------------------------------------------------------------------------

    @precondition(lambda self: self.ready)
    @invariant()
    def agrees_with_model(self) -> None:
        statuses = self.lb.statuses()
        expected = [backend.status() for backend in self.model.backends.values()]
        assert statuses == expected
        assert all(status.in_flight >= 0 for status in statuses)
        assert [status.available for status in statuses] == [
            backend.available for backend in self.model.backends.values()
        ]

    @precondition(lambda self: self.ready)
    @invariant()
    def held_picks_are_counted(self) -> None:
        held = Counter(backend.name for _, backend in self.held)
        for status in self.lb.statuses():
            assert status.in_flight == held[status.backend]


TestBalancerMachine = BalancerMachine.TestCase


# ---- threads -------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", list(Algorithm), ids=lambda algorithm: algorithm.value)
def test_threads_pick_and_release(algorithm: Algorithm) -> None:
    lb = LoadBalancer(
        {"a": 1, "b": 2, "c": 3, "d": 1},
        algorithm=algorithm,
        consecutive_failures=3,
        base_ejection_time=0.002,
        max_ejection_time=0.01,
        panic_threshold=0.5,
        seed=1,
    )
    picks = [0] * 8
    negative: list[dict[str, int]] = []
    done = threading.Event()
    deadline = time.monotonic() + 0.5

    def worker(index: int) -> None:
        rng = random.Random(index)
        while time.monotonic() < deadline:
            key = f"user-{rng.randrange(100)}"
            way = rng.randrange(4)
            fail = rng.random() < 0.2
            if way == 0:
                pick = lb.pick(key)
                with pick:
                    if fail:
                        pick.fail()
            elif way == 1:
                try:
                    with lb.pick(key):
                        if fail:
                            raise Boom
                except Boom:
                    pass
            elif way == 2:
                lb.pick(key).release(failed=fail)
            else:
                lb.record(lb.choose(key), failed=fail)
            picks[index] += 1

    def watch() -> None:
        while not done.is_set():
            loads = in_flight(lb)
            if min(loads.values()) < 0:
                negative.append(loads)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run_threads(worker, 8, within=JOIN + 0.5)
    finally:
        done.set()
        watcher.join(JOIN)
    assert not negative, negative[:3]
    statuses = lb.statuses()
    assert [status.in_flight for status in statuses] == [0, 0, 0, 0]
    assert sum(status.successes + status.failures for status in statuses) == sum(picks)
    assert all(status.successes > 0 for status in statuses)
