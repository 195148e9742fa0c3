"""Zero trust for ASGI services (NIST SP 800-207, BeyondCorp): every request authenticated
(JWT bearer tokens, SPIFFE workload identity), authorized by a policy that denies by default,
and written to a tamper-evident audit log; sensitive fields encrypted with AES-256-GCM.

>>> from buttress import EventStore
>>> policy = RulePolicy([allow("read", actions="GET", scopes=["api:read"])])
>>> audit = AuditLog(EventStore())
>>> fields = FieldEncryptor(KeyRing.generate("k1"))
"""

from __future__ import annotations

from buttress.security.zerotrust.audit import (
    AuditAnchor,
    AuditEntry,
    AuditLog,
    AuditVerification,
    canonical_json,
)
from buttress.security.zerotrust.encryption import FieldEncryptor, KeyRing
from buttress.security.zerotrust.identity import (
    Principal,
    SpiffeId,
    WorkloadIdentity,
    parse_spiffe_id,
)
from buttress.security.zerotrust.middleware import (
    DECISION_SCOPE_KEY,
    PRINCIPAL_SCOPE_KEY,
    ZeroTrustMiddleware,
    decision_from_scope,
    principal_from_scope,
)
from buttress.security.zerotrust.policy import (
    AccessRequest,
    CedarPolicy,
    Decision,
    PathPattern,
    PolicyDecisionPoint,
    Rule,
    RulePolicy,
    allow,
    deny,
)
from buttress.security.zerotrust.revocation import RevocationCheck, RevocationList

__all__ = [
    "DECISION_SCOPE_KEY",
    "PRINCIPAL_SCOPE_KEY",
    "AccessRequest",
    "AuditAnchor",
    "AuditEntry",
    "AuditLog",
    "AuditVerification",
    "CedarPolicy",
    "Decision",
    "FieldEncryptor",
    "KeyRing",
    "PathPattern",
    "PolicyDecisionPoint",
    "Principal",
    "RevocationCheck",
    "RevocationList",
    "Rule",
    "RulePolicy",
    "SpiffeId",
    "WorkloadIdentity",
    "ZeroTrustMiddleware",
    "allow",
    "canonical_json",
    "decision_from_scope",
    "deny",
    "parse_spiffe_id",
    "principal_from_scope",
]
