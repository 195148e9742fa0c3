"""The README's examples and the docstring examples run as written."""

from __future__ import annotations

import doctest
import pathlib
import re
import sys
import types

import buttress
import buttress.backends.redis
import buttress.backends.sqlite
import buttress.caching
import buttress.caching.aside
import buttress.caching.writebehind
import buttress.errors
import buttress.events.aggregate
import buttress.events.cqrs
import buttress.events.projection
import buttress.events.store
import buttress.lazy
import buttress.pool
import buttress.resilience.breaker
import buttress.resilience.bulkhead
import buttress.routing
import buttress.routing.balancer
import buttress.routing.sharding
import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def readme_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)


def test_readme_has_an_example_per_available_pattern() -> None:
    examples = "\n".join(readme_examples())
    assert "CircuitBreaker(" in examples
    assert "Bulkhead" in examples
    assert "ConnectionPool(" in examples
    assert "HashRing(" in examples
    assert "ShardedStore(" in examples
    assert "EventStore(" in examples
    assert "Repository(" in examples
    assert "ProjectionRunner(" in examples
    assert "LocalCache(" in examples
    assert "WriteBehind(" in examples
    assert "CacheAside(" in examples
    assert "OAuthServer(" in examples
    assert "ZeroTrustMiddleware(" in examples
    assert "FieldEncryptor(" in examples


@pytest.mark.parametrize("index", range(len(readme_examples())))
def test_readme_example_runs(index: int, capsys: pytest.CaptureFixture[str]) -> None:
    code = readme_examples()[index]
    # Run as a script of its own would be: a module in sys.modules (dataclasses look there),
    # compiled without this file's `from __future__` flags.
    module = types.ModuleType("__readme__")
    sys.modules["__readme__"] = module
    try:
        compiled = compile(code, f"README.md example {index + 1}", "exec", dont_inherit=True)
        exec(compiled, module.__dict__)
    finally:
        del sys.modules["__readme__"]
    assert capsys.readouterr().out  # every example shows its result


@pytest.mark.parametrize(
    "module",
    [
        buttress,
        buttress.errors,
        buttress.caching,
        buttress.events.store,
        buttress.events.aggregate,
        buttress.events.cqrs,
        buttress.events.projection,
        buttress.caching.writebehind,
        buttress.caching.aside,
        buttress.lazy,
        buttress.pool,
        buttress.routing,
        buttress.routing.balancer,
        buttress.routing.sharding,
        buttress.backends.sqlite,
        buttress.backends.redis,
        buttress.resilience.breaker,
        buttress.resilience.bulkhead,
    ],
    ids=lambda module: module.__name__,
)
def test_docstring_examples(module: object) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)  # type: ignore[arg-type]
    assert result.failed == 0


def test_extension_docstring_examples() -> None:
    """The examples in the Rust classes' docstrings run too."""
    from buttress import _core

    globs = {
        "CircuitBreaker": _core.CircuitBreaker,
        "Bulkhead": _core.Bulkhead,
        "ManualClock": _core.ManualClock,
        "ConnectionPool": _core.ConnectionPool,
        "HashRing": _core.HashRing,
        "LocalCache": _core.LocalCache,
    }
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    names = ("CircuitBreaker", "CircuitPermit", "Bulkhead", "ManualClock", "ConnectionPool")
    names += ("HashRing", "LocalCache")
    for name in (*names, "PoolLease"):
        for test in finder.find(getattr(_core, name), name, globs=dict(globs)):
            runner.run(test)
    assert runner.failures == 0
    assert runner.tries >= 4
