"""The OAuth server through its Python API: the catalogue's Authorize/ExchangeCode, and every
RFC 9700 tightening over Authlib's defaults (PKCE S256 for all, single-use codes whose replay
revokes, refresh rotation with reuse detection, hashed secrets, key rotation), plus bad input."""

from __future__ import annotations

import base64
import dataclasses
import threading
import time
from typing import Any

import buttress
import pytest
from buttress.errors import ButtressError, OAuthError
from buttress.security.oauth import (
    InMemoryOAuthStorage,
    OAuthServer,
    OAuthStorage,
    hash_client_secret,
    verify_client_secret,
)
from joserfc import jwt
from joserfc.jwk import KeySet
from oauth_support import pkce_pair

ISSUER = "https://auth.example"
REDIRECT = "https://app.example/callback"


@pytest.fixture
def server() -> OAuthServer:
    server = OAuthServer(ISSUER, audience="https://api.example", introspection_clients=["api"])
    server.register_client(
        "web", client_secret="web-secret", redirect_uris=[REDIRECT], scopes=["profile", "orders"]
    )
    server.register_client("spa", public=True, redirect_uris=[REDIRECT], scopes=["profile"])
    server.register_client("api", client_secret="api-secret", scopes=["reports"])
    return server


def grant(server: OAuthServer, client_id: str = "web", **extra: Any) -> tuple[str, str]:
    """Authorizes alice for ``client_id``; returns (code, verifier)."""
    verifier, challenge = pkce_pair()
    granted = server.authorize(
        client_id=client_id,
        redirect_uri=REDIRECT,
        subject="alice",
        code_challenge=challenge,
        state="s-1",
        **extra,
    )
    return granted.code, verifier


def exchange(server: OAuthServer, code: str, verifier: str, client_id: str = "web") -> Any:
    secret = "web-secret" if client_id == "web" else None
    return server.exchange_code(
        code=code,
        client_id=client_id,
        client_secret=secret,
        code_verifier=verifier,
        redirect_uri=REDIRECT,
    )


def introspect(server: OAuthServer, token: str) -> dict[str, Any]:
    return server.introspect(token, client_id="api", client_secret="api-secret")


# ---- authorization code + PKCE --------------------------------------------------------------


def test_authorize_returns_code_state_and_issuer(server: OAuthServer) -> None:
    _, challenge = pkce_pair()
    granted = server.authorize(
        client_id="web",
        redirect_uri=REDIRECT,
        subject="alice",
        code_challenge=challenge,
        scope="profile",
        state="xyz",
    )
    assert granted.state == "xyz"
    assert granted.issuer == ISSUER
    assert granted.redirect_to.startswith(REDIRECT + "?code=")
    assert "iss=https%3A%2F%2Fauth.example" in granted.redirect_to


def test_exchange_code_issues_rfc9068_jwt(server: OAuthServer) -> None:
    code, verifier = grant(server, scope="profile")
    tokens = exchange(server, code, verifier)
    assert tokens.token_type == "Bearer"
    assert tokens.scope == "profile"
    assert tokens.refresh_token
    decoded = jwt.decode(
        tokens.access_token, KeySet.import_key_set(server.jwks()), algorithms=["ES256"]
    )
    assert decoded.header["typ"] == "at+jwt"
    assert decoded.header["alg"] == "ES256"
    assert decoded.header["kid"] == server.jwks()["keys"][0]["kid"]
    claims = decoded.claims
    for name in ("iss", "sub", "aud", "exp", "iat", "jti", "client_id", "scope"):
        assert name in claims
    assert claims["iss"] == ISSUER
    assert claims["sub"] == "alice"
    assert claims["aud"] == "https://api.example"
    assert claims["client_id"] == "web"
    assert claims["exp"] - claims["iat"] == server.access_token_lifetime


def test_public_client_exchanges_without_secret(server: OAuthServer) -> None:
    code, verifier = grant(server, "spa")
    tokens = exchange(server, code, verifier, client_id="spa")
    assert tokens.refresh_token


