"""``buttress.security.tokens``: JWT bearer tokens checked against a JWKS.

Tokens are signed with joserfc and real keys; the refusals cover the classic attacks (``alg:
none``, HS256 signed with the issuer's public key, a tampered payload, a made-up key id) and
the claim checks. The remote key set is served by a real HTTP server on 127.0.0.1 in a thread,
whose keys the tests rotate while counting the fetches it answers.

The helpers at the top (``Issuer``, ``jwks_server``) are shared with the zero-trust tests.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from buttress.errors import ButtressError, InvalidTokenError, KeySetUnavailableError
from buttress.security import (
    KeySource,
    RemoteKeySet,
    StaticKeySet,
    TokenValidator,
    VerifiedToken,
)
from hypothesis import given
from hypothesis import strategies as st
from joserfc import jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, Key, KeySet, OKPKey, RSAKey
from joserfc.jws import JWSRegistry
from joserfc.registry import HeaderParameter

ISSUER = "https://issuer.example"
AUDIENCE = "https://api.example"
NOW = 1_700_000_000


class FakeClock:
    """Wall-clock seconds that move only when told to."""

    def __init__(self, start: float = NOW) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Issuer:
    """An authorization server's signing keys, and the tokens it would issue."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.clock = clock or FakeClock()
        self.keys: dict[str, Key] = {}
        self.add_key("k1")

    def add_key(self, kid: str, kind: str = "EC") -> Key:
        if kind == "EC":
            key: Key = ECKey.generate_key("P-256", parameters={"kid": kid})
        elif kind == "RSA":
            key = RSAKey.generate_key(2048, parameters={"kid": kid})
        else:
            key = OKPKey.generate_key("Ed25519", parameters={"kid": kid})
        self.keys[kid] = key
        return key

    def jwks(self) -> dict[str, Any]:
        return {"keys": [key.as_dict(private=False) for key in self.keys.values()]}

    def claims(self, **changes: Any) -> dict[str, Any]:
        now = int(self.clock())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "alice",
            "client_id": "web-app",
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
            "scope": "orders:read orders:write",
        }
        claims.update(changes)
        return {name: value for name, value in claims.items() if value is not None}

    def token(
        self, kid: str = "k1", alg: str = "ES256", typ: str | None = "at+jwt", **changes: Any
    ) -> str:
        header: dict[str, Any] = {"alg": alg, "kid": kid}
        if typ is not None:
            header["typ"] = typ
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SecurityWarning)  # EdDSA is deprecated by RFC 9864
            return jwt.encode(
                header, self.claims(**changes), self.keys[kid], algorithms=[alg], default_type=None
            )

    def validator(self, **options: Any) -> TokenValidator:
        options.setdefault("jwks", self.jwks())
        options.setdefault("clock", self.clock)
        return TokenValidator(issuer=ISSUER, audience=AUDIENCE, **options)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def refused(validator: TokenValidator, token: str) -> InvalidTokenError:
    with pytest.raises(InvalidTokenError) as caught:
        validator.validate(token)
    return caught.value


class JWKSServer:
    """A real HTTP server on 127.0.0.1 serving a JWKS the test can change, counting requests."""

    def __init__(self, jwks: dict[str, Any]) -> None:
        self.jwks = jwks
        self.status = 200
        self.requests = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server.lock:
                    server.requests += 1
                    body = json.dumps(server.jwks).encode()
                    status = server.status
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self) -> JWKSServer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def issuer() -> Issuer:
    return Issuer()


@pytest.fixture
def jwks_server(issuer: Issuer) -> Iterator[JWKSServer]:
    with JWKSServer(issuer.jwks()) as server:
        yield server


# -- a good token -------------------------------------------------------------------------------


