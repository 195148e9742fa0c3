"""The zero-trust middleware end to end: a Starlette app behind ``ZeroTrustMiddleware``, called
through httpx's ASGI transport with real signed tokens. 401 (with and without an error code),
400, 403, 503 and 200; every decision in the audit log; cached decisions that still respect
revocation and never outlive the token; workload identity from the TLS extension."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from buttress import EventStore
from buttress.security import (
    AccessRequest,
    AuditLog,
    Decision,
    Principal,
    RemoteKeySet,
    RevocationList,
    RulePolicy,
    WorkloadIdentity,
    ZeroTrustMiddleware,
    allow,
    decision_from_scope,
    deny,
    principal_from_scope,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from test_tokens import NOW, FakeClock, Issuer
from test_zerotrust_identity import certificate, tls_scope


async def whoami(request: Request) -> JSONResponse:
    principal = principal_from_scope(request.scope)
    decision = decision_from_scope(request.scope)
    assert principal is not None
    assert decision is not None
    return JSONResponse(
        {"subject": principal.subject, "rule": decision.rule, "workload": principal.workload_id}
    )


APP = Starlette(
    routes=[
        Route("/orders/{id}", whoami, methods=["GET", "POST", "DELETE"]),
        Route("/admin/users", whoami),
        Route("/reports", whoami),
    ]
)


class CountingPolicy:
    """The rule policy, counting how often it is asked (to see the cache at work)."""

    def __init__(self) -> None:
        self.calls = 0
        self.rules = RulePolicy(
            [
                allow("read-orders", actions="GET", resources="/orders/**", scopes=["orders:read"]),
                allow(
                    "write-orders",
                    actions=["POST"],
                    resources="/orders/**",
                    scopes=["orders:write"],
                ),
                deny("no-admin", resources="/admin/**"),
                allow("admins", claims={"roles": "admin"}),
                allow(
                    "prod-jobs",
                    actions="GET",
                    resources="/reports",
                    workloads=["spiffe://example.org/ns/prod/*"],
                ),
            ]
        )

    def decide(self, principal: Principal, request: AccessRequest) -> Decision:
        self.calls += 1
        return self.rules.decide(principal, request)


class Setup:
    def __init__(self, **options: Any) -> None:
        self.clock = FakeClock()
        self.issuer = Issuer(self.clock)
        self.policy = CountingPolicy()
        self.store = EventStore()
        self.audit = AuditLog(self.store)
        self.revoked = RevocationList(clock=self.clock)
        options.setdefault("validator", self.issuer.validator(access_token=True, leeway=0))
        options.setdefault("policy", self.policy)
        options.setdefault("audit", self.audit)
        options.setdefault("revocation", self.revoked)
        options.setdefault("realm", "api")
        options.setdefault("clock", self.clock)
        self.app = options.pop("app", APP)
        self.middleware = ZeroTrustMiddleware(self.app, **options)

    def client(self, app: Any = None) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=app or self.middleware, client=("10.0.0.7", 1234))
        return httpx.AsyncClient(transport=transport, base_url="http://testserver")

    def bearer(self, **claims: Any) -> dict[str, str]:
        return {"authorization": f"Bearer {self.issuer.token(**claims)}"}

    def audited(self) -> list[dict[str, Any]]:
        return [entry.entry for entry in self.audit.entries()]


@pytest.fixture
def setup() -> Setup:
    return Setup()


@pytest.fixture
async def client(setup: Setup) -> AsyncIterator[httpx.AsyncClient]:
    async with setup.client() as client:
        yield client


# -- authentication ------------------------------------------------------------------------------


async def test_no_token_is_401_without_an_error_code(
    setup: Setup, client: httpx.AsyncClient
) -> None:
    response = await client.get("/orders/1")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="api"'
    assert response.headers["cache-control"] == "no-store"
    assert response.json() == {"error": "unauthorized"}
    (entry,) = setup.audited()
    assert entry["decision"] == "deny"
    assert entry["status"] == 401
    assert entry["stage"] == "authentication"
    assert entry["reason"] == "The request carries no bearer token."
    assert entry["client_ip"] == "10.0.0.7"


async def test_another_scheme_counts_as_no_token(client: httpx.AsyncClient) -> None:
    response = await client.get("/orders/1", headers={"authorization": "Basic dXNlcjpwdw=="})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="api"'


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": NOW - 1}, "expired"),
        ({"aud": "https://elsewhere.example"}, "wrong_audience"),
        ({"iss": "https://evil.example"}, "wrong_issuer"),
    ],
)
async def test_an_invalid_token_is_401_invalid_token(
    setup: Setup, client: httpx.AsyncClient, claims: dict[str, Any], reason: str
) -> None:
    response = await client.get("/orders/1", headers=setup.bearer(**claims))
    assert response.status_code == 401
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="api", error="invalid_token", error_description="')
    assert response.json()["error"] == "invalid_token"
    (entry,) = setup.audited()
    assert entry["status"] == 401
    assert reason in entry["reason"]
    assert setup.policy.calls == 0  # never authorized


async def test_a_forged_token_is_401(setup: Setup, client: httpx.AsyncClient) -> None:
    token = setup.issuer.token()
    header, payload, signature = token.split(".")
    response = await client.get(
        "/orders/1", headers={"authorization": f"Bearer {header}.{payload}.{signature[::-1]}"}
    )
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


@pytest.mark.parametrize(
    "headers",
    [
        [("authorization", "Bearer")],
        [("authorization", "Bearer a b")],
        [("authorization", 'Bearer tok"en')],
        [("authorization", "Bearer x"), ("authorization", "Bearer y")],
    ],
)
async def test_a_malformed_authorization_header_is_400(
    setup: Setup, client: httpx.AsyncClient, headers: list[tuple[str, str]]
) -> None:
    response = await client.get("/orders/1", headers=headers)
    assert response.status_code == 400
    assert 'error="invalid_request"' in response.headers["www-authenticate"]
    assert setup.audited()[0]["status"] == 400


async def test_an_unreachable_key_set_is_503(setup: Setup) -> None:
    validator = setup.issuer.validator(
        jwks=RemoteKeySet("http://127.0.0.1:9/jwks", timeout=0.5, clock=setup.clock)
    )
    setup = Setup(validator=validator)
    async with setup.client() as client:
        response = await client.get("/orders/1", headers=setup.bearer())
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert setup.audited()[0]["status"] == 503


# -- authorization -------------------------------------------------------------------------------


async def test_an_allowed_request_reaches_the_app_with_its_principal(
    setup: Setup, client: httpx.AsyncClient
) -> None:
    headers = setup.bearer(sub="alice")
    response = await client.get("/orders/7", headers=headers)
    assert response.status_code == 200
    assert response.json() == {"subject": "alice", "rule": "read-orders", "workload": None}
    (entry,) = setup.audited()
    assert entry["decision"] == "allow"
    assert entry["rule"] == "read-orders"
    assert entry["subject"] == "alice"
    assert entry["client_id"] == "web-app"
    assert entry["action"] == "GET"
    assert entry["resource"] == "/orders/7"
    assert entry["status"] is None
    assert entry["cached"] is False
    token = headers["authorization"].split()[1]
    assert token.split(".")[2] not in json.dumps(entry)  # the token itself is never logged


async def test_a_policy_deny_is_403(setup: Setup, client: httpx.AsyncClient) -> None:
    admin = setup.bearer(roles=["admin"])
    assert (await client.delete("/orders/7", headers=admin)).status_code == 200
    response = await client.get("/admin/users", headers=admin)
    assert response.status_code == 403
    assert "www-authenticate" not in response.headers
    assert response.json()["error"] == "forbidden"
    default = await client.delete("/orders/7", headers=setup.bearer())
    assert default.status_code == 403
    entries = setup.audited()
    assert [entry["rule"] for entry in entries] == ["admins", "no-admin", None]
    assert [entry["status"] for entry in entries] == [None, 403, 403]
    assert "denied by default" in entries[2]["reason"]


async def test_a_failing_policy_denies() -> None:
    class Broken:
        def decide(self, principal: Principal, request: AccessRequest) -> Decision:
            raise RuntimeError("policy store down")

    setup = Setup(policy=Broken())
    async with setup.client() as client:
        response = await client.get("/orders/1", headers=setup.bearer())
    assert response.status_code == 403
    assert "could not decide" in setup.audited()[0]["reason"]


async def test_the_audit_log_is_valid_after_many_requests(
    setup: Setup, client: httpx.AsyncClient
) -> None:
    token = setup.bearer()
    responses = await asyncio.gather(
        *(client.get(f"/orders/{number}", headers=token) for number in range(20)),
        *(client.get("/admin/users", headers=token) for _ in range(5)),
        *(client.get("/orders/1") for _ in range(5)),
    )
    assert (
        sorted(response.status_code for response in responses) == [200] * 20 + [401] * 5 + [403] * 5
    )
    result = setup.audit.verify()
    assert result.valid
    assert result.entries == 30


async def test_an_audit_log_that_cannot_be_written_refuses_the_request(setup: Setup) -> None:
    setup.store.close()
    async with setup.client() as client:
        allowed = await client.get("/orders/1", headers=setup.bearer())
        unauthenticated = await client.get("/orders/1")
    assert allowed.status_code == 503
    assert unauthenticated.status_code == 503


async def test_an_unexpected_error_is_a_clean_audited_refusal() -> None:
    class Broken(WorkloadIdentity):
        def from_scope(self, scope: Any) -> Any:
            raise RuntimeError("secret internals")

    reached: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])

    setup = Setup(app=app, workload_identity=Broken())
    token = [(b"authorization", f"Bearer {setup.issuer.token()}".encode())]
    sent = await call(
        setup.middleware, {"type": "http", "method": "GET", "path": "/orders/1", "headers": token}
    )
    assert sent[0]["status"] == 500
    assert b"secret" not in sent[1]["body"]
    assert reached == []
    assert setup.audited()[0]["decision"] == "deny"
    assert setup.audited()[0]["status"] == 500


# -- the cache, revocation and expiry ------------------------------------------------------------


async def test_decisions_are_cached_per_token_and_request(
    setup: Setup, client: httpx.AsyncClient
) -> None:
    token = setup.bearer()
    for _ in range(3):
        assert (await client.get("/orders/1", headers=token)).status_code == 200
    assert setup.policy.calls == 1
    assert (await client.get("/orders/2", headers=token)).status_code == 200
    assert setup.policy.calls == 2
    assert (await client.get("/orders/2", headers=setup.bearer())).status_code == 200
    assert setup.policy.calls == 3  # another token
    assert [entry["cached"] for entry in setup.audited()] == [False, True, True, False, False]


async def test_revocation_is_checked_even_when_the_decision_is_cached(
    setup: Setup, client: httpx.AsyncClient
) -> None:
    token = setup.issuer.token(jti="token-1")
    headers = {"authorization": f"Bearer {token}"}
    assert (await client.get("/orders/1", headers=headers)).status_code == 200
    assert (await client.get("/orders/1", headers=headers)).status_code == 200
    setup.revoked.revoke_token("token-1", expires_at=NOW + 300)
    response = await client.get("/orders/1", headers=headers)
    assert response.status_code == 401
    assert 'error_description="The token was revoked."' in response.headers["www-authenticate"]
    assert setup.policy.calls == 1
    # A subject can be revoked as a whole, too.
    other = setup.bearer(sub="bob")
    assert (await client.get("/orders/1", headers=other)).status_code == 200
    setup.revoked.revoke_subject("bob")
    assert (await client.get("/orders/1", headers=other)).status_code == 401
    setup.revoked.restore_subject("bob")
    assert (await client.get("/orders/1", headers=other)).status_code == 200
    assert setup.audited()[2]["reason"] == "The bearer token (or its subject) was revoked."


async def test_an_async_revocation_check() -> None:
    revoked: set[str] = set()

    async def is_revoked(principal: Principal) -> bool:
        await asyncio.sleep(0)
        return principal.token_id in revoked

    setup = Setup(revocation=is_revoked)
    token = setup.issuer.token(jti="t-9")
    async with setup.client() as client:
        headers = {"authorization": f"Bearer {token}"}
        assert (await client.get("/orders/1", headers=headers)).status_code == 200
        revoked.add("t-9")
        assert (await client.get("/orders/1", headers=headers)).status_code == 401


async def test_a_failing_revocation_check_fails_closed() -> None:
    def broken(principal: Principal) -> bool:
        raise ConnectionError("redis down")

    setup = Setup(revocation=broken)
    async with setup.client() as client:
        assert (await client.get("/orders/1", headers=setup.bearer())).status_code == 503


async def test_cache_entries_never_outlive_the_token(
    setup: Setup, client: httpx.AsyncClient
) -> None:
    headers = setup.bearer(exp=NOW + 10)
    assert (await client.get("/orders/1", headers=headers)).status_code == 200
    assert (await client.get("/orders/1", headers=headers)).status_code == 200
    assert setup.policy.calls == 1
    setup.clock.advance(11)  # the cache's own TTL (5 s of real time) has not passed
    response = await client.get("/orders/1", headers=headers)
    assert response.status_code == 401
    assert "expired" in response.headers["www-authenticate"]


async def test_no_cache_asks_the_policy_every_time() -> None:
    setup = Setup(cache_ttl=0)
    async with setup.client() as client:
        headers = setup.bearer()
        for _ in range(3):
            assert (await client.get("/orders/1", headers=headers)).status_code == 200
    assert setup.policy.calls == 3


# -- workload identity ---------------------------------------------------------------------------


def with_client_certificate(app: Any, pem: str) -> Any:
    """What a server that terminates mTLS does: the TLS extension in the scope."""

    async def server(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope = {
            **scope,
            "extensions": {**scope.get("extensions", {}), **tls_scope([pem])["extensions"]},
        }
        await app(scope, receive, send)

    return server


async def test_a_workload_authenticated_by_mtls_alone() -> None:
    setup = Setup(
        workload_identity=WorkloadIdentity(trust_domains=["example.org"]), require_token=False
    )
    prod = with_client_certificate(
        setup.middleware, certificate("spiffe://example.org/ns/prod/job")
    )
    async with setup.client(prod) as client:
        response = await client.get("/reports")
        assert response.status_code == 200
        assert response.json()["workload"] == "spiffe://example.org/ns/prod/job"
        assert (await client.get("/orders/1")).status_code == 403
    dev = with_client_certificate(setup.middleware, certificate("spiffe://example.org/ns/dev/job"))
    async with setup.client(dev) as client:
        assert (await client.get("/reports")).status_code == 403
    async with setup.client() as client:
        assert (await client.get("/reports")).status_code == 401  # no certificate, no token
    assert setup.audited()[0]["workload"] == "spiffe://example.org/ns/prod/job"


async def test_a_token_and_a_workload_together() -> None:
    setup = Setup(workload_identity=WorkloadIdentity())
    app = with_client_certificate(setup.middleware, certificate("spiffe://example.org/ns/web"))
    async with setup.client(app) as client:
        assert (await client.get("/reports")).status_code == 401  # the token is still required
        response = await client.get("/orders/1", headers=setup.bearer())
    assert response.json()["workload"] == "spiffe://example.org/ns/web"


async def test_a_revoked_workload_is_refused_even_with_a_good_token() -> None:
    setup = Setup(workload_identity=WorkloadIdentity())
    app = with_client_certificate(setup.middleware, certificate("spiffe://example.org/ns/web"))
    async with setup.client(app) as client:
        headers = setup.bearer()
        assert (await client.get("/orders/1", headers=headers)).status_code == 200
        setup.revoked.revoke_subject("spiffe://example.org/ns/web")
        assert (await client.get("/orders/1", headers=headers)).status_code == 401


# -- other protocols and raw ASGI ----------------------------------------------------------------


async def call(middleware: ZeroTrustMiddleware, scope: dict[str, Any]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        sent.append(message)

    await middleware(scope, receive, send)
    return sent


async def test_websocket_handshakes_are_guarded(setup: Setup) -> None:
    sent = await call(setup.middleware, {"type": "websocket", "path": "/orders/1", "headers": []})
    assert sent == [{"type": "websocket.close", "code": 1008}]


async def test_lifespan_passes_through(setup: Setup) -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    middleware = Setup(app=app).middleware
    await call(middleware, {"type": "lifespan"})
    assert seen == ["lifespan"]


async def test_a_scope_type_it_cannot_check_never_reaches_the_app(setup: Setup) -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    middleware = Setup(app=app).middleware
    with pytest.raises(RuntimeError, match="webtransport"):
        await call(middleware, {"type": "webtransport", "path": "/orders/1", "headers": []})
    assert seen == []


async def test_paths_with_dot_segments_are_refused(setup: Setup) -> None:
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/orders/../admin/users",
        "headers": [(b"authorization", f"Bearer {setup.issuer.token()}".encode())],
    }
    sent = await call(setup.middleware, scope)
    assert sent[0]["status"] == 400
    assert setup.policy.calls == 0


async def test_paths_with_empty_segments_are_refused() -> None:
    """``//admin/users`` escapes a deny of ``/admin/**``; an app or upstream that merges
    slashes would serve it as ``/admin/users``."""
    reached: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])

    setup = Setup(
        app=app, policy=RulePolicy([allow("all"), deny("no-admin", resources="/admin/**")])
    )
    token = [(b"authorization", f"Bearer {setup.issuer.token()}".encode())]
    for path in ("//admin/users", "/admin//users", "/x/..//admin"):
        sent = await call(
            setup.middleware, {"type": "http", "method": "GET", "path": path, "headers": token}
        )
        assert sent[0]["status"] == 400
    assert reached == []
    await call(
        setup.middleware, {"type": "http", "method": "GET", "path": "/orders/", "headers": token}
    )
    assert reached == ["/orders/"]


# -- bad configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "argument"),
    [
        ({"app": None}, TypeError, "app"),
        ({"validator": "v"}, TypeError, "validator"),
        ({"policy": object()}, TypeError, "policy"),
        ({"audit": "log"}, TypeError, "audit"),
        ({"workload_identity": "spiffe"}, TypeError, "workload_identity"),
        ({"revocation": {"t1"}}, TypeError, "revocation"),
        ({"require_token": 0}, TypeError, "require_token"),
        ({"require_token": False}, ValueError, "workload_identity"),
        ({"cache_ttl": -1}, ValueError, "cache_ttl"),
        ({"cache_ttl": float("nan")}, ValueError, "cache_ttl"),
        ({"cache_size": 0}, ValueError, "cache_size"),
        ({"realm": 'a"b'}, ValueError, "realm"),
        ({"clock": 1.0}, TypeError, "clock"),
    ],
)
def test_bad_options_name_the_argument(
    options: dict[str, Any], error: type[Exception], argument: str
) -> None:
    with pytest.raises(error) as caught:
        Setup(**options)
    message = str(caught.value)
    assert argument in message
    assert message.endswith(".")
