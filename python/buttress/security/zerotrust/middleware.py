"""The policy enforcement point (NIST SP 800-207's PEP) as plain ASGI middleware.

``ZeroTrustMiddleware`` wraps any ASGI app (Starlette, FastAPI, Django's ASGI handler) and, for
every HTTP request and WebSocket handshake:

1. **authenticates**: the ``Authorization: Bearer`` token, checked by a ``TokenValidator``,
   and the workload identity (SPIFFE ID) from mutual TLS or a trusted proxy when a
   ``WorkloadIdentity`` is given. No token: 401 with ``WWW-Authenticate: Bearer realm=...``
   and no error code (RFC 6750 section 3.1); a bad token: 401 with
   ``error="invalid_token"``; a malformed header: 400 ``invalid_request``; a key set that
   cannot be fetched: 503.
2. checks **revocation** on every request, also when the decision is cached;
3. **authorizes** with a ``PolicyDecisionPoint`` (deny by default): a deny is 403;
4. **audits** the decision, allowed or denied, in the ``AuditLog`` *before* the app runs, so no
   request reaches the app without its trace; when the audit log cannot be written, the
   request is refused with 503 (fail closed);
5. calls the app with the principal in ``scope["buttress.principal"]`` and the decision in
   ``scope["buttress.decision"]`` (``principal_from_scope`` reads them).

Decisions are cached for ``cache_ttl`` seconds (a bounded ``buttress.LocalCache``) keyed by
a SHA-256 of the token, never past the token's ``exp``; the validator remembers the tokens it
verified the same way. A decision is cached per (token, workload, method, path, client
address, scheme); a policy whose conditions look at anything else (time of day, headers) needs
``cache_ttl=0``.

>>> from buttress import EventStore
>>> from buttress.security.tokens import TokenValidator
>>> from buttress.security.zerotrust.policy import RulePolicy, allow
>>> async def app(scope, receive, send): ...
>>> guarded = ZeroTrustMiddleware(
...     app,
...     validator=TokenValidator(issuer="https://issuer.example", audience="api",
...                              jwks={"keys": []}),
...     policy=RulePolicy([allow("read", actions="GET", scopes=["api:read"])]),
...     audit=AuditLog(EventStore()),
...     realm="api",
... )
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from buttress._core import LocalCache
from buttress.errors import (
    AuditChainError,
    AuditWriteError,
    EventStoreError,
    InvalidTokenError,
    KeySetUnavailableError,
)
from buttress.security._bearer import (
    MalformedAuthorizationError,
    bearer_challenge,
    bearer_token,
    quotable,
)
from buttress.security.tokens import TokenValidator, VerifiedToken
from buttress.security.zerotrust.audit import AuditLog
from buttress.security.zerotrust.identity import Principal, WorkloadIdentity
from buttress.security.zerotrust.policy import AccessRequest, Decision, PolicyDecisionPoint
from buttress.security.zerotrust.revocation import RevocationCheck, RevocationList

__all__ = [
    "DECISION_SCOPE_KEY",
    "PRINCIPAL_SCOPE_KEY",
    "ZeroTrustMiddleware",
    "decision_from_scope",
    "principal_from_scope",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Where the middleware puts the authenticated ``Principal`` in the ASGI scope.
PRINCIPAL_SCOPE_KEY = "buttress.principal"
#: Where the middleware puts the ``Decision`` that let the request through.
DECISION_SCOPE_KEY = "buttress.decision"

_log = logging.getLogger("buttress.security.zerotrust")
# RFC 6750 section 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
# RFC 6750 section 3: error_description is limited to these characters.


def principal_from_scope(scope: Scope) -> Principal | None:
    """The principal the middleware authenticated for this request (None outside it).

    >>> principal_from_scope({}) is None
    True
    """
    value = scope.get(PRINCIPAL_SCOPE_KEY)
    return value if isinstance(value, Principal) else None


def decision_from_scope(scope: Scope) -> Decision | None:
    """The decision that let this request through (None outside the middleware).

    >>> decision_from_scope({}) is None
    True
    """
    value = scope.get(DECISION_SCOPE_KEY)
    return value if isinstance(value, Decision) else None


class _Refusal(Exception):
    """Ends a request early with a status, headers and the reason for the audit log."""

    def __init__(
        self,
        status: int,
        reason: str,
        *,
        error: str | None = None,
        description: str | None = None,
        principal: Principal | None = None,
        stage: str = "authentication",
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.error = error
        self.description = description
        self.principal = principal
        self.stage = stage


class ZeroTrustMiddleware:
    """Authenticates, authorizes and audits every request before the wrapped ASGI app sees it.

    - ``validator``: a ``TokenValidator`` for the bearer tokens.
    - ``policy``: the ``PolicyDecisionPoint`` (``RulePolicy``, ``CedarPolicy``).
    - ``audit``: the ``AuditLog`` every decision is written to; pass ``None`` explicitly to run
      without one (not recommended).
    - ``workload_identity``: a ``WorkloadIdentity`` to read the caller's SPIFFE ID (optional).
    - ``revocation``: a ``RevocationList`` or a function ``principal -> bool`` (or awaitable
      bool) asked on every request.
    - ``require_token``: when False, a caller with a workload identity and no token is
      authenticated by the identity alone (service-to-service over mTLS).
    - ``cache_ttl``/``cache_size``: the decision cache (0 turns it off). Verified tokens are
      remembered by the validator (its own ``cache_size`` and ``cache_ttl``).
    - ``realm``: the ``realm`` of the ``WWW-Authenticate`` challenge.
    - ``clock``: seconds since the epoch, used to keep cache entries within the token's ``exp``.

    >>> ZeroTrustMiddleware(None, validator=None, policy=None, audit=None)
    Traceback (most recent call last):
    ...
    TypeError: app must be an ASGI application (a callable taking scope, receive, send); ...
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        validator: TokenValidator,
        policy: PolicyDecisionPoint,
        audit: AuditLog | None,
        workload_identity: WorkloadIdentity | None = None,
        revocation: RevocationList | RevocationCheck | None = None,
        require_token: bool = True,
        cache_ttl: float = 5.0,
        cache_size: int = 10_000,
        realm: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not callable(app):
            raise TypeError(
                "app must be an ASGI application (a callable taking scope, receive, send); "
                f"got {type(app).__name__}."
            )
        if not isinstance(validator, TokenValidator):
            raise TypeError(f"validator must be a TokenValidator (got {type(validator).__name__}).")
        if not isinstance(policy, PolicyDecisionPoint):
            raise TypeError(
                "policy must be a PolicyDecisionPoint (RulePolicy, CedarPolicy, or an object with "
                f"decide(principal, request)); got {type(policy).__name__}."
            )
        if audit is not None and not isinstance(audit, AuditLog):
            raise TypeError(f"audit must be an AuditLog or None (got {type(audit).__name__}).")
        if workload_identity is not None and not isinstance(workload_identity, WorkloadIdentity):
            raise TypeError(
                "workload_identity must be a WorkloadIdentity or None "
                f"(got {type(workload_identity).__name__})."
            )
        if revocation is not None and not callable(revocation):
            raise TypeError(
                "revocation must be a RevocationList or a function of the principal returning "
                f"a bool; got {type(revocation).__name__}."
            )
        if not isinstance(require_token, bool):
            raise TypeError(f"require_token must be a bool (got {type(require_token).__name__}).")
        if not require_token and workload_identity is None:
            raise ValueError(
                "require_token=False needs a workload_identity: without a token, the workload "
                "identity is the only way a caller can be authenticated."
            )
        if (
            isinstance(cache_ttl, bool)
            or not isinstance(cache_ttl, (int, float))
            or not (math.isfinite(cache_ttl) and cache_ttl >= 0)
        ):
            raise ValueError(
                f"cache_ttl must be a number of seconds, 0 or more (got {cache_ttl!r})."
            )
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"cache_size must be a whole number from 1 (got {cache_size!r}).")
        if realm is not None and (not isinstance(realm, str) or not quotable(realm)):
            raise ValueError(
                "realm must be a str of printable ASCII without quotes or backslashes "
                f"(got {realm!r})."
            )
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds (got {clock!r}).")
        self.app = app
        self.validator = validator
        self.policy = policy
        self.audit = audit
        self.workload_identity = workload_identity
        self.revocation = revocation
        self.require_token = require_token
        self.cache_ttl = float(cache_ttl)
        self.realm = realm
        self._clock = clock
        self._cache = LocalCache(cache_size) if cache_ttl > 0 else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind == "lifespan":
            await self.app(scope, receive, send)  # startup and shutdown carry no request
            return
        if kind not in ("http", "websocket"):
            # Fail closed: a protocol this middleware cannot check must not reach the app.
            raise RuntimeError(
                f"ZeroTrustMiddleware cannot check ASGI scopes of type {kind!r} (only http, "
                "websocket and lifespan); refusing to pass the request to the app unchecked."
            )
        method = "GET" if scope["type"] == "websocket" else str(scope.get("method", "GET"))
        request = AccessRequest(method, str(scope.get("path", "")), _context(scope))
        try:
            principal, decision, cached = await self._decide(scope, request)
        except _Refusal as refusal:
            await self._audit_refusal(refusal, request)
            await self._refuse(scope, send, refusal)
            return
        except Exception:
            # Fail closed, and say nothing of what broke to the caller.
            _log.exception("The request could not be authenticated or authorized; refused.")
            failure = _Refusal(
                500,
                "The middleware failed while deciding; refused.",
                description="The request could not be checked.",
            )
            await self._audit_refusal(failure, request)
            await self._refuse(scope, send, failure)
            return
        try:
            await self._audit(principal, request, decision, cached=cached, status=None)
        except _Refusal as refusal:
            await self._refuse(scope, send, refusal)
            return
        if not decision.allowed:
            await self._refuse(
                scope,
                send,
                _Refusal(403, decision.reason, principal=principal, stage="authorization"),
            )
            return
        scope = dict(scope)
        scope[PRINCIPAL_SCOPE_KEY] = principal
        scope[DECISION_SCOPE_KEY] = decision
        await self.app(scope, receive, send)

    # -- the decision ----------------------------------------------------------------------

    async def _decide(
        self, scope: Scope, request: AccessRequest
    ) -> tuple[Principal, Decision, bool]:
        if _has_dot_segments(request.resource):
            raise _Refusal(
                400,
                "The path has '.' or '..' segments; refused so that the policy and the app "
                "cannot read it differently.",
                error="invalid_request",
                description="The request path has dot segments.",
            )
        if "//" in request.resource:
            raise _Refusal(
                400,
                "The path has empty segments ('//'); refused so that the policy and an app "
                "that merges slashes cannot read it differently.",
                error="invalid_request",
                description="The request path has empty segments.",
            )
        token = _bearer_token(scope)
        identity = (
            self.workload_identity.from_scope(scope) if self.workload_identity is not None else None
        )
        now = self._clock()
        if token is None:
            if self.require_token or identity is None:
                raise _Refusal(401, "The request carries no bearer token.")
            principal = Principal.from_workload(identity)
            credential: tuple[str, str | bytes] = ("workload", str(identity))
            expires_at = math.inf
        else:
            digest = hashlib.sha256(token.encode("ascii")).digest()
            verified = await self._authenticate(token)
            principal = Principal.from_token(verified, identity)
            credential = ("token", digest)
            expires_at = verified.expires_at if verified.expires_at is not None else now
        await self._check_revocation(principal)
        key = (
            "decision",
            *credential,
            principal.workload_id,
            request.action,
            request.resource,
            request.context.get("client_ip"),
            request.context.get("scheme"),
        )
        if self._cache is not None:
            hit = self._cache.get(key)
            if hit is not None and hit[1] > now:
                return principal, hit[0], True
        try:
            decision = self.policy.decide(principal, request)
            if not isinstance(decision, Decision):
                raise TypeError(f"the policy returned {type(decision).__name__}, not a Decision")
        except Exception as error:
            _log.exception("The policy decision point failed; the request is denied.")
            decision = Decision(
                False, None, f"The policy could not decide ({error}); denied.", "error"
            )
        self._remember(key, (decision, expires_at), now, expires_at)
        return principal, decision, False

    async def _authenticate(self, token: str) -> VerifiedToken:
        # The validator remembers the tokens it has verified (never past their exp), so a
        # token seen before costs a lookup there, not a signature check.
        try:
            verified = await self.validator.validate_async(token)
        except InvalidTokenError as error:
            raise _Refusal(
                401,
                f"The bearer token was refused ({error.reason}): {error.description}",
                error=error.error,
                description=error.description,
            ) from None
        except KeySetUnavailableError as error:
            _log.warning("%s", error)
            raise _Refusal(
                503,
                f"The token could not be checked: {error}",
                description="The token could not be checked now; retry later.",
            ) from None
        return verified

    def _remember(self, key: tuple[Any, ...], value: object, now: float, expires_at: float) -> None:
        if self._cache is None:
            return
        ttl = min(self.cache_ttl, expires_at - now)
        if ttl > 1e-6:
            self._cache.set(key, value, ttl=ttl)

    async def _check_revocation(self, principal: Principal) -> None:
        if self.revocation is None:
            return
        try:
            answer = self.revocation(principal)
            if inspect.isawaitable(answer):
                answer = await answer
        except Exception:
            _log.exception("The revocation check failed; the request is refused.")
            raise _Refusal(
                503,
                "The revocation check failed; refused.",
                description="The token could not be checked now; retry later.",
                principal=principal,
            ) from None
        if answer:
            raise _Refusal(
                401,
                "The bearer token (or its subject) was revoked.",
                error="invalid_token",
                description="The token was revoked.",
                principal=principal,
            )

    # -- the audit log ---------------------------------------------------------------------

    async def _audit(
        self,
        principal: Principal | None,
        request: AccessRequest,
        decision: Decision,
        *,
        cached: bool,
        status: int | None,
        stage: str = "authorization",
    ) -> None:
        if self.audit is None:
            return
        entry = {
            "decision": "allow" if decision.allowed else "deny",
            "stage": stage,
            "status": status if status is not None else (None if decision.allowed else 403),
            "engine": decision.engine,
            "rule": decision.rule,
            "reason": decision.reason,
            "cached": cached,
            "subject": None if principal is None else principal.subject,
            "client_id": None if principal is None else principal.client_id,
            "token_id": None if principal is None else principal.token_id,
            "workload": None if principal is None else principal.workload_id,
            "action": request.action,
            "resource": request.resource,
            "client_ip": request.context.get("client_ip"),
        }
        try:
            await self.audit.record_async(entry)
        except (AuditWriteError, AuditChainError, EventStoreError, OSError) as error:
            _log.error("The audit log could not record a decision (%s); refusing.", error)
            raise _Refusal(
                503,
                "The audit log could not record the decision.",
                description="The request could not be audited; retry later.",
            ) from None

    async def _audit_refusal(self, refusal: _Refusal, request: AccessRequest) -> None:
        decision = Decision(False, None, refusal.reason, "middleware")
        try:
            await self._audit(
                refusal.principal,
                request,
                decision,
                cached=False,
                status=refusal.status,
                stage=refusal.stage,
            )
        except _Refusal as failure:
            refusal.status = failure.status
            refusal.error = None
            refusal.description = failure.description

    # -- answering -------------------------------------------------------------------------

    async def _refuse(self, scope: Scope, send: Send, refusal: _Refusal) -> None:
        if scope["type"] == "websocket":
            # Closing before accepting makes the server answer the handshake with 403.
            await send({"type": "websocket.close", "code": 1008})
            return
        headers = [
            (b"content-type", b"application/json"),
            (b"cache-control", b"no-store"),
        ]
        if refusal.status == 401 or refusal.error == "invalid_request":
            headers.append((b"www-authenticate", self._challenge(refusal).encode("ascii")))
        if refusal.status == 503:
            headers.append((b"retry-after", b"5"))
        body: dict[str, str] = {
            "error": refusal.error
            or {
                401: "unauthorized",
                403: "forbidden",
                500: "server_error",
                503: "temporarily_unavailable",
            }.get(refusal.status, "invalid_request")
        }
        if refusal.status == 403:
            body["error_description"] = "The access policy does not allow this request."
        elif refusal.description:
            body["error_description"] = refusal.description
        payload = json.dumps(body).encode("utf-8")
        headers.append((b"content-length", str(len(payload)).encode("ascii")))
        await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    def _challenge(self, refusal: _Refusal) -> str:
        description = refusal.description if refusal.error is not None else None
        return bearer_challenge(self.realm, error=refusal.error, description=description)


