"""The policy decision point (NIST SP 800-207's PDP): may this principal do this action on this
resource?

Two engines behind one small protocol, ``PolicyDecisionPoint.decide(principal, request)``:

- ``RulePolicy``, a readable rule list. Semantics, the same as Cedar's and AWS IAM's:
  **deny by default**, and **a matching deny always wins over any allow**, wherever the rules
  stand in the list. Among several matching rules of the winning effect, the first in the list
  is the one reported. A request no rule matches is denied with ``rule=None``.
- ``CedarPolicy``, the same decision made by Cedar policies (``cedarpy``): ``forbid`` wins over
  ``permit``, nothing permitted means denied, and a ``forbid`` whose condition fails to
  evaluate denies (Cedar itself would skip it).

Every ``Decision`` carries the rule (or Cedar policy) that made it and a reason, for the audit
log.

>>> policy = RulePolicy([
...     allow("read-orders", actions=["GET"], resources=["/orders/**"], scopes=["orders:read"]),
...     deny("no-admin", resources=["/orders/admin/**"]),
... ])
>>> from buttress.security.tokens import VerifiedToken
>>> alice = Principal.from_token(VerifiedToken({}, {"sub": "alice", "scope": "orders:read"}))
>>> policy.decide(alice, AccessRequest("GET", "/orders/7")).rule
'read-orders'
>>> policy.decide(alice, AccessRequest("GET", "/orders/admin/x")).allowed
False
>>> policy.decide(alice, AccessRequest("DELETE", "/orders/7")).reason
'No rule allows DELETE /orders/7; denied by default.'
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import operator
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from types import MappingProxyType
from typing import Any, Literal, Protocol, runtime_checkable

from buttress.security.zerotrust.identity import Principal

__all__ = [
    "AccessRequest",
    "CedarPolicy",
    "Decision",
    "PathPattern",
    "PolicyDecisionPoint",
    "Rule",
    "RulePolicy",
    "allow",
    "deny",
]

_METHOD = re.compile(r"[A-Z]+")
_CEDAR_FAILED_POLICY = re.compile(r"policy `([^`]*)`")


@dataclasses.dataclass(frozen=True)
class AccessRequest:
    """What is asked for: an action (the HTTP method), a resource (the path) and context the
    policy may use (the middleware puts ``client_ip`` and ``scheme`` there).

    >>> AccessRequest("get", "/orders").action
    'GET'
    """

    action: str
    resource: str
    context: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.action, str) or not self.action:
            raise TypeError(f"action must be a non-empty str (got {self.action!r}).")
        if not isinstance(self.resource, str):
            raise TypeError(f"resource must be a str (got {type(self.resource).__name__}).")
        object.__setattr__(self, "action", self.action.upper())
        object.__setattr__(self, "context", MappingProxyType(dict(self.context)))


@dataclasses.dataclass(frozen=True)
class Decision:
    """A policy's answer: allowed or not, which rule decided (None: the default deny), why,
    and which engine.

    >>> Decision(False, None, "No rule allows GET /; denied by default.").allowed
    False
    """

    allowed: bool
    rule: str | None
    reason: str
    engine: str = "rules"


@runtime_checkable
class PolicyDecisionPoint(Protocol):
    """What the middleware asks of a policy engine: ``RulePolicy``, ``CedarPolicy`` or your own.

    ``decide`` must deny (never raise) when it cannot decide; the middleware treats an
    exception as a deny too.

    >>> isinstance(RulePolicy([]), PolicyDecisionPoint)
    True
    """

    def decide(self, principal: Principal, request: AccessRequest) -> Decision:
        """The decision for ``principal`` asking for ``request``."""
        ...


class PathPattern:
    """A path pattern: literal segments, ``*`` within a segment (any characters but ``/``),
    ``{name}`` (one whole non-empty segment) and ``**`` as a whole segment (any number of
    segments, none included). Matching is case-sensitive and exact otherwise, on the path as
    the app sees it.

    >>> pattern = PathPattern("/orders/{id}/items/**")
    >>> pattern.matches("/orders/7/items"), pattern.matches("/orders/7/items/a/b")
    (True, True)
    >>> pattern.matches("/orders/7"), pattern.matches("/orders//items")
    (False, False)
    >>> PathPattern("/files/*.pdf").matches("/files/a.pdf")
    True
    """

    def __init__(self, pattern: str) -> None:
        if not isinstance(pattern, str):
            raise TypeError(f"A path pattern must be a str (got {type(pattern).__name__}).")
        if pattern != "*" and not pattern.startswith("/"):
            raise ValueError(f"A path pattern must start with '/' or be '*' (got {pattern!r}).")
        self.pattern = pattern
        # Each segment: None for `**`, else a test of one path segment. Matched segment by
        # segment (below) rather than as one regex, whose backtracking over several `**`
        # grows polynomially with the path's length.
        self._segments: list[Callable[[str], bool] | None] = []
        if pattern == "*":
            return
        for segment in pattern[1:].split("/"):
            if segment == "**":
                self._segments.append(None)
                continue
            if "**" in segment:
                raise ValueError(
                    f"'**' must be a whole segment of a path pattern (got {pattern!r})."
                )
            if re.fullmatch(r"\{[A-Za-z_][A-Za-z0-9_]*\}", segment):
                self._segments.append(bool)  # any non-empty segment
                continue
            pieces = [re.escape(piece) for piece in segment.split("*")]
            self._segments.append(_segment_glob(re.compile("[^/]*".join(pieces), re.DOTALL)))

    def matches(self, path: str) -> bool:
        """Whether ``path`` matches the pattern."""
        if self.pattern == "*":
            return True
        if not path.startswith("/"):
            return False
        segments = path[1:].split("/")
        # reached[j]: the pattern's segments so far match the path's first j segments.
        reached = [True] + [False] * len(segments)
        for test in self._segments:
            if test is None:
                # `**`: any number of segments, none included.
                reached = list(itertools.accumulate(reached, operator.or_))
            else:
                reached = [False] + [reached[j] and test(segments[j]) for j in range(len(segments))]
            if not any(reached):
                return False
        return reached[-1]

    def __repr__(self) -> str:
        return f"PathPattern({self.pattern!r})"


def _same_claim(held: object, wanted: object) -> bool:
    """Equality for claim values, except that a bool equals only a bool: in Python ``True ==
    1``, but a claim ``"admin": 1`` must not satisfy a rule asking for ``True``."""
    if isinstance(held, bool) or isinstance(wanted, bool):
        return held is wanted
    return held == wanted


def _segment_glob(glob: re.Pattern[str]) -> Callable[[str], bool]:
    def test(segment: str) -> bool:
        return glob.fullmatch(segment) is not None

    return test


Condition = Callable[[Principal, AccessRequest], bool]


def _names(value: str | Iterable[str], argument: str) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(item, str) and item for item in items):
        raise TypeError(f"{argument} must be a str or a collection of non-empty str.")
    return items


class Rule:
    """One rule: an effect (``"allow"`` or ``"deny"``) and what it applies to. All its
    conditions must hold for it to match:

    - ``actions``: HTTP methods (upper-case), or ``"*"`` for any;
    - ``resources``: path patterns (see ``PathPattern``); the default ``"*"`` is any path;
    - ``scopes``: scopes the principal's token must all have;
    - ``claims``: claim name → expected value, or a collection of accepted values; a list
      claim (``roles``, ``groups``) matches when it holds an accepted value;
    - ``workloads``: SPIFFE ID patterns the caller's workload identity must match (a caller
      without one never matches);
    - ``when``: a function of ``(principal, request)`` returning a bool, for anything else. A
      ``when`` that raises (or returns an awaitable: it must not be ``async``) counts as *not
      matching* for an allow and as *matching* for a deny, so an error never opens access.

    Prefer ``allow(...)`` and ``deny(...)`` to build rules.

    >>> rule = Rule("admins", "allow", claims={"roles": "admin"})
    >>> rule.effect
    'allow'
    """

    def __init__(
        self,
        name: str,
        effect: Literal["allow", "deny"],
        *,
        actions: str | Iterable[str] = "*",
        resources: str | Iterable[str] = "*",
        scopes: Iterable[str] = (),
        claims: Mapping[str, Any] | None = None,
        workloads: str | Iterable[str] = (),
        when: Condition | None = None,
        reason: str | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str (got {name!r}).")
        if effect not in ("allow", "deny"):
            raise ValueError(f"effect must be 'allow' or 'deny' (got {effect!r}).")
        self.name = name
        self.effect = effect
        methods = _names(actions, "actions")
        if "*" in methods:
            self.actions: frozenset[str] | None = None
        else:
            for method in methods:
                if not _METHOD.fullmatch(method.upper()):
                    raise ValueError(
                        f"actions must hold HTTP methods such as 'GET' or '*' (got {method!r})."
                    )
            self.actions = frozenset(method.upper() for method in methods)
        self.resources = tuple(PathPattern(item) for item in _names(resources, "resources"))
        if isinstance(scopes, str):
            raise TypeError("scopes must be a collection of scope names, not one str.")
        self.scopes = frozenset(_names(tuple(scopes), "scopes"))
        if claims is not None and not isinstance(claims, Mapping):
            raise TypeError(f"claims must be a mapping or None (got {type(claims).__name__}).")
        self.claims: Mapping[str, tuple[Any, ...]] = MappingProxyType(
            {
                key: tuple(value)
                if isinstance(value, Collection) and not isinstance(value, (str, bytes))
                else (value,)
                for key, value in (claims or {}).items()
            }
        )
        self.workloads = tuple(PathPattern("/" + item) for item in _names(workloads, "workloads"))
        if when is not None and not callable(when):
            raise TypeError(f"when must be a function of (principal, request) (got {when!r}).")
        self.when = when
        if reason is not None and not isinstance(reason, str):
            raise TypeError(f"reason must be a str or None (got {type(reason).__name__}).")
        self.reason = reason

    def matches(self, principal: Principal, request: AccessRequest) -> bool:
        """Whether every condition of the rule holds for ``request`` by ``principal``.

        >>> from buttress.security.tokens import VerifiedToken
        >>> bob = Principal.from_token(VerifiedToken({}, {"sub": "bob", "roles": ["admin"]}))
        >>> admins = Rule("admins", "allow", claims={"roles": "admin"})
        >>> admins.matches(bob, AccessRequest("GET", "/"))
        True
        """
        if self.actions is not None and request.action not in self.actions:
            return False
        if not any(pattern.matches(request.resource) for pattern in self.resources):
            return False
        if not self.scopes <= principal.scopes:
            return False
        for claim, accepted in self.claims.items():
            if claim not in principal.claims:
                return False
            value = principal.claims[claim]
            held = value if isinstance(value, list) else [value]
            if not any(_same_claim(item, wanted) for item in held for wanted in accepted):
                return False
        if self.workloads:
            workload = principal.workload_id
            if workload is None or not any(
                pattern.matches("/" + workload) for pattern in self.workloads
            ):
                return False
        if self.when is not None:
            try:
                outcome = self.when(principal, request)
                if inspect.isawaitable(outcome):
                    if inspect.iscoroutine(outcome):
                        outcome.close()  # never awaited: no "never awaited" warning either
                    raise TypeError("a when= condition must return a bool, not an awaitable")
                return bool(outcome)
            except Exception:
                # Fail closed: a broken condition never grants, and never lifts a deny.
                return self.effect == "deny"
        return True

    def __repr__(self) -> str:
        return f"Rule({self.name!r}, {self.effect!r})"


def allow(name: str, **conditions: Any) -> Rule:
    """A rule that allows what it matches (see ``Rule`` for the conditions).

    >>> allow("health", actions="GET", resources="/health").effect
    'allow'
    """
    return Rule(name, "allow", **conditions)


def deny(name: str, **conditions: Any) -> Rule:
    """A rule that denies what it matches, whatever allows it too.

    >>> deny("no-delete", actions=["DELETE"]).effect
    'deny'
    """
    return Rule(name, "deny", **conditions)


class RulePolicy:
    """A rule list: deny by default, a matching deny wins over every allow, and the first
    matching rule of the winning effect is the one the decision names.

    >>> policy = RulePolicy([allow("all"), deny("no-delete", actions="DELETE")])
    >>> from buttress.security.tokens import VerifiedToken
    >>> anyone = Principal.from_token(VerifiedToken({}, {"sub": "x"}))
    >>> policy.decide(anyone, AccessRequest("DELETE", "/a")).rule
    'no-delete'
    """

    engine = "rules"

    def __init__(self, rules: Iterable[Rule]) -> None:
        if isinstance(rules, Rule):
            raise TypeError("rules must be a list of rules; wrap a single Rule in a list.")
        self.rules = tuple(rules)
        for rule in self.rules:
            if not isinstance(rule, Rule):
                raise TypeError(
                    f"rules must hold Rule objects (made by allow() or deny()); got "
                    f"{type(rule).__name__}."
                )
        names = [rule.name for rule in self.rules]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(
                f"rules must have distinct names, so a decision names one rule; "
                f"{', '.join(duplicates)} appear more than once."
            )

    def decide(self, principal: Principal, request: AccessRequest) -> Decision:
        """The decision for ``principal`` asking for ``request``."""
        first_allow: Rule | None = None
        for rule in self.rules:
            if rule.effect == "allow" and first_allow is not None:
                continue  # only a deny could still change the outcome
            if not rule.matches(principal, request):
                continue
            if rule.effect == "deny":
                return Decision(
                    False,
                    rule.name,
                    rule.reason
                    or f"Rule {rule.name!r} denies {request.action} {request.resource}.",
                    self.engine,
                )
            first_allow = rule
        if first_allow is not None:
            return Decision(
                True,
                first_allow.name,
                first_allow.reason
                or f"Rule {first_allow.name!r} allows {request.action} {request.resource}.",
                self.engine,
            )
        return Decision(
            False,
            None,
            f"No rule allows {request.action} {request.resource}; denied by default.",
            self.engine,
        )


def _cedar_value(value: Any) -> Any:
    """A JSON claim as a Cedar value: Cedar has no null and no floats, so those are left out
    (``None`` is returned for "leave out")."""
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**63 else None
    if isinstance(value, list):
        items = [_cedar_value(item) for item in value]
        return [item for item in items if item is not None]
    if isinstance(value, dict):
        record = {str(key): _cedar_value(item) for key, item in value.items()}
        return {key: item for key, item in record.items() if item is not None}
    return None


class CedarPolicy:
    """Cedar policies (through ``cedarpy``) as the decision point.

    The request Cedar sees:

    - principal ``User::"<sub>"`` (``principal_type``), or ``Workload::"<spiffe id>"``
      (``workload_type``) for a caller authenticated by its workload identity alone; its
      attributes are ``scopes`` (a set), ``claims`` (a record) and ``workload`` (the SPIFFE ID,
      or ``""``);
    - action ``Action::"<METHOD>"``;
    - resource ``Resource::"<path>"`` (``resource_type``) with the attribute ``path``;
    - context: the same ``scopes``, ``claims``, ``workload``, plus the request's context.

    Claims with no Cedar form (null, floats) are left out. ``entities`` adds entities of your
    own (roles, groups) as Cedar JSON. Each policy's ``@id("...")`` annotation, when it has
    one, names it in decisions.

    >>> policy = CedarPolicy('''
    ...     @id("read-orders")
    ...     permit(principal, action == Action::"GET", resource)
    ...     when { context.scopes.contains("orders:read") };
    ...     @id("no-admin")
    ...     forbid(principal, action, resource) when { resource.path like "/admin/*" };
    ... ''')
    >>> from buttress.security.tokens import VerifiedToken
    >>> alice = Principal.from_token(VerifiedToken({}, {"sub": "alice", "scope": "orders:read"}))
    >>> policy.decide(alice, AccessRequest("GET", "/orders/7")).rule
    'read-orders'
    >>> policy.decide(alice, AccessRequest("GET", "/admin/users")).rule
    'no-admin'
    """

    engine = "cedar"

    def __init__(
        self,
        policies: str,
        *,
        entities: Iterable[Mapping[str, Any]] = (),
        principal_type: str = "User",
        workload_type: str = "Workload",
        resource_type: str = "Resource",
    ) -> None:
        import cedarpy  # the `security` extra; imported here so RulePolicy does without it

        self._cedarpy = cedarpy
        if not isinstance(policies, str):
            raise TypeError(f"policies must be Cedar policy text (got {type(policies).__name__}).")
        try:
            self._policies = cedarpy.PolicySet.from_str(policies)
        except ValueError as error:
            raise ValueError(f"policies could not be parsed as Cedar: {error}") from None
        for argument, value in (
            ("principal_type", principal_type),
            ("workload_type", workload_type),
            ("resource_type", resource_type),
        ):
            if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
                raise ValueError(f"{argument} must be a Cedar entity type name (got {value!r}).")
        self.principal_type = principal_type
        self.workload_type = workload_type
        self.resource_type = resource_type
        self._entities = [dict(entity) for entity in entities]
        # Cedar skips a policy whose condition fails to evaluate; for a forbid that would open
        # access, so decide() denies when one of these errs.
        static = json.loads(cedarpy.policies_to_json_str(policies)).get("staticPolicies", {})
        self._forbids = {
            policy_id: policy.get("annotations", {}).get("id") or policy_id
            for policy_id, policy in static.items()
            if policy.get("effect") != "permit"
        }
        self._names: dict[str, str] = {}

    def decide(self, principal: Principal, request: AccessRequest) -> Decision:
        """The decision Cedar makes for ``principal`` asking for ``request``."""
        scopes = sorted(principal.scopes)
        claims = _cedar_value(dict(principal.claims))
        workload = principal.workload_id or ""
        if principal.token is None and principal.workload is not None:
            principal_uid = {"type": self.workload_type, "id": workload}
        else:
            principal_uid = {"type": self.principal_type, "id": principal.subject}
        resource_uid = {"type": self.resource_type, "id": request.resource}
        attributes = {"scopes": scopes, "claims": claims, "workload": workload}
        context = {
            key: converted
            for key, value in request.context.items()
            if (converted := _cedar_value(value)) is not None
        }
        context.update(attributes)
        entities = [
            *self._entities,
            {"uid": principal_uid, "attrs": attributes, "parents": []},
            {"uid": resource_uid, "attrs": {"path": request.resource}, "parents": []},
        ]
        cedar_request = {
            "principal": principal_uid,
            "action": {"type": "Action", "id": request.action},
            "resource": resource_uid,
            "context": context,
        }
        try:
            result = self._cedarpy.is_authorized(
                cedar_request, self._policies, json.dumps(entities)
            )
        except Exception as error:  # cedarpy raises plain exceptions on malformed input
            return Decision(
                False, None, f"Cedar could not evaluate the request ({error}); denied.", self.engine
            )
        diagnostics = result.diagnostics
        names = diagnostics.id_annotations_by_reason
        deciding = [names.get(policy_id) or policy_id for policy_id in diagnostics.reasons]
        target = f"{request.action} {request.resource}"
        for problem in diagnostics.errors:
            failed = _CEDAR_FAILED_POLICY.search(problem)
            if failed is None or failed.group(1) in self._forbids:
                name = None if failed is None else self._forbids[failed.group(1)]
                return Decision(
                    False,
                    name,
                    f"Cedar policy {name!r} could not be evaluated ({problem}); denied.",
                    self.engine,
                )
        if result.allowed:
            return Decision(
                True, deciding[0], f"Cedar policy {deciding[0]!r} permits {target}.", self.engine
            )
        if deciding:
            return Decision(
                False, deciding[0], f"Cedar policy {deciding[0]!r} forbids {target}.", self.engine
            )
        errors = "; ".join(diagnostics.errors)
        suffix = f" (evaluation errors: {errors})" if errors else ""
        return Decision(
            False,
            None,
            f"No Cedar policy permits {target}; denied by default{suffix}.",
            self.engine,
        )
