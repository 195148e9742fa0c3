"""The Bearer scheme (RFC 6750) as both the OAuth resource server and the zero-trust
middleware speak it: the token of an ``Authorization`` header, and the ``WWW-Authenticate``
challenge of a refusal."""

from __future__ import annotations

import re

# RFC 6750 section 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# RFC 6750 section 3: a quoted value holds %x20-21 / %x23-5B / %x5D-7E, so no '"' or '\'.
_UNQUOTABLE = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")


class MalformedAuthorizationError(ValueError):
    """The Authorization header names the Bearer scheme but holds no well-formed token."""


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None when there is no
    header or it uses another scheme. A Bearer header without a well-formed token raises
    ``MalformedAuthorizationError`` (answer ``invalid_request``, RFC 6750 section 3.1).

    >>> bearer_token("Bearer abc.def.ghi"), bearer_token("Basic dXNlcjpwdw=="), bearer_token(None)
    ('abc.def.ghi', None, None)
    """
    if authorization is None:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    credentials = credentials.strip()
    if not _B64TOKEN.fullmatch(credentials):
        raise MalformedAuthorizationError(
            "The Authorization header names the Bearer scheme but holds no well-formed token; "
            "send 'Authorization: Bearer <token>'."
        )
    return credentials


def quotable(text: str) -> bool:
    """Whether ``text`` can stand in a quoted challenge parameter as it is.

    >>> quotable("api"), quotable('a"b'), quotable("é")
    (True, False, False)
    """
    return _UNQUOTABLE.search(text) is None


def sanitise(text: str) -> str:
    """``text`` made quotable: a double quote becomes an apostrophe, anything else that may not
    stand there a question mark.

    >>> sanitise('kid "k1" is unknown\\n')
    "kid 'k1' is unknown?"
    """
    return _UNQUOTABLE.sub(lambda found: "'" if found.group() == '"' else "?", text)


def bearer_challenge(
    realm: str | None,
    *,
    error: str | None = None,
    description: str | None = None,
    scope: str | None = None,
) -> str:
    """The challenge's value: ``Bearer`` and its parameters; a request that sent no token gets
    no error code (RFC 6750 section 3.1).

    >>> bearer_challenge("api")
    'Bearer realm="api"'
    >>> bearer_challenge("api", error="invalid_token", description="The token has expired.")
    'Bearer realm="api", error="invalid_token", error_description="The token has expired."'
    """
    parts = [] if realm is None else [f'realm="{realm}"']
    if error is not None:
        parts.append(f'error="{error}"')
    if description:
        parts.append(f'error_description="{sanitise(description)}"')
    if scope is not None:
        parts.append(f'scope="{sanitise(scope)}"')
    return "Bearer" + (" " + ", ".join(parts) if parts else "")
