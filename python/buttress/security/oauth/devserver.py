"""The development server: an ``OAuthServer`` configured from a JSON file, with a development
user whose consent is given automatically and a protected ``GET /me``.

Run it with ``python -m buttress.security.oauth serve --config FILE --host 127.0.0.1 --port N``.
The file::

    {
      "issuer": "http://127.0.0.1:9000",
      "audience": "http://127.0.0.1:9000/me",
      "dev_user": "alice",
      "clients": [
        {"client_id": "web", "client_secret": "web-secret",
         "redirect_uris": ["http://127.0.0.1:8000/callback"], "scopes": ["profile", "orders"]},
        {"client_id": "spa", "public": true,
         "redirect_uris": ["http://127.0.0.1:3000/cb"], "scopes": ["profile"]}
      ]
    }

Everything but ``clients`` is optional: the issuer defaults to ``http://HOST:PORT``, the
audience to the issuer, the user to ``dev-user``. The dev server never belongs in production:
it approves every authorization request as the development user.

>>> app = create_dev_app({"issuer": "http://127.0.0.1:9000", "clients": []})
>>> "/me" in [route.path for route in app.routes]
True
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from buttress.security.oauth.app import auto_approve, create_app
from buttress.security.oauth.resource import ResourceServer
from buttress.security.oauth.server import OAuthServer
from buttress.security.tokens import VerifiedToken

__all__ = ["create_dev_app", "load_dev_config"]

_TOP_LEVEL_KEYS = {
    "issuer",
    "audience",
    "dev_user",
    "clients",
    "scopes_supported",
    "access_token_lifetime",
    "refresh_token_lifetime",
    "code_lifetime",
    "introspection_clients",
    "key_publication_delay",
}
_CLIENT_KEYS = {"client_id", "client_secret", "redirect_uris", "scopes", "public", "grant_types"}


def load_dev_config(path: str | pathlib.Path) -> dict[str, Any]:
    """Reads a development server config file (JSON), refusing unknown keys so a typo does not
    pass silently.

    >>> import tempfile, os
    >>> with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    ...     _ = f.write('{"clients": []}')
    >>> load_dev_config(f.name)
    {'clients': []}
    >>> os.unlink(f.name)
    """
    if not isinstance(path, (str, pathlib.Path)):
        raise TypeError(f"path must be a str or Path (got {type(path).__name__}).")
    try:
        text = pathlib.Path(path).read_text("utf-8")
    except OSError as error:
        raise ValueError(f"The config file {path} could not be read: {error}.") from error
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"The config file {path} is not valid JSON ({error.msg} at line {error.lineno}); "
            "fix it and start again."
        ) from error
    _check_config(config, str(path))
    return dict(config)


def _refuse_unknown_keys(found: dict[str, Any], known: set[str], what: str) -> None:
    unknown = sorted(set(found) - known)
    if unknown:
        raise ValueError(
            f"{what} has unknown keys {', '.join(unknown)}; the known ones are "
            f"{', '.join(sorted(known))}."
        )


def _check_config(config: object, where: str) -> None:
    if not isinstance(config, dict):
        raise ValueError(f"The config in {where} must be a JSON object.")
    _refuse_unknown_keys(config, _TOP_LEVEL_KEYS, f"The config in {where}")
    clients = config.get("clients", [])
    if not isinstance(clients, list):
        raise ValueError(f"clients in {where} must be a list of client objects.")
    for index, client in enumerate(clients):
        if not isinstance(client, dict):
            raise ValueError(f"clients[{index}] in {where} must be an object.")
        _refuse_unknown_keys(client, _CLIENT_KEYS, f"clients[{index}] in {where}")
        if "client_id" not in client:
            raise ValueError(f"clients[{index}] in {where} needs a client_id.")


def create_dev_app(config: Mapping[str, Any], *, default_issuer: str | None = None) -> Starlette:
    """The development server's app for a config (as ``load_dev_config`` returns it).

    >>> app = create_dev_app({"clients": []}, default_issuer="http://127.0.0.1:9000")
    >>> app.state.oauth_server.issuer
    'http://127.0.0.1:9000'
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping (got {type(config).__name__}).")
    _check_config(dict(config), "the config")
    issuer = config.get("issuer", default_issuer)
    if issuer is None:
        raise ValueError("The config needs an issuer (or pass default_issuer).")
    optional = {
        name: config[name]
        for name in (
            "scopes_supported",
            "access_token_lifetime",
            "refresh_token_lifetime",
            "code_lifetime",
            "introspection_clients",
            "key_publication_delay",
        )
        if name in config
    }
    server = OAuthServer(issuer, audience=config.get("audience", issuer), **optional)
    for client in config.get("clients", []):
        server.register_client(**client)
    dev_user = config.get("dev_user", "dev-user")
    resource = ResourceServer.beside(server, realm="buttress-dev")

    async def me(request: Request, token: VerifiedToken) -> Response:
        return JSONResponse(
            {
                "sub": token.subject,
                "scope": " ".join(sorted(token.scopes)),
                "client_id": token.client_id,
            }
        )

    app = create_app(
        server,
        consent=auto_approve(dev_user),
        extra_routes=[Route("/me", resource.protect(me), methods=["GET"])],
    )
    app.state.oauth_server = server
    return app
