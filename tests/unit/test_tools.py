"""The pure parts of the k8s_* tools: argument validation (errors name the argument),
the OpenAI tool specs, result capping, Secret redaction, compact summaries and the stamp
operations added to a JSON patch. No cluster: the cluster-facing half is in
tests/integration/test_tools.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agentrun_operator import contract, models, tools


class NoKube:
    """Stands in for the cluster where a call must fail before reaching it."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the tool touched the cluster ({name}) for bad arguments")


# -- arguments -------------------------------------------------------------------------------

BAD_ARGUMENTS: list[tuple[str, str, dict[str, Any], str]] = [
    ("missing name", "k8s_get", {"kind": "Pod"}, "argument 'name' is required"),
    ("missing kind", "k8s_list", {}, "argument 'kind' is required"),
    ("name of wrong type", "k8s_get", {"kind": "Pod", "name": 42}, "argument 'name'"),
    (
        "replicas as words",
        "k8s_scale",
        {"kind": "deploy", "name": "w", "replicas": "three"},
        "argument 'replicas'",
    ),
    (
        "replicas as a string",
        "k8s_scale",
        {"kind": "deploy", "name": "w", "replicas": "3"},
        "argument 'replicas'",
    ),
    (
        "negative replicas",
        "k8s_scale",
        {"kind": "deploy", "name": "w", "replicas": -1},
        "argument 'replicas'",
    ),
    (
        "unknown argument",
        "k8s_get",
        {"kind": "Pod", "name": "p", "force": True},
        "unknown argument 'force'",
    ),
    (
        "snake_case argument",
        "k8s_get",
        {"kind": "Pod", "name": "p", "api_version": "v1"},
        "unknown argument 'api_version'",
    ),
    ("name with a slash", "k8s_get", {"kind": "Pod", "name": "a/b"}, "argument 'name'"),
    ("name '..'", "k8s_delete_pod", {"name": ".."}, "argument 'name'"),
    (
        "bad namespace",
        "k8s_list",
        {"kind": "Pod", "namespace": "Not_A_Namespace"},
        "argument 'namespace'",
    ),
    (
        "bad apiVersion",
        "k8s_get",
        {"kind": "Pod", "name": "p", "apiVersion": "apps"},
        "argument 'apiVersion'",
    ),
    ("tailLines too big", "k8s_logs", {"pod": "p", "tailLines": 100000}, "argument 'tailLines'"),
    ("previous as text", "k8s_logs", {"pod": "p", "previous": "maybe"}, "argument 'previous'"),
    (
        "unknown patchType",
        "k8s_patch",
        {"kind": "cm", "name": "c", "patch": {}, "patchType": "xml"},
        "argument 'patchType'",
    ),
    (
        "json patch as object",
        "k8s_patch",
        {"kind": "cm", "name": "c", "patch": {"a": 1}, "patchType": "json"},
        "argument 'patch'",
    ),
    (
        "merge patch as list",
        "k8s_patch",
        {"kind": "cm", "name": "c", "patch": [{"op": "remove", "path": "/a"}]},
        "argument 'patch'",
    ),
    ("patch as number", "k8s_patch", {"kind": "cm", "name": "c", "patch": 3}, "argument 'patch'"),
    ("manifest not YAML", "k8s_apply", {"manifest": "a: [b"}, "argument 'manifest'"),
    ("two manifests", "k8s_apply", {"manifest": "a: 1\n---\nb: 2\n"}, "exactly one object"),
    (
        "manifest without kind",
        "k8s_apply",
        {"manifest": {"apiVersion": "v1", "metadata": {"name": "x"}}},
        "needs kind",
    ),
    (
        "manifest without name",
        "k8s_apply",
        {"manifest": "apiVersion: v1\nkind: ConfigMap\n"},
        "metadata.name",
    ),
    ("unknown tool", "k8s_nuke", {}, "unknown tool 'k8s_nuke'"),
]


