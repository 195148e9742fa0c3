"""Revocation: tokens (by ``jti``) and subjects that must be refused before their tokens expire.

The middleware asks its revocation check on *every* request, cached decision or not, so a
revocation takes effect on the very next request. ``RevocationList`` is the in-process list;
any function of the principal returning a bool (or an awaitable bool, to ask Redis or the
OAuth server's introspection endpoint) does as well.

>>> revoked = RevocationList()
>>> revoked.revoke_token("token-123", expires_at=2_000_000_000)
>>> "token-123" in revoked
True
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Awaitable, Callable

from buttress.security.zerotrust.identity import Principal

__all__ = ["RevocationCheck", "RevocationList"]

#: What the middleware accepts as a revocation check.
RevocationCheck = Callable[[Principal], "bool | Awaitable[bool]"]


class RevocationList:
    """A thread-safe, in-process list of revoked token ids and subjects.

    A revoked token id is kept until its token would have expired anyway (``expires_at``; kept
    for good without it); ``purge()`` drops the ones past that, and runs by itself now and then.
    Revoking a subject refuses every token of that subject, and revoking a SPIFFE ID refuses
    that workload whether it calls alone or with a token, until ``restore_subject``.

    >>> from buttress.security.tokens import VerifiedToken
    >>> revoked = RevocationList()
    >>> alice = Principal.from_token(VerifiedToken({}, {"sub": "alice", "jti": "t1"}))
    >>> revoked(alice)
    False
    >>> revoked.revoke_subject("alice")
    >>> revoked(alice)
    True
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds (got {clock!r}).")
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[str, float] = {}
        self._subjects: set[str] = set()
        self._checks = 0

    def revoke_token(self, token_id: str, *, expires_at: float | None = None) -> None:
        """Refuses the token whose ``jti`` is ``token_id`` from now on."""
        if not isinstance(token_id, str) or not token_id:
            raise TypeError(f"token_id must be a non-empty str (got {token_id!r}).")
        if expires_at is not None and (
            isinstance(expires_at, bool) or not isinstance(expires_at, (int, float))
        ):
            raise TypeError(
                f"expires_at must be seconds since the epoch or None (got {expires_at!r})."
            )
        with self._lock:
            self._tokens[token_id] = math.inf if expires_at is None else float(expires_at)

    def revoke_subject(self, subject: str) -> None:
        """Refuses every token of ``subject`` (or the workload with that SPIFFE ID)."""
        if not isinstance(subject, str) or not subject:
            raise TypeError(f"subject must be a non-empty str (got {subject!r}).")
        with self._lock:
            self._subjects.add(subject)

    def restore_subject(self, subject: str) -> None:
        """Lifts ``revoke_subject``."""
        with self._lock:
            self._subjects.discard(subject)

    def purge(self) -> int:
        """Forgets revoked token ids whose tokens have expired; returns how many."""
        now = self._clock()
        with self._lock:
            expired = [token for token, until in self._tokens.items() if until <= now]
            for token in expired:
                del self._tokens[token]
            return len(expired)

    def is_revoked(self, principal: Principal) -> bool:
        """Whether ``principal``'s token, subject or workload (SPIFFE ID) is revoked."""
        with self._lock:
            self._checks += 1
            due = self._checks % 4096 == 0
            revoked = (
                principal.subject in self._subjects
                or (principal.workload_id is not None and principal.workload_id in self._subjects)
                or (principal.token_id is not None and principal.token_id in self._tokens)
            )
        if due:
            self.purge()
        return revoked

    __call__ = is_revoked

    def __contains__(self, token_id: object) -> bool:
        with self._lock:
            return token_id in self._tokens

    def __len__(self) -> int:
        with self._lock:
            return len(self._tokens) + len(self._subjects)
