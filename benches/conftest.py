"""Benchmarks of buttress beside its peers, and a report of the ratios after the run.

Run with the release build (``pip install '.[bench]'`` into a venv of its own):

    python -m pytest benches -p no:cacheprovider

The shared timing recipe is in ``_harness.py``. Targets are printed as PASS/MISS for
information only: nothing here fails the run on a time. Results that are not timings (a cache's
hit ratio on a trace) are added by their tests through the ``report_section`` fixture and
printed after the groups' tables.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import buttress
import pytest
from _harness import (
    BARE_FORM,
    BASELINE,
    BUTTRESS,
    INTERLEAVED_CALLS,
    INTERLEAVED_ROUNDS,
    NOT_PEERS,
    Bench,
    Case,
    Result,
    interleave,
)

_RESULTS = pytest.StashKey[list[Result]]()
_CASES = pytest.StashKey[dict[str, list[Case]]]()
_SECTIONS = pytest.StashKey[list[tuple[str, list[str]]]]()
# A median this much above the fastest round means other load slowed most of the rounds.
NOISY_SPREAD = 1.25


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RESULTS] = []
    config.stash[_CASES] = {}
    config.stash[_SECTIONS] = []


@pytest.fixture
def bench(benchmark: Any, request: pytest.FixtureRequest) -> Bench:
    return Bench(benchmark, request.config.stash[_RESULTS], request.config.stash[_CASES])


@pytest.fixture
def report_section(request: pytest.FixtureRequest) -> Callable[[str, list[str]], None]:
    """``report_section(title, lines)`` adds a section to the report, printed after the groups'
    tables: for what a test measures that is not a time (a hit ratio), so it is read beside the
    times."""
    sections = request.config.stash[_SECTIONS]

    def add(title: str, lines: list[str]) -> None:
        sections.append((title, list(lines)))

    return add


# --- the report -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """buttress's forms in `group` must each beat the cheapest of `peer_forms` by `factor`."""

    text: str
    group: str
    buttress_forms: tuple[str, ...]
    peer_lib: str
    peer_forms: tuple[str, ...]
    factor: float
    metric: str  # "overhead" (over the group's bare call) or "time" (median as measured)


TARGETS = (
    Target(
        "successful call: buttress overhead >= 20x lower than pybreaker's",
        "breaker-success",
        ("@breaker", "call()", "with"),
        "pybreaker",
        ("call()", "@decorator", "with calling()"),
        20.0,
        "overhead",
    ),
    Target(
        "successful call: buttress overhead >= 3x lower than circuitbreaker's `with`",
        "breaker-success",
        ("@breaker", "call()", "with"),
        "circuitbreaker",
        ("with",),
        3.0,
        "overhead",
    ),
    Target(
        "lazy: hot access no slower than functools.cached_property",
        "lazy",
        ("lazy_property",),
        "functools",
        ("cached_property",),
        1.0,
        "time",
    ),
    Target(
        "rejected call: buttress >= 5x cheaper than pybreaker's",
        "breaker-rejected",
        ("call() raising", "@breaker raising", "acquire() raising", "try_acquire() -> None"),
        "pybreaker",
        ("call() raising", "@decorator raising"),
        5.0,
        "time",
    ),
    Target(
        "pool checkout + checkin (fake connection): buttress >= 10x faster than psycopg_pool",
        "pool-cycle",
        ("acquire() + release()", "with connection()"),
        "psycopg_pool",
        ("getconn() + putconn()", "with connection()"),
        10.0,
        "time",
    ),
    Target(
        "pool checkout + checkin (fake connection): buttress >= 10x faster than SQLAlchemy",
        "pool-cycle",
        ("acquire() + release()", "with connection()"),
        "sqlalchemy",
        ("connect() + close()",),
        10.0,
        "time",
    ),
    Target(
        "pool checkout + checkin (fake connection): buttress >= 10x faster than DBUtils",
        "pool-cycle",
        ("acquire() + release()", "with connection()"),
        "dbutils",
        ("connection() + close()",),
        10.0,
        "time",
    ),
    Target(
        "pool, 8 threads on 4 connections: buttress throughput >= 3x psycopg_pool's",
        "pool-contended",
        ("acquire() + release()", "with connection()"),
        "psycopg_pool",
        ("getconn() + putconn()", "with connection()"),
        3.0,
        "time",
    ),
    Target(
        "ring lookup (10 nodes, ketama): buttress get_node overhead >= 15x lower than uhashring's",
        "ring-lookup",
        ("get_node(key)",),
        "uhashring",
        ("get_node(key)",),
        15.0,
        "overhead",
    ),
    Target(
        "ring batch of 1,000 keys: buttress get_node_many >= 50x faster per key than uhashring",
        "ring-batch",
        ("get_node_many(keys)",),
        "uhashring",
        ("[get_node(key) for key in keys]",),
        50.0,
        "time",
    ),
    Target(
        "event append, one event: buttress >= 25x faster than eventsourcing's in-memory save()",
        "events-append-one",
        ("trigger + Repository.save (in memory)",),
        "eventsourcing",
        ("method + Application.save (in memory)",),
        25.0,
        "time",
    ),
    Target(
        "event append, 100 events: buttress >= 50x faster than eventsourcing's in-memory save()",
        "events-append-batch",
        ("100 triggers + one save (in memory)",),
        "eventsourcing",
        ("100 methods + one save (in memory)",),
        50.0,
        "time",
    ),
    Target(
        "rebuild of 1,000 events: buttress >= 15x faster than eventsourcing",
        "events-rebuild",
        ("Repository.get, 1000 events (in memory)",),
        "eventsourcing",
        ("repository.get, 1000 events (in memory)",),
        15.0,
        "time",
    ),
    Target(
        "durable appends: group commit with 4 threads >= 5x the throughput of a sync per append",
        "events-durable",
        ('group commit, 4 threads (fsync="group")',),
        "fsync-per-append",
        ('1 thread, fsync="always"', '4 threads, fsync="always"'),
        5.0,
        "time",
    ),
    Target(
        "write-behind enqueue: buttress >= 4x faster than a queue.Queue write-behind",
        "writebehind-enqueue",
        ("WriteBehind.set",),
        "queue.Queue",
        ("set: dict cache + Queue.put",),
        4.0,
        "time",
    ),
    Target(
        "cache get-hit: buttress >= 2.5x faster than cachetools' LRU",
        "cache-get-hit",
        ("get()", "[]"),
        "cachetools",
        ("get()", "[]"),
        2.5,
        "time",
    ),
)


