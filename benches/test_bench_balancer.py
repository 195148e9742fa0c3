"""Load balancer: one choice of backend over 4, untracked (``choose()``) and tracked in flight
(``with pick()``), beside the cheapest rotation Python has, ``next()`` on an itertools.cycle.

No peer balances in-process like this, so there is no ratio to meet: the cycle is a floor, the
cost of a rotation with no availability, weights or accounting at all. Every body counts the
backend it got in a dict, so the check after the run knows how often each one was chosen.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import buttress
import pytest
from _harness import BUTTRESS, FLOOR, Bench, Case, Made, registrar

BACKENDS = [f"http://10.0.0.{number}:8080" for number in range(1, 5)]

PICK: list[Case] = []
add = registrar(PICK)


def _counter() -> dict[str, int]:
    return dict.fromkeys(BACKENDS, 0)


def _in_turn(seen: dict[str, int]) -> str:
    """A rotation gives every backend the same count, give or take the last partial cycle (a
    smoke run, --benchmark-disable, makes one call)."""
    counts = list(seen.values())
    calls = sum(counts)
    assert calls > 0
    assert max(counts) - min(counts) <= 1, f"not a rotation: {seen}"
    return (
        f"{calls:,} calls, each of {len(BACKENDS)} backends chosen {min(counts):,}-{max(counts):,}"
    )


def _released(lb: buttress.LoadBalancer[str], seen: dict[str, int]) -> str:
    """Nothing left in flight, every pick recorded as a success on the backend it went to."""
    statuses = lb.statuses()
    assert [status.in_flight for status in statuses] == [0] * len(BACKENDS)
    assert {status.backend: status.successes for status in statuses} == seen
    assert all(status.failures == 0 and status.available for status in statuses)
    return f"0 in flight, {sum(seen.values()):,} successes recorded"


def _rotation_checked(
    lb: buttress.LoadBalancer[str] | None, seen: dict[str, int]
) -> Callable[[], str]:
    def verify() -> str:
        text = _in_turn(seen)
        if lb is not None:
            text += "; " + _released(lb, seen)
        return text

    return verify


@add(FLOOR, "next(itertools.cycle(backends))")
def _() -> Made:
    cycle = itertools.cycle(BACKENDS)
    seen = _counter()

    def run() -> bool:
        backend = next(cycle)
        seen[backend] += 1
        return True

    return run, _rotation_checked(None, seen)


@add(BUTTRESS, "choose(), round robin")
def _() -> Made:
    lb = buttress.LoadBalancer(BACKENDS)
    seen = _counter()

    def run() -> bool:
        backend = lb.choose()
        seen[backend] += 1
        return True

    def verify() -> str:
        text = _in_turn(seen)
        statuses = lb.statuses()
        assert all(status.in_flight == status.successes == 0 for status in statuses)
        return text + "; untracked: 0 in flight, 0 recorded"

    return run, verify


@add(BUTTRESS, "with pick(), round robin")
def _() -> Made:
    lb = buttress.LoadBalancer(BACKENDS)
    seen = _counter()

    def run() -> bool:
        with lb.pick() as backend:
            seen[backend] += 1
        return True

    return run, _rotation_checked(lb, seen)


@add(BUTTRESS, "with pick(), least_request")
def _() -> Made:
    lb = buttress.LoadBalancer(BACKENDS, algorithm="least_request", seed=0)
    seen = _counter()

    def run() -> bool:
        with lb.pick() as backend:
            seen[backend] += 1
        return True

    def verify() -> str:
        text = _released(lb, seen)
        calls = sum(seen.values())
        if calls >= 1000:  # with nothing in flight, two random choices spread evenly
            assert min(seen.values()) > calls / len(BACKENDS) / 2, f"lopsided: {seen}"
            text += f"; each backend >= {min(seen.values()):,} of {calls:,}"
        return text

    return run, verify


@pytest.mark.benchmark(group="balancer-pick")
@pytest.mark.parametrize("case", PICK, ids=lambda case: case.id)
def test_balancer_pick(bench: Bench, case: Case) -> None:
    bench(case, expect=True)
