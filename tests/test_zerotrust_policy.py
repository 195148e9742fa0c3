"""The policy decision point: deny by default, a matching deny wins over every allow, every
decision names its rule and reason; path patterns; Cedar behind the same protocol."""

from __future__ import annotations

import re
from typing import Any

import pytest
from buttress.security import (
    AccessRequest,
    CedarPolicy,
    Decision,
    PathPattern,
    PolicyDecisionPoint,
    Principal,
    Rule,
    RulePolicy,
    VerifiedToken,
    allow,
    deny,
    parse_spiffe_id,
)
from hypothesis import given
from hypothesis import strategies as st


def principal(
    sub: str = "alice", scope: str = "", workload: str | None = None, **claims: Any
) -> Principal:
    token = VerifiedToken({"alg": "ES256"}, {"sub": sub, "scope": scope, **claims})
    return Principal.from_token(token, None if workload is None else parse_spiffe_id(workload))


ALICE = principal(scope="orders:read", roles=["support"], tenant="acme")


def test_nothing_is_allowed_by_an_empty_policy() -> None:
    decision = RulePolicy([]).decide(ALICE, AccessRequest("GET", "/"))
    assert decision == Decision(False, None, "No rule allows GET /; denied by default.", "rules")


def test_a_request_no_rule_matches_is_denied_by_default() -> None:
    policy = RulePolicy([allow("read-orders", actions="GET", resources="/orders/**")])
    decision = policy.decide(ALICE, AccessRequest("POST", "/orders/1"))
    assert not decision.allowed
    assert decision.rule is None
    assert "denied by default" in decision.reason


def test_a_deny_wins_wherever_it_stands() -> None:
    everything = allow("everything")
    no_admin = deny("no-admin", resources="/admin/**", reason="Admin is off limits.")
    for rules in ([everything, no_admin], [no_admin, everything]):
        policy = RulePolicy(rules)
        decision = policy.decide(ALICE, AccessRequest("GET", "/admin/users"))
        assert decision == Decision(False, "no-admin", "Admin is off limits.", "rules")
        assert policy.decide(ALICE, AccessRequest("GET", "/orders")).rule == "everything"


def test_the_first_matching_allow_is_named() -> None:
    policy = RulePolicy([allow("first", resources="/a/**"), allow("second")])
    assert policy.decide(ALICE, AccessRequest("GET", "/a/b")).rule == "first"
    assert policy.decide(ALICE, AccessRequest("GET", "/c")).rule == "second"
    assert policy.decide(ALICE, AccessRequest("GET", "/c")).reason == "Rule 'second' allows GET /c."


def test_scopes_claims_and_workloads() -> None:
    bob = principal("bob", scope="orders:read orders:write", roles="admin", tenant="globex")
    web = principal("svc", workload="spiffe://example.org/ns/prod/sa/web")
    rules = [
        allow("writers", actions=["POST", "PUT"], scopes=["orders:write"]),
        allow("support", claims={"roles": ["support", "admin"], "tenant": "acme"}),
        allow("prod-web", workloads=["spiffe://example.org/ns/prod/sa/*"]),
    ]
    policy = RulePolicy(rules)
    assert policy.decide(bob, AccessRequest("POST", "/orders")).rule == "writers"
    carol = principal("carol", scope="orders:read")
    assert not policy.decide(carol, AccessRequest("POST", "/orders")).allowed
    assert policy.decide(ALICE, AccessRequest("DELETE", "/x")).rule == "support"
    assert not policy.decide(bob, AccessRequest("DELETE", "/x")).allowed  # tenant differs
    assert policy.decide(web, AccessRequest("GET", "/x")).rule == "prod-web"
    dev = principal("svc", workload="spiffe://example.org/ns/dev/sa/web")
    assert not policy.decide(dev, AccessRequest("GET", "/x")).allowed