@pytest.mark.parametrize(
    ("tool", "arguments", "expected"),
    [case[1:] for case in BAD_ARGUMENTS],
    ids=[case[0] for case in BAD_ARGUMENTS],
)
async def test_bad_arguments_are_a_failed_outcome_naming_the_argument(
    tool: str, arguments: dict[str, Any], expected: str
) -> None:
    outcome = await tools.run_tool(
        NoKube(),  # type: ignore[arg-type]
        name=tool,
        arguments=arguments,
        namespace="ns",
        call_id="c-0123456789ab",
    )
    assert outcome.status == "failed"
    assert outcome.result is None
    assert outcome.error is not None and expected in outcome.error, outcome.error
    assert outcome.error.startswith(f"{tool}: ")


async def test_arguments_that_are_not_an_object_fail() -> None:
    outcome = await tools.run_tool(
        NoKube(),  # type: ignore[arg-type]
        name="k8s_get",
        arguments=["Pod", "p"],  # type: ignore[arg-type]
        namespace="ns",
        call_id="c-0123456789ab",
    )
    assert outcome.status == "failed"
    assert "must be a JSON object" in (outcome.error or "")


def test_unknown_arguments_list_the_allowed_ones() -> None:
    with pytest.raises(tools.ArgumentError) as caught:
        tools.parse_arguments("k8s_logs", {"pod": "p", "lines": 5})
    assert "tailLines" in str(caught.value) and "previous" in str(caught.value)
    assert caught.value.argument == "lines"


