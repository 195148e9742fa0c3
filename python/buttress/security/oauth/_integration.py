"""Authlib's authorization server, wired to buttress's storage and tightened to RFC 9700.

Authlib supplies the protocol: request parsing, client authentication, the grants, PKCE,
revocation, introspection, RFC 9207's ``iss`` and the error responses. This module supplies
what Authlib leaves to the integrator (the models, storage, a framework-neutral request and
response) and closes the gaps its defaults leave open: PKCE S256 required of every client,
single-use codes whose replay revokes what they issued, refresh tokens rotated on every use with
reuse detection, public clients allowed to refresh, and hashed client secrets.

Nothing here is public; ``OAuthServer`` (server.py) is the API.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import parse_qsl, urlsplit

# Authlib ships no type information (no py.typed), so its classes are Any to mypy; the
# subclasses below are checked for their own code only.
from authlib.common.security import generate_token  # type: ignore[import-untyped]
from authlib.oauth2.rfc6749 import (  # type: ignore[import-untyped]
    AuthorizationCodeMixin,
    AuthorizationServer,
    ClientMixin,
    InvalidGrantError,
    InvalidRequestError,
    OAuth2Request,
    TokenMixin,
    UnsupportedTokenTypeError,
)
from authlib.oauth2.rfc6749.grants import (  # type: ignore[import-untyped]
    AuthorizationCodeGrant,
    ClientCredentialsGrant,
    RefreshTokenGrant,
)
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload  # type: ignore[import-untyped]
from authlib.oauth2.rfc6749.util import scope_to_list  # type: ignore[import-untyped]
from authlib.oauth2.rfc7009 import RevocationEndpoint  # type: ignore[import-untyped]
from authlib.oauth2.rfc7636 import (  # type: ignore[import-untyped]
    CodeChallenge,
    create_s256_code_challenge,
)
from authlib.oauth2.rfc7662 import IntrospectionEndpoint  # type: ignore[import-untyped]
from authlib.oauth2.rfc9068 import JWTBearerTokenGenerator  # type: ignore[import-untyped]
from authlib.oauth2.rfc9207 import IssuerParameter  # type: ignore[import-untyped]

from buttress.security.oauth.client_secrets import VerifiedSecrets
from buttress.security.oauth.storage import AuthorizationCodeRecord, ClientRecord, TokenRecord

if TYPE_CHECKING:
    from buttress.security.oauth.server import OAuthServer

log = logging.getLogger("buttress.security.oauth")

CONFIDENTIAL_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]
ALL_AUTH_METHODS = [*CONFIDENTIAL_AUTH_METHODS, "none"]
SIGNING_ALGORITHM = "ES256"

# Error codes whose Authlib responses may carry no description; a sentence helps the client's
# developer more than the bare code.
DEFAULT_DESCRIPTIONS = {
    "invalid_request": "The request is missing a parameter or has a malformed one.",
    "invalid_client": "Client authentication failed; check the client id and secret.",
    "invalid_grant": (
        "The authorization code or refresh token is invalid, expired, revoked, or was issued "
        "to another client."
    ),
    "unauthorized_client": "This client may not use this grant type.",
    "unsupported_grant_type": (
        "The grant type is not supported; use authorization_code, refresh_token or "
        "client_credentials."
    ),
    "unsupported_response_type": "The response type is not supported; use code.",
    "invalid_scope": "The requested scope is unknown or exceeds what the client may ask for.",
    "access_denied": "The resource owner or the server denied the request.",
    "unsupported_token_type": "The token type hint must be access_token or refresh_token.",
}


def digest(value: str) -> str:
    """The storage key of a code or token: SHA-256 of its value, hex."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def new_family_id() -> str:
    """A fresh grant family id."""
    return uuid.uuid4().hex


