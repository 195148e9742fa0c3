"""The public surface: `__all__` lists exactly what is public, versions agree, everything public
is documented, every error is a `ButtressError`, and the typing files ship."""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import pathlib
import re
import types
from typing import Any

import buttress
import buttress.backends.redis
import buttress.caching
import buttress.caching.aside
import buttress.caching.writebehind
import buttress.errors
import buttress.events.aggregate
import buttress.events.cqrs
import buttress.events.projection
import buttress.events.store
import buttress.resilience
import buttress.resilience._state
import buttress.resilience.breaker
import buttress.resilience.bulkhead
import buttress.routing.sharding
import pytest
from buttress import _core

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = pathlib.Path(buttress.__file__).resolve().parent


def public_names(module: types.ModuleType) -> set[str]:
    """Names a user sees in `module`: not private, not a submodule."""
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }


def defined_here(module: types.ModuleType) -> set[str]:
    """Public classes and functions whose home is `module` (not imported helpers)."""
    return {
        name
        for name in public_names(module)
        if (inspect.isclass(vars(module)[name]) or inspect.isfunction(vars(module)[name]))
        and getattr(vars(module)[name], "__module__", None) == module.__name__
    }


# ---- __all__ -----------------------------------------------------------------------------


def test_buttress_all_is_exactly_the_public_names() -> None:
    assert len(buttress.__all__) == len(set(buttress.__all__))
    assert set(buttress.__all__) == public_names(buttress) | {"__version__"}


def test_resilience_all_is_exactly_the_public_names() -> None:
    module = buttress.resilience
    assert len(module.__all__) == len(set(module.__all__))
    assert set(module.__all__) == public_names(module)


def test_core_all_is_exactly_the_public_names() -> None:
    assert set(_core.__all__) == public_names(_core) | {"__version__"}


@pytest.mark.parametrize(
    "module",
    [
        buttress.errors,
        buttress.resilience.breaker,
        buttress.resilience.bulkhead,
        buttress.resilience._state,
        buttress.routing.sharding,
        buttress.events.store,
        buttress.events.aggregate,
        buttress.events.cqrs,
        buttress.events.projection,
        buttress.caching,
        buttress.caching.writebehind,
        buttress.caching.aside,
        buttress.backends.redis,
    ],
    ids=lambda module: module.__name__,
)
def test_submodule_all_lists_what_it_defines(module: types.ModuleType) -> None:
    assert len(module.__all__) == len(set(module.__all__))
    for name in module.__all__:
        assert hasattr(module, name), f"{module.__name__}.__all__ names missing {name}"
    assert defined_here(module) <= set(module.__all__)


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, Any] = {}
    exec("from buttress import *", namespace)
    namespace.pop("__builtins__")
    assert set(namespace) == set(buttress.__all__)


def test_resilience_names_are_reexported_from_the_top_level() -> None:
    for name in buttress.resilience.__all__:
        assert getattr(buttress, name) is getattr(buttress.resilience, name)
    for name in buttress.errors.__all__:
        assert getattr(buttress, name) is getattr(buttress.errors, name)


def test_the_caching_classes_are_reexported_from_the_top_level() -> None:
    for name in ("LocalCache", "CacheAside", "WriteThrough", "WriteBehind"):
        assert name in buttress.__all__
        assert name in buttress.caching.__all__
        assert getattr(buttress, name) is getattr(buttress.caching, name)
    assert buttress.LocalCache is _core.LocalCache
    assert buttress.LocalCache.__module__ == "buttress._core"


# ---- version -----------------------------------------------------------------------------


def cargo_version() -> str:
    text = (ROOT / "Cargo.toml").read_text(encoding="utf-8")
    package = text.split("[package]", 1)[1].split("\n[", 1)[0]
    match = re.search(r'^version\s*=\s*"([^"]+)"', package, re.MULTILINE)
    assert match is not None
    return match.group(1)


def test_version_is_a_string_matching_cargo_and_pyproject() -> None:
    assert isinstance(buttress.__version__, str)
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?(a|b|rc|dev|post)\d*)*", buttress.__version__)
    assert buttress.__version__ == _core.__version__ == cargo_version()
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    project = pyproject.split("[project]", 1)[1].split("\n[", 1)[0]
    static = re.search(r'^version\s*=\s*"([^"]+)"', project, re.MULTILINE)
    if static is None:
        assert re.search(r'^dynamic\s*=\s*\[[^\]]*"version"', project, re.MULTILINE)
    else:
        assert static.group(1) == buttress.__version__


def test_installed_metadata_agrees() -> None:
    assert importlib.metadata.version("buttress") == buttress.__version__


# ---- docstrings --------------------------------------------------------------------------


def public_objects() -> list[tuple[str, Any]]:
    found: dict[int, tuple[str, Any]] = {}
    for module in (buttress, buttress.resilience, buttress.errors, _core):
        for name in module.__all__:
            value = getattr(module, name)
            if inspect.isclass(value) or callable(value):
                found.setdefault(id(value), (f"{module.__name__}.{name}", value))
    found[id(buttress.resilience)] = ("buttress.resilience", buttress.resilience)
    found[id(buttress)] = ("buttress", buttress)
    found[id(buttress.errors)] = ("buttress.errors", buttress.errors)
    return sorted(found.values(), key=lambda item: item[0])