@pytest.mark.parametrize("client_id", ["web", "spa"])
def test_missing_code_challenge_is_refused(server: OAuthServer, client_id: str) -> None:
    pending = server.start_authorization(
        {"response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT, "state": "s"}
    )
    assert not hasattr(pending, "client_id")
    parameters = pending.redirect_parameters()  # type: ignore[union-attr]
    assert parameters["error"] == "invalid_request"
    assert "code_challenge" in parameters["error_description"]
    assert parameters["state"] == "s"
    assert parameters["iss"] == ISSUER


@pytest.mark.parametrize("method", ["plain", "S512"])
def test_other_challenge_methods_are_refused(server: OAuthServer, method: str) -> None:
    with pytest.raises(OAuthError) as caught:
        server.authorize(
            client_id="web",
            redirect_uri=REDIRECT,
            subject="alice",
            code_challenge="x" * 43,
            code_challenge_method=method,
        )
    assert caught.value.error == "invalid_request"
    assert caught.value.redirect_to is not None
    assert caught.value.redirect_to.startswith(REDIRECT)


def test_challenge_without_method_means_plain_and_is_refused(server: OAuthServer) -> None:
    response = server.start_authorization(
        {
            "response_type": "code",
            "client_id": "web",
            "redirect_uri": REDIRECT,
            "code_challenge": "x" * 43,
        }
    )
    assert response.redirect_parameters()["error"] == "invalid_request"  # type: ignore[union-attr]


def test_wrong_verifier_is_invalid_grant_and_leaves_the_code_usable(server: OAuthServer) -> None:
    code, verifier = grant(server)
    with pytest.raises(OAuthError) as caught:
        exchange(server, code, pkce_pair()[0])
    assert caught.value.error == "invalid_grant"
    assert exchange(server, code, verifier).access_token


def test_missing_verifier_is_refused(server: OAuthServer) -> None:
    code, _ = grant(server)
    response = server.token_endpoint(
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "client_id": "web",
            "client_secret": "web-secret",
        }
    )
    assert response.status_code == 400
    assert response.body["error"] == "invalid_request"  # type: ignore[index]