class OAuthResponse:
    """A framework-neutral HTTP response: status, body (a JSON dict or text) and headers.

    >>> response = OAuthResponse(302, "", [("Location", "https://app.example/cb?code=x")])
    >>> response.location
    'https://app.example/cb?code=x'
    """

    __slots__ = ("body", "headers", "status_code")

    def __init__(
        self, status_code: int, body: dict[str, Any] | str, headers: list[tuple[str, str]]
    ) -> None:
        self.status_code = status_code
        self.body = body
        self.headers = list(headers)

    @property
    def location(self) -> str | None:
        """The ``Location`` header, or None. Settable (RFC 9207 adds ``iss`` through it)."""
        for name, value in self.headers:
            if name.lower() == "location":
                return value
        return None

    @location.setter
    def location(self, value: str) -> None:
        self.headers = [(n, v) for n, v in self.headers if n.lower() != "location"]
        self.headers.append(("Location", value))

    def redirect_parameters(self) -> dict[str, str]:
        """The query parameters of the ``Location`` URL (empty when there is none)."""
        location = self.location
        return dict(parse_qsl(urlsplit(location).query)) if location else {}

    def __repr__(self) -> str:
        return f"OAuthResponse({self.status_code}, {self.body!r})"


class _Headers(dict[str, str]):
    """Request headers looked up case-insensitively, as HTTP headers are."""

    def __init__(self, headers: Mapping[str, str]) -> None:
        super().__init__((name.lower(), value) for name, value in headers.items())

    def get(self, name: str, default: Any = None) -> Any:
        return super().get(name.lower(), default)


class Request(OAuth2Request):  # type: ignore[misc]
    """An Authlib request built from already-parsed parameters (query for GET, form for POST)."""

    def __init__(
        self, method: str, uri: str, headers: Mapping[str, str], params: dict[str, str]
    ) -> None:
        super().__init__(method, uri, headers=_Headers(headers))
        self.payload = BasicOAuth2Payload(params)
        self._params = params

    @property
    def args(self) -> dict[str, str]:
        return self._params if self.method == "GET" else {}

    @property
    def form(self) -> dict[str, str]:
        return self._params if self.method == "POST" else {}


# ---- the models Authlib asks for -------------------------------------------------------------


class ResourceOwner:
    """The user a grant was made for; Authlib only needs its id."""

    def __init__(self, subject: str) -> None:
        self.subject = subject

    def get_user_id(self) -> str:
        return self.subject


class Client(ClientMixin):  # type: ignore[misc]
    def __init__(self, record: ClientRecord, secrets: VerifiedSecrets) -> None:
        self.record = record
        self._secrets = secrets

    def get_client_id(self) -> str:
        return self.record.client_id

    def get_default_redirect_uri(self) -> str | None:
        # Without a redirect_uri in the request, only an unambiguous registration will do.
        uris = self.record.redirect_uris
        return uris[0] if len(uris) == 1 else None

    def get_allowed_scope(self, scope: str | None) -> str | None:
        if not scope:
            return " ".join(self.record.scopes)
        requested = list(dict.fromkeys(scope_to_list(scope)))
        if not set(requested) <= set(self.record.scopes):
            # None makes Authlib answer invalid_scope rather than silently narrowing.
            return None
        return " ".join(requested)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        # Exact string match (RFC 9700 section 2.1): no prefix, pattern or port leniency.
        return redirect_uri in self.record.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        if self.record.secret_hash is None:
            return False
        return self._secrets.verify(client_secret, self.record.secret_hash)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        if self.record.public:
            return method == "none"
        return method in CONFIDENTIAL_AUTH_METHODS

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code" and "authorization_code" in self.record.grant_types

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.record.grant_types


class AuthorizationCode(AuthorizationCodeMixin):  # type: ignore[misc]
    def __init__(self, record: AuthorizationCodeRecord) -> None:
        self.record = record
        # Read by Authlib's CodeChallenge.
        self.code_challenge = record.code_challenge
        self.code_challenge_method = record.code_challenge_method

    def get_redirect_uri(self) -> str | None:
        return self.record.redirect_uri

    def get_scope(self) -> str:
        return self.record.scope