def test_a_good_token_is_accepted_and_its_claims_parsed(issuer: Issuer) -> None:
    token = issuer.token(sub="alice", scope="orders:read orders:write")
    verified = issuer.validator(access_token=True).validate(token)
    assert isinstance(verified, VerifiedToken)
    assert verified.subject == "alice"
    assert verified.issuer == ISSUER
    assert verified.audience == (AUDIENCE,)
    assert verified.client_id == "web-app"
    assert verified.scopes == {"orders:read", "orders:write"}
    assert verified.expires_at == NOW + 300
    assert verified.header["kid"] == "k1"
    with pytest.raises(TypeError):
        verified.claims["sub"] = "mallory"  # type: ignore[index]


@pytest.mark.parametrize(
    ("kind", "alg"), [("RSA", "RS256"), ("RSA", "PS256"), ("OKP", "EdDSA"), ("OKP", "Ed25519")]
)
def test_every_allowed_algorithm_verifies(issuer: Issuer, kind: str, alg: str) -> None:
    issuer.add_key("k2", kind)
    verified = issuer.validator().validate(issuer.token("k2", alg))
    assert verified.header["alg"] == alg


def test_validate_async_accepts_a_good_token(issuer: Issuer) -> None:
    verified = asyncio.run(issuer.validator().validate_async(issuer.token()))
    assert verified.subject == "alice"


def test_a_list_audience_and_several_accepted_audiences(issuer: Issuer) -> None:
    token = issuer.token(aud=["https://other.example", AUDIENCE])
    assert issuer.validator().validate(token).audience == ("https://other.example", AUDIENCE)
    validator = TokenValidator(
        issuer=ISSUER,
        audience=["https://a.example", "https://b.example"],
        jwks=issuer.jwks(),
        clock=issuer.clock,
    )
    assert validator.validate(issuer.token(aud="https://b.example")).subject == "alice"


def test_a_token_without_kid_uses_the_only_fitting_key(issuer: Issuer) -> None:
    claims = issuer.claims()
    token = jwt.encode({"alg": "ES256"}, claims, issuer.keys["k1"])
    assert issuer.validator().validate(token).subject == "alice"
    issuer.add_key("k2")
    with pytest.raises(InvalidTokenError, match="names no key id") as caught:
        issuer.validator().validate(token)
    assert caught.value.reason == "unknown_key"


# -- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "advance", "reason"),
    [
        ({"exp": NOW - 60}, 0, "expired"),
        ({}, 301 + 30, "expired"),
        ({"nbf": NOW + 120}, 0, "not_yet_valid"),
        ({"iat": NOW + 120}, 0, "issued_in_future"),
        ({"aud": "https://elsewhere.example"}, 0, "wrong_audience"),
        ({"iss": "https://evil.example"}, 0, "wrong_issuer"),
        ({"exp": None}, 0, "missing_claim"),
        ({"exp": "tomorrow"}, 0, "invalid_claim"),
    ],
)
def test_claims_are_checked(
    issuer: Issuer, changes: dict[str, Any], advance: float, reason: str
) -> None:
    token = issuer.token(**changes)
    issuer.clock.advance(advance)
    error = refused(issuer.validator(), token)
    assert error.reason == reason
    assert error.error == "invalid_token"
    assert isinstance(error, ButtressError)
    assert str(error).endswith(".")


def test_the_leeway_forgives_small_clock_skew(issuer: Issuer) -> None:
    validator = issuer.validator(leeway=30)
    assert validator.validate(issuer.token(exp=NOW - 20)).subject == "alice"
    assert validator.validate(issuer.token(nbf=NOW + 20, iat=NOW + 20)).subject == "alice"
    assert refused(validator, issuer.token(exp=NOW - 31)).reason == "expired"
    assert refused(issuer.validator(leeway=0), issuer.token(exp=NOW - 1)).reason == "expired"


def test_an_unsigned_alg_none_token_is_refused(issuer: Issuer) -> None:
    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = b64(json.dumps(issuer.claims()).encode())
    for token in (f"{header}.{payload}.", f"{header}.{payload}.{b64(b'x')}"):
        error = refused(issuer.validator(), token)
        assert error.reason == "algorithm_not_allowed"