def test_redirect_uri_must_match_exactly(server: OAuthServer) -> None:
    _, challenge = pkce_pair()
    for near_miss in (REDIRECT + "/", REDIRECT + "?x=1", REDIRECT.upper(), "https://evil/cb"):
        response = server.start_authorization(
            {
                "response_type": "code",
                "client_id": "web",
                "redirect_uri": near_miss,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
        # Never redirected to an unregistered URI: a 400 to the user agent instead.
        assert response.status_code == 400, near_miss  # type: ignore[union-attr]
        assert response.location is None  # type: ignore[union-attr]
        assert response.body["error"] == "invalid_request"  # type: ignore[union-attr,index]


def test_token_request_redirect_uri_must_match_the_authorization(server: OAuthServer) -> None:
    code, verifier = grant(server)
    with pytest.raises(OAuthError) as caught:
        server.exchange_code(
            code=code,
            client_id="web",
            client_secret="web-secret",
            code_verifier=verifier,
            redirect_uri="https://app.example/other",
        )
    assert caught.value.error == "invalid_grant"


def test_unknown_scope_is_invalid_scope(server: OAuthServer) -> None:
    with pytest.raises(OAuthError) as caught:
        grant(server, scope="profile admin")
    assert caught.value.error == "invalid_scope"
    assert caught.value.redirect_to is not None


def test_denied_consent_redirects_access_denied(server: OAuthServer) -> None:
    _, challenge = pkce_pair()
    pending = server.start_authorization(
        {
            "response_type": "code",
            "client_id": "web",
            "redirect_uri": REDIRECT,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "state": "st",
        }
    )
    response = server.finish_authorization(pending, None)  # type: ignore[arg-type]
    parameters = response.redirect_parameters()
    assert parameters["error"] == "access_denied"
    assert parameters["state"] == "st"
    assert parameters["iss"] == ISSUER


def test_repeated_parameter_is_invalid_request(server: OAuthServer) -> None:
    response = server.token_endpoint(
        [("grant_type", "client_credentials"), ("grant_type", "client_credentials")]
    )
    assert response.status_code == 400
    assert response.body["error"] == "invalid_request"  # type: ignore[index]


# ---- single-use codes -------------------------------------------------------------------------


def test_replayed_code_is_refused_and_revokes_its_tokens(server: OAuthServer) -> None:
    code, verifier = grant(server)
    tokens = exchange(server, code, verifier)
    assert introspect(server, tokens.access_token)["active"] is True
    with pytest.raises(OAuthError) as caught:
        exchange(server, code, verifier)
    assert caught.value.error == "invalid_grant"
    assert caught.value.status_code == 400
    assert introspect(server, tokens.access_token) == {"active": False}
    assert introspect(server, tokens.refresh_token or "") == {"active": False}
    with pytest.raises(OAuthError):
        server.refresh(
            refresh_token=tokens.refresh_token or "", client_id="web", client_secret="web-secret"
        )


def test_concurrent_redemptions_issue_tokens_once(server: OAuthServer) -> None:
    code, verifier = grant(server)
    outcomes: list[str] = []
    barrier = threading.Barrier(4)

    def redeem() -> None:
        barrier.wait()
        try:
            exchange(server, code, verifier)
            outcomes.append("tokens")
        except OAuthError as error:
            outcomes.append(error.error)

    threads = [threading.Thread(target=redeem) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(outcomes) == ["invalid_grant"] * 3 + ["tokens"]


def test_code_expires(server: OAuthServer) -> None:
    short = OAuthServer(ISSUER, code_lifetime=0.05)
    short.register_client("web", client_secret="s", redirect_uris=[REDIRECT])
    verifier, challenge = pkce_pair()
    code = short.authorize(
        client_id="web", redirect_uri=REDIRECT, subject="alice", code_challenge=challenge
    ).code
    time.sleep(0.1)
    with pytest.raises(OAuthError) as caught:
        short.exchange_code(
            code=code,
            client_id="web",
            client_secret="s",
            code_verifier=verifier,
            redirect_uri=REDIRECT,
        )
    assert caught.value.error == "invalid_grant"
    assert "expired" in caught.value.description


def test_code_of_another_client_is_invalid_grant(server: OAuthServer) -> None:
    server.register_client("other", client_secret="o", redirect_uris=[REDIRECT])
    code, verifier = grant(server)
    with pytest.raises(OAuthError) as caught:
        server.exchange_code(
            code=code,
            client_id="other",
            client_secret="o",
            code_verifier=verifier,
            redirect_uri=REDIRECT,
        )
    assert caught.value.error == "invalid_grant"


# ---- refresh rotation -------------------------------------------------------------------------


@pytest.mark.parametrize("client_id", ["web", "spa"])
def test_refresh_rotates_and_reuse_revokes_the_family(server: OAuthServer, client_id: str) -> None:
    secret = "web-secret" if client_id == "web" else None
    code, verifier = grant(server, client_id)
    first = exchange(server, code, verifier, client_id=client_id)
    second = server.refresh(
        refresh_token=first.refresh_token or "", client_id=client_id, client_secret=secret
    )
    assert second.refresh_token
    assert second.refresh_token != first.refresh_token
    assert introspect(server, first.refresh_token or "") == {"active": False}
    assert introspect(server, second.access_token)["active"] is True
    # The old refresh token again: reuse. Everything of the grant dies, the newest included.
    with pytest.raises(OAuthError) as caught:
        server.refresh(
            refresh_token=first.refresh_token or "", client_id=client_id, client_secret=secret
        )
    assert caught.value.error == "invalid_grant"
    for token in (first.access_token, second.access_token, second.refresh_token):
        assert introspect(server, token) == {"active": False}
    with pytest.raises(OAuthError):
        server.refresh(
            refresh_token=second.refresh_token, client_id=client_id, client_secret=secret
        )


def test_refresh_may_narrow_scope_but_not_widen_it(server: OAuthServer) -> None:
    code, verifier = grant(server, scope="profile orders")
    first = exchange(server, code, verifier)
    narrow = server.refresh(
        refresh_token=first.refresh_token or "",
        client_id="web",
        client_secret="web-secret",
        scope="profile",
    )
    assert narrow.scope == "profile"
    # The rotated refresh token keeps the grant's scope.
    assert introspect(server, narrow.refresh_token or "")["scope"] == "profile orders"
    with pytest.raises(OAuthError) as caught:
        server.refresh(
            refresh_token=narrow.refresh_token or "",
            client_id="web",
            client_secret="web-secret",
            scope="profile admin",
        )
    assert caught.value.error == "invalid_scope"


def test_refresh_token_of_another_client_is_invalid_grant(server: OAuthServer) -> None:
    code, verifier = grant(server)
    tokens = exchange(server, code, verifier)
    with pytest.raises(OAuthError) as caught:
        server.refresh(refresh_token=tokens.refresh_token or "", client_id="spa")
    assert caught.value.error == "invalid_grant"


# ---- client authentication, client credentials ----------------------------------------------


def test_client_secrets_are_stored_hashed(server: OAuthServer) -> None:
    record = server.storage.get_client("web")
    assert record is not None
    assert record.secret_hash is not None
    assert "web-secret" not in record.secret_hash
    assert record.secret_hash.startswith("scrypt$")
    assert verify_client_secret("web-secret", record.secret_hash)
    assert not verify_client_secret("web-secreT", record.secret_hash)
    assert hash_client_secret("x") != hash_client_secret("x")  # salted


def test_damaged_secret_hash_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="damaged"):
        verify_client_secret("x", "md5$abc")


def test_bad_client_secret_is_401_invalid_client(server: OAuthServer) -> None:
    with pytest.raises(OAuthError) as caught:
        server.client_credentials(client_id="api", client_secret="wrong")
    assert caught.value.error == "invalid_client"
    assert caught.value.status_code == 401


def test_client_credentials(server: OAuthServer) -> None:
    tokens = server.client_credentials(client_id="api", client_secret="api-secret")
    assert tokens.refresh_token is None
    assert tokens.scope == "reports"
    claims = jwt.decode(
        tokens.access_token, KeySet.import_key_set(server.jwks()), algorithms=["ES256"]
    ).claims
    assert claims["sub"] == "api"
    assert claims["client_id"] == "api"


def test_public_client_cannot_use_client_credentials(server: OAuthServer) -> None:
    response = server.token_endpoint({"grant_type": "client_credentials", "client_id": "spa"})
    assert response.status_code == 401
    assert response.body["error"] == "invalid_client"  # type: ignore[index]


def test_client_credentials_unknown_scope(server: OAuthServer) -> None:
    with pytest.raises(OAuthError) as caught:
        server.client_credentials(client_id="api", client_secret="api-secret", scope="admin")
    assert caught.value.error == "invalid_scope"


def test_unsupported_grant_type(server: OAuthServer) -> None:
    response = server.token_endpoint(
        {"grant_type": "password", "username": "a", "password": "b"}, {}
    )
    assert response.status_code == 400
    assert response.body["error"] == "unsupported_grant_type"  # type: ignore[index]


def test_malformed_basic_credentials_are_invalid_client(server: OAuthServer) -> None:
    response = server.token_endpoint(
        {"grant_type": "client_credentials"}, {"Authorization": "Basic ÿÿ-not-base64"}
    )
    assert response.status_code == 401
    assert response.body["error"] == "invalid_client"  # type: ignore[index]


@pytest.mark.parametrize("header", ["Basic ", "basic  ", "Basic \t", " Basic", "Bearer "])
def test_authorization_scheme_without_credentials_is_invalid_client(
    server: OAuthServer, header: str
) -> None:
    # A scheme with nothing after it once reached Authlib's header split and raised (a 500).
    for response in (
        server.token_endpoint({"grant_type": "client_credentials"}, {"Authorization": header}),
        server.revocation_endpoint({"token": "x"}, {"Authorization": header}),
        server.introspection_endpoint({"token": "x"}, {"Authorization": header}),
    ):
        assert response.status_code == 401
        assert response.body["error"] == "invalid_client"  # type: ignore[index]


def test_two_client_authentication_methods_are_refused(server: OAuthServer) -> None:
    # RFC 6749 section 2.3: one authentication method per request.
    basic = {"Authorization": "Basic " + base64.b64encode(b"api:api-secret").decode()}
    both = server.token_endpoint(
        {"grant_type": "client_credentials", "client_id": "api", "client_secret": "api-secret"},
        basic,
    )
    assert both.status_code == 400
    assert both.body["error"] == "invalid_request"  # type: ignore[index]
    # A form client_id naming another client than the Basic credentials is not silently
    # ignored: the token would be issued to a client the request did not name.
    other = server.token_endpoint({"grant_type": "client_credentials", "client_id": "web"}, basic)
    assert other.status_code == 400
    assert other.body["error"] == "invalid_request"  # type: ignore[index]
    same = server.token_endpoint({"grant_type": "client_credentials", "client_id": "api"}, basic)
    assert same.status_code == 200


# ---- revocation, introspection ---------------------------------------------------------------


def test_introspection_of_an_active_access_token(server: OAuthServer) -> None:
    code, verifier = grant(server, scope="profile")
    tokens = exchange(server, code, verifier)
    info = introspect(server, tokens.access_token)
    assert info["active"] is True
    assert info["sub"] == "alice"
    assert info["client_id"] == "web"
    assert info["scope"] == "profile"
    assert info["iss"] == ISSUER
    assert info["aud"] == "https://api.example"
    assert info["token_type"] == "Bearer"


def test_only_named_resource_servers_introspect_other_clients_tokens(server: OAuthServer) -> None:
    server.register_client("batch", client_secret="batch-secret", scopes=["reports"])
    code, verifier = grant(server, scope="profile")
    tokens = exchange(server, code, verifier)
    # RFC 7662 section 4: a client that is not a named resource server learns nothing of
    # another client's token, not even that it exists.
    for token in (tokens.access_token, tokens.refresh_token):
        assert server.introspect(token or "", client_id="batch", client_secret="batch-secret") == {
            "active": False
        }
        assert server.introspect(token or "", client_id="api", client_secret="api-secret")["active"]
    # A client may always ask about its own tokens.
    assert server.introspect(tokens.access_token, client_id="web", client_secret="web-secret")[
        "active"
    ]
    own = server.client_credentials(client_id="batch", client_secret="batch-secret")
    assert server.introspect(own.access_token, client_id="batch", client_secret="batch-secret")[
        "active"
    ]


def test_introspection_clients_must_be_a_collection_of_ids() -> None:
    with pytest.raises(TypeError, match="introspection_clients"):
        OAuthServer(ISSUER, introspection_clients="api")
    with pytest.raises(TypeError, match="introspection_clients"):
        OAuthServer(ISSUER, introspection_clients=[7])  # type: ignore[list-item]


def test_introspection_needs_an_authenticated_client(server: OAuthServer) -> None:
    response = server.introspection_endpoint({"token": "x", "client_id": "spa"})
    assert response.status_code == 401
    assert response.body["error"] == "invalid_client"  # type: ignore[index]


def test_revoking_an_access_token(server: OAuthServer) -> None:
    code, verifier = grant(server)
    tokens = exchange(server, code, verifier)
    server.revoke(tokens.access_token, client_id="web", client_secret="web-secret")
    assert introspect(server, tokens.access_token) == {"active": False}
    assert server.token_is_active(tokens.refresh_token or "")


def test_revoking_a_refresh_token_ends_the_grant(server: OAuthServer) -> None:
    code, verifier = grant(server, "spa")
    tokens = exchange(server, code, verifier, client_id="spa")
    server.revoke(tokens.refresh_token or "", client_id="spa", token_type_hint="refresh_token")
    assert not server.token_is_active(tokens.access_token)
    assert not server.token_is_active(tokens.refresh_token or "")


def test_revoking_an_unknown_token_succeeds(server: OAuthServer) -> None:
    server.revoke("never-issued", client_id="web", client_secret="web-secret")


def test_unknown_token_type_hint_is_a_400(server: OAuthServer) -> None:
    # RFC 7009 section 2.2.1: unsupported_token_type is an RFC 6749 section 5.2 error (400); a
    # 401 would also need a WWW-Authenticate challenge the client cannot answer.
    auth = {"token": "x", "token_type_hint": "id_token", "client_id": "api"}
    for response in (
        server.revocation_endpoint({**auth, "client_secret": "api-secret"}),
        server.introspection_endpoint({**auth, "client_secret": "api-secret"}),
    ):
        assert response.status_code == 400
        assert response.body["error"] == "unsupported_token_type"  # type: ignore[index]


# ---- metadata and keys ----------------------------------------------------------------------


def test_metadata(server: OAuthServer) -> None:
    metadata = server.metadata()
    assert metadata["issuer"] == ISSUER
    assert metadata["code_challenge_methods_supported"] == ["S256"]
    assert metadata["authorization_response_iss_parameter_supported"] is True
    assert metadata["jwks_uri"] == ISSUER + "/jwks"
    assert server.metadata_url == ISSUER + "/.well-known/oauth-authorization-server"


def test_key_rotation_keeps_the_old_key_until_its_tokens_expire() -> None:
    server = OAuthServer(ISSUER, access_token_lifetime=1, key_publication_delay=0)
    server.register_client("api", client_secret="s")
    before = server.client_credentials(client_id="api", client_secret="s").access_token
    old_kid = server.jwks()["keys"][0]["kid"]
    new_kid = server.rotate_signing_key()
    after = server.client_credentials(client_id="api", client_secret="s").access_token
    keys = KeySet.import_key_set(server.jwks())
    assert jwt.decode(before, keys).header["kid"] == old_kid
    assert jwt.decode(after, keys).header["kid"] == new_kid
    assert [key["kid"] for key in server.jwks()["keys"]] == [old_kid, new_kid]
    for key in server.jwks()["keys"]:
        assert "d" not in key  # public halves only
    # Retired keys stay for the token lifetime plus the clock-skew allowance; jump past it.
    for record in server.storage.signing_keys():
        if record.kid == old_kid:
            assert record.retire_at is not None
            assert record.retire_at <= time.time() + 1 + 60
    server.storage.purge(time.time() + 62)
    assert [key["kid"] for key in server.jwks()["keys"]] == [new_kid]


def test_a_new_key_is_published_before_it_signs(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    server = OAuthServer(ISSUER, access_token_lifetime=600, key_publication_delay=300)
    server.register_client("api", client_secret="s")

    def signer() -> str:
        token = server.client_credentials(client_id="api", client_secret="s").access_token
        return str(jwt.decode(token, KeySet.import_key_set(server.jwks())).header["kid"])

    first = signer()  # the first key signs at once: nothing was signed before it
    now[0] += 10
    second = server.rotate_signing_key()
    # Published at once, so a resource server refreshing its cached JWKS learns it ...
    assert [key["kid"] for key in server.jwks()["keys"]] == [first, second]
    # ... but it signs only once every cached JWKS (max-age 300) can hold it.
    now[0] += 299
    assert signer() == first
    now[0] += 2
    assert signer() == second
    # The old key signed until then, so it stays until its last token has expired.
    retire_at = {r.kid: r.retire_at for r in server.storage.signing_keys()}[first]
    assert retire_at == 1_000_000.0 + 10 + 300 + 600 + 60
    # Two rotations in a row: each key signs in turn, none before it was published 300 s.
    third = server.rotate_signing_key()
    now[0] += 1
    fourth = server.rotate_signing_key()
    assert signer() == second
    now[0] += 300
    assert signer() == fourth
    assert third in [key["kid"] for key in server.jwks()["keys"]]


def test_key_publication_delay_is_checked() -> None:
    with pytest.raises(TypeError, match="key_publication_delay"):
        OAuthServer(ISSUER, key_publication_delay="300")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key_publication_delay"):
        OAuthServer(ISSUER, key_publication_delay=-1)


# ---- storage ---------------------------------------------------------------------------------


def test_in_memory_storage_is_an_oauth_storage() -> None:
    assert isinstance(InMemoryOAuthStorage(), OAuthStorage)


def test_purge_drops_expired_tokens(server: OAuthServer) -> None:
    tokens = server.client_credentials(client_id="api", client_secret="api-secret")
    assert server.storage.purge(time.time()) == 0
    assert server.storage.purge(time.time() + server.access_token_lifetime + 1) >= 1
    assert not server.token_is_active(tokens.access_token)


def test_errors_are_buttress_errors() -> None:
    assert issubclass(OAuthError, ButtressError)
    error = OAuthError("invalid_grant", "The code was already used.", 400, None)
    assert str(error) == "invalid_grant: The code was already used."


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "kind", "argument"),
    [
        ({"issuer": 5}, TypeError, "issuer"),
        ({"issuer": "ftp://auth.example"}, ValueError, "issuer"),
        ({"issuer": "http://auth.example"}, ValueError, "issuer"),
        ({"issuer": "https://auth.example?x=1"}, ValueError, "issuer"),
        ({"storage": {}}, TypeError, "storage"),
        ({"audience": 3}, TypeError, "audience"),
        ({"scopes_supported": "read"}, TypeError, "scopes_supported"),
        ({"scopes_supported": ["a b"]}, ValueError, "scopes_supported"),
        ({"access_token_lifetime": 1.5}, TypeError, "access_token_lifetime"),
        ({"access_token_lifetime": True}, TypeError, "access_token_lifetime"),
        ({"access_token_lifetime": 0}, ValueError, "access_token_lifetime"),
        ({"refresh_token_lifetime": -1}, ValueError, "refresh_token_lifetime"),
        ({"code_lifetime": "60"}, TypeError, "code_lifetime"),
        ({"code_lifetime": 3600}, ValueError, "code_lifetime"),
    ],
)
def test_bad_server_arguments(kwargs: dict[str, Any], kind: type[Exception], argument: str) -> None:
    arguments: dict[str, Any] = {"issuer": ISSUER, **kwargs}
    with pytest.raises(kind) as caught:
        OAuthServer(**arguments)
    message = str(caught.value)
    assert argument in message
    assert message.endswith((".", ").")), message


@pytest.mark.parametrize(
    ("kwargs", "kind", "argument"),
    [
        ({"client_id": 7}, TypeError, "client_id"),
        ({"client_id": ""}, ValueError, "client_id"),
        ({"public": "yes"}, TypeError, "public"),
        ({"public": True, "client_secret": "s"}, ValueError, "client_secret"),
        ({"client_secret": None}, ValueError, "client_secret"),
        ({"redirect_uris": "https://a/cb"}, TypeError, "redirect_uris"),
        ({"redirect_uris": ["/relative"]}, ValueError, "redirect_uris"),
        ({"redirect_uris": ["https://a/cb#frag"]}, ValueError, "redirect_uris"),
        ({"redirect_uris": ["http://evil.example/cb"]}, ValueError, "redirect_uris"),
        ({"redirect_uris": []}, ValueError, "redirect_uris"),
        ({"scopes": [1]}, TypeError, "scopes"),
        ({"grant_types": ["password"]}, ValueError, "grant_types"),
        (
            {"public": True, "client_secret": None, "grant_types": ["client_credentials"]},
            ValueError,
            "client_credentials",
        ),
    ],
)
def test_bad_client_registrations(
    kwargs: dict[str, Any], kind: type[Exception], argument: str
) -> None:
    server = OAuthServer(ISSUER)
    arguments: dict[str, Any] = {
        "client_id": "c",
        "client_secret": "s",
        "redirect_uris": ["https://a/cb"],
        "grant_types": ["authorization_code"],
        **kwargs,
    }
    client_id = arguments.pop("client_id")
    with pytest.raises(kind) as caught:
        server.register_client(client_id, **arguments)
    assert argument in str(caught.value)
    assert str(caught.value)[0].isupper() or str(caught.value).startswith(argument)


def test_bad_python_api_arguments(server: OAuthServer) -> None:
    with pytest.raises(TypeError, match="code must be a str"):
        server.exchange_code(code=1, client_id="web", code_verifier="v" * 43)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="subject must be a str"):
        server.authorize(
            client_id="web",
            redirect_uri=REDIRECT,
            subject=None,  # type: ignore[arg-type]
            code_challenge="c" * 43,
        )
    with pytest.raises(ValueError, match="subject"):
        server.authorize(client_id="web", redirect_uri=REDIRECT, subject="", code_challenge="c")
    with pytest.raises(TypeError, match="request must be the AuthorizationRequest"):
        server.finish_authorization("nope", "alice")  # type: ignore[arg-type]


