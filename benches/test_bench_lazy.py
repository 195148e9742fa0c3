"""Lazy loading: hot access of a loaded value, beside functools.cached_property."""

from __future__ import annotations

import functools

import buttress
import pytest
from _harness import BARE_FORM, BASELINE, BUTTRESS, Bench, Case, Made, registrar

VALUE = 42

LAZY: list[Case] = []
add = registrar(LAZY)


class Computed:
    """The same attribute four ways: plain, buttress's lazy_property, functools' cached_property
    and a buttress Lazy held by the instance."""

    def __init__(self) -> None:
        self.plain = VALUE
        self.calls = 0
        self.lazy = buttress.Lazy(self._compute)

    def _compute(self) -> int:
        self.calls += 1
        return VALUE

    @buttress.lazy_property
    def with_buttress(self) -> int:
        return self._compute()

    @functools.cached_property
    def with_functools(self) -> int:
        return self._compute()


def _computed_once(instance: Computed, read: object) -> Made:
    def verify() -> str:
        assert instance.calls == 1, f"computed {instance.calls} times"
        return "computed once"

    return read, verify  # type: ignore[return-value]


@add(BASELINE, BARE_FORM)
def _() -> Made:
    instance = Computed()
    instance.calls = 1  # a plain attribute is never computed; keep the check uniform

    def run() -> int:
        return instance.plain

    return _computed_once(instance, run)


@add(BUTTRESS, "lazy_property")
def _() -> Made:
    instance = Computed()
    assert instance.with_buttress == VALUE

    def run() -> int:
        return instance.with_buttress

    return _computed_once(instance, run)


@add(BUTTRESS, "Lazy.get()")
def _() -> Made:
    instance = Computed()
    lazy = instance.lazy
    assert lazy.get() == VALUE

    def run() -> int:
        return lazy.get()

    return _computed_once(instance, run)


@add("functools", "cached_property")
def _() -> Made:
    instance = Computed()
    assert instance.with_functools == VALUE

    def run() -> int:
        return instance.with_functools

    return _computed_once(instance, run)


@pytest.mark.benchmark(group="lazy")
@pytest.mark.parametrize("case", LAZY, ids=lambda case: case.id)
def test_lazy(bench: Bench, case: Case) -> None:
    bench(case, expect=VALUE)
