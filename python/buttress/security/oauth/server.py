"""The OAuth 2.0 authorization server: a Python object, and the endpoints an ASGI app exposes.

``OAuthServer`` is built on Authlib's server components and joserfc (see ``_integration``) and
holds its state in an ``OAuthStorage``. It can be driven two ways:

- from Python, without HTTP (the catalogue's ``Authorize`` and ``ExchangeCode``):
  ``authorize``, ``exchange_code``, ``refresh``, ``client_credentials``, ``revoke``,
  ``introspect``;
- from HTTP, through ``create_app`` (app.py), which calls the endpoint methods
  (``start_authorization``/``finish_authorization``, ``token_endpoint``,
  ``revocation_endpoint``, ``introspection_endpoint``) with parsed parameters and turns the
  ``OAuthResponse`` they return into an HTTP response.

>>> import base64, hashlib
>>> server = OAuthServer("https://auth.example")
>>> _ = server.register_client("app", client_secret="app-secret",
...                            redirect_uris=["https://app.example/cb"], scopes=["read"])
>>> verifier = "v" * 43
>>> challenge = base64.urlsafe_b64encode(
...     hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
>>> granted = server.authorize(client_id="app", redirect_uri="https://app.example/cb",
...                            subject="alice", code_challenge=challenge, state="xyz")
>>> granted.state, granted.issuer
('xyz', 'https://auth.example')
>>> tokens = server.exchange_code(code=granted.code, client_id="app",
...                               client_secret="app-secret", code_verifier=verifier,
...                               redirect_uri="https://app.example/cb")
>>> tokens.token_type, tokens.scope
('Bearer', 'read')
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from authlib.oauth2.base import OAuth2Error  # type: ignore[import-untyped]
from authlib.oauth2.rfc6749.util import scope_to_list  # type: ignore[import-untyped]
from authlib.oauth2.rfc8414 import (  # type: ignore[import-untyped]
    AuthorizationServerMetadata,
    get_well_known_url,
)
from authlib.oauth2.rfc9207 import (  # type: ignore[import-untyped]
    AuthorizationServerMetadata as IssuerMetadata,
)
from joserfc.jwk import ECKey, KeySet

from buttress.errors import OAuthError
from buttress.security.oauth import _integration
from buttress.security.oauth._integration import OAuthResponse, digest
from buttress.security.oauth._params import (
    check_basic_credentials,
    check_parameters,
    check_single_client_authentication,
)
from buttress.security.oauth.client_secrets import VerifiedSecrets, hash_client_secret
from buttress.security.oauth.storage import (
    ClientRecord,
    InMemoryOAuthStorage,
    OAuthStorage,
    SigningKeyRecord,
    TokenRecord,
)
from buttress.security.tokens import is_loopback_host
from buttress.security.zerotrust.encryption import FieldEncryptor

__all__ = [
    "AuthorizationRequest",
    "AuthorizationResponse",
    "OAuthResponse",
    "OAuthServer",
    "TokenResponse",
]

Parameters = Mapping[str, str] | Iterable[tuple[str, str]]

_GRANT_TYPES = ("authorization_code", "refresh_token", "client_credentials")
# Tokens are checked with up to this much clock skew, so a retired key stays published this
# much longer than the last token it signed.
_CLOCK_SKEW = 60
# Where a sealed signing key sits in its record, and the field its encryption is bound to.
_SEALED_KEY_FIELD = "sealed_private_jwk"
_PURGE_INTERVAL = 60.0


@dataclass(frozen=True)
class TokenResponse:
    """A successful token response (RFC 6749 section 5.1).

    >>> TokenResponse("eyJ...", "Bearer", 600, "read", None).refresh_token is None
    True
    """

    access_token: str = field(repr=False)
    token_type: str
    expires_in: int
    scope: str
    refresh_token: str | None = field(repr=False)


@dataclass(frozen=True)
class AuthorizationResponse:
    """A granted authorization: the code, the client's ``state``, the issuer (RFC 9207) and
    the full URL the user agent is redirected to.

    >>> AuthorizationResponse("c", "xyz", "https://auth.example", "https://app/cb?code=c").state
    'xyz'
    """

    code: str = field(repr=False)
    state: str | None
    issuer: str
    redirect_to: str = field(repr=False)


@dataclass(frozen=True)
class AuthorizationRequest:
    """A valid authorization request waiting for the resource owner's decision: show it on a
    consent page, then pass it to ``OAuthServer.finish_authorization``.

    >>> request = AuthorizationRequest("app", "https://app.example/cb", ("read",), None, None)
    >>> request.scopes
    ('read',)
    """

    client_id: str
    redirect_uri: str
    scopes: tuple[str, ...]
    state: str | None
    _grant: Any = field(repr=False, compare=False)


class OAuthServer:
    """An OAuth 2.0 authorization server with RFC 9700's defaults.

    - ``issuer``: the server's URL (https, or http on a loopback address for development);
      the endpoints live under it: ``/authorize``, ``/token``, ``/revoke``, ``/introspect``,
      ``/jwks``, and the metadata at ``/.well-known/oauth-authorization-server``.
    - ``storage``: an ``OAuthStorage``; an ``InMemoryOAuthStorage`` when omitted.
    - ``audience``: the ``aud`` of access tokens (your API's identifier); the client id when
      None.
    - ``scopes_supported``: every scope the server knows; any scope when None.
    - ``access_token_lifetime``, ``refresh_token_lifetime``: seconds (int).
    - ``code_lifetime``: seconds an authorization code may be redeemed in (at most 600).
    - ``key_publication_delay``: seconds a new signing key is published in the JWKS before it
      signs (the JWKS's ``Cache-Control: max-age``), so a resource server holding the key set
      in a cache knows the key before it sees a token signed with it. 0 signs at once.
    - ``key_encryptor``: a ``buttress.security.zerotrust.FieldEncryptor`` that seals signing
      keys before they are stored (AES-256-GCM under its keyring), so whoever reads the store
      cannot sign tokens. Keys stored without one still load; keys sealed with one need it.
    - ``introspection_clients``: the confidential clients (resource servers) that may
      introspect any token. Any other client learns only about tokens issued to itself; for
      the rest introspection answers ``{"active": false}`` (RFC 7662 section 4).

    >>> server = OAuthServer("https://auth.example", audience="https://api.example")
    >>> server.metadata()["code_challenge_methods_supported"]
    ['S256']
    """

    def __init__(
        self,
        issuer: str,
        *,
        storage: OAuthStorage | None = None,
        audience: str | None = None,
        scopes_supported: Iterable[str] | None = None,
        access_token_lifetime: int = 600,
        refresh_token_lifetime: int = 14 * 24 * 3600,
        code_lifetime: float = 60.0,
        introspection_clients: Iterable[str] = (),
        key_publication_delay: float = 300.0,
        key_encryptor: FieldEncryptor | None = None,
    ) -> None:
        self.issuer = _check_issuer(issuer)
        if storage is None:
            storage = InMemoryOAuthStorage()
        elif not isinstance(storage, OAuthStorage):
            raise TypeError(
                "storage must implement OAuthStorage (get_client, save_code, use_code, "
                f"save_token, ...), such as InMemoryOAuthStorage (got {type(storage).__name__})."
            )
        self.storage: OAuthStorage = storage
        if audience is not None:
            _check_text("audience", audience)
        self.audience = audience
        self.scopes_supported: list[str] | None = (
            None
            if scopes_supported is None
            else list(_check_scopes("scopes_supported", scopes_supported))
        )
        self.access_token_lifetime = _check_lifetime("access_token_lifetime", access_token_lifetime)
        self.refresh_token_lifetime = _check_lifetime(
            "refresh_token_lifetime", refresh_token_lifetime
        )
        if isinstance(code_lifetime, bool) or not isinstance(code_lifetime, (int, float)):
            raise TypeError(
                f"code_lifetime must be a number of seconds (got {type(code_lifetime).__name__})."
            )
        if not 0 < code_lifetime <= 600:
            raise ValueError(
                "code_lifetime must be more than 0 and at most 600 seconds; codes are meant "
                f"to be redeemed at once (got {code_lifetime})."
            )
        self.code_lifetime = float(code_lifetime)
        if isinstance(introspection_clients, str):
            raise TypeError(
                "introspection_clients must be a collection of client ids, not one str "
                f"(got {introspection_clients!r}); write [{introspection_clients!r}]."
            )
        if isinstance(key_publication_delay, bool) or not isinstance(
            key_publication_delay, (int, float)
        ):
            raise TypeError(
                "key_publication_delay must be a number of seconds "
                f"(got {type(key_publication_delay).__name__})."
            )
        if not 0 <= key_publication_delay <= 86_400:
            raise ValueError(
                "key_publication_delay must be from 0 to 86400 seconds: how long resource "
                f"servers may cache the JWKS (got {key_publication_delay})."
            )
        self.key_publication_delay = float(key_publication_delay)
        if key_encryptor is not None and not isinstance(key_encryptor, FieldEncryptor):
            raise TypeError(
                "key_encryptor must be a buttress.security.zerotrust.FieldEncryptor or None "
                f"(got {type(key_encryptor).__name__})."
            )
        self.key_encryptor = key_encryptor
        self.introspection_clients = frozenset(
            _check_text("introspection_clients", client) for client in introspection_clients
        )
        # How long a grant family can have live tokens: the longest a revocation of it must be
        # remembered, and a used code kept to recognise its replay.
        self.family_lifetime = float(
            max(self.refresh_token_lifetime, self.access_token_lifetime) + _CLOCK_SKEW
        )
        base = self.issuer.rstrip("/")
        self.authorization_endpoint = base + "/authorize"
        self.token_endpoint_url = base + "/token"
        self.revocation_endpoint_url = base + "/revoke"
        self.introspection_endpoint_url = base + "/introspect"
        self.jwks_uri = base + "/jwks"
        self.metadata_url = str(get_well_known_url(self.issuer, external=True))
        # Serialises key creation and rotation in this process, so two threads never both
        # create a first key.
        self._key_lock = threading.Lock()
        self._imported_keys: dict[str, ECKey] = {}
        self._last_purge = time.time()
        # A confidential client's secret costs a scrypt the first time, an HMAC after that.
        self.verified_secrets = VerifiedSecrets()
        self._authlib = _integration.Server(self)

    # ---- clients ------------------------------------------------------------------------------

    def register_client(
        self,
        client_id: str,
        *,
        redirect_uris: Iterable[str] = (),
        scopes: Iterable[str] = (),
        client_secret: str | None = None,
        public: bool = False,
        grant_types: Iterable[str] | None = None,
    ) -> ClientRecord:
        """Registers (or replaces) a client and returns its record, secret hashed.

        A confidential client needs ``client_secret``; a public one (``public=True``: a browser
        or native app) has none. ``grant_types`` defaults to authorization_code and
        refresh_token, plus client_credentials for confidential clients (only client_credentials
        for a confidential client without ``redirect_uris``).

        >>> server = OAuthServer("https://auth.example")
        >>> server.register_client("spa", public=True,
        ...                        redirect_uris=["https://spa.example/cb"]).grant_types
        ('authorization_code', 'refresh_token')
        """
        _check_text("client_id", client_id)
        if not client_id:
            raise ValueError("client_id must not be empty.")
        if not isinstance(public, bool):
            raise TypeError(f"public must be a bool (got {type(public).__name__}).")
        if public and client_secret is not None:
            raise ValueError(
                "A public client has no secret: drop client_secret, or set public=False for a "
                "confidential client."
            )
        if not public and client_secret is None:
            raise ValueError(
                "client_secret is required for a confidential client; pass one, or set "
                "public=True for a browser or native app that cannot keep a secret."
            )
        if client_secret is not None:
            _check_text("client_secret", client_secret)
        uris = tuple(_check_strings("redirect_uris", redirect_uris))
        grants: tuple[str, ...]
        if grant_types is None:
            if public:
                grants = _GRANT_TYPES[:2]
            else:
                # A confidential client with nowhere to redirect to is a service: it can only
                # use client credentials.
                grants = _GRANT_TYPES if uris else ("client_credentials",)
        else:
            grants = tuple(_check_strings("grant_types", grant_types))
            unknown = sorted(set(grants) - set(_GRANT_TYPES))
            if unknown:
                raise ValueError(
                    f"grant_types may hold only {', '.join(_GRANT_TYPES)}; remove "
                    f"{', '.join(unknown)}."
                )
            if public and "client_credentials" in grants:
                raise ValueError(
                    "A public client cannot use client_credentials: it has no credentials. "
                    "Remove it from grant_types or make the client confidential."
                )
        for uri in uris:
            _check_redirect_uri(uri)
        if "authorization_code" in grants and not uris:
            raise ValueError(
                "redirect_uris must hold at least one URI for a client that uses "
                "authorization_code."
            )
        client_scopes = tuple(_check_scopes("scopes", scopes))
        if self.scopes_supported is not None:
            unknown = sorted(set(client_scopes) - set(self.scopes_supported))
            if unknown:
                raise ValueError(
                    f"scopes holds {', '.join(unknown)}, which the server does not support "
                    "(scopes_supported); add them there or remove them here."
                )
        record = ClientRecord(
            client_id=client_id,
            secret_hash=None if client_secret is None else hash_client_secret(client_secret),
            redirect_uris=uris,
            scopes=client_scopes,
            grant_types=tuple(grants),
        )
        self.storage.save_client(record)
        return record

    # ---- the Python API ---------------------------------------------------------------------

    def authorize(
        self,
        *,
        client_id: str,
        redirect_uri: str | None,
        subject: str,
        code_challenge: str,
        code_challenge_method: str = "S256",
        scope: str | None = None,
        state: str | None = None,
    ) -> AuthorizationResponse:
        """Grants an authorization code to ``client_id`` for the resource owner ``subject``
        (whose consent the caller has obtained): the catalogue's ``Authorize``.

        Raises ``OAuthError`` when the request is refused; its ``redirect_to`` is the error
        response for the client when the RFC lets it be delivered there.

        >>> server = OAuthServer("https://auth.example")
        >>> _ = server.register_client("spa", public=True, redirect_uris=["https://spa/cb"])
        >>> server.authorize(client_id="spa", redirect_uri="https://spa/cb", subject="alice",
        ...                  code_challenge="x" * 43, code_challenge_method="plain")
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        buttress.errors.OAuthError: invalid_request: The code_challenge_method must be S256; ...
        """
        _check_text("subject", subject)
        if not subject:
            raise ValueError("subject must name the resource owner; it must not be empty.")
        params = _drop_none(
            response_type="code",
            client_id=_check_text("client_id", client_id),
            redirect_uri=_check_optional_text("redirect_uri", redirect_uri),
            code_challenge=_check_text("code_challenge", code_challenge),
            code_challenge_method=_check_text("code_challenge_method", code_challenge_method),
            scope=_check_optional_text("scope", scope),
            state=_check_optional_text("state", state),
        )
        started = self.start_authorization(params)
        if isinstance(started, OAuthResponse):
            raise _error_from(started)
        response = self.finish_authorization(started, subject)
        granted = response.redirect_parameters()
        if response.status_code != 302 or "code" not in granted:
            raise _error_from(response)
        return AuthorizationResponse(
            code=granted["code"],
            state=granted.get("state"),
            issuer=granted.get("iss", self.issuer),
            redirect_to=str(response.location),
        )

    def exchange_code(
        self,
        *,
        code: str,
        client_id: str,
        code_verifier: str,
        redirect_uri: str | None = None,
        client_secret: str | None = None,
    ) -> TokenResponse:
        """Exchanges an authorization code for tokens: the catalogue's ``ExchangeCode``.

        A confidential client passes ``client_secret``; a public client does not. A code is
        good once: a second exchange raises ``OAuthError`` (``invalid_grant``) and revokes the
        tokens the first one issued.

        >>> OAuthServer("https://auth.example").exchange_code(
        ...     code="made-up", client_id="nobody", code_verifier="v" * 43)
        Traceback (most recent call last):
        ...
        buttress.errors.OAuthError: invalid_client: The client does not exist on this server.
        """
        params = _drop_none(
            grant_type="authorization_code",
            code=_check_text("code", code),
            code_verifier=_check_text("code_verifier", code_verifier),
            redirect_uri=_check_optional_text("redirect_uri", redirect_uri),
            **self._client_params(client_id, client_secret),
        )
        return _token_response(self.token_endpoint(params))

    def refresh(
        self,
        *,
        refresh_token: str,
        client_id: str,
        client_secret: str | None = None,
        scope: str | None = None,
    ) -> TokenResponse:
        """Trades a refresh token for new tokens, a new refresh token among them; the old one
        is spent, and presenting it again revokes every token of its grant.

        >>> OAuthServer("https://auth.example").refresh(refresh_token="x", client_id="nobody")
        Traceback (most recent call last):
        ...
        buttress.errors.OAuthError: invalid_client: The client does not exist on this server.
        """
        params = _drop_none(
            grant_type="refresh_token",
            refresh_token=_check_text("refresh_token", refresh_token),
            scope=_check_optional_text("scope", scope),
            **self._client_params(client_id, client_secret),
        )
        return _token_response(self.token_endpoint(params))

    def client_credentials(
        self, *, client_id: str, client_secret: str, scope: str | None = None
    ) -> TokenResponse:
        """Issues an access token to a confidential client acting on its own behalf.

        >>> server = OAuthServer("https://auth.example")
        >>> _ = server.register_client("batch", client_secret="s", scopes=["reports"])
        >>> server.client_credentials(client_id="batch", client_secret="s").scope
        'reports'
        """
        params = _drop_none(
            grant_type="client_credentials",
            scope=_check_optional_text("scope", scope),
            **self._client_params(client_id, _check_text("client_secret", client_secret)),
        )
        return _token_response(self.token_endpoint(params))

    def revoke(
        self,
        token: str,
        *,
        client_id: str,
        client_secret: str | None = None,
        token_type_hint: str | None = None,
    ) -> None:
        """Revokes a token (RFC 7009); revoking a refresh token ends its whole grant. An
        unknown token is not an error.

        >>> server = OAuthServer("https://auth.example")
        >>> _ = server.register_client("batch", client_secret="s")
        >>> server.revoke("not-a-token", client_id="batch", client_secret="s")
        """
        params = _drop_none(
            token=_check_text("token", token),
            token_type_hint=_check_optional_text("token_type_hint", token_type_hint),
            **self._client_params(client_id, client_secret),
        )
        response = self.revocation_endpoint(params)
        if response.status_code != 200:
            raise _error_from(response)

    def introspect(
        self,
        token: str,
        *,
        client_id: str,
        client_secret: str,
        token_type_hint: str | None = None,
    ) -> dict[str, Any]:
        """What the server knows of a token (RFC 7662), asked by an authenticated client.

        >>> server = OAuthServer("https://auth.example")
        >>> _ = server.register_client("api", client_secret="s")
        >>> server.introspect("not-a-token", client_id="api", client_secret="s")
        {'active': False}
        """
        params = _drop_none(
            token=_check_text("token", token),
            token_type_hint=_check_optional_text("token_type_hint", token_type_hint),
            **self._client_params(client_id, _check_text("client_secret", client_secret)),
        )
        response = self.introspection_endpoint(params)
        if response.status_code != 200 or not isinstance(response.body, dict):
            raise _error_from(response)
        return dict(response.body)

    def token_is_active(self, token: str) -> bool:
        """True when this server issued ``token`` and it is neither expired nor revoked: the
        in-process twin of introspection, for a resource server living beside the server.

        >>> OAuthServer("https://auth.example").token_is_active("made-up")
        False
        """
        _check_text("token", token)
        record = self.storage.get_token(digest(token))
        return record is not None and record.active_at(time.time())

    # ---- the endpoints, for HTTP ---------------------------------------------------------------

    def start_authorization(
        self, params: Parameters, headers: Mapping[str, str] | None = None
    ) -> AuthorizationRequest | OAuthResponse:
        """Validates an authorization request (the query of ``GET /authorize``). Returns an
        ``AuthorizationRequest`` waiting for consent, or the error ``OAuthResponse`` to send:
        a redirect to the client when its redirect URI is trusted, a 400 otherwise.

        >>> server = OAuthServer("https://auth.example")
        >>> server.start_authorization({"response_type": "code", "client_id": "x"}).status_code
        400
        """
        server = self._authlib
        request = None
        try:
            request = self._request("GET", self.authorization_endpoint, params, headers)
            grant = server.get_consent_grant(request)
        except OAuth2Error as error:
            response: OAuthResponse = server.handle_error_response(request, error)
            server.issuer_parameter.add_issuer_parameter(server, response)
            return response
        return AuthorizationRequest(
            client_id=grant.client.get_client_id(),
            redirect_uri=grant.redirect_uri,
            scopes=tuple(scope_to_list(request.scope) or ()),
            state=request.payload.state,
            _grant=grant,
        )

    def finish_authorization(
        self, request: AuthorizationRequest, subject: str | None
    ) -> OAuthResponse:
        """Completes an authorization request with the resource owner's decision: ``subject``
        (who approved) grants a code, None denies (``access_denied``). Returns the redirect.

        >>> server = OAuthServer("https://auth.example")
        >>> _ = server.register_client("spa", public=True, redirect_uris=["https://spa/cb"])
        >>> pending = server.start_authorization({
        ...     "response_type": "code", "client_id": "spa", "code_challenge": "c" * 43,
        ...     "code_challenge_method": "S256"})
        >>> server.finish_authorization(pending, None).redirect_parameters()["error"]
        'access_denied'
        """
        if not isinstance(request, AuthorizationRequest):
            raise TypeError(
                "request must be the AuthorizationRequest start_authorization returned "
                f"(got {type(request).__name__})."
            )
        if subject is not None:
            _check_text("subject", subject)
        owner = _integration.ResourceOwner(subject) if subject else None
        grant = request._grant
        response: OAuthResponse = self._authlib.create_authorization_response(
            request=grant.request, grant_user=owner, grant=grant
        )
        return response

    def token_endpoint(
        self, params: Parameters, headers: Mapping[str, str] | None = None
    ) -> OAuthResponse:
        """Handles ``POST /token`` with its form parameters and headers.

        >>> OAuthServer("https://auth.example").token_endpoint(
        ...     {"grant_type": "password"}).body["error"]
        'unsupported_grant_type'
        """
        try:
            request = self._request("POST", self.token_endpoint_url, params, headers)
        except OAuth2Error as error:
            return self._error_response(error)
        response: OAuthResponse = self._authlib.create_token_response(request)
        return response

    def revocation_endpoint(
        self, params: Parameters, headers: Mapping[str, str] | None = None
    ) -> OAuthResponse:
        """Handles ``POST /revoke`` (RFC 7009).

        >>> OAuthServer("https://auth.example").revocation_endpoint({"token": "x"}).status_code
        401
        """
        return self._endpoint("revocation", self.revocation_endpoint_url, params, headers)

    def introspection_endpoint(
        self, params: Parameters, headers: Mapping[str, str] | None = None
    ) -> OAuthResponse:
        """Handles ``POST /introspect`` (RFC 7662); the caller must authenticate as a
        confidential client.

        >>> OAuthServer("https://auth.example").introspection_endpoint(
        ...     {"token": "x"}).status_code
        401
        """
        return self._endpoint("introspection", self.introspection_endpoint_url, params, headers)

    def metadata(self) -> dict[str, Any]:
        """The authorization server metadata (RFC 8414), validated by Authlib.

        >>> OAuthServer("https://auth.example").metadata()["token_endpoint"]
        'https://auth.example/token'
        """
        data = {
            "issuer": self.issuer,
            "authorization_endpoint": self.authorization_endpoint,
            "token_endpoint": self.token_endpoint_url,
            "jwks_uri": self.jwks_uri,
            "revocation_endpoint": self.revocation_endpoint_url,
            "introspection_endpoint": self.introspection_endpoint_url,
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": list(_GRANT_TYPES),
            "token_endpoint_auth_methods_supported": list(_integration.ALL_AUTH_METHODS),
            "revocation_endpoint_auth_methods_supported": list(_integration.ALL_AUTH_METHODS),
            "introspection_endpoint_auth_methods_supported": list(
                _integration.CONFIDENTIAL_AUTH_METHODS
            ),
            "code_challenge_methods_supported": ["S256"],
            "authorization_response_iss_parameter_supported": True,
        }
        if self.scopes_supported is not None:
            data["scopes_supported"] = list(self.scopes_supported)
        metadata = AuthorizationServerMetadata(data)
        metadata.validate(metadata_classes=[IssuerMetadata])
        return dict(metadata)

    # ---- signing keys --------------------------------------------------------------------------

    def jwks(self) -> dict[str, Any]:
        """The public signing keys (a JWKS): the current key and retired keys whose tokens may
        still be live.

        >>> keys = OAuthServer("https://auth.example").jwks()["keys"]
        >>> [(key["kty"], key["crv"], key["alg"]) for key in keys]
        [('EC', 'P-256', 'ES256')]
        """
        self._current_key()
        now = time.time()
        published = [
            record
            for record in self.storage.signing_keys()
            if record.retire_at is None or record.retire_at > now
        ]
        return {"keys": [self._imported(record).as_dict(private=False) for record in published]}

    def rotate_signing_key(self) -> str:
        """Makes a new signing key and returns its key id. It is published in the JWKS at
        once and signs after ``key_publication_delay``; until then the previous key signs, and
        it stays in the JWKS until the last token it signed has expired.

        >>> server = OAuthServer("https://auth.example", key_publication_delay=0)
        >>> first_kid = server.jwks()["keys"][0]["kid"]
        >>> new_kid = server.rotate_signing_key()
        >>> [key["kid"] == new_kid for key in server.jwks()["keys"]]
        [False, True]
        """
        with self._key_lock:
            now = time.time()
            previous = [r for r in self.storage.signing_keys() if r.retire_at is None]
            fresh = self._new_key_record(now)
            self.storage.save_signing_key(fresh)
            retire_at = now + self.key_publication_delay + self.access_token_lifetime + _CLOCK_SKEW
            for record in previous:
                self.storage.save_signing_key(replace(record, retire_at=retire_at))
            return fresh.kid

    def signing_key_set(self) -> KeySet:
        """A joserfc ``KeySet`` holding only the current private signing key.

        >>> len(OAuthServer("https://auth.example").signing_key_set().keys)
        1
        """
        return KeySet([self._current_key()])

    def purge_expired(self) -> int:
        """Drops expired codes, tokens and retired keys from storage; returns how many went.
        The server also does this on its own at most once a minute as it issues tokens.

        >>> OAuthServer("https://auth.example").purge_expired()
        0
        """
        self._last_purge = time.time()
        return self.storage.purge(self._last_purge)

    # ---- used by the Authlib integration ---------------------------------------------------------

    def record_issued_tokens(self, token: dict[str, Any], request: Any) -> None:
        """Stores the tokens of a token response (called by the Authlib integration)."""
        now = time.time()
        client_id = str(request.client.get_client_id())
        subject = None if request.user is None else str(request.user.get_user_id())
        if request.authorization_code is not None:
            family_id = request.authorization_code.record.family_id
        elif request.refresh_token is not None:
            family_id = request.refresh_token.record.family_id
        else:
            family_id = _integration.new_family_id()
        scope = str(token.get("scope") or "")
        access_token = str(token["access_token"])
        # The token was signed a moment ago by this server: its claims are read, not verified
        # again (an ECDSA verification is most of a token request's cost).
        claims = _unverified_claims(access_token)
        self.storage.save_token(
            TokenRecord(
                token_hash=digest(access_token),
                kind="access_token",
                client_id=client_id,
                subject=subject,
                scope=scope,
                family_id=family_id,
                issued_at=float(claims["iat"]),
                expires_at=float(claims["exp"]),
                audience=str(claims["aud"]),
                token_id=str(claims["jti"]),
            )
        )
        if "refresh_token" in token:
            # RFC 6749 section 6: a rotated refresh token keeps the scope of the grant, even
            # when this refresh asked for a narrower access token.
            refresh_scope = (
                scope if request.refresh_token is None else request.refresh_token.record.scope
            )
            self.storage.save_token(
                TokenRecord(
                    token_hash=digest(str(token["refresh_token"])),
                    kind="refresh_token",
                    client_id=client_id,
                    subject=subject,
                    scope=refresh_scope,
                    family_id=family_id,
                    issued_at=now,
                    expires_at=now + self.refresh_token_lifetime,
                )
            )
        if now - self._last_purge > _PURGE_INTERVAL:
            self.purge_expired()

    def introspection_payload(self, record: TokenRecord) -> dict[str, Any]:
        """The RFC 7662 response for an active token (called by the Authlib integration)."""
        payload: dict[str, Any] = {
            "active": True,
            "client_id": record.client_id,
            "scope": record.scope,
            "iss": self.issuer,
            "exp": int(record.expires_at),
            "iat": int(record.issued_at),
        }
        if record.kind == "access_token":
            payload["token_type"] = "Bearer"
            payload["sub"] = record.subject or record.client_id
            if record.audience is not None:
                payload["aud"] = record.audience
            if record.token_id is not None:
                payload["jti"] = record.token_id
        elif record.subject is not None:
            payload["sub"] = record.subject
        return payload

    # ---- internals -----------------------------------------------------------------------------

    def _client_params(self, client_id: str, client_secret: str | None) -> dict[str, str]:
        params = {"client_id": _check_text("client_id", client_id)}
        if client_secret is not None:
            params["client_secret"] = _check_text("client_secret", client_secret)
        return params

    def _request(
        self,
        method: str,
        uri: str,
        params: Parameters,
        headers: Mapping[str, str] | None,
    ) -> _integration.Request:
        pairs = params.items() if isinstance(params, Mapping) else params
        checked = check_parameters(pairs)
        if method == "POST":
            # The token, revocation and introspection endpoints, where the client authenticates.
            check_single_client_authentication(checked, headers or {})
        else:
            check_basic_credentials(headers or {})
        # The endpoint's own URL, not the URL the request arrived on: behind a TLS-terminating
        # proxy that one says http, and Authlib would refuse it as insecure transport.
        return _integration.Request(method, uri, headers or {}, checked)

    def _endpoint(
        self, name: str, uri: str, params: Parameters, headers: Mapping[str, str] | None
    ) -> OAuthResponse:
        try:
            request = self._request("POST", uri, params, headers)
        except OAuth2Error as error:
            return self._error_response(error)
        response: OAuthResponse = self._authlib.create_endpoint_response(name, request)
        return response

    def _error_response(self, error: Any) -> OAuthResponse:
        response: OAuthResponse = self._authlib.handle_error_response(None, error)
        return response

    def _new_key_record(self, now: float) -> SigningKeyRecord:
        key = ECKey.generate_key(
            "P-256", parameters={"use": "sig", "alg": _integration.SIGNING_ALGORITHM}, auto_kid=True
        )
        return SigningKeyRecord(
            kid=str(key.kid), private_jwk=self._seal(str(key.kid), key), created_at=now
        )

    def _current_key(self) -> ECKey:
        records = self.storage.signing_keys()
        if not any(r.retire_at is None for r in records):
            with self._key_lock:
                records = self.storage.signing_keys()
                if not any(r.retire_at is None for r in records):
                    records = [*records, self._new_key_record(time.time())]
                    self.storage.save_signing_key(records[-1])
        return self._imported(self._signing_record(records, time.time()))

    def _signing_record(self, records: list[SigningKeyRecord], now: float) -> SigningKeyRecord:
        """The key that signs now. A key starts signing ``key_publication_delay`` after it
        was made (the oldest key at once: nothing signed before it), and signs until a newer
        key starts; a retired key never signs."""
        ordered = sorted(records, key=lambda r: (r.created_at, r.kid))
        live = [r for r in ordered if r.retire_at is None or r.retire_at > now]
        started = [
            r for r in live if r is ordered[0] or r.created_at + self.key_publication_delay <= now
        ]
        return started[-1] if started else live[0]

    def _published_key_set(self) -> KeySet:
        return KeySet([self._imported(record) for record in self.storage.signing_keys()])

    def _seal(self, kid: str, key: ECKey) -> dict[str, Any]:
        private = key.as_dict(private=True)
        if self.key_encryptor is None:
            return dict(private)
        sealed = self.key_encryptor.encrypt_text(
            json.dumps(private), record_id=kid, field=_SEALED_KEY_FIELD
        )
        return {"kid": kid, _SEALED_KEY_FIELD: sealed}

    def _unseal(self, record: SigningKeyRecord) -> dict[str, Any]:
        sealed = record.private_jwk.get(_SEALED_KEY_FIELD)
        if sealed is None:
            return dict(record.private_jwk)
        if self.key_encryptor is None:
            raise ValueError(
                f"The signing key {record.kid!r} is stored sealed; give the server the "
                "key_encryptor that sealed it."
            )
        # The record id binds the sealed key to its kid: a key moved to another record fails.
        plain = self.key_encryptor.decrypt_text(
            str(sealed), record_id=record.kid, field=_SEALED_KEY_FIELD
        )
        private: dict[str, Any] = json.loads(plain)
        return private

    def _imported(self, record: SigningKeyRecord) -> ECKey:
        key = self._imported_keys.get(record.kid)
        if key is None:
            key = ECKey.import_key(self._unseal(record))
            self._imported_keys[record.kid] = key
        return key

    def __repr__(self) -> str:
        return f"OAuthServer({self.issuer!r}, storage={self.storage!r})"


# ---- responses to results ------------------------------------------------------------------------


def _token_response(response: OAuthResponse) -> TokenResponse:
    body = response.body
    if response.status_code != 200 or not isinstance(body, dict):
        raise _error_from(response)
    return TokenResponse(
        access_token=str(body["access_token"]),
        token_type=str(body["token_type"]),
        expires_in=int(body.get("expires_in", 0)),
        scope=str(body.get("scope", "")),
        refresh_token=None if body.get("refresh_token") is None else str(body["refresh_token"]),
    )


def _error_from(response: OAuthResponse) -> OAuthError:
    if isinstance(response.body, dict) and "error" in response.body:
        body = response.body
        return OAuthError(
            str(body["error"]),
            str(body.get("error_description", "")),
            response.status_code,
            None,
        )
    found = response.redirect_parameters()
    error = found.get("error", "server_error")
    description = found.get("error_description") or _integration.DEFAULT_DESCRIPTIONS.get(
        error, "The authorization server refused the request."
    )
    return OAuthError(error, description, response.status_code, response.location)


# ---- argument checks -----------------------------------------------------------------------------


def _drop_none(**params: str | None) -> dict[str, str]:
    return {name: value for name, value in params.items() if value is not None}


def _check_text(argument: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{argument} must be a str (got {type(value).__name__}).")
    return value


def _check_optional_text(argument: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{argument} must be a str or None (got {type(value).__name__}).")
    return value


def _check_strings(argument: str, values: object) -> list[str]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(
            f"{argument} must be a list of str, not {type(values).__name__}; wrap a single "
            "value in a list."
        )
    items = list(values)
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{argument} must hold only str (found {type(item).__name__}).")
    return items


def _check_scopes(argument: str, values: object) -> list[str]:
    scopes = _check_strings(argument, values)
    for scope in scopes:
        if not scope or any(ch in scope for ch in ' "\\') or not scope.isascii():
            raise ValueError(
                f"{argument} holds {scope!r}, which is not a valid scope name: use printable "
                "ASCII without spaces, quotes or backslashes (RFC 6749 section 3.3)."
            )
    return list(dict.fromkeys(scopes))


def _unverified_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT this server has just signed, read without checking the signature."""
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


def _check_lifetime(argument: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argument} must be an int of seconds (got {type(value).__name__}).")
    if value <= 0:
        raise ValueError(f"{argument} must be a positive number of seconds (got {value}).")
    return value


def _check_issuer(value: object) -> str:
    issuer = _check_text("issuer", value)
    parts = urlsplit(issuer)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(
            f"issuer must be an absolute https URL such as https://auth.example (got {issuer!r})."
        )
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ValueError(
            f"issuer must use https; plain http is allowed only on a loopback address for "
            f"development (got {issuer!r})."
        )
    if parts.query or parts.fragment:
        raise ValueError(
            f"issuer must have no query or fragment (RFC 8414 section 2; got {issuer!r})."
        )
    return issuer


def _check_redirect_uri(uri: str) -> None:
    parts = urlsplit(uri)
    if not parts.scheme or parts.fragment or "#" in uri:
        raise ValueError(
            f"redirect_uris holds {uri!r}; each must be an absolute URI without a fragment "
            "(RFC 6749 section 3.1.2)."
        )
    if parts.scheme == "http" and not is_loopback_host(parts.hostname or ""):
        raise ValueError(
            f"redirect_uris holds {uri!r}; http is allowed only on a loopback address "
            "(RFC 9700 section 2.6). Use https."
        )