# ---- remembered secrets ------------------------------------------------------------------------


def test_a_verified_secret_costs_one_scrypt_and_a_wrong_one_a_scrypt_every_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from buttress.security.oauth import client_secrets

    scrypts: list[str] = []
    real = client_secrets.verify_client_secret

    def counting(secret: str, stored_hash: str) -> bool:
        scrypts.append(secret)
        return real(secret, stored_hash)

    monkeypatch.setattr(client_secrets, "verify_client_secret", counting)
    server = OAuthServer("https://auth.example")
    server.register_client("batch", client_secret="right-secret", scopes=["reports"])
    for _ in range(3):
        assert server.client_credentials(client_id="batch", client_secret="right-secret")
    assert scrypts == ["right-secret"]
    for _ in range(2):
        with pytest.raises(OAuthError) as refused:
            server.client_credentials(client_id="batch", client_secret="wrong-secret")
        assert refused.value.error == "invalid_client"
    assert scrypts == ["right-secret", "wrong-secret", "wrong-secret"]
    # Registered again with another secret: the old one is refused, and never from memory.
    server.register_client("batch", client_secret="new-secret", scopes=["reports"])
    with pytest.raises(OAuthError):
        server.client_credentials(client_id="batch", client_secret="right-secret")
    assert server.client_credentials(client_id="batch", client_secret="new-secret")
    assert scrypts[-2:] == ["right-secret", "new-secret"]


