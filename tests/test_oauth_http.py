"""The OAuth server over real HTTP on 127.0.0.1 (uvicorn in a thread), driven by clients nobody
here wrote: Authlib's and requests-oauthlib's OAuth2Session, plus plain requests for the
negative cases, the development server's /me, and the ``serve`` command in a subprocess."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from authlib.common.security import generate_token
from authlib.integrations.requests_client import OAuth2Session as AuthlibSession
from buttress.security.oauth import OAuthServer, ResourceServer, create_dev_app
from joserfc import jwt
from joserfc.jwk import KeySet
from oauth_support import live_app, pkce_pair
from requests_oauthlib import OAuth2Session as OAuthlibSession
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

REDIRECT = "http://127.0.0.1:1/callback"
TIMEOUT = 10


class Live:
    """The running development server: its URLs and the OAuthServer behind it."""

    def __init__(self, base: str, server: OAuthServer) -> None:
        self.base = base
        self.server = server
        self.metadata: dict[str, Any] = requests.get(
            base + "/.well-known/oauth-authorization-server", timeout=TIMEOUT
        ).json()
        self.authorize = self.metadata["authorization_endpoint"]
        self.token = self.metadata["token_endpoint"]
        self.revoke = self.metadata["revocation_endpoint"]
        self.introspect_url = self.metadata["introspection_endpoint"]

    def introspect(self, token: str) -> dict[str, Any]:
        response = requests.post(
            self.introspect_url,
            data={"token": token},
            auth=("resource", "resource-secret"),
            timeout=TIMEOUT,
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def me(self, access_token: str | None) -> requests.Response:
        headers = {} if access_token is None else {"Authorization": f"Bearer {access_token}"}
        return requests.get(self.base + "/me", headers=headers, timeout=TIMEOUT)


def dev_config(issuer: str) -> dict[str, Any]:
    return {
        "issuer": issuer,
        "dev_user": "alice",
        "access_token_lifetime": 300,
        "clients": [
            {
                "client_id": "web",
                "client_secret": "web-secret",
                "redirect_uris": [REDIRECT],
                "scopes": ["profile", "orders"],
            },
            {
                "client_id": "spa",
                "public": True,
                "redirect_uris": [REDIRECT],
                "scopes": ["profile"],
            },
            {"client_id": "resource", "client_secret": "resource-secret"},
            {"client_id": "batch", "client_secret": "batch-secret", "scopes": ["reports"]},
        ],
        "introspection_clients": ["resource"],
        # The rotation test wants the new key to sign at once.
        "key_publication_delay": 0,
    }


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    holder: dict[str, Starlette] = {}

    def make(base: str) -> Starlette:
        holder["app"] = create_dev_app(dev_config(base))
        return holder["app"]

    with live_app(make) as base:
        yield Live(base, holder["app"].state.oauth_server)


def location_parameters(response: requests.Response) -> dict[str, str]:
    assert response.status_code == 302, response.text
    query = parse_qs(urlsplit(response.headers["location"]).query)
    return {name: values[0] for name, values in query.items()}


# ---- Authlib's client -----------------------------------------------------------------------


def test_authlib_client_code_pkce_refresh_revoke(live: Live) -> None:
    with AuthlibSession(
        "web",
        "web-secret",
        scope="profile orders",
        redirect_uri=REDIRECT,
        code_challenge_method="S256",
    ) as client:
        verifier = generate_token(48)
        url, state = client.create_authorization_url(live.authorize, code_verifier=verifier)
        redirect = requests.get(url, allow_redirects=False, timeout=TIMEOUT)
        parameters = location_parameters(redirect)
        assert parameters["state"] == state
        assert parameters["iss"] == live.server.issuer
        token = client.fetch_token(
            live.token,
            authorization_response=redirect.headers["location"],
            code_verifier=verifier,
        )
        assert token["token_type"] == "Bearer"
        assert token["scope"] == "profile orders"
        me = live.me(token["access_token"])
        assert me.status_code == 200
        assert me.json() == {"sub": "alice", "scope": "orders profile", "client_id": "web"}

        refreshed = client.refresh_token(live.token, refresh_token=token["refresh_token"])
        assert refreshed["refresh_token"] != token["refresh_token"]
        assert live.introspect(token["refresh_token"]) == {"active": False}

        revoked = client.revoke_token(
            live.revoke, token=refreshed["refresh_token"], token_type_hint="refresh_token"
        )
        assert revoked.status_code == 200
        assert live.introspect(refreshed["refresh_token"]) == {"active": False}
        assert live.introspect(refreshed["access_token"]) == {"active": False}
        assert live.me(refreshed["access_token"]).status_code == 401


def test_authlib_public_client_refreshes(live: Live) -> None:
    with AuthlibSession(
        "spa",
        token_endpoint_auth_method="none",
        scope="profile",
        redirect_uri=REDIRECT,
        code_challenge_method="S256",
    ) as client:
        verifier = generate_token(48)
        url, _ = client.create_authorization_url(live.authorize, code_verifier=verifier)
        redirect = requests.get(url, allow_redirects=False, timeout=TIMEOUT)
        token = client.fetch_token(
            live.token,
            authorization_response=redirect.headers["location"],
            code_verifier=verifier,
        )
        refreshed = client.refresh_token(live.token, refresh_token=token["refresh_token"])
        assert live.introspect(refreshed["access_token"])["active"] is True
        assert live.me(refreshed["access_token"]).json()["sub"] == "alice"


def test_authlib_client_credentials(live: Live) -> None:
    with AuthlibSession("batch", "batch-secret", scope="reports") as client:
        token = client.fetch_token(live.token, grant_type="client_credentials")
    assert "refresh_token" not in token
    info = live.introspect(token["access_token"])
    assert info["active"] is True
    assert info["client_id"] == "batch"
    assert info["sub"] == "batch"
    assert info["scope"] == "reports"


# ---- requests-oauthlib --------------------------------------------------------------------------


def test_requests_oauthlib_code_pkce_refresh_revoke(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    # oauthlib refuses http URLs unless told; the server itself is on loopback http.
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")
    with OAuthlibSession("web", redirect_uri=REDIRECT, scope=["profile"], pkce="S256") as session:
        url, state = session.authorization_url(live.authorize)
        redirect = requests.get(url, allow_redirects=False, timeout=TIMEOUT)
        assert location_parameters(redirect)["state"] == state
        token = session.fetch_token(
            live.token,
            authorization_response=redirect.headers["location"],
            client_secret="web-secret",
            include_client_id=True,
        )
        assert session.get(live.base + "/me", timeout=TIMEOUT).json()["sub"] == "alice"
        refreshed = session.refresh_token(live.token, auth=("web", "web-secret"))
        assert refreshed["access_token"] != token["access_token"]
        assert live.introspect(token["refresh_token"]) == {"active": False}
        response = session.post(
            live.revoke,
            data={"token": refreshed["refresh_token"], "token_type_hint": "refresh_token"},
            auth=("web", "web-secret"),
            withhold_token=True,
            timeout=TIMEOUT,
        )
        assert response.status_code == 200
        assert live.introspect(refreshed["access_token"]) == {"active": False}


# ---- the refusals, over HTTP -------------------------------------------------------------------


def test_missing_pkce_is_refused(live: Live) -> None:
    response = requests.get(
        live.authorize,
        params={
            "response_type": "code",
            "client_id": "web",
            "redirect_uri": REDIRECT,
            "state": "q",
        },
        allow_redirects=False,
        timeout=TIMEOUT,
    )
    parameters = location_parameters(response)
    assert parameters["error"] == "invalid_request"
    assert parameters["state"] == "q"
    assert parameters["iss"] == live.server.issuer


def test_plain_pkce_is_refused(live: Live) -> None:
    verifier, _ = pkce_pair()
    response = requests.get(
        live.authorize,
        params={
            "response_type": "code",
            "client_id": "spa",
            "redirect_uri": REDIRECT,
            "code_challenge": verifier,
            "code_challenge_method": "plain",
        },
        allow_redirects=False,
        timeout=TIMEOUT,
    )
    assert location_parameters(response)["error"] == "invalid_request"


def test_wrong_redirect_uri_is_not_followed(live: Live) -> None:
    _, challenge = pkce_pair()
    response = requests.get(
        live.authorize,
        params={
            "response_type": "code",
            "client_id": "web",
            "redirect_uri": "http://127.0.0.1:1/callback/../evil",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        },
        allow_redirects=False,
        timeout=TIMEOUT,
    )
    assert response.status_code == 400
    assert "location" not in response.headers
    assert response.json()["error"] == "invalid_request"


def test_replayed_code_is_refused_and_its_tokens_revoked(live: Live) -> None:
    verifier, challenge = pkce_pair()
    response = requests.get(
        live.authorize,
        params={
            "response_type": "code",
            "client_id": "web",
            "redirect_uri": REDIRECT,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        },
        allow_redirects=False,
        timeout=TIMEOUT,
    )
    code = location_parameters(response)["code"]
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "code_verifier": verifier,
    }
    first = requests.post(live.token, data=form, auth=("web", "web-secret"), timeout=TIMEOUT)
    assert first.status_code == 200
    tokens = first.json()
    assert first.headers["cache-control"] == "no-store"
    again = requests.post(live.token, data=form, auth=("web", "web-secret"), timeout=TIMEOUT)
    assert again.status_code == 400
    assert again.json()["error"] == "invalid_grant"
    assert live.introspect(tokens["access_token"]) == {"active": False}
    assert live.introspect(tokens["refresh_token"]) == {"active": False}
    assert live.me(tokens["access_token"]).status_code == 401


def test_reused_refresh_token_revokes_the_family(live: Live) -> None:
    verifier, challenge = pkce_pair()
    granted = live.server.authorize(
        client_id="spa", redirect_uri=REDIRECT, subject="alice", code_challenge=challenge
    )
    first = requests.post(
        live.token,
        data={
            "grant_type": "authorization_code",
            "code": granted.code,
            "redirect_uri": REDIRECT,
            "code_verifier": verifier,
            "client_id": "spa",
        },
        timeout=TIMEOUT,
    ).json()
    refresh = {"grant_type": "refresh_token", "client_id": "spa"}
    second = requests.post(
        live.token, data={**refresh, "refresh_token": first["refresh_token"]}, timeout=TIMEOUT
    ).json()
    reuse = requests.post(
        live.token, data={**refresh, "refresh_token": first["refresh_token"]}, timeout=TIMEOUT
    )
    assert reuse.status_code == 400
    assert reuse.json()["error"] == "invalid_grant"
    assert live.introspect(second["access_token"]) == {"active": False}
    assert live.introspect(second["refresh_token"]) == {"active": False}
    after = requests.post(
        live.token, data={**refresh, "refresh_token": second["refresh_token"]}, timeout=TIMEOUT
    )
    assert after.json()["error"] == "invalid_grant"


def test_bad_client_secret_is_401_with_www_authenticate(live: Live) -> None:
    response = requests.post(
        live.token,
        data={"grant_type": "client_credentials"},
        auth=("batch", "wrong"),
        timeout=TIMEOUT,
    )
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"
    assert response.headers["www-authenticate"].startswith("Basic ")


def test_unsupported_grant_type_and_wrong_content_type(live: Live) -> None:
    response = requests.post(live.token, data={"grant_type": "password"}, timeout=TIMEOUT)
    assert response.status_code == 400
    assert response.json()["error"] == "unsupported_grant_type"
    as_json = requests.post(live.token, json={"grant_type": "client_credentials"}, timeout=10)
    assert as_json.status_code == 400
    assert as_json.json()["error"] == "invalid_request"


def test_introspection_refuses_public_clients(live: Live) -> None:
    response = requests.post(
        live.introspect_url, data={"token": "x", "client_id": "spa"}, timeout=TIMEOUT
    )
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


# ---- metadata, keys, the resource side --------------------------------------------------------


def test_metadata_document(live: Live) -> None:
    metadata = live.metadata
    assert metadata["issuer"] == live.base
    assert metadata["code_challenge_methods_supported"] == ["S256"]
    assert metadata["response_types_supported"] == ["code"]
    assert "client_credentials" in metadata["grant_types_supported"]


def test_jwks_and_rotation_over_http(live: Live) -> None:
    token = live.server.client_credentials(client_id="batch", client_secret="batch-secret")
    before = requests.get(live.metadata["jwks_uri"], timeout=TIMEOUT).json()["keys"]
    new_kid = live.server.rotate_signing_key()
    after = requests.get(live.metadata["jwks_uri"], timeout=TIMEOUT).json()["keys"]
    assert [key["kid"] for key in after] == [key["kid"] for key in before] + [new_kid]
    assert all("d" not in key for key in after)
    fresh = live.server.client_credentials(client_id="batch", client_secret="batch-secret")
    keys = KeySet.import_key_set({"keys": after})
    assert jwt.decode(fresh.access_token, keys).header["kid"] == new_kid
    assert jwt.decode(token.access_token, keys).header["kid"] != new_kid
    # A token signed with the old key still opens /me.
    assert live.me(token.access_token).status_code == 200
    assert live.me(fresh.access_token).status_code == 200


def test_me_without_token_is_a_bare_bearer_challenge(live: Live) -> None:
    response = live.me(None)
    assert response.status_code == 401
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert "error=" not in challenge


def test_me_with_a_bad_token_is_invalid_token(live: Live) -> None:
    response = live.me("not.a.token")
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    malformed = requests.get(
        live.base + "/me", headers={"Authorization": "Bearer"}, timeout=TIMEOUT
    )
    assert malformed.status_code == 400
    assert 'error="invalid_request"' in malformed.headers["www-authenticate"]


def test_resource_server_checks_tokens_against_the_remote_jwks(live: Live) -> None:
    """A separate API validating locally against the issuer's published JWKS."""
    resource = ResourceServer(
        issuer=live.server.issuer, audience=live.server.issuer, jwks=live.metadata["jwks_uri"]
    )

    async def orders(request: Request, token: Any) -> Response:
        return JSONResponse({"sub": token.subject})

    api = Starlette(routes=[Route("/orders", resource.protect(orders, scopes=["orders"]))])
    code_token = live.server.client_credentials(client_id="batch", client_secret="batch-secret")
    with live_app(lambda base: api) as api_base:
        denied = requests.get(
            api_base + "/orders",
            headers={"Authorization": f"Bearer {code_token.access_token}"},
            timeout=TIMEOUT,
        )
        assert denied.status_code == 403
        assert 'error="insufficient_scope"' in denied.headers["www-authenticate"]
        verified = resource.validate(code_token.access_token)
        assert verified.client_id == "batch"


