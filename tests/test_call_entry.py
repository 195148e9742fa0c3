"""`CircuitBreaker.call` is installed by hand as a fast-call method: it must pass arguments,
keywords and errors exactly like a normal method, and leak nothing."""

from __future__ import annotations

import inspect
import sys
from typing import Any

import pytest
from buttress import CircuitBreaker, CircuitOpenError, _core


def echo(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((), {}), ((1,), {}), ((1, 2, 3), {}), ((), {"x": 1}), ((1, 2), {"x": 3, "func": 4})],
)
def test_passes_positional_and_keyword_arguments(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    breaker = CircuitBreaker()
    assert breaker.call(echo, *args, **kwargs) == (args, kwargs)
    assert _core.CircuitBreaker.call(breaker, echo, *args, **kwargs) == (args, kwargs)


def test_signature_and_docstring() -> None:
    signature = inspect.signature(CircuitBreaker.call)
    assert str(signature) == "(self, func, /, *args, **kwargs)"
    assert CircuitBreaker.call.__doc__
    assert "CircuitOpenError" in CircuitBreaker.call.__doc__


def test_missing_or_wrong_func_and_self() -> None:
    breaker = CircuitBreaker()
    with pytest.raises(TypeError, match="func"):
        breaker.call()
    with pytest.raises(TypeError, match="func must be callable"):
        breaker.call(5)
    with pytest.raises(TypeError):
        _core.CircuitBreaker.call(5, echo)  # type: ignore[arg-type]
    assert breaker.metrics().calls == 0


def test_errors_and_refusals_pass_through() -> None:
    breaker = CircuitBreaker(failure_threshold=1, fallback=None)

    def boom() -> None:
        raise KeyError("missing")

    with pytest.raises(KeyError):
        breaker.call(boom)
    with pytest.raises(CircuitOpenError):
        breaker.call(echo, 1, x=2)


def test_fallback_gets_the_call_arguments() -> None:
    breaker = CircuitBreaker(fallback=echo)
    breaker.force_open()
    assert breaker.call(print, 1, x=2) == ((1,), {"x": 2})


def test_no_reference_is_leaked() -> None:
    breaker = CircuitBreaker()
    value = object()
    before = sys.getrefcount(value)
    for _ in range(1000):
        breaker.call(echo, value, key=value)
    assert sys.getrefcount(value) == before