class Token(TokenMixin):  # type: ignore[misc]
    def __init__(self, record: TokenRecord) -> None:
        self.record = record

    def check_client(self, client: Client) -> bool:
        return bool(self.record.client_id == client.get_client_id())

    def get_scope(self) -> str:
        return self.record.scope

    def get_expires_in(self) -> int:
        return max(0, int(self.record.expires_at - self.record.issued_at))

    def is_expired(self) -> bool:
        return time.time() >= self.record.expires_at

    def is_revoked(self) -> bool:
        return self.record.revoked or self.record.used

    def get_user(self) -> ResourceOwner | None:
        return None if self.record.subject is None else ResourceOwner(self.record.subject)


# ---- PKCE: S256 for every client ---------------------------------------------------------------


def _compare_s256(code_verifier: str, code_challenge: str) -> bool:
    expected = create_s256_code_challenge(code_verifier)
    return hmac.compare_digest(expected.encode("ascii"), code_challenge.encode("ascii"))


class RequiredS256CodeChallenge(CodeChallenge):  # type: ignore[misc]
    """Authlib's PKCE, with S256 required of every client (RFC 9700 section 2.1.1): a missing
    challenge and ``plain`` are refused, and verifiers are compared in constant time."""

    DEFAULT_CODE_CHALLENGE_METHOD = "S256"
    SUPPORTED_CODE_CHALLENGE_METHOD: ClassVar[list[str]] = ["S256"]
    CODE_CHALLENGE_METHODS: ClassVar[dict[str, Callable[[str, str], bool]]] = {
        "S256": _compare_s256
    }

    def __init__(self) -> None:
        super().__init__(required=True)

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge"):
            raise InvalidRequestError(
                "The authorization request has no code_challenge; PKCE with "
                "code_challenge_method=S256 is required for every client."
            )
        if data.get("code_challenge_method") != "S256":
            # Without a method RFC 7636 means plain, which is refused too.
            raise InvalidRequestError(
                "The code_challenge_method must be S256; plain (the default when it is "
                "omitted) is not accepted."
            )
        super().validate_code_challenge(grant, redirect_uri)


# ---- the grants ---------------------------------------------------------------------------------


def _owner(grant_or_endpoint: Any) -> OAuthServer:
    owner: OAuthServer = grant_or_endpoint.server.owner
    return owner


