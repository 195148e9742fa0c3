"""Security: bearer token validation (``tokens``) and the zero-trust pipeline
(``zerotrust``): workload identity, policy decisions, field encryption, a tamper-evident audit
log and the ASGI middleware that applies them. The OAuth 2.0 server lives in
``buttress.security.oauth``. Needs the ``security`` extra.

>>> from buttress.security import RulePolicy, deny
>>> RulePolicy([deny("no-delete", actions="DELETE")]).rules[0].name
'no-delete'
"""

from __future__ import annotations

from buttress.errors import (
    AuditChainError,
    AuditWriteError,
    FieldDecryptionError,
    InvalidTokenError,
    KeySetUnavailableError,
    SecurityError,
)
from buttress.security.tokens import (
    ASYMMETRIC_ALGORITHMS,
    DEFAULT_ALGORITHMS,
    KeySource,
    RemoteKeySet,
    StaticKeySet,
    TokenValidator,
    VerifiedToken,
    is_loopback_host,
)
from buttress.security.zerotrust import (
    DECISION_SCOPE_KEY,
    PRINCIPAL_SCOPE_KEY,
    AccessRequest,
    AuditAnchor,
    AuditEntry,
    AuditLog,
    AuditVerification,
    CedarPolicy,
    Decision,
    FieldEncryptor,
    KeyRing,
    PathPattern,
    PolicyDecisionPoint,
    Principal,
    RevocationCheck,
    RevocationList,
    Rule,
    RulePolicy,
    SpiffeId,
    WorkloadIdentity,
    ZeroTrustMiddleware,
    allow,
    canonical_json,
    decision_from_scope,
    deny,
    parse_spiffe_id,
    principal_from_scope,
)

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "DECISION_SCOPE_KEY",
    "DEFAULT_ALGORITHMS",
    "PRINCIPAL_SCOPE_KEY",
    "AccessRequest",
    "AuditAnchor",
    "AuditChainError",
    "AuditEntry",
    "AuditLog",
    "AuditVerification",
    "AuditWriteError",
    "CedarPolicy",
    "Decision",
    "FieldDecryptionError",
    "FieldEncryptor",
    "InvalidTokenError",
    "KeyRing",
    "KeySetUnavailableError",
    "KeySource",
    "PathPattern",
    "PolicyDecisionPoint",
    "Principal",
    "RemoteKeySet",
    "RevocationCheck",
    "RevocationList",
    "Rule",
    "RulePolicy",
    "SecurityError",
    "SpiffeId",
    "StaticKeySet",
    "TokenValidator",
    "VerifiedToken",
    "WorkloadIdentity",
    "ZeroTrustMiddleware",
    "allow",
    "canonical_json",
    "decision_from_scope",
    "deny",
    "is_loopback_host",
    "parse_spiffe_id",
    "principal_from_scope",
]
