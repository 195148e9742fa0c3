"""Load balancer: spreads calls over backends, tracks what is in flight, and keeps failing
backends out of rotation (anchors: Envoy, NGINX, HAProxy).

Algorithms: ``round_robin`` (a real rotation), ``weighted_round_robin`` (NGINX's smooth
weighted round robin), ``least_connections``, ``least_request`` (the better of two random
choices, Envoy's default), ``hash`` (by key, through a ``HashRing``) and ``random``.

A backend leaves rotation when an active health check fails ``unhealthy_threshold`` times in a
row (it returns after ``healthy_threshold`` passes), or when ``consecutive_failures`` calls in a
row fail: it is then ejected for ``base_ejection_time`` times the number of times it has been
ejected, at most ``max_ejection_time`` (Envoy's outlier detection). With none left,
``NoHealthyBackendError``; with ``panic_threshold`` set, the balancer routes to every backend
once fewer than that share of them are available (Envoy's panic mode), as a degraded service
beats none.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import math
import random
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from types import TracebackType
from typing import Any, Generic, TypeVar

from buttress._core import HashRing, ManualClock
from buttress.errors import NoHealthyBackendError

__all__ = ["Algorithm", "BackendStatus", "LoadBalancer", "Pick"]

B = TypeVar("B", bound=Hashable)


class Algorithm(str, enum.Enum):
    """How the balancer chooses among available backends."""

    ROUND_ROBIN = "round_robin"
    WEIGHTED_ROUND_ROBIN = "weighted_round_robin"
    LEAST_CONNECTIONS = "least_connections"
    LEAST_REQUEST = "least_request"
    HASH = "hash"
    RANDOM = "random"


@dataclasses.dataclass(frozen=True)
class BackendStatus(Generic[B]):
    """A snapshot of one backend."""

    backend: B
    weight: int
    in_flight: int
    healthy: bool
    ejected_until: float | None
    ejections: int
    successes: int
    failures: int

    @property
    def available(self) -> bool:
        """Healthy and not ejected at the time of the snapshot."""
        return self.healthy and self.ejected_until is None


class _Backend(Generic[B]):
    __slots__ = (
        "check_failures",
        "check_passes",
        "consecutive_failures",
        "current_weight",
        "ejected_until",
        "ejections",
        "failures",
        "healthy",
        "in_flight",
        "name",
        "successes",
        "target",
        "weight",
    )

    def __init__(self, target: B, weight: int, name: str) -> None:
        self.target = target
        self.weight = weight
        self.name = name
        self.in_flight = 0
        self.healthy = True
        self.ejected_until: float | None = None
        self.ejections = 0
        self.consecutive_failures = 0
        self.check_failures = 0
        self.check_passes = 0
        self.successes = 0
        self.failures = 0
        self.current_weight = 0  # smooth weighted round robin's running score


def _positive_int(argument: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argument} must be a whole number (got {value!r}).")
    if value < 1:
        raise ValueError(f"{argument} must be at least 1 (got {value!r}).")
    return value


def _seconds(argument: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{argument} must be a number of seconds (got {value!r}).")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{argument} must be more than 0 seconds (got {value!r}).")
    return float(value)


class Pick(Generic[B]):
    """One call's backend: ``with lb.pick() as backend:`` (or ``async with``) counts it in flight
    until the block ends, and records the outcome: an exception is a failure, unless the
    balancer's ``is_failure`` says otherwise. ``fail()`` marks a failure without raising (say, an
    HTTP 503)."""

    __slots__ = ("_backend", "_balancer", "_done", "_failed")

    def __init__(self, balancer: LoadBalancer[B], backend: _Backend[B]) -> None:
        self._balancer = balancer
        self._backend = backend
        self._done = False
        self._failed = False

    @property
    def backend(self) -> B:
        """The chosen backend."""
        return self._backend.target

    def fail(self) -> None:
        """Counts this call as failed when it ends, though it raised nothing."""
        self._failed = True

    def release(self, *, failed: bool | None = None) -> None:
        """Ends the call: no longer in flight, outcome recorded. Called once; `with` does it."""
        self._end(self._failed if failed is None else failed)

    def _end(self, failed: bool | None) -> None:
        # `failed` None: the call says nothing about the backend (it was cancelled).
        if self._done:
            raise RuntimeError("This pick was already released; release each pick once.")
        self._done = True
        self._balancer._finish(self._backend, failed)

    def __enter__(self) -> B:
        return self._backend.target

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        failed: bool | None = self._failed
        try:
            if exc_value is not None and not failed:
                # Cancellation and interpreter exits say nothing about the backend.
                failed = (
                    bool(self._balancer._is_failure(exc_value))
                    if isinstance(exc_value, Exception)
                    else None
                )
        finally:
            self._end(failed)

    async def __aenter__(self) -> B:
        return self._backend.target

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc_value, traceback)


def _counts_as_failure(error: BaseException) -> bool:
    return True


class LoadBalancer(Generic[B]):
    """Spreads calls over ``backends`` (any hashable values: URLs, addresses, clients), or over a
    mapping of backends to integer weights.

    >>> lb = LoadBalancer(["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    >>> [lb.choose() for _ in range(4)]
    ['10.0.0.1', '10.0.0.2', '10.0.0.3', '10.0.0.1']
    >>> with lb.pick() as backend:
    ...     lb.status(backend).in_flight
    1
    """

    def __init__(
        self,
        backends: Iterable[B] | Mapping[B, int],
        *,
        algorithm: Algorithm | str = Algorithm.ROUND_ROBIN,
        name: str = "lb",
        health_check: Callable[[B], object] | None = None,
        check_interval: float = 10.0,
        healthy_threshold: int = 2,
        unhealthy_threshold: int = 3,
        consecutive_failures: int | None = 5,
        base_ejection_time: float = 30.0,
        max_ejection_time: float = 300.0,
        panic_threshold: float | None = None,
        is_failure: Callable[[BaseException], bool] = _counts_as_failure,
        seed: int | None = None,
        clock: ManualClock | None = None,
    ) -> None:
        try:
            self.algorithm = Algorithm(algorithm)
        except ValueError:
            choices = ", ".join(repr(choice.value) for choice in Algorithm)
            raise ValueError(f"algorithm must be one of {choices} (got {algorithm!r}).") from None
        if not isinstance(name, str):
            raise TypeError(f"name must be a string (got {name!r}).")
        if health_check is not None and not callable(health_check):
            raise TypeError(f"health_check must be callable (got {health_check!r}).")
        if not callable(is_failure):
            raise TypeError(f"is_failure must be callable (got {is_failure!r}).")
        if panic_threshold is not None and not (
            isinstance(panic_threshold, (int, float)) and 0 < panic_threshold <= 1
        ):
            raise ValueError(
                f"panic_threshold must be a fraction above 0 and at most 1, or None (got "
                f"{panic_threshold!r})."
            )
        if consecutive_failures is not None:
            consecutive_failures = _positive_int("consecutive_failures", consecutive_failures)
        if clock is not None and not isinstance(clock, ManualClock):
            raise TypeError(f"clock must be a buttress.ManualClock or None (got {clock!r}).")
        self.name = name
        self._health_check = health_check
        self._check_interval = _seconds("check_interval", check_interval)
        self._healthy_threshold = _positive_int("healthy_threshold", healthy_threshold)
        self._unhealthy_threshold = _positive_int("unhealthy_threshold", unhealthy_threshold)
        self._consecutive_failures = consecutive_failures
        self._base_ejection_time = _seconds("base_ejection_time", base_ejection_time)
        self._max_ejection_time = _seconds("max_ejection_time", max_ejection_time)
        self._panic_threshold = panic_threshold
        self._is_failure = is_failure
        self._now: Callable[[], float] = clock.now if clock is not None else time.monotonic
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._backends: dict[B, _Backend[B]] = {}
        self._cursor = 0
        # The backends in rotation, kept until a backend's state changes or the earliest
        # ejection runs out, so a pick does not rebuild them.
        self._cached: list[_Backend[B]] | None = None
        self._cached_usable: frozenset[int] = frozenset()
        self._cached_until = math.inf
        self._entries: list[_Backend[B]] = []
        self._ring: HashRing | None = None
        self._checker: threading.Thread | None = None
        self._stop_checks = threading.Event()
        pairs = self._parse_backends(backends)
        if not pairs:
            raise ValueError("backends must name at least one backend.")
        for target, weight in pairs:
            self._add(target, weight)

    # ---- backends --------------------------------------------------------------------------

    @staticmethod
    def _parse_backends(backends: Iterable[B] | Mapping[B, int]) -> list[tuple[B, int]]:
        if isinstance(backends, (str, bytes)):
            raise TypeError(
                "backends must be an iterable of backends or a mapping of backends to weights, "
                "not a single string."
            )
        if isinstance(backends, Mapping):
            return [
                (target, _positive_int("weight", weight)) for target, weight in backends.items()
            ]
        try:
            return [(target, 1) for target in backends]
        except TypeError:
            raise TypeError(
                f"backends must be an iterable of backends or a mapping of backends to weights "
                f"(got {backends!r})."
            ) from None

    def _add(self, target: B, weight: int) -> None:
        if target in self._backends:
            raise ValueError(f"backend {target!r} is already in the balancer.")
        self._backends[target] = _Backend(target, weight, repr(target))
        self._changed()

    def add_backend(self, backend: B, weight: int = 1) -> None:
        """Adds a backend (healthy until checks or failures say otherwise)."""
        weight = _positive_int("weight", weight)
        with self._lock:
            self._add(backend, weight)

    def remove_backend(self, backend: B) -> None:
        """Removes a backend; calls already on it finish normally."""
        with self._lock:
            if backend not in self._backends:
                raise KeyError(f"backend {backend!r} is not in the balancer.")
            if len(self._backends) == 1:
                raise ValueError("backend is the last one; a balancer keeps at least one.")
            if list(self._backends).index(backend) < self._cursor:
                self._cursor -= 1  # the backends after it move up one place
            del self._backends[backend]
            self._changed()

    def set_weight(self, backend: B, weight: int) -> None:
        """Changes a backend's weight."""
        weight = _positive_int("weight", weight)
        with self._lock:
            self._entry(backend).weight = weight
            self._changed()

    def _changed(self) -> None:
        """Forgets what was derived from the backends' states (under the lock)."""
        self._ring = None
        self._cached = None
        self._entries = list(self._backends.values())

    def _entry(self, backend: B) -> _Backend[B]:
        try:
            return self._backends[backend]
        except KeyError:
            raise KeyError(f"backend {backend!r} is not in the balancer.") from None

    def status(self, backend: B) -> BackendStatus[B]:
        """A snapshot of one backend."""
        with self._lock:
            entry = self._entry(backend)
            self._expire_ejection(entry, self._now())
            return self._snapshot(entry)

    def statuses(self) -> list[BackendStatus[B]]:
        """A snapshot of every backend, in the order they were added."""
        with self._lock:
            now = self._now()
            for entry in self._backends.values():
                self._expire_ejection(entry, now)
            return [self._snapshot(entry) for entry in self._backends.values()]

    @staticmethod
    def _snapshot(entry: _Backend[B]) -> BackendStatus[B]:
        return BackendStatus(
            entry.target,
            entry.weight,
            entry.in_flight,
            entry.healthy,
            entry.ejected_until,
            entry.ejections,
            entry.successes,
            entry.failures,
        )

    def __len__(self) -> int:
        return len(self._backends)

    def __repr__(self) -> str:
        return (
            f"LoadBalancer(name={self.name!r}, algorithm={self.algorithm.value!r}, "
            f"backends={list(self._backends)!r})"
        )

    # ---- choosing --------------------------------------------------------------------------

    def _expire_ejection(self, entry: _Backend[B], now: float) -> None:
        if entry.ejected_until is not None and now >= entry.ejected_until:
            entry.ejected_until = None
            entry.consecutive_failures = 0
            self._cached = None

    def _candidates(self) -> list[_Backend[B]]:
        now = self._now()
        if self._cached is not None and now < self._cached_until:
            return self._cached
        available = []
        for entry in self._backends.values():
            self._expire_ejection(entry, now)
            if entry.healthy and entry.ejected_until is None:
                available.append(entry)
        every = list(self._backends.values())
        if self._panic_threshold is not None and len(available) < self._panic_threshold * len(
            every
        ):
            available = every
        if not available:
            raise NoHealthyBackendError(self.name, len(every))
        self._cached = available
        self._cached_usable = frozenset(id(entry) for entry in available)
        self._cached_until = min(
            (entry.ejected_until for entry in every if entry.ejected_until is not None),
            default=math.inf,
        )
        return available

    def _select(self, key: object) -> _Backend[B]:
        candidates = self._candidates()
        algorithm = self.algorithm
        if algorithm is Algorithm.ROUND_ROBIN:
            # The cursor walks every backend in order and skips those out of rotation, so a
            # backend leaving or returning never shifts whose turn is next.
            entries = self._entries
            if len(candidates) == len(entries):
                index = self._cursor % len(entries)
                self._cursor = index + 1
                return entries[index]
            usable = self._cached_usable
            for step in range(len(entries)):
                index = (self._cursor + step) % len(entries)
                if id(entries[index]) in usable:
                    self._cursor = index + 1
                    return entries[index]
            raise AssertionError("candidates are among the backends")
        if algorithm is Algorithm.WEIGHTED_ROUND_ROBIN:
            total = 0
            best = candidates[0]
            for entry in candidates:
                entry.current_weight += entry.weight
                total += entry.weight
                if entry.current_weight > best.current_weight:
                    best = entry
            best.current_weight -= total
            return best
        if algorithm is Algorithm.LEAST_CONNECTIONS:
            # Fewest in flight per unit of weight; ties go round in turn.
            start = self._cursor % len(candidates)
            self._cursor += 1
            rotated = candidates[start:] + candidates[:start]
            return min(rotated, key=lambda entry: entry.in_flight / entry.weight)
        if algorithm is Algorithm.LEAST_REQUEST:
            if len(candidates) == 1:
                return candidates[0]
            # Two distinct random candidates; random() * n is uniform to within n / 2**53,
            # and several times cheaper than sample().
            count = len(candidates)
            draw = self._random.random
            one = int(draw() * count)
            other = int(draw() * (count - 1))
            first, second = candidates[one], candidates[other + (other >= one)]
            if first.in_flight / first.weight <= second.in_flight / second.weight:
                return first
            return second
        if algorithm is Algorithm.RANDOM:
            weights = [entry.weight for entry in candidates]
            return self._random.choices(candidates, weights)[0]
        return self._by_hash(key, candidates)

    def _by_hash(self, key: object, candidates: list[_Backend[B]]) -> _Backend[B]:
        if key is None:
            raise TypeError("key must be given with the hash algorithm: pick(key=...).")
        if not isinstance(key, (str, bytes, int)):
            raise TypeError(f"key must be a str, bytes or int (got {type(key).__name__}).")
        if self._ring is None:
            self._ring = HashRing({entry.name: entry.weight for entry in self._backends.values()})
        by_name = {entry.name: entry for entry in self._backends.values()}
        usable = {entry.name for entry in candidates}
        # The key's own backend, or the next one round the ring that can take it.
        for name in self._ring.get_nodes(key, len(self._ring)):
            if name in usable:
                return by_name[name]
        return candidates[0]

    def choose(self, key: object = None) -> B:
        """A backend for one call, without tracking it (no in-flight count, no outcome)."""
        with self._lock:
            return self._select(key).target

    def pick(self, key: object = None) -> Pick[B]:
        """A backend for one call, counted in flight until the returned ``Pick`` is released
        (``with lb.pick() as backend:`` releases it on every path). ``key`` is required with
        the ``hash`` algorithm."""
        with self._lock:
            entry = self._select(key)
            entry.in_flight += 1
        return Pick(self, entry)

    def _finish(self, entry: _Backend[B], failed: bool | None) -> None:
        with self._lock:
            entry.in_flight -= 1
            if failed is None:
                return
            # An ejection that has run out ends before this outcome counts.
            self._expire_ejection(entry, self._now())
            if failed:
                entry.failures += 1
                entry.consecutive_failures += 1
                limit = self._consecutive_failures
                if (
                    limit is not None
                    and entry.consecutive_failures >= limit
                    and entry.ejected_until is None
                ):
                    entry.ejections += 1
                    ejection = min(
                        self._base_ejection_time * entry.ejections, self._max_ejection_time
                    )
                    entry.ejected_until = self._now() + ejection
                    self._cached = None
            else:
                entry.successes += 1
                entry.consecutive_failures = 0

    def record(self, backend: B, *, failed: bool) -> None:
        """Records the outcome of a call made with ``choose()`` (not counted in flight)."""
        with self._lock:
            entry = self._entry(backend)
            entry.in_flight += 1
        self._finish(entry, failed)

    # ---- active health checks --------------------------------------------------------------

    def _checked(self, entry: _Backend[B], passed: bool) -> None:
        with self._lock:
            if passed:
                entry.check_failures = 0
                entry.check_passes += 1
                if not entry.healthy and entry.check_passes >= self._healthy_threshold:
                    entry.healthy = True
                    self._cached = None
            else:
                entry.check_passes = 0
                entry.check_failures += 1
                if entry.healthy and entry.check_failures >= self._unhealthy_threshold:
                    entry.healthy = False
                    self._cached = None

    def _passes(self, target: B) -> Any:
        assert self._health_check is not None
        try:
            return self._health_check(target)
        except Exception:
            return False

    def check_health(self) -> None:
        """Runs one round of the health check on every backend (the checker thread does this
        every ``check_interval`` seconds)."""
        if self._health_check is None:
            raise RuntimeError("This balancer has no health_check to run.")
        for entry in list(self._backends.values()):
            verdict = self._passes(entry.target)
            if isinstance(verdict, Awaitable):
                close = getattr(verdict, "close", None)
                if close is not None:
                    close()  # never awaited: closed so it warns nobody
                raise TypeError(
                    "health_check returned an awaitable; run it with check_health_async()."
                )
            self._checked(entry, verdict is not False and verdict is not None)

    async def check_health_async(self) -> None:
        """One round of the health check, awaiting checks that are coroutine functions; the
        backends are checked concurrently."""
        if self._health_check is None:
            raise RuntimeError("This balancer has no health_check to run.")
        entries = list(self._backends.values())

        async def one(entry: _Backend[B]) -> None:
            try:
                verdict = self._passes(entry.target)
                if isinstance(verdict, Awaitable):
                    verdict = await verdict
            except Exception:
                verdict = False
            self._checked(entry, verdict is not False and verdict is not None)

        await asyncio.gather(*(one(entry) for entry in entries))

    def start_health_checks(self) -> None:
        """Starts a daemon thread that runs the health check every ``check_interval`` seconds
        until ``stop_health_checks()`` (or the balancer is garbage collected)."""
        if self._health_check is None:
            raise RuntimeError("This balancer has no health_check to run.")
        if (
            self._checker is not None
            and self._checker.is_alive()
            and not self._stop_checks.is_set()
        ):
            return
        # A fresh event per thread: one still winding down keeps its own, already set.
        self._stop_checks = threading.Event()
        reference = weakref.ref(self)
        stop = self._stop_checks
        interval = self._check_interval

        def run() -> None:
            while not stop.is_set():
                balancer = reference()
                if balancer is None:
                    return
                balancer.check_health()
                del balancer
                stop.wait(interval)

        self._checker = threading.Thread(target=run, name=f"buttress-lb-{self.name}", daemon=True)
        self._checker.start()

    def stop_health_checks(self) -> None:
        """Stops the checker thread."""
        self._stop_checks.set()

    async def run_health_checks(self) -> None:
        """The asyncio twin of the checker thread: runs forever; cancel the task to stop."""
        while True:
            await self.check_health_async()
            await asyncio.sleep(self._check_interval)