def test_good_arguments_parse_with_their_defaults() -> None:
    logs = tools.parse_arguments("k8s_logs", {"pod": "p"})
    assert isinstance(logs, tools.LogsArgs)
    assert (logs.tail_lines, logs.previous, logs.namespace) == (200, False, None)
    patch = tools.parse_arguments("k8s_patch", {"kind": "cm", "name": "c", "patch": '{"a": 1}'})
    assert isinstance(patch, tools.PatchArgs)
    assert patch.patch == {"a": 1} and patch.patch_type == "merge"
    apply = tools.parse_arguments(
        "k8s_apply", {"manifest": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n"}
    )
    assert isinstance(apply, tools.ApplyArgs)
    assert apply.manifest == {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}


# -- specs -----------------------------------------------------------------------------------


def test_openai_tools_describe_every_tool_with_the_design_arguments() -> None:
    specs = {s["function"]["name"]: s for s in tools.openai_tools(models.ALL_TOOLS)}
    assert list(specs) == list(models.ALL_TOOLS)
    expected = {
        "k8s_get": {"kind", "name", "namespace", "apiVersion"},
        "k8s_list": {"kind", "namespace", "labelSelector", "fieldSelector", "apiVersion"},
        "k8s_describe": {"kind", "name", "namespace"},
        "k8s_logs": {"pod", "namespace", "container", "tailLines", "previous"},
        "k8s_events": {"namespace", "kind", "name"},
        "k8s_scale": {"kind", "name", "namespace", "replicas"},
        "k8s_rollout_restart": {"kind", "name", "namespace"},
        "k8s_delete_pod": {"name", "namespace"},
        "k8s_patch": {"kind", "name", "namespace", "patch", "patchType"},
        "k8s_apply": {"manifest"},
    }
    for name, spec in specs.items():
        assert spec["type"] == "function"
        params = spec["function"]["parameters"]
        assert params["type"] == "object" and params["additionalProperties"] is False
        assert set(params["properties"]) == expected[name], name
        assert spec["function"]["description"]
        if "namespace" in params["properties"]:
            assert "run's own namespace" in params["properties"]["namespace"]["description"]
            assert "namespace" not in params.get("required", [])
        text = json.dumps(spec)
        assert '"title"' not in text and '{"type": "null"}' not in text
    assert specs["k8s_logs"]["function"]["parameters"]["properties"]["tailLines"]["default"] == 200
    assert set(specs["k8s_scale"]["function"]["parameters"]["required"]) == {
        "kind",
        "name",
        "replicas",
    }


def test_openai_tools_only_the_named_and_rejects_unknown_names() -> None:
    assert [s["function"]["name"] for s in tools.openai_tools(models.READ_ONLY_TOOLS)] == list(
        models.READ_ONLY_TOOLS
    )
    with pytest.raises(ValueError, match="k8s_nuke"):
        tools.openai_tools(["k8s_get", "k8s_nuke"])


# -- capping ---------------------------------------------------------------------------------


def test_a_small_result_is_left_alone() -> None:
    result = {"name": "x", "items": [1, 2, 3]}
    assert tools.cap(result, 1000) is result


def test_a_long_list_keeps_the_first_items_and_says_how_many() -> None:
    result = {"kind": "Pod", "count": 500, "items": [{"name": f"pod-{i:03}"} for i in range(500)]}
    capped = tools.cap(result, 2000)
    assert tools.size(capped) <= 2000
    assert capped["truncated"] is True
    shown = len(capped["items"])
    assert 0 < shown < 500
    assert capped["items"][0] == {"name": "pod-000"}
    assert f"{shown} of 500" in capped["note"]


def test_events_keep_the_newest() -> None:
    result = {"events": [{"message": f"event {i}"} for i in range(300)]}
    capped = tools.cap(result, 1000)
    assert tools.size(capped) <= 1000
    assert capped["events"][-1] == {"message": "event 299"}
    assert "newest" in capped["note"]


def test_logs_keep_their_last_whole_lines() -> None:
    text = "".join(f"line {i}\n" for i in range(5000))
    capped = tools.cap({"pod": "p", "lines": text}, 4096)
    assert tools.size(capped) <= 4096
    assert capped["truncated"] is True
    assert capped["lines"].endswith("line 4999\n")
    assert capped["lines"].startswith("line ")  # a whole line, not its tail


def test_anything_else_becomes_the_start_of_its_json_text() -> None:
    obj = {"kind": "ConfigMap", "data": {"big": "x" * 50_000}}
    capped = tools.cap(obj, 3000)
    assert tools.size(capped) <= 3000
    assert capped["truncated"] is True
    assert capped["json"].startswith('{"kind": "ConfigMap"')
    assert "50" in capped["note"]


@pytest.mark.parametrize("limit", [40, 100, 512, 1000, 4096, 16384])
def test_the_cap_holds_for_any_limit_and_non_ascii_text(limit: int) -> None:
    for result in (
        {"items": [{"name": "ü" * 40}] * 200},
        {"lines": "Grüße 😀\n" * 3000},
        {"object": {"a": ['"quoted" ✓'] * 2000}},
    ):
        assert tools.size(tools.cap(result, limit)) <= limit


# -- redaction -------------------------------------------------------------------------------

SECRET = {
    "apiVersion": "v1",
    "kind": "Secret",
    "metadata": {
        "name": "db",
        "annotations": {tools.LAST_APPLIED: '{"stringData":{"password":"hunter2"}}'},
    },
    "type": "Opaque",
    "data": {"password": "aHVudGVyMg=="},
    "stringData": {"user": "hunter2"},
}


def test_a_secret_keeps_its_keys_but_not_its_values() -> None:
    redacted = tools.redact(SECRET)
    assert redacted["data"] == {"password": tools.REDACTED}
    assert redacted["stringData"] == {"user": tools.REDACTED}
    assert redacted["metadata"]["annotations"][tools.LAST_APPLIED] == tools.REDACTED
    assert "hunter2" not in json.dumps(redacted) and "aHVudGVyMg" not in json.dumps(redacted)
    assert SECRET["data"] == {"password": "aHVudGVyMg=="}  # the input is untouched


def test_secrets_are_redacted_inside_lists_and_other_objects() -> None:
    items = {k: v for k, v in SECRET.items() if k not in ("apiVersion", "kind")}
    for value in (
        {"kind": "SecretList", "items": [items, items]},  # List items carry no kind
        {"kind": "List", "items": [SECRET]},
        [{"object": SECRET}],
        {"events": [], "object": SECRET},
    ):
        text = json.dumps(tools.redact(value))
        assert "hunter2" not in text and "aHVudGVyMg" not in text, text


def test_other_objects_are_not_redacted() -> None:
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "data": {"a": "b"}}
    assert tools.redact(cm) == cm
    crd = {"apiVersion": "example.com/v1", "kind": "Secret", "data": {"a": "b"}}
    assert tools.redact(crd) == crd  # only core/v1 Secrets hold secret data