class CodeGrant(AuthorizationCodeGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = ALL_AUTH_METHODS

    def save_authorization_code(self, code: str, request: Any) -> None:
        owner = _owner(self)
        now = time.time()
        data = request.payload.data
        owner.storage.save_code(
            AuthorizationCodeRecord(
                code_hash=digest(code),
                client_id=request.client.get_client_id(),
                subject=request.user.get_user_id(),
                redirect_uri=request.payload.redirect_uri,
                scope=request.scope or "",
                code_challenge=data["code_challenge"],
                code_challenge_method=data["code_challenge_method"],
                family_id=new_family_id(),
                expires_at=now + owner.code_lifetime,
                retain_until=now + owner.code_lifetime + owner.family_lifetime,
            )
        )

    def query_authorization_code(self, code: str, client: Client) -> AuthorizationCode | None:
        owner = _owner(self)
        record = owner.storage.get_code(digest(code))
        if record is None:
            return None
        if record.used:
            _revoke_family(owner, record.family_id, "a used authorization code was presented again")
            raise InvalidGrantError(
                "The authorization code was already used; the tokens issued from it are now "
                "revoked. Start a new authorization."
            )
        if record.client_id != client.get_client_id():
            return None
        if time.time() >= record.expires_at:
            raise InvalidGrantError(
                "The authorization code has expired; codes live only briefly. Start a new "
                "authorization."
            )
        return AuthorizationCode(record)

    def create_token_response(self) -> Any:
        owner = _owner(self)
        code: AuthorizationCode = self.request.authorization_code
        # The atomic step: of two concurrent redemptions only one wins; the loser is a replay.
        if not owner.storage.use_code(code.record.code_hash):
            _revoke_family(owner, code.record.family_id, "an authorization code was redeemed twice")
            raise InvalidGrantError(
                "The authorization code was already used; the tokens issued from it are now "
                "revoked. Start a new authorization."
            )
        return super().create_token_response()

    def delete_authorization_code(self, authorization_code: AuthorizationCode) -> None:
        # Kept, marked used, until retain_until: a later replay must still be recognised.
        return None

    def authenticate_user(self, authorization_code: AuthorizationCode) -> ResourceOwner:
        return ResourceOwner(authorization_code.record.subject)


class RotatingRefreshTokenGrant(RefreshTokenGrant):  # type: ignore[misc]
    # Public clients refresh too (RFC 9700 section 4.14): rotation protects their tokens.
    TOKEN_ENDPOINT_AUTH_METHODS = ALL_AUTH_METHODS
    INCLUDE_NEW_REFRESH_TOKEN = True

    def authenticate_refresh_token(self, refresh_token: str) -> Token | None:
        owner = _owner(self)
        record = owner.storage.get_token(digest(refresh_token))
        if record is None or record.kind != "refresh_token":
            return None
        if record.used:
            _revoke_family(owner, record.family_id, "a rotated refresh token was presented again")
            raise InvalidGrantError(
                "The refresh token was already used and has been replaced; every token of its "
                "grant is now revoked. Start a new authorization."
            )
        if record.revoked or time.time() >= record.expires_at:
            return None
        return Token(record)

    def create_token_response(self) -> Any:
        owner = _owner(self)
        old: Token = self.request.refresh_token
        if not owner.storage.use_refresh_token(old.record.token_hash):
            _revoke_family(owner, old.record.family_id, "a refresh token was used twice at once")
            raise InvalidGrantError(
                "The refresh token was already used and has been replaced; every token of its "
                "grant is now revoked. Start a new authorization."
            )
        return super().create_token_response()

    def authenticate_user(self, refresh_token: Token) -> ResourceOwner | None:
        return refresh_token.get_user()

    def revoke_old_credential(self, refresh_token: Token) -> None:
        # Already marked used by use_refresh_token, which is what makes reuse detectable.
        return None


class ConfidentialClientCredentialsGrant(ClientCredentialsGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = CONFIDENTIAL_AUTH_METHODS


def _revoke_family(owner: OAuthServer, family_id: str, why: str) -> None:
    log.warning("Revoking grant family %s: %s.", family_id, why)
    owner.storage.revoke_family(family_id, time.time() + owner.family_lifetime)


# ---- tokens, revocation, introspection --------------------------------------------------------


class AccessTokenGenerator(JWTBearerTokenGenerator):  # type: ignore[misc]
    """Authlib's RFC 9068 generator, signing with the server's current ES256 key."""

    def __init__(self, owner: OAuthServer) -> None:
        super().__init__(
            issuer=owner.issuer,
            alg=SIGNING_ALGORITHM,
            refresh_token_generator=self._refresh_token,
            expires_generator=lambda client, grant_type: owner.access_token_lifetime,
        )
        self.owner = owner

    @staticmethod
    def _refresh_token(**_: Any) -> str:
        return str(generate_token(48))

    def get_jwks(self) -> Any:
        # A key set of the one current key: joserfc then writes its kid into the header.
        return self.owner.signing_key_set()

    def get_audiences(self, client: Client, user: Any, scope: str) -> str:
        return self.owner.audience or client.get_client_id()

    def get_jti(self, client: Client, grant_type: str, user: Any, scope: str) -> str:
        return uuid.uuid4().hex


def find_token(owner: OAuthServer, token_string: str) -> Token | None:
    """The stored token with this value (the hint is only a hint: a hash finds either kind)."""
    record = owner.storage.get_token(digest(token_string))
    return None if record is None else Token(record)


class UnsupportedTokenTypeHint(UnsupportedTokenTypeError):  # type: ignore[misc]
    """RFC 7009 section 2.2.1 makes ``unsupported_token_type`` an RFC 6749 section 5.2 error, a
    400; Authlib's is a 401, which would also owe the client a ``WWW-Authenticate`` challenge."""

    status_code = 400


@contextmanager
def unsupported_hint_is_a_400() -> Iterator[None]:
    """Turns Authlib's ``UnsupportedTokenTypeError`` into ``UnsupportedTokenTypeHint``."""
    try:
        yield
    except UnsupportedTokenTypeError as error:
        raise UnsupportedTokenTypeHint() from error


class Revocation(RevocationEndpoint):  # type: ignore[misc]
    CLIENT_AUTH_METHODS = ALL_AUTH_METHODS

    def check_params(self, request: Any, client: Client) -> None:
        with unsupported_hint_is_a_400():
            super().check_params(request, client)

    def query_token(self, token_string: str, token_type_hint: str | None) -> Token | None:
        return find_token(_owner(self), token_string)

    def revoke_token(self, token: Token, request: Any) -> None:
        owner = _owner(self)
        if token.record.kind == "refresh_token":
            # RFC 7009 section 2.1: revoking a refresh token also ends the access tokens of
            # the same grant.
            owner.storage.revoke_family(token.record.family_id, time.time() + owner.family_lifetime)
        else:
            owner.storage.revoke_token(token.record.token_hash)


class Introspection(IntrospectionEndpoint):  # type: ignore[misc]
    # Only clients that can authenticate (resource servers register as confidential clients).
    CLIENT_AUTH_METHODS = CONFIDENTIAL_AUTH_METHODS

    def check_params(self, request: Any, client: Client) -> None:
        with unsupported_hint_is_a_400():
            super().check_params(request, client)

    def query_token(self, token_string: str, token_type_hint: str | None) -> Token | None:
        return find_token(_owner(self), token_string)

    def check_permission(self, token: Token, client: Client, request: Any) -> bool:
        # RFC 7662 section 4: only resource servers named to the server learn about any
        # token; a client may always ask about its own.
        client_id = client.get_client_id()
        return (
            client_id in _owner(self).introspection_clients or token.record.client_id == client_id
        )

    def introspect_token(self, token: Token) -> dict[str, Any]:
        return _owner(self).introspection_payload(token.record)


# ---- the server ------------------------------------------------------------------------------


class Server(AuthorizationServer):  # type: ignore[misc]
    """Authlib's AuthorizationServer integrated with buttress's storage and responses."""

    def __init__(self, owner: OAuthServer) -> None:
        super().__init__(scopes_supported=owner.scopes_supported)
        self.owner = owner
        self.register_token_generator("default", AccessTokenGenerator(owner))
        self.register_grant(CodeGrant, [RequiredS256CodeChallenge()])
        self.register_grant(RotatingRefreshTokenGrant)
        self.register_grant(ConfidentialClientCredentialsGrant)
        self.register_endpoint(Revocation)
        self.register_endpoint(Introspection)
        self.issuer_parameter = _Issuer(owner.issuer)
        self.register_extension(self.issuer_parameter)

    def query_client(self, client_id: str) -> Client | None:
        record = self.owner.storage.get_client(client_id)
        return None if record is None else Client(record, self.owner.verified_secrets)

    def save_token(self, token: dict[str, Any], request: Any) -> None:
        self.owner.record_issued_tokens(token, request)

    def create_oauth2_request(self, request: Any) -> Any:
        if not isinstance(request, OAuth2Request):
            raise TypeError("The OAuth server takes only requests built by buttress.")
        return request

    def create_json_request(self, request: Any) -> Any:
        raise NotImplementedError("The OAuth server takes no JSON requests.")

    def handle_response(
        self, status: int, body: dict[str, Any] | str, headers: list[tuple[str, str]]
    ) -> OAuthResponse:
        if isinstance(body, dict) and "error" in body and not body.get("error_description"):
            default = DEFAULT_DESCRIPTIONS.get(str(body["error"]))
            if default:
                body = {**body, "error_description": default}
        return OAuthResponse(status, body, headers)

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        return None


class _Issuer(IssuerParameter):  # type: ignore[misc]
    """RFC 9207: the ``iss`` parameter in every authorization response, errors included."""

    def __init__(self, issuer: str) -> None:
        self.issuer = issuer

    def get_issuer(self) -> str:
        return self.issuer
