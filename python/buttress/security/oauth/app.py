"""The ASGI app (Starlette) that exposes an ``OAuthServer`` over HTTP.

Routes, under the issuer's path: ``GET /authorize`` (and ``POST`` with a form), ``POST /token``,
``POST /revoke``, ``POST /introspect``, ``GET /jwks``, ``GET /openapi.json`` and the RFC 8414
metadata at ``/.well-known/oauth-authorization-server``. Each OAuth call runs in a worker
thread, so a storage that blocks (a database) never stalls the event loop.

Who the user is and whether they consent is the application's business: pass ``consent``, an
async callable that gets the Starlette request and the validated ``AuthorizationRequest`` and
returns the approving subject, None to deny, or a Response of its own (a login or consent page).
``auto_approve`` is the development shortcut.

>>> from buttress.security.oauth import OAuthServer
>>> app = create_app(OAuthServer("https://auth.example"), consent=auto_approve("alice"))
>>> sorted(route.path for route in app.routes)[:3]
['/.well-known/oauth-authorization-server', '/authorize', '/introspect']
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from authlib.oauth2.rfc6749 import InvalidRequestError  # type: ignore[import-untyped]
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from buttress.security.oauth._integration import OAuthResponse
from buttress.security.oauth.server import AuthorizationRequest, OAuthServer

__all__ = ["ConsentHandler", "auto_approve", "create_app", "load_openapi"]

ConsentHandler = Callable[[Request, AuthorizationRequest], Awaitable["str | Response | None"]]

_FORM = "application/x-www-form-urlencoded"


def auto_approve(subject: str) -> ConsentHandler:
    """A consent handler that approves every request as ``subject``: for development and
    tests only, never in production.

    >>> handler = auto_approve("alice")
    >>> callable(handler)
    True
    """
    if not isinstance(subject, str) or not subject:
        raise TypeError(f"subject must be a non-empty str (got {subject!r}).")

    async def approve(request: Request, authorization: AuthorizationRequest) -> str:
        return subject

    return approve


def load_openapi() -> dict[str, Any]:
    """The OpenAPI description of the token, revocation and introspection endpoints that ships
    with the package.

    >>> sorted(load_openapi()["paths"])
    ['/introspect', '/revoke', '/token']
    """
    text = resources.files("buttress.security.oauth").joinpath("openapi.json").read_text("utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


def create_app(
    server: OAuthServer,
    *,
    consent: ConsentHandler | None = None,
    extra_routes: Sequence[BaseRoute] = (),
) -> Starlette:
    """A Starlette app serving ``server``'s endpoints (plus ``extra_routes``).

    Without ``consent`` the server grants no authorization codes (every authorization request
    is answered ``access_denied``), which suits a server for client credentials only.

    >>> from buttress.security.oauth import OAuthServer
    >>> app = create_app(OAuthServer("https://auth.example/tenant"))
    >>> "/.well-known/oauth-authorization-server/tenant" in [r.path for r in app.routes]
    True
    """
    if not isinstance(server, OAuthServer):
        raise TypeError(f"server must be an OAuthServer (got {type(server).__name__}).")
    if consent is not None and not callable(consent):
        raise TypeError(f"consent must be an async callable or None (got {consent!r}).")

    async def authorize(request: Request) -> Response:
        params, problem = await _parameters(request)
        if problem is not None:
            return problem
        headers = dict(request.headers)
        started = await run_in_threadpool(server.start_authorization, params, headers)
        if isinstance(started, OAuthResponse):
            return _to_http(started)
        decision: str | Response | None = None
        if consent is not None:
            decision = await consent(request, started)
        if isinstance(decision, Response):
            return decision
        finished = await run_in_threadpool(server.finish_authorization, started, decision)
        return _to_http(finished)

    def endpoint(
        handle: Callable[[list[tuple[str, str]], dict[str, str]], OAuthResponse],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def call(request: Request) -> Response:
            params, problem = await _parameters(request)
            if problem is not None:
                return problem
            response = await run_in_threadpool(handle, params, dict(request.headers))
            return _to_http(response)

        return call

    async def metadata(request: Request) -> Response:
        return JSONResponse(server.metadata())

    async def jwks(request: Request) -> Response:
        keys = await run_in_threadpool(server.jwks)
        # Cached no longer than a new key is published before it signs.
        max_age = int(server.key_publication_delay)
        return JSONResponse(keys, headers={"Cache-Control": f"max-age={max_age}"})

    openapi = load_openapi()

    async def openapi_document(request: Request) -> Response:
        # A relative server URL: the document stays right behind proxies and in ASGI tests.
        return JSONResponse({**openapi, "servers": [{"url": base or "/"}]})

    def path(url: str) -> str:
        return urlsplit(url).path or "/"

    base = urlsplit(server.issuer).path.rstrip("/")
    routes: list[BaseRoute] = [
        Route(path(server.authorization_endpoint), authorize, methods=["GET", "POST"]),
        Route(path(server.token_endpoint_url), endpoint(server.token_endpoint), methods=["POST"]),
        Route(
            path(server.revocation_endpoint_url),
            endpoint(server.revocation_endpoint),
            methods=["POST"],
        ),
        Route(
            path(server.introspection_endpoint_url),
            endpoint(server.introspection_endpoint),
            methods=["POST"],
        ),
        Route(path(server.jwks_uri), jwks, methods=["GET"]),
        Route(path(server.metadata_url), metadata, methods=["GET"]),
        Route(base + "/openapi.json", openapi_document, methods=["GET"]),
        *extra_routes,
    ]
    return Starlette(routes=routes)


async def _parameters(request: Request) -> tuple[list[tuple[str, str]], Response | None]:
    """The request's OAuth parameters: the query of a GET, the urlencoded form of a POST."""
    if request.method == "GET":
        return list(request.query_params.multi_items()), None
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != _FORM:
        return [], _error_response(
            f"The request body must be {_FORM} (RFC 6749 section 4.1.3); send the parameters "
            "as a form."
        )
    try:
        form = await request.form()
    except (HTTPException, MultiPartException, ValueError):
        return [], _error_response("The form body could not be parsed; send a valid form.")
    params: list[tuple[str, str]] = []
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            return [], _error_response("The form must hold text fields only, not files.")
        params.append((name, value))
    return params, None


def _error_response(description: str) -> Response:
    status, body, headers = InvalidRequestError(description)()
    return JSONResponse(body, status_code=status, headers=dict(headers))


def _to_http(response: OAuthResponse) -> Response:
    headers = dict(response.headers)
    if response.status_code == 302 and response.location is not None:
        headers.pop("Location", None)
        return RedirectResponse(response.location, status_code=302, headers=headers)
    if isinstance(response.body, dict):
        headers.pop("Content-Type", None)
        return JSONResponse(response.body, status_code=response.status_code, headers=headers)
    return Response(response.body, status_code=response.status_code, headers=headers)