def test_hs256_signed_with_the_public_key_is_refused(issuer: Issuer) -> None:
    """The key confusion attack: the attacker signs with HMAC, using the issuer's public key
    (PEM or JWK JSON, both public) as the secret."""
    rsa = issuer.add_key("rsa", "RSA")
    validator = issuer.validator(algorithms=["RS256"])
    assert validator.validate(issuer.token("rsa", "RS256")).subject == "alice"
    header = b64(json.dumps({"alg": "HS256", "kid": "rsa", "typ": "JWT"}).encode())
    payload = b64(json.dumps(issuer.claims(sub="admin")).encode())
    signing_input = f"{header}.{payload}".encode()
    for secret in (
        rsa.as_pem(private=False),
        json.dumps(rsa.as_dict(private=False)).encode(),
    ):
        signature = hmac.new(secret, signing_input, hashlib.sha256).digest()
        error = refused(validator, f"{header}.{payload}.{b64(signature)}")
        assert error.reason == "algorithm_not_allowed"


def test_hmac_and_none_cannot_be_allowed() -> None:
    for algorithms in (["HS256"], ["RS256", "none"], ["HS512"]):
        with pytest.raises(ValueError, match="algorithms may list only asymmetric"):
            TokenValidator(
                issuer=ISSUER, audience=AUDIENCE, jwks={"keys": []}, algorithms=algorithms
            )


def test_an_algorithm_outside_the_allow_list_is_refused(issuer: Issuer) -> None:
    issuer.add_key("rsa", "RSA")
    validator = issuer.validator(algorithms=["ES256"])
    assert refused(validator, issuer.token("rsa", "RS256")).reason == "algorithm_not_allowed"


def test_a_key_of_another_type_than_the_alg_is_refused(issuer: Issuer) -> None:
    """A token claiming RS256 for the EC key id must not reach any verification."""
    issuer.add_key("rsa", "RSA")
    token = issuer.token("rsa", "RS256")
    _header, payload, signature = token.split(".")
    forged_header = b64(json.dumps({"alg": "RS256", "kid": "k1", "typ": "at+jwt"}).encode())
    error = refused(issuer.validator(), f"{forged_header}.{payload}.{signature}")
    assert error.reason == "key_mismatch"


def test_an_unknown_kid_is_refused(issuer: Issuer) -> None:
    other = Issuer(issuer.clock)
    other.add_key("k9")
    error = refused(issuer.validator(), other.token("k9"))
    assert error.reason == "unknown_key"
    assert "k9" in str(error)


def test_a_token_signed_by_another_key_with_the_same_kid_is_refused(issuer: Issuer) -> None:
    impostor = Issuer(issuer.clock)  # also has a key called k1
    assert refused(issuer.validator(), impostor.token("k1")).reason == "bad_signature"


def test_a_tampered_payload_is_refused(issuer: Issuer) -> None:
    header, payload, signature = issuer.token(sub="alice").split(".")
    claims = json.loads(unb64(payload))
    claims["sub"] = "admin"
    tampered = f"{header}.{b64(json.dumps(claims).encode())}.{signature}"
    assert refused(issuer.validator(), tampered).reason == "bad_signature"


def test_a_tampered_header_is_refused(issuer: Issuer) -> None:
    header, payload, signature = issuer.token().split(".")
    fields = json.loads(unb64(header))
    fields["extra"] = "x"
    tampered = f"{b64(json.dumps(fields).encode())}.{payload}.{signature}"
    assert refused(issuer.validator(), tampered).reason == "bad_signature"