# ---- the serve command ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_serve_command(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = tmp_path / "oauth.json"
    config.write_text(json.dumps(dev_config(base)))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "buttress.security.oauth",
            "serve",
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                metadata = requests.get(
                    base + "/.well-known/oauth-authorization-server", timeout=1
                ).json()
                break
            except requests.ConnectionError:
                assert process.poll() is None, process.communicate()[1].decode()
                assert time.monotonic() < deadline, "the serve command did not start"
                time.sleep(0.1)
        assert metadata["issuer"] == base
        basic = base64.b64encode(b"batch:batch-secret").decode()
        token = requests.post(
            metadata["token_endpoint"],
            data={"grant_type": "client_credentials"},
            headers={"Authorization": f"Basic {basic}"},
            timeout=TIMEOUT,
        ).json()
        me = requests.get(
            base + "/me",
            headers={"Authorization": f"Bearer {token['access_token']}"},
            timeout=TIMEOUT,
        )
        assert me.json() == {"sub": "batch", "scope": "reports", "client_id": "batch"}
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=10)
    assert b"development server" in stderr


def test_serve_command_refuses_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"clients": [], "isuer": "typo"}))
    result = subprocess.run(
        [sys.executable, "-m", "buttress.security.oauth", "serve", "--config", str(config)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert b"unknown keys isuer" in result.stderr


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_serve_command_refuses_a_non_loopback_host(tmp_path: Path, host: str) -> None:
    # The dev server approves every authorization request as the development user: on a
    # reachable address anyone on the network could mint tokens for that user.
    config = tmp_path / "oauth.json"
    config.write_text(json.dumps(dev_config("http://127.0.0.1:9000")))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "buttress.security.oauth",
            "serve",
            "--config",
            str(config),
            "--host",
            host,
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 2
    assert b"loopback" in result.stderr