def test_conditions_fail_closed() -> None:
    def broken(principal: Principal, request: AccessRequest) -> bool:
        raise RuntimeError("boom")

    assert (
        not RulePolicy([allow("a", when=broken)]).decide(ALICE, AccessRequest("GET", "/")).allowed
    )
    decision = RulePolicy([allow("all"), deny("d", when=broken)]).decide(
        ALICE, AccessRequest("GET", "/")
    )
    assert decision.rule == "d"
    office_hours = allow("ctx", when=lambda p, r: r.context.get("client_ip") == "10.0.0.1")
    policy = RulePolicy([office_hours])
    assert policy.decide(ALICE, AccessRequest("GET", "/", {"client_ip": "10.0.0.1"})).allowed
    assert not policy.decide(ALICE, AccessRequest("GET", "/", {"client_ip": "10.0.0.2"})).allowed


def test_an_async_condition_never_grants() -> None:
    """A coroutine is truthy: an ``async def`` condition must not read as "holds"."""

    async def never(principal: Principal, request: AccessRequest) -> bool:
        return False

    request = AccessRequest("GET", "/")
    assert not RulePolicy([allow("a", when=never)]).decide(ALICE, request).allowed
    assert RulePolicy([allow("all"), deny("d", when=never)]).decide(ALICE, request).rule == "d"


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("/orders", "/orders", True),
        ("/orders", "/orders/", False),
        ("/orders", "/ORDERS", False),
        ("/orders/*", "/orders/7", True),
        ("/orders/*", "/orders/7/items", False),
        ("/orders/**", "/orders", True),
        ("/orders/**", "/orders/7/items/3", True),
        ("/orders/**", "/ordersX", False),
        ("/orders/{id}", "/orders/", False),
        ("/orders/{id}/items", "/orders/7/items", True),
        ("/a/**/z", "/a/z", True),
        ("/a/**/z", "/a/b/c/z", True),
        ("/a/**/z", "/a/b/c/y", False),
        ("/files/*.pdf", "/files/report.pdf", True),
        ("/files/*.pdf", "/files/report.pdf/x", False),
        ("/files/a.b", "/files/aXb", False),
        ("*", "/anything/at/all", True),
    ],
)
def test_path_patterns(pattern: str, path: str, matches: bool) -> None:
    assert PathPattern(pattern).matches(path) is matches


# -- the precedence property ----------------------------------------------------------------------

METHODS = ["GET", "POST", "DELETE"]
PATHS = ["/a", "/a/b", "/c"]
SCOPES = ["s1", "s2"]

rule_specs = st.tuples(
    st.sampled_from(["allow", "deny"]),
    st.sampled_from(["*", *METHODS]),
    st.sampled_from(["*", "/a/**", "/a/b", "/c"]),
    st.lists(st.sampled_from(SCOPES), max_size=2, unique=True),
)


def build(specs: list[tuple[str, str, str, list[str]]]) -> list[Rule]:
    return [
        Rule(f"r{index}", effect, actions=method, resources=resource, scopes=scopes)  # type: ignore[arg-type]
        for index, (effect, method, resource, scopes) in enumerate(specs)
    ]


@given(
    specs=st.lists(rule_specs, max_size=8),
    method=st.sampled_from(METHODS),
    path=st.sampled_from(PATHS),
    granted=st.sets(st.sampled_from(SCOPES)),
    order=st.randoms(use_true_random=False),
)
def test_deny_wins_and_default_deny_whatever_the_order(
    specs: list[tuple[str, str, str, list[str]]],
    method: str,
    path: str,
    granted: set[str],
    order: Any,
) -> None:
    caller = principal(scope=" ".join(sorted(granted)))
    request = AccessRequest(method, path)
    rules = build(specs)
    matching = [rule for rule in rules if rule.matches(caller, request)]
    decision = RulePolicy(rules).decide(caller, request)
    denies = [rule for rule in matching if rule.effect == "deny"]
    allows = [rule for rule in matching if rule.effect == "allow"]
    # Allowed exactly when some allow matches and no deny does.
    assert decision.allowed == (bool(allows) and not denies)
    # The decision names the first matching rule of the winning effect, or none.
    expected = denies[0] if denies else (allows[0] if allows else None)
    assert decision.rule == (expected.name if expected else None)
    assert decision.reason
    # Reordering the rules never changes whether the request is allowed.
    shuffled = list(rules)
    order.shuffle(shuffled)
    assert RulePolicy(shuffled).decide(caller, request).allowed == decision.allowed
    # Adding an allow-everything rule never lifts a deny made by a rule.
    widened = RulePolicy([*rules, allow("everything")]).decide(caller, request)
    assert widened.allowed == (not denies)