def _ns(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e9:,.1f} ns"


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    if value == float("inf"):
        return "inf"
    return f"{value:,.1f}x"


def _spread(result: Result) -> str:
    """Median over the fastest round: near 1.0 on a quiet machine; well above it (flagged with
    a `!`) when other load slowed most rounds, and that case's ratios are not to be trusted."""
    if result.median is None or not result.fastest:
        return "-"
    return f"{result.median / result.fastest:.2f}{'!' if _is_noisy(result) else ' '}"


def _is_noisy(result: Result) -> bool:
    if result.median is None or not result.fastest:
        return False
    return result.median / result.fastest > NOISY_SPREAD


def _overhead_ratio(peer: float, ours: float) -> float:
    """Peer overhead ÷ buttress overhead; inf when buttress's is lost in the noise."""
    return float("inf") if ours <= 0 else peer / ours


def _describe_build() -> str:
    path = Path(buttress.__file__).resolve().parent
    line = f"buttress {buttress.__version__} imported from {path}"
    if (path.parent.parent / "Cargo.toml").exists():
        line += (
            "\n  WARNING: this is the source tree (an editable `maturin develop` build, debug "
            "unless built with --release): these numbers do not represent a release wheel."
        )
    return line


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    results = config.stash.get(_RESULTS, [])
    sections = config.stash.get(_SECTIONS, [])
    if not results and not sections:
        return
    write = terminalreporter.write_line
    terminalreporter.write_sep("=", "buttress vs peers")
    if not any(result.median is not None for result in results):
        if results:
            write(
                f"Benchmarks were disabled (--benchmark-disable): each of the {len(results)} "
                "bodies ran once and passed its check; no timings, so no ratios."
            )
        _write_sections(write, sections)
        return
    write(_describe_build())
    cpus = os.cpu_count() or 0
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    write(
        f"load average {load} on {cpus} CPUs. The tables above are pytest-benchmark's, one case "
        "after another. The ratios below come from a second, interleaved pass: every case of a "
        f"group timed in turn, {INTERLEAVED_ROUNDS} rounds x {INTERLEAVED_CALLS:,} calls in a "
        "fresh shuffled order, so load that comes and goes hits each case alike. Median and "
        "fastest round per call; overhead = median - the group's bare call; median/min above "
        f"{NOISY_SPREAD} (!) marks cases that other load slowed in most rounds."
    )
    groups = {name: interleave(name, cases) for name, cases in config.stash[_CASES].items()}
    for name, members in groups.items():
        _write_group(write, name, members)
    _write_sections(write, sections)
    _write_targets(write, groups)