def _context(scope: Scope) -> dict[str, Any]:
    client = scope.get("client")
    return {
        "client_ip": str(client[0]) if client else None,
        "scheme": str(scope.get("scheme", "http")),
    }


def _has_dot_segments(path: str) -> bool:
    return any(segment in (".", "..") for segment in path.split("/"))


def _bearer_token(scope: Scope) -> str | None:
    """The bearer token of the request; None when it sends no Bearer credentials."""
    values = [value for name, value in scope.get("headers", ()) if name.lower() == b"authorization"]
    if not values:
        return None
    if len(values) > 1:
        raise _Refusal(
            400,
            "The request has more than one Authorization header.",
            error="invalid_request",
            description="Send one Authorization header.",
        )
    try:
        header = bytes(values[0]).decode("ascii").strip()
    except UnicodeDecodeError:
        raise _Refusal(
            400,
            "The Authorization header is not ASCII.",
            error="invalid_request",
            description="The Authorization header is malformed.",
        ) from None
    try:
        return bearer_token(header)  # None for another scheme: no bearer credentials sent
    except MalformedAuthorizationError:
        raise _Refusal(
            400,
            "The Authorization header's Bearer credentials are not a token.",
            error="invalid_request",
            description="The Authorization header is malformed.",
        ) from None