def test_arguments_carrying_secret_data_are_redacted_for_the_stream() -> None:
    manifest = "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {pw: hunter2}\n"
    shown = tools.redacted_arguments("k8s_apply", {"manifest": manifest})
    assert "hunter2" not in json.dumps(shown)
    merge = tools.redacted_arguments(
        "k8s_patch", {"kind": "secrets", "name": "s", "patch": {"data": {"pw": "aHVudGVyMg=="}}}
    )
    assert "aHVudGVyMg" not in json.dumps(merge)
    ops = tools.redacted_arguments(
        "k8s_patch",
        {
            "kind": "Secret",
            "name": "s",
            "patchType": "json",
            "patch": [{"op": "replace", "path": "/data/pw", "value": "aHVudGVyMg=="}],
        },
    )
    assert "aHVudGVyMg" not in json.dumps(ops) and ops["patch"][0]["path"] == "/data/pw"
    plain = {"kind": "cm", "name": "c", "patch": {"data": {"a": "b"}}}
    assert tools.redacted_arguments("k8s_patch", plain) == plain
    # Two documents cannot be parsed (the call fails), and its text is shown: not this one.
    two = manifest + "---\n" + manifest
    assert "hunter2" not in json.dumps(tools.redacted_arguments("k8s_apply", {"manifest": two}))


# -- shapes ----------------------------------------------------------------------------------


def test_a_pod_summary_says_what_kubectl_get_says() -> None:
    pod = {
        "metadata": {"name": "p", "namespace": "n", "creationTimestamp": "2024-01-01T00:00:00Z"},
        "spec": {"containers": [{"name": "a"}, {"name": "b"}], "nodeName": "node-1"},
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {"ready": True, "restartCount": 0, "state": {"running": {}}},
                {
                    "ready": False,
                    "restartCount": 4,
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                },
            ],
            "conditions": [{"type": "Ready", "status": "False", "reason": "ContainersNotReady"}],
        },
    }
    summary = tools.summarize(pod, kind="Pod")
    assert summary == {
        "name": "p",
        "kind": "Pod",
        "namespace": "n",
        "created": "2024-01-01T00:00:00Z",
        "phase": "Running",
        "ready": "1/2",
        "restarts": 4,
        "node": "node-1",
        "reason": "CrashLoopBackOff",
        "conditions": ["Ready=False (ContainersNotReady)"],
    }


def test_a_secret_summary_lists_keys_only() -> None:
    summary = tools.summarize(SECRET, kind="Secret")
    assert summary["keys"] == ["password"] and summary["type"] == "Opaque"
    assert "hunter2" not in json.dumps(summary) and "aHVudGVyMg" not in json.dumps(summary)


def test_the_stamp_is_merged_into_a_merge_patch_without_touching_the_input() -> None:
    patch: dict[str, Any] = {"metadata": {"annotations": {"a": "b"}}, "spec": {"replicas": 2}}
    merged = tools.merge(patch, {"metadata": {"annotations": {contract.LAST_CALL_ID: "c-1"}}})
    assert merged["metadata"]["annotations"] == {"a": "b", contract.LAST_CALL_ID: "c-1"}
    assert merged["spec"] == {"replicas": 2}
    assert patch["metadata"]["annotations"] == {"a": "b"}


