"""The resource server's side: RFC 9068 access tokens checked locally, and Starlette endpoints
protected by them (RFC 6750).

The checking itself is ``buttress.security.tokens.TokenValidator`` (signature against the
issuer's JWKS with an algorithm allow-list, ``iss``, ``aud``, ``exp``, ``nbf``, ``typ: at+jwt``);
this module adds the bearer-token plumbing around it: reading the ``Authorization`` header,
the 401/403 answers with their ``WWW-Authenticate`` challenge, an optional revocation check,
and a key source for a resource server that lives in the same process as the ``OAuthServer``.

>>> from buttress.security.oauth import OAuthServer
>>> server = OAuthServer("https://auth.example", audience="https://api.example")
>>> resource = ResourceServer.beside(server)
>>> resource.validator.issuer
'https://auth.example'
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import Any

from joserfc.jwk import Key, KeySet
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from buttress.errors import InvalidTokenError, KeySetUnavailableError
from buttress.security._bearer import (
    MalformedAuthorizationError,
    bearer_challenge,
    bearer_token,
    quotable,
    sanitise,
)
from buttress.security.oauth.server import OAuthServer
from buttress.security.tokens import KeySource, StaticKeySet, TokenValidator, VerifiedToken

__all__ = ["ProtectedEndpoint", "ResourceServer", "bearer_token"]

ProtectedEndpoint = Callable[[Request, VerifiedToken], Awaitable[Response]]


class _ServerKeys:
    """The published keys of an ``OAuthServer`` in this process, read afresh on each lookup
    so rotation shows at once."""

    def __init__(self, server: OAuthServer) -> None:
        self._server = server

    @property
    def keys(self) -> KeySet:
        return StaticKeySet(self._server.jwks()).keys

    def find_key(self, kid: str | None, alg: str) -> Key:
        return StaticKeySet(self._server.jwks()).find_key(kid, alg)

    async def find_key_async(self, kid: str | None, alg: str) -> Key:
        return self.find_key(kid, alg)


class ResourceServer:
    """Checks RFC 9068 access tokens for one API and protects its Starlette endpoints.

    - ``issuer``, ``audience``: what ``iss`` and ``aud`` must say.
    - ``jwks``: the issuer's keys: its ``jwks_uri`` (fetched and cached), a JWKS dict, a
      joserfc ``KeySet`` or any ``KeySource``.
    - ``algorithms``: the allow-list (ES256, what ``OAuthServer`` signs with, by default).
    - ``is_active``: an optional ``token -> bool`` revocation check (for example a call to
      the issuer's introspection endpoint, or ``OAuthServer.token_is_active`` in-process);
      without it a revoked token stays good until it expires, which is why access tokens
      should be short-lived.
    - ``realm``: the realm named in ``WWW-Authenticate`` challenges.

    >>> resource = ResourceServer(issuer="https://auth.example", audience="api",
    ...                           jwks={"keys": []})
    >>> resource.validate("not-a-jwt")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    buttress.errors.InvalidTokenError: The token is not a well-formed signed JWT ...
    """

    def __init__(
        self,
        *,
        issuer: str,
        audience: str | Collection[str],
        jwks: KeySet | Mapping[str, Any] | KeySource | str,
        algorithms: Collection[str] = ("ES256",),
        is_active: Callable[[str], bool] | None = None,
        realm: str = "api",
        leeway: float = 30.0,
    ) -> None:
        self.validator = TokenValidator(
            issuer=issuer,
            audience=audience,
            jwks=jwks,
            algorithms=algorithms,
            access_token=True,
            leeway=leeway,
        )
        if is_active is not None and not callable(is_active):
            raise TypeError(f"is_active must be a callable or None (got {is_active!r}).")
        self.is_active = is_active
        if not isinstance(realm, str) or not realm or not quotable(realm):
            raise ValueError(
                f"realm must be a non-empty printable ASCII str without quotes (got {realm!r})."
            )
        self.realm = realm

    @classmethod
    def beside(cls, server: OAuthServer, *, realm: str = "api") -> ResourceServer:
        """A resource server in the same process as ``server``: its keys are read from the
        server directly, and revoked tokens are refused at once.

        >>> from buttress.security.oauth import OAuthServer
        >>> ResourceServer.beside(OAuthServer("https://auth.example", audience="api")).realm
        'api'
        """
        if not isinstance(server, OAuthServer):
            raise TypeError(f"server must be an OAuthServer (got {type(server).__name__}).")
        if server.audience is None:
            raise ValueError(
                "ResourceServer.beside needs the server's audience: create the OAuthServer "
                "with audience= your API's identifier, so its access tokens name it in aud."
            )
        return cls(
            issuer=server.issuer,
            audience=server.audience,
            jwks=_ServerKeys(server),
            is_active=server.token_is_active,
            realm=realm,
        )

    def validate(self, token: str) -> VerifiedToken:
        """Checks ``token``; raises ``InvalidTokenError`` when it does not pass.

        >>> resource = ResourceServer(issuer="i", audience="a", jwks={"keys": []})
        >>> resource.validate("x.y.z")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        buttress.errors.InvalidTokenError: The token is not a well-formed signed JWT ...
        """
        verified = self.validator.validate(token)
        if self.is_active is not None and not self.is_active(token):
            raise InvalidTokenError("revoked", "The token has been revoked.")
        return verified

    async def validate_async(self, token: str) -> VerifiedToken:
        """``validate`` for asyncio: key fetches and the revocation check do not block the
        event loop."""
        verified = await self.validator.validate_async(token)
        if self.is_active is not None and not await run_in_threadpool(self.is_active, token):
            raise InvalidTokenError("revoked", "The token has been revoked.")
        return verified

    def protect(
        self, endpoint: ProtectedEndpoint, *, scopes: Iterable[str] = ()
    ) -> Callable[[Request], Awaitable[Response]]:
        """Wraps ``endpoint(request, token)`` as a Starlette endpoint that runs only with a
        valid access token holding every scope in ``scopes``.

        No token: 401 with ``WWW-Authenticate: Bearer realm="..."`` and no error code (RFC 6750
        section 3.1); a bad token: 401 ``invalid_token``; a malformed header: 400
        ``invalid_request``; a missing scope: 403 ``insufficient_scope``; keys that cannot be
        fetched: 503.

        >>> async def me(request, token):
        ...     return JSONResponse({"sub": token.subject})
        >>> resource = ResourceServer(issuer="i", audience="a", jwks={"keys": []})
        >>> callable(resource.protect(me, scopes=["profile"]))
        True
        """
        if not callable(endpoint):
            raise TypeError(f"endpoint must be an async callable (got {endpoint!r}).")
        if isinstance(scopes, str):
            raise TypeError("scopes must be a collection of scope names, not one str.")
        required = frozenset(scopes)

        async def protected(request: Request) -> Response:
            try:
                token = bearer_token(request.headers.get("authorization"))
            except MalformedAuthorizationError as error:
                return self._challenge(400, "invalid_request", str(error))
            if token is None:
                return self._challenge(401, None, None)
            try:
                verified = await self.validate_async(token)
            except InvalidTokenError as error:
                return self._challenge(401, "invalid_token", error.description)
            except KeySetUnavailableError:
                return JSONResponse(
                    {"error": "temporarily_unavailable"},
                    status_code=503,
                    headers={"Retry-After": "5"},
                )
            missing = required - verified.scopes
            if missing:
                return self._challenge(
                    403,
                    "insufficient_scope",
                    f"The token lacks the scope {' '.join(sorted(missing))}.",
                    scope=" ".join(sorted(required)),
                )
            return await endpoint(request, verified)

        return protected

    def _challenge(
        self,
        status: int,
        error: str | None,
        description: str | None,
        *,
        scope: str | None = None,
    ) -> Response:
        challenge = bearer_challenge(self.realm, error=error, description=description, scope=scope)
        headers = {"WWW-Authenticate": challenge}
        if error is None:
            return Response(status_code=status, headers=headers)
        body = {"error": error}
        if description is not None:
            body["error_description"] = sanitise(description)
        return JSONResponse(body, status_code=status, headers=headers)

    def __repr__(self) -> str:
        return f"ResourceServer(issuer={self.validator.issuer!r}, realm={self.realm!r})"