@given(st.data())
def test_a_changed_character_never_yields_other_claims(data: st.DataObject) -> None:
    """Whatever single character is changed, the token is refused, or (a base64 character that
    only differs in unused bits) accepted with exactly the original header and claims."""
    issuer = Issuer()
    token = issuer.token()
    validator = issuer.validator()
    original = validator.validate(token)
    index = data.draw(st.integers(0, len(token) - 1))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ "
    replacement = data.draw(st.sampled_from(alphabet).filter(lambda char: char != token[index]))
    changed = token[:index] + replacement + token[index + 1 :]
    try:
        verified = validator.validate(changed)
    except InvalidTokenError:
        return
    assert dict(verified.claims) == dict(original.claims)
    assert dict(verified.header) == dict(original.header)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "é.é.é",
        "e30.e30.",
        "W10.e30.",
        "x" * 20_000,
        "..",
        "e30.e30.e30",
    ],
)
def test_malformed_tokens_are_refused(issuer: Issuer, token: str) -> None:
    assert refused(issuer.validator(), token).reason in ("malformed", "algorithm_not_allowed")


def test_a_payload_that_is_not_an_object_is_refused(issuer: Issuer) -> None:
    header = {"alg": "ES256", "kid": "k1"}
    from joserfc import jws

    token = jws.serialize_compact(header, b"[1, 2]", issuer.keys["k1"], algorithms=["ES256"])
    assert refused(issuer.validator(), token).reason == "malformed"


def test_rfc_9068_access_tokens(issuer: Issuer) -> None:
    validator = issuer.validator(access_token=True)
    assert validator.validate(issuer.token(typ="at+jwt")).subject == "alice"
    assert validator.validate(issuer.token(typ="application/AT+JWT")).subject == "alice"
    assert refused(validator, issuer.token(typ="JWT")).reason == "wrong_token_type"
    assert refused(validator, issuer.token(typ=None)).reason == "wrong_token_type"
    for claim in ("client_id", "jti", "sub", "iat"):
        error = refused(validator, issuer.token(**{claim: None}))
        assert error.reason == "missing_claim"
        assert claim in str(error)
    # Without the profile, a plain JWT without client_id passes.
    assert issuer.validator().validate(issuer.token(typ="JWT", client_id=None)).subject == "alice"


def test_required_claims(issuer: Issuer) -> None:
    validator = issuer.validator(required_claims=["tenant"])
    assert refused(validator, issuer.token()).reason == "missing_claim"
    assert validator.validate(issuer.token(tenant="acme")).claims["tenant"] == "acme"


def test_unknown_critical_headers_are_refused(issuer: Issuer) -> None:
    header = {"alg": "ES256", "kid": "k1", "crit": ["exp-ext"], "exp-ext": 1}
    signing = JWSRegistry(header_registry={"exp-ext": HeaderParameter("test", "int")})
    token = jwt.encode(header, issuer.claims(), issuer.keys["k1"], registry=signing)
    error = refused(issuer.validator(), token)
    assert error.reason == "malformed"
    assert "critical" in str(error)


@pytest.mark.parametrize("crit", [5, [["exp-ext"]], [{"a": 1}], None, True])
def test_a_malformed_crit_header_is_refused_not_raised(issuer: Issuer, crit: Any) -> None:
    """Checked before the signature: any caller can send it, so it must be a clean refusal."""
    _, payload, signature = issuer.token().split(".")
    header = b64(json.dumps({"alg": "ES256", "kid": "k1", "crit": crit}).encode())
    assert refused(issuer.validator(), f"{header}.{payload}.{signature}").reason == "malformed"


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf"])
def test_a_huge_numeric_date_is_refused_not_raised(issuer: Issuer, claim: str) -> None:
    refused(issuer.validator(), issuer.token(**{claim: 10**400}))


def test_a_fractional_exp_is_not_accepted_after_it_passed(issuer: Issuer) -> None:
    token = issuer.token(exp=NOW + 10.25)
    issuer.clock.advance(10.5)
    assert refused(issuer.validator(leeway=0), token).reason == "expired"
    token = issuer.token(exp=NOW + 20)
    issuer.clock.advance(9.75)  # 0.25 s past exp: within a leeway of 0.5 s
    assert issuer.validator(leeway=0.5).validate(token).subject == "alice"
    issuer.clock.advance(0.5)
    assert refused(issuer.validator(leeway=0.5), token).reason == "expired"


