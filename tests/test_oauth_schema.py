"""Schemathesis against the ASGI app, driven by the OpenAPI description that ships with the
package: the token, revocation and introspection endpoints never answer 5xx, and answer only
the status codes, content types and bodies the description documents, for valid and invalid
input alike."""

from __future__ import annotations

import base64

import pytest
import schemathesis
from buttress.security.oauth import OAuthServer, create_app, load_openapi
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

server = OAuthServer("https://testserver")
server.register_client(
    "web",
    client_secret="web-secret",
    redirect_uris=["https://app.example/cb"],
    scopes=["profile"],
)
server.register_client("spa", public=True, redirect_uris=["https://app.example/cb"])
app = create_app(server)

schema = schemathesis.openapi.from_asgi("/openapi.json", app)
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=25
)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def test_the_served_description_is_the_shipped_one() -> None:
    assert schema.raw_schema["paths"] == load_openapi()["paths"]


# Generated credentials rarely authenticate; a known client's reach the grant and token logic.
WEB_CLIENT = "Basic " + base64.b64encode(b"web:web-secret").decode("ascii")


@pytest.mark.parametrize("authorization", [None, WEB_CLIENT], ids=["generated", "web-client"])
@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_endpoints_keep_to_their_description(
    case: schemathesis.Case, authorization: str | None
) -> None:
    headers = None if authorization is None else {"Authorization": authorization}
    response = case.call(headers=headers)
    case.validate_response(response, checks=CHECKS)
