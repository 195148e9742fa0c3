"""The OAuth package's public surface: ``__all__`` lists exactly the public names, everything
public has a docstring with an example, and the docstring examples run as written."""

from __future__ import annotations

import doctest
import inspect
import types

import buttress.errors
import buttress.security.oauth
import buttress.security.oauth._integration
import buttress.security.oauth.app
import buttress.security.oauth.client_secrets
import buttress.security.oauth.devserver
import buttress.security.oauth.resource
import buttress.security.oauth.server
import buttress.security.oauth.storage
import pytest

PACKAGE = buttress.security.oauth
MODULES = [
    PACKAGE,
    buttress.security.oauth._integration,
    buttress.security.oauth.app,
    buttress.security.oauth.client_secrets,
    buttress.security.oauth.devserver,
    buttress.security.oauth.resource,
    buttress.security.oauth.server,
    buttress.security.oauth.storage,
]


def test_all_is_exactly_the_public_names() -> None:
    public = {
        name
        for name, value in vars(PACKAGE).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    } - {"annotations"}
    assert len(PACKAGE.__all__) == len(set(PACKAGE.__all__))
    assert set(PACKAGE.__all__) == public


@pytest.mark.parametrize("name", PACKAGE.__all__)
def test_public_classes_and_functions_have_examples(name: str) -> None:
    value = getattr(PACKAGE, name)
    if inspect.isclass(value) or inspect.isfunction(value):
        assert value.__doc__, f"{name} has no docstring"
        assert ">>>" in value.__doc__, f"{name}'s docstring has no example"


def test_oauth_error_is_a_security_error() -> None:
    assert issubclass(buttress.errors.OAuthError, buttress.errors.SecurityError)
    assert "OAuthError" in buttress.errors.__all__


@pytest.mark.parametrize("module", MODULES, ids=lambda module: module.__name__)
def test_docstring_examples_run(module: types.ModuleType) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, raise_on_error=False)
    assert result.failed == 0