# -- bad configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "argument"),
    [
        ({"issuer": 42}, TypeError, "issuer"),
        ({"issuer": ""}, TypeError, "issuer"),
        ({"audience": 42}, TypeError, "audience"),
        ({"audience": []}, ValueError, "audience"),
        ({"jwks": 42}, TypeError, "jwks"),
        ({"jwks": {"nokeys": []}}, ValueError, "jwks"),
        ({"jwks": {"keys": [{"kty": "EC"}]}}, ValueError, "jwks"),
        ({"algorithms": "HS256"}, ValueError, "algorithms"),
        ({"algorithms": []}, ValueError, "algorithms"),
        ({"leeway": -1}, ValueError, "leeway"),
        ({"leeway": "30"}, TypeError, "leeway"),
        ({"leeway": 3600}, ValueError, "leeway"),
        ({"required_claims": "sub"}, TypeError, "required_claims"),
        ({"access_token": "yes"}, TypeError, "access_token"),
        ({"clock": 5}, TypeError, "clock"),
        ({"jwks": "ftp://issuer.example/jwks"}, ValueError, "url"),
        ({"jwks": "http://issuer.example/jwks"}, ValueError, "url must use https"),
    ],
)
def test_bad_configuration_names_the_argument(
    options: dict[str, Any], error: type[Exception], argument: str
) -> None:
    settings: dict[str, Any] = {"issuer": ISSUER, "audience": AUDIENCE, "jwks": {"keys": []}}
    settings.update(options)
    with pytest.raises(error) as caught:
        TokenValidator(**settings)
    message = str(caught.value)
    assert argument in message
    assert message[0].isupper() or message.startswith(argument.split()[0])
    assert message.endswith(".")


def test_validate_refuses_a_token_of_the_wrong_type(issuer: Issuer) -> None:
    with pytest.raises(TypeError, match="token must be a str or bytes"):
        issuer.validator().validate(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "argument"),
    [
        ({"cache_ttl": 0}, "cache_ttl"),
        ({"min_refetch_interval": -1}, "min_refetch_interval"),
        ({"timeout": "5"}, "timeout"),
        ({"http_client": object()}, "http_client"),
        ({"async_http_client": httpx.Client()}, "async_http_client"),
    ],
)
def test_remote_key_set_bad_options(options: dict[str, Any], argument: str) -> None:
    try:
        with pytest.raises((TypeError, ValueError), match=argument):
            RemoteKeySet("https://issuer.example/jwks", **options)
    finally:
        client = options.get("async_http_client")
        if isinstance(client, httpx.Client):
            client.close()


# -- the remote key set -------------------------------------------------------------------------


def test_the_key_set_is_fetched_once_and_cached(issuer: Issuer, jwks_server: JWKSServer) -> None:
    keys = RemoteKeySet(jwks_server.url, clock=issuer.clock)
    validator = issuer.validator(jwks=keys)
    assert isinstance(keys, KeySource)
    for _ in range(5):
        assert validator.validate(issuer.token()).subject == "alice"
    assert jwks_server.requests == 1
    assert keys.fetches == 1


def test_a_jwks_url_string_makes_a_remote_key_set(issuer: Issuer, jwks_server: JWKSServer) -> None:
    validator = issuer.validator(jwks=jwks_server.url)
    assert isinstance(validator.keys, RemoteKeySet)
    assert validator.validate(issuer.token()).subject == "alice"


def test_rotation_to_a_new_kid_refetches(issuer: Issuer, jwks_server: JWKSServer) -> None:
    keys = RemoteKeySet(jwks_server.url, clock=issuer.clock)
    validator = issuer.validator(jwks=keys)
    assert validator.validate(issuer.token("k1")).subject == "alice"
    issuer.add_key("k2")
    jwks_server.jwks = issuer.jwks()
    issuer.clock.advance(31)  # past min_refetch_interval
    assert validator.validate(issuer.token("k2")).subject == "alice"
    assert jwks_server.requests == 2
    # The retired key disappears from the issuer: its tokens stop verifying after a refresh.
    old_token = issuer.token("k1")
    del issuer.keys["k1"]
    jwks_server.jwks = issuer.jwks()
    issuer.clock.advance(301)  # past cache_ttl
    assert validator.validate(issuer.token("k2")).subject == "alice"
    assert jwks_server.requests == 3
    assert refused(validator, old_token).reason == "unknown_key"
    assert jwks_server.requests == 3