# -- Cedar ---------------------------------------------------------------------------------------

CEDAR = """
@id("read-orders")
permit(principal, action == Action::"GET", resource)
when { context.scopes.contains("orders:read") && resource.path like "/orders/*" };

@id("support-role")
permit(principal, action, resource)
when { context.claims has roles && context.claims.roles.contains("support") };

@id("no-admin")
forbid(principal, action, resource) when { resource.path like "/admin*" };

@id("prod-workloads")
permit(principal is Workload, action == Action::"GET", resource)
when { context.workload like "spiffe://example.org/ns/prod/*" };
"""


def test_cedar_decides_behind_the_same_protocol() -> None:
    policy = CedarPolicy(CEDAR)
    assert isinstance(policy, PolicyDecisionPoint)
    reader = principal("bob", scope="orders:read")
    allowed = policy.decide(reader, AccessRequest("GET", "/orders/7"))
    assert allowed == Decision(
        True, "read-orders", "Cedar policy 'read-orders' permits GET /orders/7.", "cedar"
    )
    assert policy.decide(ALICE, AccessRequest("DELETE", "/tickets/1")).rule == "support-role"
    forbidden = policy.decide(ALICE, AccessRequest("GET", "/admin/users"))
    assert not forbidden.allowed
    assert forbidden.rule == "no-admin"
    default = policy.decide(reader, AccessRequest("POST", "/orders/7"))
    assert not default.allowed
    assert default.rule is None
    assert "denied by default" in default.reason


def test_a_cedar_forbid_that_fails_to_evaluate_still_denies() -> None:
    """Cedar skips a policy whose condition errors; for a forbid, that would open access."""
    policy = CedarPolicy(
        """
        @id("everyone") permit(principal, action, resource);
        @id("same-tenant") forbid(principal, action, resource)
        when { context.claims.tenant != "acme" };
        @id("odd-permit") permit(principal, action, resource)
        when { context.claims.level > 3 };
        """
    )
    assert policy.decide(principal("eve", tenant="acme"), AccessRequest("GET", "/x")).allowed
    decision = policy.decide(principal("eve"), AccessRequest("GET", "/x"))  # no tenant claim
    assert not decision.allowed
    assert decision.rule == "same-tenant"
    assert "could not be evaluated" in decision.reason


def test_cedar_workload_principals_and_odd_claims() -> None:
    policy = CedarPolicy(CEDAR)
    job = Principal.from_workload(parse_spiffe_id("spiffe://example.org/ns/prod/job"))
    assert policy.decide(job, AccessRequest("GET", "/reports")).rule == "prod-workloads"
    dev = Principal.from_workload(parse_spiffe_id("spiffe://example.org/ns/dev/job"))
    assert not policy.decide(dev, AccessRequest("GET", "/reports")).allowed
    odd = principal("weird\nname", scope="orders:read", ratio=0.5, nothing=None, big=2**80)
    assert policy.decide(odd, AccessRequest("GET", "/orders/1")).allowed