def _write_sections(write: Callable[[str], None], sections: list[tuple[str, list[str]]]) -> None:
    for title, lines in sections:
        write("")
        write(f"[{title}]")
        for line in lines:
            write(f"  {line}")


def _bare(members: list[Result]) -> float | None:
    return next((r.median for r in members if r.lib == BASELINE), None)


def _write_group(write: Callable[[str], None], name: str, members: list[Result]) -> None:
    bare = _bare(members)
    write("")
    write(f"[{name}]")
    width = max(len(r.label) for r in members) + 2
    header = f"  {'case':<{width}}{'median':>12}"
    header += f"{'overhead':>12}" if bare is not None else ""
    write(f"{header}{'median/min':>12}  check")
    for r in members:
        line = f"  {r.label:<{width}}{_ns(r.median):>12}"
        if bare is not None:
            over = None if r.lib == BASELINE or r.median is None else r.median - bare
            line += f"{_ns(over):>12}"
        write(f"{line}{_spread(r):>12}  {r.check}")
    ours = [r for r in members if r.lib == BUTTRESS and r.median is not None]
    peers = [r for r in members if r.lib not in NOT_PEERS and r.median is not None]
    if not ours or not peers:
        return
    write("")
    if bare is None:
        write("  peer median / buttress median (how many times faster buttress is)")
    else:
        write(
            "  peer median / buttress median  [peer overhead / buttress overhead]  "
            "(how many times faster buttress is)"
        )
    col = max(24, *(len(r.form) + 2 for r in ours))
    peer_width = max(len(r.label) for r in peers) + 2
    write("  " + " " * peer_width + "".join(f"{r.form:>{col}}" for r in ours))
    for peer in peers:
        cells = []
        for mine in ours:
            assert peer.median is not None
            assert mine.median is not None
            cell = _ratio(peer.median / mine.median)
            if bare is not None:
                cell += f" [{_ratio(_overhead_ratio(peer.median - bare, mine.median - bare))}]"
            cells.append(f"{cell:>{col}}")
        write(f"  {peer.label:<{peer_width}}" + "".join(cells))


def _target_ratio(
    target: Target, members: list[Result], form: str, attr: str
) -> tuple[str, str] | None:
    """PASS or MISS, and how many times buttress's `form` beats the cheapest peer form, judged by
    `attr` ("median" or "fastest"); None when a case it needs was not measured."""
    timed = {(r.lib, r.form): getattr(r, attr) for r in members if getattr(r, attr) is not None}
    bare = timed.get((BASELINE, BARE_FORM))
    peers = [(timed[key], key[1]) for key in timed if key[0] == target.peer_lib]
    peers = [(time, name) for time, name in peers if name in target.peer_forms]
    mine = timed.get((BUTTRESS, form))
    if not peers or mine is None or (target.metric == "overhead" and bare is None):
        return None
    peer, peer_form = min(peers)
    if target.metric == "overhead":
        assert bare is not None
        value = _overhead_ratio(peer - bare, mine - bare)
        detail = f"overhead {_ns(peer - bare)} / {_ns(mine - bare)}"
    else:
        value = peer / mine
        detail = f"{_ns(peer)} / {_ns(mine)}"
    verdict = "PASS" if value >= target.factor else "MISS"
    return verdict, f"{_ratio(value):>7} ({detail} vs {target.peer_lib} {peer_form})"


def _write_targets(write: Callable[[str], None], groups: dict[str, list[Result]]) -> None:
    write("")
    write(
        "[targets] (informational: the run never fails on them). Judged on the interleaved "
        "medians; the fastest rounds' ratio follows as a cross-check."
    )
    for target in TARGETS:
        members = groups.get(target.group, [])
        write(f"  {target.text}")
        for form in target.buttress_forms:
            by_median = _target_ratio(target, members, form, "median")
            if by_median is None:
                write(f"    n/a   buttress {form}: a case it needs was not measured in this run")
                continue
            verdict, text = by_median
            write(f"    {verdict}  buttress {form:<22} {text}")
            by_fastest = _target_ratio(target, members, form, "fastest")
            if by_fastest is not None:
                verdict, text = by_fastest
                write(f"          {'(fastest rounds)':<31} {text}: {verdict}")
