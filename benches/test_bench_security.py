"""Security: token validation, the token endpoint and the audit log, beside the same work done
with the libraries used plainly.

- token-validate: one RFC 9068 access token (ES256) checked completely: signature, issuer,
  audience and expiry. buttress ``TokenValidator.validate`` with its cache of verified tokens
  off, and on with a token it has seen before (a resource server sees a client's token on
  every request until it expires), beside joserfc's ``jwt.decode``
  plus a ``JWTClaimsRegistry`` (what buttress builds on), and Authlib's ``JsonWebToken``
  (``authlib.jose``, which Authlib now marks deprecated in favour of joserfc). An ECDSA
  verification is most of the cost in every case.
- token-endpoint: one client-credentials token request answered with an RFC 9068 JWT.
  buttress ``OAuthServer.client_credentials`` beside Authlib's ``AuthorizationServer`` wired
  plainly (a dict of clients, the client credentials grant, Authlib's RFC 9068 generator
  signing with the same kind of key). The difference that matters: buttress stores client
  secrets as scrypt hashes and checks a secret against one, where the plain wiring compares
  the secret in clear; the check is most of buttress's cost, and is the price of not keeping
  secrets in clear.
- audit-append (in memory) and audit-append-durable: one decision appended to buttress's
  hash-chained ``AuditLog``, in memory and on a durable event store that syncs every append,
  beside one row inserted into SQLite, in memory and in a file with a commit per row (SQLite's
  default full sync).
"""

from __future__ import annotations

import base64
import hmac
import json
import sqlite3
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import buttress
import pytest
from _harness import BUTTRESS, Bench, Case, Counts, Made, registrar
from authlib.oauth2.rfc6749 import (  # type: ignore[import-untyped]
    AuthorizationServer,
    ClientMixin,
    OAuth2Request,
)
from authlib.oauth2.rfc6749.grants import ClientCredentialsGrant  # type: ignore[import-untyped]
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload  # type: ignore[import-untyped]
from authlib.oauth2.rfc9068 import JWTBearerTokenGenerator  # type: ignore[import-untyped]
from buttress.security import TokenValidator
from buttress.security.oauth import OAuthServer
from buttress.security.zerotrust import AuditLog
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet
from joserfc.jwt import JWTClaimsRegistry

with warnings.catch_warnings():
    # Importing authlib.jose warns that it is deprecated; the bench measures it all the same.
    warnings.simplefilter("ignore")
    from authlib.jose import JsonWebToken  # type: ignore[import-untyped]

ISSUER = "https://auth.example"
AUDIENCE = "https://api.example"
AUTHLIB = "authlib"
JOSERFC = "joserfc"
SQLITE = "sqlite3"

# --- token-validate ---------------------------------------------------------------------------

VALIDATE_COUNTS = Counts(
    rounds=60, iterations=20, warmup_rounds=5, interleaved_rounds=60, interleaved_calls=20
)
VALIDATE: list[Case] = []
add_validate = registrar(VALIDATE, VALIDATE_COUNTS)

_ISSUING_SERVER = OAuthServer(ISSUER, audience=AUDIENCE)
_ISSUING_SERVER.register_client("reports", client_secret="reports-secret", scopes=["read"])
TOKEN = _ISSUING_SERVER.client_credentials(
    client_id="reports", client_secret="reports-secret"
).access_token
JWKS = _ISSUING_SERVER.jwks()
SUBJECT = "reports"


@add_validate(BUTTRESS, "TokenValidator.validate, every call checked (cache_size=0)")
def _() -> Made:
    validator = TokenValidator(
        issuer=ISSUER, audience=AUDIENCE, jwks=JWKS, access_token=True, cache_size=0
    )

    def run() -> bool:
        return validator.validate(TOKEN).subject == SUBJECT

    return run, lambda: "signature, iss, aud, exp, RFC 9068 typ checked each call"


@add_validate(BUTTRESS, "TokenValidator.validate, a token seen before")
def _() -> Made:
    validator = TokenValidator(issuer=ISSUER, audience=AUDIENCE, jwks=JWKS, access_token=True)
    validator.validate(TOKEN)

    def run() -> bool:
        return validator.validate(TOKEN).subject == SUBJECT

    return run, lambda: "checked fully once, then remembered until its exp (the default)"