def test_cedar_refuses_bad_policies() -> None:
    with pytest.raises(ValueError, match="policies could not be parsed"):
        CedarPolicy("permit(principal, action resource);")
    with pytest.raises(TypeError, match="policies must be Cedar policy text"):
        CedarPolicy(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="principal_type"):
        CedarPolicy(CEDAR, principal_type="not a type")


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build_it", "error", "argument"),
    [
        (lambda: Rule("", "allow"), TypeError, "name"),
        (lambda: Rule("r", "permit"), ValueError, "effect"),  # type: ignore[arg-type]
        (lambda: allow("r", actions=["get it"]), ValueError, "actions"),
        (lambda: allow("r", actions=[1]), TypeError, "actions"),
        (lambda: allow("r", resources="orders"), ValueError, "path pattern"),
        (lambda: allow("r", resources="/a/b**"), ValueError, "'**'"),
        (lambda: allow("r", scopes="orders:read"), TypeError, "scopes"),
        (lambda: allow("r", claims=["roles"]), TypeError, "claims"),
        (lambda: allow("r", when="always"), TypeError, "when"),
        (lambda: RulePolicy(allow("r")), TypeError, "rules"),
        (lambda: RulePolicy(["r"]), TypeError, "rules"),
        (lambda: RulePolicy([allow("r"), deny("r")]), ValueError, "distinct names"),
        (lambda: AccessRequest("", "/"), TypeError, "action"),
        (lambda: AccessRequest("GET", 7), TypeError, "resource"),
    ],
)
def test_bad_rules_name_the_argument(build_it: Any, error: type[Exception], argument: str) -> None:
    with pytest.raises(error) as caught:
        build_it()
    assert argument in str(caught.value)
    assert str(caught.value).endswith(".")


def _regex_model(pattern: str) -> re.Pattern[str]:
    """The path patterns' meaning as one regex (how they were first matched): the model the
    segment-by-segment matcher must agree with."""
    parts = []
    segments = pattern[1:].split("/")
    for index, segment in enumerate(segments):
        if segment == "**":
            parts.append(r"(?:/[^/]*)*" if index == len(segments) - 1 else r"(?:/[^/]*)*?")
        elif re.fullmatch(r"\{[A-Za-z_][A-Za-z0-9_]*\}", segment):
            parts.append(r"/[^/]+")
        else:
            parts.append("/" + "[^/]*".join(re.escape(piece) for piece in segment.split("*")))
    return re.compile("".join(parts), re.DOTALL)


_PATTERN_SEGMENTS = st.sampled_from(["**", "*", "{id}", "a", "b", "a*", "*b", "", "a*b"])
_PATH_SEGMENTS = st.sampled_from(["a", "b", "ab", "aab", "", "x", "a\nb"])


@given(
    pattern=st.lists(_PATTERN_SEGMENTS, min_size=1, max_size=5).map(lambda s: "/" + "/".join(s)),
    path=st.lists(_PATH_SEGMENTS, max_size=6).map(lambda s: "/" + "/".join(s)),
)
def test_path_patterns_match_as_their_regex_does(pattern: str, path: str) -> None:
    assert PathPattern(pattern).matches(path) == (_regex_model(pattern).fullmatch(path) is not None)


def test_several_double_stars_on_a_long_path_match_segment_by_segment() -> None:
    # As one backtracking regex, three `**` on 800 segments took seconds; segment by segment
    # it is a pass per pattern segment.
    pattern = PathPattern("/**/a/**/b/**/c")
    long_path = "/" + "/".join(["x"] * 800)
    assert not pattern.matches(long_path)
    assert pattern.matches(long_path + "/a/x/b/c")
    assert not pattern.matches("relative/a/b/c")


def test_a_bool_claim_matches_only_a_bool() -> None:
    # In Python True == 1, but a token saying "admin": 1 is not one saying "admin": true.
    policy = RulePolicy(
        [allow("admins", claims={"admin": True}), allow("tier-1", claims={"tier": 1})]
    )
    assert policy.decide(principal(admin=True), AccessRequest("GET", "/")).rule == "admins"
    assert not policy.decide(principal(admin=1), AccessRequest("GET", "/")).allowed
    assert not policy.decide(principal(tier=True), AccessRequest("GET", "/")).allowed
    assert policy.decide(principal(tier=1), AccessRequest("GET", "/")).rule == "tier-1"
    assert policy.decide(principal(tier=[2, 1]), AccessRequest("GET", "/")).rule == "tier-1"