@pytest.mark.parametrize(
    ("label", "value"), public_objects(), ids=[label for label, _ in public_objects()]
)
def test_public_objects_have_docstrings(label: str, value: Any) -> None:
    assert (inspect.getdoc(value) or "").strip(), f"{label} has no docstring"


def public_members(kind: str) -> list[tuple[str, Any]]:
    """Public methods (`kind="method"`) or properties of the public classes, skipping what
    they inherit from the standard library."""
    members = []
    for label, value in public_objects():
        if not inspect.isclass(value):
            continue
        for name in dir(value):
            if name.startswith("_"):
                continue
            owner = next(klass for klass in value.__mro__ if name in vars(klass))
            if owner.__module__ in ("builtins", "enum"):
                continue
            attribute = vars(owner)[name]
            if isinstance(attribute, value):
                continue  # an enum member
            is_property = inspect.isdatadescriptor(attribute)
            if (
                not is_property
                and not callable(attribute)
                and not isinstance(attribute, (classmethod, staticmethod))
            ):
                continue  # a class constant (documented in its class's docstring)
            if is_property == (kind == "property"):
                members.append((f"{label}.{name}", attribute))
    return members


@pytest.mark.parametrize(
    ("label", "member"),
    public_members("method"),
    ids=[label for label, _ in public_members("method")],
)
def test_public_methods_have_docstrings(label: str, member: Any) -> None:
    assert (getattr(member, "__doc__", None) or "").strip(), f"{label} has no docstring"


UNDOCUMENTED_PROPERTIES = {
    label
    for label, member in public_members("property")
    if not (getattr(member, "__doc__", None) or "").strip()
}


def test_public_properties_have_docstrings() -> None:
    assert sorted(UNDOCUMENTED_PROPERTIES) == []


# ---- exception hierarchy -----------------------------------------------------------------


def test_every_buttress_exception_is_a_buttress_error() -> None:
    exceptions = {
        value
        for module in (buttress, buttress.errors, buttress.resilience, buttress.routing)
        for value in vars(module).values()
        if inspect.isclass(value) and issubclass(value, BaseException)
    }
    assert exceptions == {
        buttress.ButtressError,
        buttress.CircuitOpenError,
        buttress.BulkheadFullError,
        buttress.PoolError,
        buttress.PoolTimeoutError,
        buttress.PoolFullError,
        buttress.PoolClosedError,
        buttress.EmptyRingError,
        buttress.NoHealthyBackendError,
        buttress.ShardingError,
        buttress.ShardUnavailableError,
        buttress.QuorumNotReachedError,
        buttress.RebalanceError,
        buttress.EventStoreError,
        buttress.WrongExpectedVersionError,
        buttress.DuplicateEventError,
        buttress.StoreCorruptedError,
        buttress.StoreLockedError,
        buttress.EventStoreFailedError,
        buttress.EventStoreClosedError,
        buttress.AggregateNotFoundError,
        buttress.NoHandlerError,
        buttress.WriteQueueFullError,
        buttress.SecurityError,
        buttress.InvalidTokenError,
        buttress.KeySetUnavailableError,
        buttress.FieldDecryptionError,
        buttress.AuditChainError,
        buttress.AuditWriteError,
        buttress.OAuthError,
    }
    for exception in exceptions:
        assert issubclass(exception, buttress.ButtressError)
    assert issubclass(buttress.ButtressError, Exception)
    assert not issubclass(buttress.ButtressError, (ValueError, TypeError, RuntimeError))


def test_errors_raised_by_the_cores_are_the_python_classes() -> None:
    breaker = buttress.CircuitBreaker("api")
    breaker.force_open()
    with pytest.raises(buttress.ButtressError) as caught:
        breaker.call(print)
    assert type(caught.value) is buttress.CircuitOpenError
    bulkhead = buttress.Bulkhead("api", max_concurrent=1)
    bulkhead.acquire()
    with pytest.raises(buttress.ButtressError) as caught:
        bulkhead.acquire()
    assert type(caught.value) is buttress.BulkheadFullError
    pool = buttress.ConnectionPool(object, max_size=1, max_waiting=1)
    held = pool.acquire()
    with pytest.raises(buttress.PoolError) as caught:
        pool.acquire(timeout=0)
    assert type(caught.value) is buttress.PoolTimeoutError
    pool.close(timeout=0)
    with pytest.raises(buttress.ButtressError) as caught:
        pool.acquire()
    assert type(caught.value) is buttress.PoolClosedError
    pool.release(held)


# ---- typing files ------------------------------------------------------------------------


def test_py_typed_and_core_stub_ship_in_the_package() -> None:
    assert (PACKAGE / "py.typed").is_file()
    assert (PACKAGE / "_core.pyi").is_file()


def test_core_stub_declares_what_the_extension_defines() -> None:
    tree = ast.parse((PACKAGE / "_core.pyi").read_text(encoding="utf-8"))
    declared = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    # Private aliases (`_CacheKey`) exist only for the stub's own annotations.
    declared |= {
        node.target.id
        for node in tree.body
        if isinstance(node, ast.AnnAssign)
        and isinstance(node.target, ast.Name)
        and (not node.target.id.startswith("_") or node.target.id == "__version__")
    }
    stub_all = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(isinstance(target, ast.Name) and target.id == "__all__" for target in node.targets)
    )
    assert set(stub_all) == set(_core.__all__)
    assert declared == public_names(_core) | {"__version__"}
