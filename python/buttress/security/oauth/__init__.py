"""An OAuth 2.0 authorization server built on Authlib and joserfc, with RFC 9700's defaults.

- ``OAuthServer``: the server as a Python object (``authorize``, ``exchange_code``,
  ``refresh``, ``client_credentials``, ``revoke``, ``introspect``, ``metadata``, ``jwks``,
  ``rotate_signing_key``) and the endpoint methods an HTTP front end calls.
- ``create_app``: the Starlette (ASGI) app exposing the endpoints; ``auto_approve`` for
  development consent; ``create_dev_app`` and ``python -m buttress.security.oauth serve`` for
  the development server.
- ``ResourceServer``: protects API endpoints with the server's RFC 9068 access tokens.
- ``OAuthStorage`` and ``InMemoryOAuthStorage``: where the server keeps its records.

Refusals raise ``buttress.errors.OAuthError`` (the RFC 6749 code in ``error``).

>>> server = OAuthServer("https://auth.example")
>>> _ = server.register_client("batch", client_secret="batch-secret", scopes=["reports"])
>>> server.client_credentials(client_id="batch", client_secret="batch-secret").token_type
'Bearer'
"""

from __future__ import annotations

from buttress.security.oauth._integration import OAuthResponse
from buttress.security.oauth.app import ConsentHandler, auto_approve, create_app, load_openapi
from buttress.security.oauth.client_secrets import (
    VerifiedSecrets,
    hash_client_secret,
    verify_client_secret,
)
from buttress.security.oauth.devserver import create_dev_app, load_dev_config
from buttress.security.oauth.resource import ProtectedEndpoint, ResourceServer, bearer_token
from buttress.security.oauth.server import (
    AuthorizationRequest,
    AuthorizationResponse,
    OAuthServer,
    TokenResponse,
)
from buttress.security.oauth.storage import (
    AuthorizationCodeRecord,
    ClientRecord,
    InMemoryOAuthStorage,
    OAuthStorage,
    SigningKeyRecord,
    TokenRecord,
)

__all__ = [
    "AuthorizationCodeRecord",
    "AuthorizationRequest",
    "AuthorizationResponse",
    "ClientRecord",
    "ConsentHandler",
    "InMemoryOAuthStorage",
    "OAuthResponse",
    "OAuthServer",
    "OAuthStorage",
    "ProtectedEndpoint",
    "ResourceServer",
    "SigningKeyRecord",
    "TokenRecord",
    "TokenResponse",
    "VerifiedSecrets",
    "auto_approve",
    "bearer_token",
    "create_app",
    "create_dev_app",
    "hash_client_secret",
    "load_dev_config",
    "load_openapi",
    "verify_client_secret",
]
