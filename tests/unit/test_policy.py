"""AgentPolicy semantics as pure functions: CEL checks, tightening, and judging calls."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from agentrun_operator import models, policy

NOW = dt.datetime(2026, 12, 7, 10, 30, tzinfo=dt.UTC)  # a Monday


def _policy(
    spec: dict[str, Any], *, name: str = "guard", kind: str = "AgentPolicy"
) -> policy.Policy:
    meta = {"name": name, "generation": 3}
    if kind == "AgentPolicy":
        meta["namespace"] = "team"
    return policy.Policy.of({"kind": kind, "metadata": meta, "spec": spec})


def _ctx(
    tool: str = "k8s_scale", args: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    preview = extra.pop("preview", None)
    return policy.context(
        tool=tool,
        args=args if args is not None else {"kind": "Deployment", "name": "web", "replicas": 3},
        run={"namespace": "team", "name": "r", "createdBy": "alice", "serviceAccount": "default"},
        preview=preview,
        namespace=extra.pop("namespace", "team"),
        namespace_labels=extra.pop("namespace_labels", {"env": "prod"}),
        now=extra.pop("now", NOW),
    )


# -- admission: every expression compiles, or the policy is refused naming the rule -----------

HOSTILE = [
    ("too long", "true && " * 400 + "true", "characters; at most 2048"),
    ("too deeply nested", "(" * 40 + "true" + ")" * 40, "recursion limit"),
    ("wrong type", "tool == 1", "no matching overload"),
    ("not a condition", '"yes"', "must be a bool"),
    ("reserved word", "namespace.name == 'x'", "reserved identifier: namespace"),
    ("unknown variable", "pod.name == 'x'", "at 1:4: undeclared reference to 'pod.name'"),
    ("syntax error", "args.replicas >", "Syntax error"),
    ("unknown function", "tool.shout()", "undeclared reference to 'shout'"),
]


@pytest.mark.parametrize(("why", "expression", "said"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_expressions_are_refused_naming_the_rule(
    why: str, expression: str, said: str
) -> None:
    problems = policy.check(
        {"rules": [{"name": "bad-one", "when": expression, "action": "require"}]}
    )
    assert len(problems) == 1, problems
    assert problems[0].startswith("spec.rules[0] (bad-one).when "), problems
    assert said in problems[0], problems


def test_a_good_policy_has_no_problems_and_options_belong_to_require() -> None:
    assert (
        policy.check({"rules": [{"name": "ok", "when": "tool == 'k8s_get'", "action": "allow"}]})
        == []
    )
    problems = policy.check(
        {"rules": [{"name": "x", "when": "true", "action": "allow", "minApprovals": 2}]}
    )
    assert problems == [
        "spec.rules[0] (x).minApprovals applies only to action 'require' (not allow)"
    ]


def test_expensive_expressions_are_cut_by_the_budget_and_count_as_require() -> None:
    big = list(range(1000))
    p = _policy(
        {
            "rules": [
                {
                    "name": "costly",
                    "when": "args.l.all(a, args.l.all(b, args.l.all(c, a + b + c >= 0)))",
                    "action": "allow",
                }
            ]
        }
    )
    started = time.monotonic()
    verdict = policy.judge([p], _ctx(args={"l": big}))
    took = time.monotonic() - started
    assert verdict.action == "require", verdict
    assert verdict.rule is not None and "budget" in verdict.rule.message.lower()
    assert took < 1.0, f"a bounded evaluation took {took:.2f} s"


def test_arguments_too_big_to_judge_are_hidden_and_a_rule_reading_them_requires() -> None:
    p = _policy({"rules": [{"name": "small", "when": "args.name == 'web'", "action": "allow"}]})
    huge = {"name": "web", "blob": "x" * (policy.MAX_ARGS_BYTES + 1)}
    assert policy.judge([p], _ctx(args=huge)).action == "require"
    assert policy.judge([p], _ctx(args={"name": "web"})).action == "allow"


def test_a_rule_of_the_wrong_type_at_evaluation_requires_never_allows() -> None:
    p = _policy({"rules": [{"name": "typed", "when": "args.replicas > 10", "action": "allow"}]})
    verdict = policy.judge([p], _ctx(args={"replicas": "eleven"}))
    assert verdict.action == "require"
    assert verdict.rule is not None and verdict.rule.name == "typed"
    assert "could not be evaluated" in verdict.rule.message


# -- judging: deny beats require beats allow -------------------------------------------------


def test_deny_beats_require_beats_allow_and_requires_combine() -> None:
    rules = [
        {"name": "ok", "when": "true", "action": "allow"},
        {
            "name": "big",
            "when": "args.replicas > 10",
            "action": "require",
            "minApprovals": 2,
            "approvers": {"groups": ["sre-leads"]},
            "message": "big scale",
        },
        {
            "name": "any-scale",
            "when": "tool == 'k8s_scale'",
            "action": "require",
            "approvers": {"users": ["carol"]},
        },
        {
            "name": "system",
            "when": "namespaceObject.metadata.name == 'kube-system'",
            "action": "deny",
        },
    ]
    p = _policy({"rules": rules})
    v = policy.judge([p], _ctx(args={"replicas": 12}))
    assert v.action == "require" and v.rule is not None
    assert (v.rule.name, v.rule.min_approvals, v.rule.message) == ("big", 2, "big scale")
    assert [a.model_dump() for a in v.rule.approvers] == [
        {"users": [], "groups": ["sre-leads"]},
        {"users": ["carol"], "groups": []},
    ]
    assert policy.judge([p], _ctx(args={"replicas": 12}, namespace="kube-system")).action == "deny"
    assert policy.judge([p], _ctx(tool="k8s_patch", args={"replicas": 1})).action == "allow"
    assert policy.judge([], _ctx()).action is None


def test_rules_see_the_preview_target_and_the_time() -> None:
    preview = models.Preview(
        summary="delete pod db-0 (StatefulSet/db replaces it)",
        operation="delete",
        owner="StatefulSet/db",
        replaced=True,
        target=models.PreviewTarget(
            api_version="v1", kind="Pod", namespace="team", name="db-0", labels={"tier": "data"}
        ),
    )
    p = _policy(
        {
            "rules": [
                {
                    "name": "no-sts-pods",
                    "when": "tool == 'k8s_delete_pod' && target != null && "
                    "target.ownerKind == 'StatefulSet'",
                    "action": "deny",
                },
                {
                    "name": "office-hours",
                    "when": "now.getDayOfWeek() in [1, 2, 3, 4, 5] && now.getHours() >= 9 && "
                    "now.getHours() < 17",
                    "action": "allow",
                },
            ]
        }
    )
    assert (
        policy.judge([p], _ctx("k8s_delete_pod", {"name": "db-0"}, preview=preview)).action
        == "deny"
    )
    assert policy.judge([p], _ctx()).action == "allow"
    saturday = dt.datetime(2026, 12, 12, 10, 0, tzinfo=dt.UTC)
    assert policy.judge([p], _ctx(now=saturday)).action is None


def test_gating_allow_waives_only_the_default_list() -> None:
    allow = policy.Verdict("allow")
    none = policy.Verdict(None)
    default = models.EffectiveApproval(waivable=list(models.MUTATING_TOOLS))
    written = models.EffectiveApproval(required_by_run=True)
    always = models.EffectiveApproval(
        waivable=list(models.MUTATING_TOOLS), always_required=["k8s_scale"]
    )
    assert policy.gated("k8s_scale", none, default)
    assert not policy.gated("k8s_scale", allow, default)
    assert policy.gated("k8s_scale", allow, written)
    assert policy.gated("k8s_scale", allow, always)
    assert not policy.gated("k8s_get", none, default)
    assert policy.gated("k8s_get", policy.Verdict("require"), default)


def test_a_runs_own_list_only_adds_to_what_the_policies_decide() -> None:
    p = _policy({"rules": [{"name": "ok", "when": "true", "action": "allow"}]})
    t = policy.tighten({"goal": "g", "tools": ["k8s_scale"], "approval": {"required": []}}, [p])
    assert sorted(t.spec.approval.required) == sorted(models.MUTATING_TOOLS)
    assert t.waivable == list(models.MUTATING_TOOLS)
    assert any("(+k8s_scale)" in c for c in t.clamped), t.clamped
    t = policy.tighten({"goal": "g", "approval": {"required": ["k8s_scale", "mcp:tools/*"]}}, [p])
    approval = models.EffectiveApproval.model_validate(t.effective(generation=1)["approval"])
    assert "k8s_scale" not in approval.waivable and "k8s_patch" in approval.waivable
    assert policy.gated("k8s_scale", policy.Verdict("allow"), approval), "the run listed it"
    assert not policy.gated("k8s_patch", policy.Verdict("allow"), approval)
    # A pattern in the run's list gates every tool it matches, whatever the server says.
    assert policy.gated("mcp:tools/read", policy.Verdict("allow"), approval, default=False)
    # Without policies, the run's list is the list (as before policies existed).
    assert (
        policy.tighten({"goal": "g", "approval": {"required": []}}, []).spec.approval.required == []
    )


# -- static settings: a run can only tighten -------------------------------------------------


def test_tighten_clamps_what_a_run_asks_too_little_of_and_says_so() -> None:
    p = _policy(
        {
            "approval": {"minApprovals": 2, "allowSelfApproval": False, "maxTimeout": "30m"},
            "limits": {"maxSteps": 10, "maxTokens": 5000, "maxCostUSD": 1.5, "timeout": "15m"},
            "tools": {"requireApproval": ["k8s_patch"]},
        }
    )
    spec = {
        "goal": "g",
        "tools": ["k8s_get", "k8s_patch"],
        "approval": {"required": [], "minApprovals": 1, "allowSelfApproval": True, "timeout": "2h"},
        "limits": {"maxSteps": 50, "timeout": "1h"},
    }
    t = policy.tighten(spec, [p])
    a, lim = t.spec.approval, t.spec.limits
    assert (a.min_approvals, a.allow_self_approval, a.timeout) == (2, False, "30m")
    assert (lim.max_steps, lim.max_tokens, lim.max_cost_usd, lim.timeout) == (10, 5000, 1.5, "15m")
    assert sorted(a.required) == sorted(models.MUTATING_TOOLS), "a run's [] only adds"
    assert t.always == ["k8s_patch"] and t.required_by_run
    assert len(t.clamped) == 8, t.clamped
    assert "spec.approval.minApprovals 1 → 2 (AgentPolicy team/guard)" in t.clamped
    fixed = t.effective(generation=1)
    assert fixed["policies"] == [{"kind": "AgentPolicy", "name": "guard", "generation": 3}]
    assert fixed["approval"]["alwaysRequired"] == ["k8s_patch"]
    assert models.EffectiveSettings.model_validate(fixed).approval.always_required == ["k8s_patch"]


def test_tighten_keeps_a_stricter_run_as_it_is() -> None:
    p = _policy({"approval": {"minApprovals": 2}, "limits": {"maxSteps": 10}})
    t = policy.tighten(
        {"goal": "g", "approval": {"minApprovals": 3}, "limits": {"maxSteps": 5}}, [p]
    )
    assert (t.spec.approval.min_approvals, t.spec.limits.max_steps) == (3, 5)
    assert t.clamped == [] and not t.required_by_run


@pytest.mark.parametrize(
    ("spec", "said"),
    [
        (
            {"tools": ["k8s_get", "k8s_apply"]},
            "spec.tools: k8s_apply is not allowed by AgentPolicy team/guard",
        ),
        ({"serviceAccountName": "admin"}, "spec.serviceAccountName: admin is not allowed"),
        (
            {"model": {"baseURL": "https://evil.example/v1"}},
            "spec.model.baseURL https://evil.example/v1",
        ),
        (
            {"approval": {"approvers": {"users": ["mallory"]}}},
            "none of users ['mallory'] may approve",
        ),
    ],
)
def test_tighten_refuses_what_a_policy_forbids_naming_it(spec: dict[str, Any], said: str) -> None:
    p = _policy(
        {
            "tools": {
                "allowed": [
                    "k8s_get",
                    "k8s_list",
                    "k8s_describe",
                    "k8s_logs",
                    "k8s_events",
                    "k8s_s*",
                ]
            },
            "serviceAccounts": ["default", "agent"],
            "models": {"baseURLs": ["https://llm.internal/v1"]},
            "approval": {"approvers": {"users": ["alice", "bob"]}},
        }
    )
    with pytest.raises(policy.Refused, match=r".*") as refused:
        policy.tighten({"goal": "g", **spec}, [p])
    assert said in str(refused.value)


def test_the_default_endpoint_is_judged_too() -> None:
    p = _policy({"models": {"baseURLs": ["https://llm.internal/v1"]}})
    with pytest.raises(policy.Refused, match="the operator's default model endpoint"):
        policy.tighten({"goal": "g"}, [p], default_base_url="http://127.0.0.1:9/v1")
    assert policy.tighten({"goal": "g"}, [p], default_base_url="https://llm.internal/v1/").spec


def test_cluster_policies_apply_where_their_selector_matches() -> None:
    bodies = [
        {
            "kind": "ClusterAgentPolicy",
            "metadata": {"name": "prod"},
            "spec": {"namespaceSelector": {"matchLabels": {"env": "prod"}}},
        },
        {"kind": "ClusterAgentPolicy", "metadata": {"name": "all"}, "spec": {}},
        {
            "kind": "ClusterAgentPolicy",
            "metadata": {"name": "not-sandbox"},
            "spec": {
                "namespaceSelector": {
                    "matchExpressions": [{"key": "sandbox", "operator": "DoesNotExist"}]
                }
            },
        },
        {"kind": "AgentPolicy", "metadata": {"name": "local", "namespace": "team"}, "spec": {}},
    ]
    names = [p.name for p in policy.applicable(bodies, {"env": "prod"})]
    assert names == ["local", "all", "not-sandbox", "prod"]
    names = [p.name for p in policy.applicable(bodies, {"sandbox": "yes"})]
    assert names == ["local", "all"]


# -- the examples a platform team would use: each rule's paths -------------------------------

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "policies"


def example(name: str) -> policy.Policy:
    body = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    assert policy.check(body["spec"]) == [], name
    return policy.Policy.of(body)


def _target(
    kind: str, *, labels: dict[str, str] | None = None, owner: str | None = None, **more: Any
) -> models.Preview:
    return models.Preview(
        summary="s",
        operation=more.pop("operation", "update"),
        owner=owner,
        changes=[models.PreviewChange(**c) for c in more.pop("changes", [])],
        target=models.PreviewTarget(
            api_version="apps/v1",
            kind=kind,
            namespace=more.pop("namespace", "team"),
            name="web",
            labels=labels or {},
        ),
    )


def test_every_example_compiles_and_none_is_left_out() -> None:
    names = sorted(p.stem for p in EXAMPLES.glob("*.yaml"))
    assert names == sorted(
        [
            "baseline",
            "batch-restarts",
            "business-hours",
            "deny-kube-system",
            "protect-statefulset-pods",
            "scale-needs-sre-leads",
        ]
    )
    for name in names:
        example(name)


def test_example_scale_above_ten_needs_two_sre_leads() -> None:
    p = example("scale-needs-sre-leads")
    v = policy.judge([p], _ctx(args={"kind": "Deployment", "name": "web", "replicas": 12}))
    assert v.action == "require" and v.rule is not None
    assert v.rule.min_approvals == 2 and v.rule.approvers[0].groups == ["sre-leads"]
    assert (
        policy.judge([p], _ctx(args={"kind": "Deployment", "name": "web", "replicas": 10})).action
        is None
    )
    patch = _target("Deployment", changes=[{"path": "spec.replicas", "before": "2", "after": "11"}])
    assert (
        policy.judge([p], _ctx("k8s_patch", {"kind": "Deployment"}, preview=patch)).action
        == "require"
    )
    paused = _target(
        "Deployment", changes=[{"path": "spec.paused", "before": None, "after": "true"}]
    )
    assert (
        policy.judge([p], _ctx("k8s_patch", {"kind": "Deployment"}, preview=paused)).action is None
    )


def test_example_kube_system_is_denied_wherever_the_call_points() -> None:
    p = example("deny-kube-system")
    assert (
        policy.judge([p], _ctx("k8s_get", {"kind": "pods"}, namespace="kube-system")).action
        == "deny"
    )
    inside = _target("Deployment", namespace="kube-system")
    assert policy.judge([p], _ctx(preview=inside)).action == "deny"
    assert policy.judge([p], _ctx(preview=_target("Deployment"))).action is None


def test_example_batch_deployments_restart_without_a_person() -> None:
    p = example("batch-restarts")
    batch = _target("Deployment", labels={"tier": "batch"})
    assert policy.judge([p], _ctx("k8s_rollout_restart", {}, preview=batch)).action == "allow"
    web = _target("Deployment", labels={"tier": "web"})
    assert policy.judge([p], _ctx("k8s_rollout_restart", {}, preview=web)).action is None
    assert (
        policy.judge([p], _ctx("k8s_rollout_restart", {}, preview=_target("Deployment"))).action
        is None
    )
    assert policy.judge([p], _ctx("k8s_scale", preview=batch)).action is None


def test_example_statefulset_pods_are_never_deleted() -> None:
    p = example("protect-statefulset-pods")
    sts = _target("Pod", owner="StatefulSet/db", operation="delete")
    assert policy.judge([p], _ctx("k8s_delete_pod", {"name": "db-0"}, preview=sts)).action == "deny"
    rs = _target("Pod", owner="ReplicaSet/web-1", operation="delete")
    assert policy.judge([p], _ctx("k8s_delete_pod", {"name": "web-1"}, preview=rs)).action is None


@pytest.mark.parametrize(
    ("when", "tool", "action"),
    [
        ("2026-12-07T09:30:00Z", "k8s_scale", None),  # Monday 10:30 in Berlin
        ("2026-12-07T17:30:00Z", "k8s_scale", "deny"),  # Monday 18:30 in Berlin
        ("2026-12-12T10:00:00Z", "k8s_scale", "deny"),  # Saturday
        ("2026-12-12T10:00:00Z", "k8s_get", None),  # reads at any time
    ],
)
def test_example_changes_only_in_business_hours(when: str, tool: str, action: str | None) -> None:
    p = example("business-hours")
    now = dt.datetime.fromisoformat(when.replace("Z", "+00:00"))
    assert policy.judge([p], _ctx(tool, now=now)).action == action


def test_example_baseline_clamps_and_refuses() -> None:
    p = example("baseline")
    with pytest.raises(
        policy.Refused, match="k8s_delete_pod is not allowed by AgentPolicy baseline"
    ):
        policy.tighten({"goal": "g", "tools": ["k8s_get", "k8s_delete_pod"]}, [p])
    t = policy.tighten(
        {"goal": "g", "tools": ["k8s_get", "k8s_scale"], "approval": {"timeout": "2h"}}, [p]
    )
    assert (t.spec.approval.timeout, t.spec.limits.max_steps, t.spec.limits.max_tokens) == (
        "30m",
        20,
        200000,
    )


def test_policies_see_mcp_tools_as_mcp_refs() -> None:
    p = _policy(
        {
            "tools": {
                "allowed": ["k8s_get", "mcp:prom/*", "mcp:*/read_*"],
                "requireApproval": ["mcp:*/delete_*"],
            }
        }
    )
    pinned = [
        models.PinnedMCPTool(server="tools", name=n, function=f"tools__{n}", schema_hash="h")
        for n in ("read_pod", "delete_pod")
    ]
    t = policy.tighten(
        {"goal": "g", "tools": ["k8s_get", "mcp:prom/*", "mcp:tools/read_pod"]},
        [p],
        mcp_tools=pinned,
    )
    assert t.always == ["mcp:tools/delete_pod"]
    assert "mcp:tools/delete_pod" in t.spec.approval.required
    with pytest.raises(policy.Refused, match="mcp:tools/delete_pod is not allowed"):
        policy.tighten({"goal": "g", "tools": ["mcp:tools/delete_pod"]}, [p])
    approval = models.EffectiveApproval(always_required=t.always)
    # An MCP tool's default (not read-only: gated) is waived by an allow rule, never a
    # policy's always-gated list.
    assert policy.gated("mcp:tools/x", policy.Verdict(None), approval, default=True)
    assert not policy.gated("mcp:tools/x", policy.Verdict("allow"), approval, default=True)
    assert not policy.gated("mcp:tools/x", policy.Verdict(None), approval, default=False)
    assert policy.gated("mcp:tools/delete_pod", policy.Verdict("allow"), approval, default=False)


def test_rules_see_every_change_and_a_person_decides_when_they_cannot() -> None:
    p = example("scale-needs-sre-leads")
    noise = [
        models.PreviewChange(path=f"metadata.annotations.a{i:02}", after='"x"') for i in range(24)
    ]
    changes = [*noise, models.PreviewChange(path="spec.replicas", before="2", after="50")]
    shown, hidden = changes[: models.MAX_PREVIEW_CHANGES], changes[models.MAX_PREVIEW_CHANGES :]

    def preview() -> models.Preview:
        return models.Preview(
            summary="s",
            operation="update",
            changes=shown,
            more_changes=len(hidden),
            target=models.PreviewTarget(api_version="apps/v1", kind="Deployment", name="web"),
        )

    full = policy.judge(
        [p], _ctx("k8s_patch", {"kind": "Deployment"}, preview=preview().with_every_change(changes))
    )
    assert full.action == "require" and full.rule is not None and full.rule.name == "big-scale"
    assert full.rule.min_approvals == 2, "spec.replicas beyond the 20 people see still counts"
    # From a checkpoint only the listed changes are known: a person decides.
    partial = policy.judge([p], _ctx("k8s_patch", {"kind": "Deployment"}, preview=preview()))
    assert partial.action == "require" and partial.rule is not None
    assert partial.rule.name == "changes-truncated"


def test_arguments_too_deep_or_too_big_for_cel_are_hidden_not_a_crash() -> None:
    p = _policy({"rules": [{"name": "r", "when": "args.x == 1", "action": "allow"}]})
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(2000):
        node["x"] = {}
        node = node["x"]
    assert policy.judge([p], _ctx(args=deep)).action == "require"
    # Beyond CEL's int: given as text, so the rule errors (a person decides) and the error
    # never repeats the arguments (they may hold anything).
    greater = _policy({"rules": [{"name": "r", "when": "args.x > 1", "action": "allow"}]})
    huge = policy.judge([greater], _ctx(args={"x": 2**70, "secret": "hunter2"}))
    assert huge.action == "require" and huge.rule is not None
    assert "hunter2" not in huge.rule.message and str(2**70) not in huge.rule.message
