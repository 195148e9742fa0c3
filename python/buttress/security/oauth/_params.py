"""The syntax of request parameters (RFC 6749 Appendix A), checked before Authlib sees them.

Authlib repeats some parameter values inside its error descriptions and refuses (with a bare
``ValueError``, an HTTP 500) to build a description holding characters RFC 6749 forbids there.
Checking every parameter's grammar first turns such input into the ``invalid_request`` the RFC
asks for, and refuses repeated parameters (RFC 6749 section 3.1 and 3.2).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from urllib.parse import unquote

from authlib.oauth2.rfc6749 import (  # type: ignore[import-untyped]
    InvalidClientError,
    InvalidRequestError,
)

# VSCHAR = %x20-7E; NQCHAR = %x21 / %x23-5B / %x5D-7E (no space, quote or backslash).
_VSCHAR = re.compile(r"[\x20-\x7e]*")
_NQCHARS = r"[\x21\x23-\x5b\x5d-\x7e]+"
_SCOPE = re.compile(rf"{_NQCHARS}(?: {_NQCHARS})*")
_RESPONSE_TYPE = re.compile(r"[A-Za-z0-9_]+(?: [A-Za-z0-9_]+)*")
# A grant type is a name or an absolute URI; URI characters (RFC 3986) hold no quote,
# backslash or space, so these values are also safe inside an error description.
_URI = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
_TOKEN_TYPE_HINT = re.compile(r"[A-Za-z0-9_\-.]+")

_GRAMMAR: dict[str, tuple[re.Pattern[str], str]] = {
    "client_id": (_VSCHAR, "printable ASCII"),
    "client_secret": (_VSCHAR, "printable ASCII"),
    "state": (_VSCHAR, "printable ASCII"),
    "code": (_VSCHAR, "printable ASCII"),
    "refresh_token": (_VSCHAR, "printable ASCII"),
    "code_verifier": (_VSCHAR, "printable ASCII"),
    "code_challenge": (_VSCHAR, "printable ASCII"),
    "code_challenge_method": (_URI, "a method name such as S256"),
    "scope": (_SCOPE, "scope names of printable ASCII separated by single spaces"),
    "response_type": (_RESPONSE_TYPE, "a response type such as code"),
    "grant_type": (_URI, "a grant type name or URI"),
    "redirect_uri": (_URI, "an absolute URI"),
    "token_type_hint": (_TOKEN_TYPE_HINT, "access_token or refresh_token"),
}


def check_parameters(params: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Refuses repeated parameters and values outside their RFC 6749 grammar with
    ``invalid_request``; returns the parameters as a dict.

    >>> check_parameters([("grant_type", "client_credentials")])
    {'grant_type': 'client_credentials'}
    """
    seen: dict[str, str] = {}
    for name, value in params:
        if name in seen:
            raise InvalidRequestError(
                f"The parameter {_printable(name)} appears more than once; send it once."
            )
        grammar = _GRAMMAR.get(name)
        if grammar is not None and not grammar[0].fullmatch(value):
            raise InvalidRequestError(
                f"The parameter {name} is malformed; it must be {grammar[1]}."
            )
        if grammar is None and not _is_text(value):
            raise InvalidRequestError(
                f"The parameter {_printable(name)} is not valid UTF-8 text; send it as such."
            )
        seen[name] = value
    return seen


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in value


def _printable(name: str) -> str:
    """A parameter name made safe to repeat in an error description."""
    cleaned = "".join(ch for ch in name if ch in _SAFE_NAME_CHARS)[:40]
    return cleaned or "(unnamed)"


_SAFE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def check_basic_credentials(headers: Mapping[str, str]) -> str | None:
    """Refuses an ``Authorization`` header that Authlib would fail on with a bare exception (a
    scheme without credentials, or Basic credentials that are not base64 of UTF-8 text) with
    ``invalid_client`` (401). Returns the client id of Basic credentials, or None.

    >>> check_basic_credentials({"authorization": "Basic YXBwOnNlY3JldA=="})
    'app'
    """
    value = next((v for k, v in headers.items() if k.lower() == "authorization"), None)
    if value is None or " " not in value:
        return None
    parts = value.split(None, 1)
    if len(parts) < 2:
        # "Basic " and the like: Authlib's own split of the header would raise on it.
        raise InvalidClientError(
            status_code=401,
            description=(
                "The Authorization header names a scheme but holds no credentials; send "
                "'Basic ' and base64 of client_id:client_secret."
            ),
        )
    scheme, credentials = parts
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(credentials.strip().encode("ascii"), validate=True)
        text = decoded.decode("utf-8")
    except (UnicodeError, binascii.Error) as error:
        raise InvalidClientError(
            status_code=401,
            description=(
                "The Authorization header does not hold valid HTTP Basic credentials; send "
                "base64 of client_id:client_secret."
            ),
        ) from error
    # As Authlib reads it: the client id is form-urlencoded (RFC 6749 section 2.3.1).
    return unquote(text.split(":", 1)[0])


def check_single_client_authentication(
    params: Mapping[str, str], headers: Mapping[str, str]
) -> None:
    """Refuses a request that authenticates the client twice (HTTP Basic and
    ``client_secret`` in the body), or whose body ``client_id`` names another client than its
    Basic credentials (RFC 6749 section 2.3: one authentication method per request).

    >>> check_single_client_authentication({"client_id": "app"},
    ...                                    {"Authorization": "Basic YXBwOnNlY3JldA=="})
    """
    basic_client_id = check_basic_credentials(headers)
    if basic_client_id is None:
        return
    if "client_secret" in params:
        raise InvalidRequestError(
            "The request authenticates the client twice, with HTTP Basic and client_secret; "
            "use one method only (RFC 6749 section 2.3)."
        )
    if "client_id" in params and params["client_id"] != basic_client_id:
        raise InvalidRequestError(
            "The client_id parameter names another client than the HTTP Basic credentials; "
            "send one client identity."
        )
