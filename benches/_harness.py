"""What every benchmark case shares: the timing recipe, the case and result records.

Every case times one body, ``run()``, a Python function whose only work is the call under test,
so the loop and the call of ``run`` itself cost the same in every case. A group's ``bare call``
case is ``run()`` calling the function directly; a case's overhead is its median minus that one.
After timing, each case checks that what it timed behaved (the breaker stayed closed or open, no
permit leaked), and the report shows that check beside the time.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Counts:
    """How many times a case's body is timed: in pytest-benchmark's own tables (``rounds`` of
    ``iterations`` calls after ``warmup_rounds``), then in the report's interleaved pass."""

    rounds: int = 500
    iterations: int = 1000
    warmup_rounds: int = 50
    interleaved_rounds: int = 400
    interleaved_calls: int = 1000

    def describe(self) -> str:
        return (
            f"timed {self.rounds}x{self.iterations} and "
            f"{self.interleaved_rounds}x{self.interleaved_calls} calls"
        )


# Bodies of a few µs at most; slow bodies (a thread batch, a database round trip) pass fewer.
DEFAULT_COUNTS = Counts()
INTERLEAVED_ROUNDS = DEFAULT_COUNTS.interleaved_rounds
INTERLEAVED_CALLS = DEFAULT_COUNTS.interleaved_calls

BASELINE = "baseline"  # the bare call of a group
BUTTRESS = "buttress"
FLOOR = "floor"  # reference points that are neither buttress nor a peer (e.g. a no-op `with`)
NOT_PEERS = (BASELINE, BUTTRESS, FLOOR)
BARE_FORM = "bare call"

# What a case's make() returns: the body to time, and a check to run after it that returns a
# description of what it verified (and raises AssertionError if the case misbehaved).
Made = tuple[Callable[[], Any], Callable[[], str]]
Make = Callable[[], Made]


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked form: ``make()`` builds fresh objects and returns ``(run, verify)``."""

    lib: str
    form: str
    make: Make
    counts: Counts = DEFAULT_COUNTS

    @property
    def id(self) -> str:
        return f"{self.lib}: {self.form}"


@dataclasses.dataclass(frozen=True)
class Result:
    group: str
    lib: str
    form: str
    median: float | None  # seconds per call of run(); None when benchmarks are disabled
    fastest: float | None  # the fastest round, per call: the least disturbed by other load
    check: str

    @property
    def label(self) -> str:
        return self.form if self.lib == BASELINE else f"{self.lib} {self.form}"


class Bench:
    """Times one case with the shared recipe, checks it, and keeps its median for the report."""

    def __init__(self, fixture: Any, results: list[Result], cases: dict[str, list[Case]]) -> None:
        self._fixture = fixture
        self._results = results
        self._cases = cases

    def __call__(self, case: Case, *, expect: object) -> None:
        self._cases.setdefault(self._fixture.group or "(no group)", []).append(case)
        run, verify = case.make()
        # Under --benchmark-disable, pedantic() calls run() once: the smoke pass still runs
        # every body and every check.
        counts = case.counts
        result = self._fixture.pedantic(
            run,
            rounds=counts.rounds,
            iterations=counts.iterations,
            warmup_rounds=counts.warmup_rounds,
        )
        assert result == expect, f"{case.id} returned {result!r}, expected {expect!r}"
        check = _with_counts(verify(), counts)
        self._fixture.extra_info["check"] = check
        stats = self._fixture.stats
        median = None if stats is None else float(stats.stats.median)
        fastest = None if stats is None else float(stats.stats.min)
        group = self._fixture.group or "(no group)"
        self._results.append(Result(group, case.lib, case.form, median, fastest, check))


def _with_counts(check: str, counts: Counts) -> str:
    return check if counts == DEFAULT_COUNTS else f"{check}; {counts.describe()}"


def registrar(
    cases: list[Case], counts: Counts = DEFAULT_COUNTS
) -> Callable[[str, str], Callable[[Make], Make]]:
    """A decorator factory: ``@add(lib, form)`` on a ``make`` function appends its case."""

    def add(lib: str, form: str) -> Callable[[Make], Make]:
        def register(make: Make) -> Make:
            cases.append(Case(lib, form, make, counts))
            return make

        return register

    return add


def interleave(group: str, cases: list[Case]) -> list[Result]:
    """Times every case of a group in turn, in a fresh shuffled order each round.

    On a shared machine, load comes and goes over seconds; pytest-benchmark times one case after
    another, so a burst can slow one case and spare its peer. Interleaving spreads the bursts
    over all cases alike, which makes the ratios between them fair. Each case is checked after.
    """
    counts = {case.counts for case in cases}
    assert len(counts) == 1, f"the cases of group {group!r} are timed with different counts"
    (count,) = counts
    made = [(case, *case.make()) for case in cases]
    per_call: dict[str, list[float]] = {case.id: [] for case in cases}
    order = list(range(len(made)))
    shuffle = random.Random(0).shuffle
    calls = range(count.interleaved_calls)
    for _ in range(count.interleaved_rounds):
        shuffle(order)
        for index in order:
            case, run, _ = made[index]
            start = time.perf_counter()
            for _ in calls:
                run()
            per_call[case.id].append((time.perf_counter() - start) / count.interleaved_calls)
    results = []
    for case, _, verify in made:
        check = _with_counts(verify(), count)
        samples = per_call[case.id]
        results.append(
            Result(
                group,
                case.lib,
                case.form,
                statistics.median(samples),
                min(samples),
                check,
            )
        )
    return results


class Crowd:
    """`threads` threads that each run `cycle` `cycles` times when run() tells them to, all
    together; run() returns when the last one is done, so its time is the batch's wall time.

    The threads live as long as the case and wait between batches, so a batch's time holds no
    thread start. stop() ends them (the verify functions call it).
    """

    def __init__(
        self, cycle: Callable[[], object], cycles: int, threads: int, timeout: float = 60.0
    ) -> None:
        self._cycle = cycle
        self._cycles = cycles
        self._threads_count = threads
        self._timeout = timeout
        self._start = threading.Barrier(threads + 1, timeout=timeout)
        self._end = threading.Barrier(threads + 1, timeout=timeout)
        self._stopping = False
        self._errors: list[BaseException] = []
        self.batches = 0
        self._threads = [
            threading.Thread(target=self._serve, name=f"bench-crowd-{n}", daemon=True)
            for n in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def cycles(self) -> int:
        return self.batches * self._threads_count * self._cycles

    def _serve(self) -> None:
        cycles = range(self._cycles)
        cycle = self._cycle
        while True:
            self._start.wait()
            if self._stopping:
                return
            try:
                for _ in cycles:
                    cycle()
            except BaseException as error:
                self._errors.append(error)
            self._end.wait()

    def run(self) -> int:
        self._start.wait()
        self._end.wait()
        if self._errors:
            raise self._errors[0]
        self.batches += 1
        return self._threads_count * self._cycles

    def stop(self) -> None:
        self._stopping = True
        self._start.wait()
        for thread in self._threads:
            thread.join(self._timeout)