@add_validate(JOSERFC, "jwt.decode + JWTClaimsRegistry")
def _() -> Made:
    keys = KeySet.import_key_set(JWKS)
    registry = JWTClaimsRegistry(
        iss={"essential": True, "value": ISSUER},
        aud={"essential": True, "value": AUDIENCE},
        exp={"essential": True},
    )

    def run() -> bool:
        token = jwt.decode(TOKEN, keys, algorithms=["ES256"])
        registry.validate(token.claims)
        return token.claims["sub"] == SUBJECT

    return run, lambda: "signature, iss, aud, exp checked each call"


@add_validate(AUTHLIB, "JsonWebToken.decode + validate")
def _() -> Made:
    decoder = JsonWebToken(["ES256"])
    options = {
        "iss": {"essential": True, "value": ISSUER},
        "aud": {"essential": True, "value": AUDIENCE},
        "exp": {"essential": True},
    }

    def run() -> bool:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # authlib.jose's deprecation, once per call
            claims = decoder.decode(TOKEN, JWKS, claims_options=options)
            claims.validate()
        return bool(claims["sub"] == SUBJECT)

    return run, lambda: "signature, iss, aud, exp checked each call"


@pytest.mark.benchmark(group="token-validate")
@pytest.mark.parametrize("case", VALIDATE, ids=lambda case: case.id)
def test_token_validate(bench: Bench, case: Case) -> None:
    bench(case, expect=True)


# --- token-endpoint ---------------------------------------------------------------------------

ENDPOINT_COUNTS = Counts(
    rounds=15, iterations=2, warmup_rounds=2, interleaved_rounds=15, interleaved_calls=2
)
ENDPOINT: list[Case] = []
add_endpoint = registrar(ENDPOINT, ENDPOINT_COUNTS)
CLIENT_ID = "billing"
CLIENT_SECRET = "billing-secret-0123456789"


def _issued_checked(issued: list[str]) -> str:
    assert issued, "no token was issued"
    validator = TokenValidator(issuer=ISSUER, audience=AUDIENCE, jwks=_keys_seen[-1])
    for token in issued[-3:]:
        assert validator.validate(token).subject == CLIENT_ID
    return f"{len(issued):,} tokens issued; the last ones validate as RFC 9068 JWTs"


_keys_seen: list[dict[str, Any]] = []