def test_remembered_secrets_are_bounded_and_check_their_arguments() -> None:
    from buttress.security.oauth import VerifiedSecrets, hash_client_secret

    remembered = VerifiedSecrets(max_entries=2)
    hashes = [hash_client_secret(f"secret-{n}") for n in range(3)]
    for n, stored in enumerate(hashes):
        assert remembered.verify(f"secret-{n}", stored)
    assert len(remembered._known) == 2
    assert hashes[0] not in remembered._known
    assert not remembered.verify("\ud800", hashes[1])  # not valid text: no match, no error
    with pytest.raises(ValueError, match="max_entries"):
        VerifiedSecrets(max_entries=0)
    with pytest.raises(TypeError, match="max_entries"):
        VerifiedSecrets(max_entries="9")  # type: ignore[arg-type]


def test_signing_keys_can_be_sealed_before_they_are_stored() -> None:
    from buttress.security.zerotrust import FieldEncryptor, KeyRing

    ring = KeyRing.generate("kek-1")
    server = OAuthServer(ISSUER, key_encryptor=FieldEncryptor(ring), key_publication_delay=0)
    server.register_client("api", client_secret="s")
    token = server.client_credentials(client_id="api", client_secret="s").access_token
    (record,) = server.storage.signing_keys()
    assert "d" not in record.private_jwk
    assert jwt.decode(token, KeySet.import_key_set(server.jwks())).header["kid"] == record.kid
    # The KEK rotates; the sealed key still opens, and new keys are sealed with the new KEK.
    ring.rotate("kek-2")
    server.rotate_signing_key()
    assert server.client_credentials(client_id="api", client_secret="s").access_token
    # A sealed key moved to another record (another kid) does not open.
    moved = dataclasses.replace(record, kid="someone-else")
    fresh = OAuthServer(ISSUER, key_encryptor=FieldEncryptor(ring))
    fresh.storage.save_signing_key(moved)
    with pytest.raises(buttress.FieldDecryptionError):
        fresh.jwks()
    with pytest.raises(TypeError, match="key_encryptor"):
        OAuthServer(ISSUER, key_encryptor=ring)  # type: ignore[arg-type]