def test_refetches_on_unknown_kids_are_rate_limited(
    issuer: Issuer, jwks_server: JWKSServer
) -> None:
    keys = RemoteKeySet(jwks_server.url, clock=issuer.clock, min_refetch_interval=30)
    validator = issuer.validator(jwks=keys)
    assert validator.validate(issuer.token()).subject == "alice"
    issuer.clock.advance(31)
    attacker = Issuer(issuer.clock)
    for number in range(50):
        attacker.add_key(f"made-up-{number}")
        assert refused(validator, attacker.token(f"made-up-{number}")).reason == "unknown_key"
    # The first unknown kid refetched; the other 49 were refused without asking the issuer.
    assert jwks_server.requests == 2
    # Meanwhile the issuer rotates: the new kid waits for the interval to pass.
    issuer.add_key("k2")
    jwks_server.jwks = issuer.jwks()
    assert refused(validator, issuer.token("k2")).reason == "unknown_key"
    assert jwks_server.requests == 2
    issuer.clock.advance(30)
    assert validator.validate(issuer.token("k2")).subject == "alice"
    assert jwks_server.requests == 3


def test_concurrent_lookups_of_a_new_kid_share_one_fetch(
    issuer: Issuer, jwks_server: JWKSServer
) -> None:
    keys = RemoteKeySet(jwks_server.url, clock=issuer.clock, min_refetch_interval=0)
    validator = issuer.validator(jwks=keys)
    validator.validate(issuer.token())
    issuer.add_key("k2")
    jwks_server.jwks = issuer.jwks()
    token = issuer.token("k2")
    results: list[str | None] = []
    barrier = threading.Barrier(8)

    def check() -> None:
        barrier.wait()
        results.append(validator.validate(token).subject)

    threads = [threading.Thread(target=check) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == ["alice"] * 8
    assert jwks_server.requests == 2


def test_async_rotation_and_rate_limit(issuer: Issuer, jwks_server: JWKSServer) -> None:
    keys = RemoteKeySet(jwks_server.url, clock=issuer.clock, min_refetch_interval=30)
    validator = issuer.validator(jwks=keys)

    async def scenario() -> None:
        assert (await validator.validate_async(issuer.token())).subject == "alice"
        issuer.add_key("k2")
        jwks_server.jwks = issuer.jwks()
        issuer.clock.advance(31)
        tokens = [issuer.token("k2") for _ in range(10)]
        results = await asyncio.gather(*(validator.validate_async(token) for token in tokens))
        assert [verified.subject for verified in results] == ["alice"] * 10
        with pytest.raises(InvalidTokenError):
            await validator.validate_async(Issuer(issuer.clock).token("k1"))
        attacker = Issuer(issuer.clock)
        attacker.add_key("x")
        with pytest.raises(InvalidTokenError):
            await validator.validate_async(attacker.token("x"))

    asyncio.run(scenario())
    assert jwks_server.requests == 2


def test_an_issuer_that_fails_gives_key_set_unavailable(
    issuer: Issuer, jwks_server: JWKSServer
) -> None:
    jwks_server.status = 500
    keys = RemoteKeySet(jwks_server.url, clock=issuer.clock)
    validator = issuer.validator(jwks=keys)
    with pytest.raises(KeySetUnavailableError, match="HTTP 500") as caught:
        validator.validate(issuer.token())
    assert caught.value.url == jwks_server.url
    assert not isinstance(caught.value, InvalidTokenError)
    # Within the interval, nothing is asked again; afterwards the issuer is back.
    with pytest.raises(KeySetUnavailableError, match="no key set has been fetched yet"):
        validator.validate(issuer.token())
    assert jwks_server.requests == 1
    jwks_server.status = 200
    issuer.clock.advance(31)
    assert validator.validate(issuer.token()).subject == "alice"


def test_stale_keys_stay_in_use_while_the_issuer_is_down(
    issuer: Issuer, jwks_server: JWKSServer
) -> None:
    keys = RemoteKeySet(jwks_server.url, clock=issuer.clock, cache_ttl=60)
    validator = issuer.validator(jwks=keys)
    validator.validate(issuer.token())
    jwks_server.status = 503
    issuer.clock.advance(61)
    assert validator.validate(issuer.token()).subject == "alice"
    assert jwks_server.requests == 2


def test_a_server_that_does_not_answer(issuer: Issuer) -> None:
    keys = RemoteKeySet("http://127.0.0.1:9/jwks", timeout=0.5, clock=issuer.clock)
    with pytest.raises(KeySetUnavailableError, match="request failed"):
        issuer.validator(jwks=keys).validate(issuer.token())


def test_a_non_jwks_answer(issuer: Issuer, jwks_server: JWKSServer) -> None:
    jwks_server.jwks = ["not", "a", "jwks"]  # type: ignore[assignment]
    with pytest.raises(KeySetUnavailableError, match="not a JWKS"):
        RemoteKeySet(jwks_server.url).refresh()


def test_a_given_http_client_is_used(issuer: Issuer, jwks_server: JWKSServer) -> None:
    with httpx.Client() as client:
        keys = RemoteKeySet(jwks_server.url, http_client=client, clock=issuer.clock)
        assert issuer.validator(jwks=keys).validate(issuer.token()).subject == "alice"


def test_an_oversized_jwks_answer_is_not_read_to_the_end(issuer: Issuer) -> None:
    """A compromised or broken issuer streaming gigabytes must not be buffered whole."""
    served: list[int] = []

    def chunks() -> Iterator[bytes]:
        for number in range(1024):  # 64 MiB in all
            served.append(number)
            yield b" " * 65536

    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=chunks()))
    with httpx.Client(transport=transport) as client:
        keys = RemoteKeySet("https://issuer.example/jwks", http_client=client)
        with pytest.raises(KeySetUnavailableError, match="larger than"):
            keys.refresh()
    assert len(served) < 64