def test_a_json_patch_gets_one_more_operation_for_the_stamp() -> None:
    ops = [{"op": "replace", "path": "/spec/replicas", "value": 2}]
    with_map = {"metadata": {"annotations": {"x": "y"}, "resourceVersion": "7"}}
    stamped, guarded = tools.json_patch_with_stamp(ops, with_map, "c-1")
    assert stamped == [
        *ops,
        {"op": "add", "path": "/metadata/annotations/agentrun.dev~1last-call-id", "value": "c-1"},
    ]
    assert not guarded
    # No annotations yet: the whole map is added, guarded against a concurrent writer.
    stamped, guarded = tools.json_patch_with_stamp(
        ops, {"metadata": {"resourceVersion": "7"}}, "c-1"
    )
    assert guarded
    assert stamped[0] == {"op": "test", "path": "/metadata/resourceVersion", "value": "7"}
    assert stamped[-1] == {
        "op": "add",
        "path": "/metadata/annotations",
        "value": {contract.LAST_CALL_ID: "c-1"},
    }
    # The user's own operations decide whether the map exists when the stamp is added.
    adds_map = [{"op": "add", "path": "/metadata/annotations", "value": {"a": "b"}}]
    stamped, guarded = tools.json_patch_with_stamp(adds_map, {"metadata": {}}, "c-1")
    assert not guarded and stamped[-1]["path"].startswith("/metadata/annotations/")


# -- previews (the pure part: what changed, shown to people) --------------------------------


def test_a_preview_lists_changed_fields_without_server_noise() -> None:
    from agentrun_operator.tools import dryrun as pv

    before = {
        "metadata": {
            "name": "web",
            "resourceVersion": "1",
            "generation": 1,
            "annotations": {"keep": "a"},
        },
        "spec": {"replicas": 1, "template": {"spec": {"containers": [{"image": "nginx:1"}]}}},
        "status": {"readyReplicas": 1},
    }
    after = {
        "metadata": {
            "name": "web",
            "resourceVersion": "2",
            "generation": 2,
            "annotations": {"keep": "a", contract.LAST_CALL_ID: "c-1"},
            "managedFields": [{"manager": "agentrun"}],
        },
        "spec": {"replicas": 3, "template": {"spec": {"containers": [{"image": "nginx:2"}]}}},
        "status": {"readyReplicas": 3},
    }
    changes = pv._changes(pv._comparable(before), pv._comparable(after), secret=False)
    assert [(c.path, c.before, c.after) for c in changes] == [
        ("spec.replicas", "1", "3"),
        ("spec.template.spec.containers[0].image", '"nginx:1"', '"nginx:2"'),
    ]


def test_a_secret_preview_names_keys_and_hides_values() -> None:
    from agentrun_operator.tools import dryrun as pv

    before = {"kind": "Secret", "apiVersion": "v1", "data": {"pw": "b2xk"}}
    after = {"kind": "Secret", "apiVersion": "v1", "data": {"pw": "bmV3", "user": "YQ=="}}
    changes = pv._changes(pv._comparable(before), pv._comparable(after), secret=True)
    assert [(c.path, c.before, c.after) for c in changes] == [
        ("data.pw", tools.REDACTED, tools.REDACTED),
        ("data.user", None, tools.REDACTED),
    ]


def test_a_long_value_is_capped_and_a_merge_patch_computed_locally() -> None:
    from agentrun_operator.tools import dryrun as pv

    [change] = pv._changes({"a": "x"}, {"a": "y" * 5000}, secret=False)
    assert change.after is not None and len(change.after) <= models.MAX_PREVIEW_VALUE
    merged = pv._merged({"spec": {"a": 1, "b": 2}}, {"spec": {"a": None, "c": 3}})
    assert merged == {"spec": {"b": 2, "c": 3}}
