"""The security package's public surface: each module's ``__all__`` lists what it defines,
everything public has a docstring, and the docstring examples run as written."""

from __future__ import annotations

import doctest
import inspect
import types

import buttress.errors
import buttress.security
import buttress.security.tokens
import buttress.security.zerotrust
import buttress.security.zerotrust.audit
import buttress.security.zerotrust.encryption
import buttress.security.zerotrust.identity
import buttress.security.zerotrust.middleware
import buttress.security.zerotrust.policy
import buttress.security.zerotrust.revocation
import pytest

MODULES = [
    buttress.security,
    buttress.security.tokens,
    buttress.security.zerotrust,
    buttress.security.zerotrust.audit,
    buttress.security.zerotrust.encryption,
    buttress.security.zerotrust.identity,
    buttress.security.zerotrust.middleware,
    buttress.security.zerotrust.policy,
    buttress.security.zerotrust.revocation,
]
SECURITY_ERRORS = [
    "SecurityError",
    "InvalidTokenError",
    "KeySetUnavailableError",
    "FieldDecryptionError",
    "AuditChainError",
    "AuditWriteError",
]


def defined_here(module: types.ModuleType) -> set[str]:
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and value.__module__ == module.__name__
    }


@pytest.mark.parametrize("module", MODULES, ids=lambda module: module.__name__)
def test_all_lists_what_the_module_defines(module: types.ModuleType) -> None:
    assert len(module.__all__) == len(set(module.__all__))
    for name in module.__all__:
        assert hasattr(module, name), f"{module.__name__}.__all__ names missing {name}"
    assert defined_here(module) <= set(module.__all__)


def test_the_package_re_exports_every_submodule_name() -> None:
    exported = set(buttress.security.__all__)
    for module in MODULES[1:]:
        assert set(module.__all__) <= exported | {"EVENT_TYPE", "GENESIS", "FORMAT_VERSION"}
    assert set(SECURITY_ERRORS) <= exported


@pytest.mark.parametrize("module", MODULES, ids=lambda module: module.__name__)
def test_public_names_are_documented(module: types.ModuleType) -> None:
    for name in module.__all__:
        value = getattr(module, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert (inspect.getdoc(value) or "").strip(), f"{module.__name__}.{name}"
            if inspect.isclass(value):
                for member, attribute in vars(value).items():
                    if member.startswith("_") or not callable(attribute):
                        continue
                    assert inspect.getdoc(attribute), f"{name}.{member} has no docstring"


@pytest.mark.parametrize("module", [*MODULES, buttress.errors], ids=lambda module: module.__name__)
def test_docstring_examples(module: types.ModuleType) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_security_errors_are_buttress_errors() -> None:
    for name in SECURITY_ERRORS:
        error = getattr(buttress.errors, name)
        assert issubclass(error, buttress.errors.SecurityError)
        assert issubclass(error, buttress.errors.ButtressError)
        assert name in buttress.errors.__all__