def test_an_issuer_trickling_its_answer_is_cut_off_at_the_timeout() -> None:
    """httpx times each read; a byte every 0.1 s would never trip that, the whole answer's
    deadline does."""
    served: list[int] = []

    def chunks() -> Iterator[bytes]:
        for number in range(100):  # 10 s in all, if nothing cut it off
            served.append(number)
            time.sleep(0.1)
            yield b" "

    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=chunks()))
    with httpx.Client(transport=transport) as client:
        keys = RemoteKeySet("https://issuer.example/jwks", http_client=client, timeout=0.3)
        with pytest.raises(KeySetUnavailableError, match="took longer"):
            keys.refresh()
    assert len(served) < 20

    async def slow_chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            await asyncio.sleep(0.1)
            yield b" "

    async def scenario() -> None:
        transport = httpx.MockTransport(lambda request: httpx.Response(200, content=slow_chunks()))
        async with httpx.AsyncClient(transport=transport) as client:
            keys = RemoteKeySet(
                "https://issuer.example/jwks", async_http_client=client, timeout=0.3
            )
            with pytest.raises(KeySetUnavailableError, match="took longer"):
                await keys.refresh_async()

    asyncio.run(scenario())


def test_redirects_are_not_followed_even_by_a_given_client(issuer: Issuer) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/jwks":
            return httpx.Response(302, headers={"location": "https://evil.example/keys"})
        return httpx.Response(200, json=Issuer().jwks())

    transport = httpx.MockTransport(answer)
    with httpx.Client(transport=transport, follow_redirects=True) as client:
        keys = RemoteKeySet("https://issuer.example/jwks", http_client=client)
        with pytest.raises(KeySetUnavailableError, match="HTTP 302"):
            keys.refresh()

    async def scenario() -> None:
        async with httpx.AsyncClient(transport=transport, follow_redirects=True) as client:
            keys = RemoteKeySet("https://issuer.example/jwks", async_http_client=client)
            with pytest.raises(KeySetUnavailableError, match="HTTP 302"):
                await keys.refresh_async()

    asyncio.run(scenario())