@add_endpoint(BUTTRESS, "OAuthServer.client_credentials (scrypt-hashed secret)")
def _() -> Made:
    server = OAuthServer(ISSUER, audience=AUDIENCE)
    server.register_client(CLIENT_ID, client_secret=CLIENT_SECRET, scopes=["invoices"])
    issued: list[str] = []

    def run() -> bool:
        response = server.client_credentials(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
        issued.append(response.access_token)
        return True

    def verify() -> str:
        _keys_seen.append(server.jwks())
        return _issued_checked(issued)

    return run, verify


class _PlainClient(ClientMixin):  # type: ignore[misc]
    """A client as Authlib's documentation shows it: the secret kept in clear."""

    def __init__(self, client_id: str, secret: str, scope: str) -> None:
        self.client_id, self.secret, self.scope = client_id, secret, scope

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> None:
        return None

    def get_allowed_scope(self, scope: str) -> str:
        return self.scope

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return False

    def check_client_secret(self, client_secret: str) -> bool:
        return hmac.compare_digest(self.secret, client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == "client_secret_basic"

    def check_response_type(self, response_type: str) -> bool:
        return False

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "client_credentials"


class _PlainRequest(OAuth2Request):  # type: ignore[misc]
    def __init__(self, uri: str, headers: dict[str, str], form: dict[str, str]) -> None:
        super().__init__("POST", uri, headers=headers)
        self.payload = BasicOAuth2Payload(form)
        self._form = form

    @property
    def form(self) -> dict[str, str]:
        return self._form


class _PlainGenerator(JWTBearerTokenGenerator):  # type: ignore[misc]
    def __init__(self, keys: KeySet) -> None:
        super().__init__(issuer=ISSUER, alg="ES256")
        self.keys = keys

    def get_jwks(self) -> KeySet:
        return self.keys

    def get_audiences(self, client: Any, user: Any, scope: str) -> str:
        return AUDIENCE


class _PlainServer(AuthorizationServer):  # type: ignore[misc]
    def __init__(self, clients: dict[str, _PlainClient], keys: KeySet) -> None:
        super().__init__()
        self.clients = clients
        self.saved: list[dict[str, Any]] = []
        self.register_token_generator("default", _PlainGenerator(keys))
        self.register_grant(ClientCredentialsGrant)

    def query_client(self, client_id: str) -> _PlainClient | None:
        return self.clients.get(client_id)

    def save_token(self, token: dict[str, Any], request: Any) -> None:
        self.saved.append(token)

    def create_oauth2_request(self, request: Any) -> Any:
        return request

    def handle_response(self, status: int, body: Any, headers: Any) -> tuple[int, Any]:
        return status, body

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        return None


@add_endpoint(AUTHLIB, "AuthorizationServer, client credentials (secret in clear)")
def _() -> Made:
    keys = KeySet([ECKey.generate_key("P-256", {"alg": "ES256", "use": "sig"}, auto_kid=True)])
    server = _PlainServer({CLIENT_ID: _PlainClient(CLIENT_ID, CLIENT_SECRET, "invoices")}, keys)
    basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    headers = {"Authorization": f"Basic {basic}"}
    form = {"grant_type": "client_credentials"}
    issued: list[str] = []

    def run() -> bool:
        status, body = server.create_token_response(_PlainRequest(f"{ISSUER}/token", headers, form))
        assert status == 200, body
        issued.append(body["access_token"])
        return True

    def verify() -> str:
        _keys_seen.append(keys.as_dict())
        return _issued_checked(issued)

    return run, verify


@pytest.mark.benchmark(group="token-endpoint")
@pytest.mark.parametrize("case", ENDPOINT, ids=lambda case: case.id)
def test_token_endpoint(bench: Bench, case: Case) -> None:
    bench(case, expect=True)


# --- audit-append -----------------------------------------------------------------------------

AUDIT_COUNTS = Counts(
    rounds=50, iterations=20, warmup_rounds=5, interleaved_rounds=50, interleaved_calls=20
)
DURABLE_COUNTS = Counts(
    rounds=20, iterations=5, warmup_rounds=2, interleaved_rounds=20, interleaved_calls=5
)
AUDIT: list[Case] = []
DURABLE: list[Case] = []
add_audit = registrar(AUDIT, AUDIT_COUNTS)
add_durable = registrar(DURABLE, DURABLE_COUNTS)


def _decision(number: int) -> dict[str, Any]:
    return {
        "time": time.time_ns(),
        "subject": "billing",
        "action": "GET",
        "resource": f"/invoices/{number}",
        "allowed": True,
        "rule": "read invoices",
    }


def _audit_case(store: buttress.EventStore) -> Made:
    log = AuditLog(store)
    count = [0]

    def run() -> bool:
        count[0] += 1
        log.record(_decision(count[0]))
        return True

    def verify() -> str:
        result = log.verify()
        assert result.valid, result
        assert result.entries == count[0], result
        return f"{count[0]:,} entries appended; the chain verifies"

    return run, verify


@add_audit(BUTTRESS, "AuditLog.record, in memory")
def _() -> Made:
    return _audit_case(buttress.EventStore())


@add_durable(BUTTRESS, "AuditLog.record, durable (a sync per append)")
def _() -> Made:
    folder = Path(tempfile.mkdtemp(prefix="bench-audit-"))
    return _audit_case(buttress.EventStore(folder / "log", fsync="always"))


def _sqlite_case(path: str) -> Made:
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("create table audit (id integer primary key, entry text not null)")
    count = [0]

    def run() -> bool:
        count[0] += 1
        connection.execute(
            "insert into audit (entry) values (?)", (json.dumps(_decision(count[0])),)
        )
        return True

    def verify() -> str:
        rows = connection.execute("select count(*) from audit").fetchone()[0]
        assert rows == count[0]
        return f"{rows:,} rows inserted, one autocommit transaction each"

    return run, verify


@add_audit(SQLITE, "insert, in memory")
def _() -> Made:
    return _sqlite_case(":memory:")


@add_durable(SQLITE, "insert, file (a commit per row, full sync)")
def _() -> Made:
    folder = Path(tempfile.mkdtemp(prefix="bench-audit-"))
    return _sqlite_case(str(folder / "audit.db"))


@pytest.mark.benchmark(group="audit-append")
@pytest.mark.parametrize("case", AUDIT, ids=lambda case: case.id)
def test_audit_append(bench: Bench, case: Case) -> None:
    bench(case, expect=True)


@pytest.mark.benchmark(group="audit-append-durable")
@pytest.mark.parametrize("case", DURABLE, ids=lambda case: case.id)
def test_audit_append_durable(bench: Bench, case: Case) -> None:
    bench(case, expect=True)