def test_static_key_set_accepts_a_key_set_object(issuer: Issuer) -> None:
    key_set = KeySet.import_key_set(issuer.jwks())  # type: ignore[arg-type]
    validator = issuer.validator(jwks=StaticKeySet(key_set))
    assert validator.validate(issuer.token()).subject == "alice"
    assert issuer.validator(jwks=key_set).validate(issuer.token()).subject == "alice"


# ---- the cache of verified tokens ------------------------------------------------------------


class CountingChecks:
    """Counts the signature checks a validator makes (the cached path makes none)."""

    def __init__(self, validator: TokenValidator, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        finish = validator._finish

        def counted(*args: Any) -> Any:
            self.count += 1
            return finish(*args)

        monkeypatch.setattr(validator, "_finish", counted)


def test_a_verified_token_is_remembered_until_its_exp(
    issuer: Issuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    validator = issuer.validator(cache_ttl=600)
    checks = CountingChecks(validator, monkeypatch)
    token = issuer.token(exp=int(issuer.clock()) + 100)
    for _ in range(3):
        assert validator.validate(token).subject == "alice"
    assert checks.count == 1
    assert asyncio.run(validator.validate_async(token)).subject == "alice"
    assert checks.count == 1
    # Past exp the full check decides again: the leeway forgives 30 s, then it is refused.
    issuer.clock.advance(100)
    assert validator.validate(token).subject == "alice"
    assert checks.count == 2
    issuer.clock.advance(31)
    assert refused(validator, token).reason == "expired"


def test_a_remembered_token_is_checked_again_after_cache_ttl(
    issuer: Issuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    validator = issuer.validator(cache_ttl=10)
    checks = CountingChecks(validator, monkeypatch)
    token = issuer.token()
    validator.validate(token)
    issuer.clock.advance(9)
    validator.validate(token)
    assert checks.count == 1
    issuer.clock.advance(2)
    validator.validate(token)
    assert checks.count == 2


def test_a_key_rotated_out_ends_its_tokens_hits(issuer: Issuer, jwks_server: JWKSServer) -> None:
    keys = RemoteKeySet(jwks_server.url, clock=issuer.clock)
    validator = issuer.validator(jwks=keys, cache_ttl=3600)
    old_token = issuer.token("k1", exp=int(issuer.clock()) + 3600)
    assert validator.validate(old_token).subject == "alice"
    issuer.add_key("k2")
    del issuer.keys["k1"]
    jwks_server.jwks = issuer.jwks()
    issuer.clock.advance(301)  # past the key set's cache_ttl: the next lookup refetches
    assert refused(validator, old_token).reason == "unknown_key"


def test_refused_tokens_are_not_remembered_and_the_cache_can_be_off(
    issuer: Issuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    validator = issuer.validator()
    bad = issuer.token(aud="someone-else")
    for _ in range(2):
        assert refused(validator, bad).reason == "wrong_audience"
    uncached = issuer.validator(cache_size=0)
    checks = CountingChecks(uncached, monkeypatch)
    token = issuer.token()
    uncached.validate(token)
    uncached.validate(token)
    assert checks.count == 2
    with pytest.raises(TypeError, match="cache_size"):
        issuer.validator(cache_size="10")
    with pytest.raises(ValueError, match="cache_size"):
        issuer.validator(cache_size=-1)
    with pytest.raises(ValueError, match="cache_ttl"):
        issuer.validator(cache_ttl=-1)
