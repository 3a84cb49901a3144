"""The operator end to end on real parts: kube-apiserver (1.34, or 1.20 with make
test-oldest), redis-server, the operator as a real process, and the mock LLM over HTTP
driven by the real langchain-openai client.

Covers: the happy path with its event sequence; a tool call the service account may not
make; each limit (steps, tokens, cost, time); stop during tokens, while waiting on the
model, through the Redis control channel and before start; a tool that needs approval
failing closed; kill -9 mid-run (the run finishes, the side effect happened once, the stream
continues without gaps); delete mid-run; TTL; the Redis keys of runs deleted behind the
operator's back swept; a model endpoint outside the allow-list and one that is down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
import redis as redis_sync

from agentrun_harness.controlplane import ControlPlane
from agentrun_harness.redisserver import RedisServer
from agentrun_operator import config, events, kube
from agentrun_operator.engine import Registry
from agentrun_operator.store import RunStore

from support import (
    Kubectl,
    OperatorProcess,
    Script,
    assert_clean_stream,
    create_run,
    marker,
    metrics,
    stream,
    wait_event,
    wait_for,
    wait_phase,
)


@pytest.fixture
def namespace(op_namespace: str) -> str:
    """Runs here live in namespaces the test operator watches (and the webhooks judge)."""
    return op_namespace


@pytest.fixture
def dump_on_failure(request: pytest.FixtureRequest, operator: OperatorProcess) -> Iterator[None]:
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"--- operator log ---\n{operator.log_tail(120)}")


pytestmark = pytest.mark.usefixtures("operator", "dump_on_failure")


# -- happy path ---------------------------------------------------------------------------


def test_a_run_goes_from_apply_to_succeeded_with_every_event_in_order(
    kubectl: Kubectl,
    namespace: str,
    agent_sa: str,
    r: redis_sync.Redis,
    script: Script,
    redis_server: RedisServer,
) -> None:
    redis_url = redis_server.url
    goal = marker("happy") + ": why are the pods of web not ready?"
    uid = create_run(
        kubectl,
        namespace,
        "happy",
        goal=goal,
        serviceAccountName=agent_sa,
        tools=["k8s_list", "k8s_get"],
    )
    st = wait_phase(kubectl, namespace, "happy", "Succeeded", "Failed")
    assert st["phase"] == "Succeeded", st
    evs = stream(r, uid)
    assert_clean_stream(evs)
    states = [e["data"]["state"] for e in evs if e["type"] == "workflow"]
    assert states == ["pending", "planning", "executing", "executing", "verifying", "succeeded"]
    tool_events = [e["data"] for e in evs if e["type"] == "tool"]
    assert [(t["name"], t["status"]) for t in tool_events] == [
        ("k8s_list", "started"),
        ("k8s_list", "succeeded"),
    ]
    assert tool_events[0]["callId"] == tool_events[1]["callId"]
    assert tool_events[0]["callId"].startswith("c-") and len(tool_events[0]["callId"]) == 14
    assert any(e["type"] == "token" and e["data"]["text"] for e in evs)
    metrics = [e["data"] for e in evs if e["type"] == "metrics"]
    assert len(metrics) == 4 and all(m["ttftMs"] is not None for m in metrics)
    assert all(m["ttrMs"] >= m["ttftMs"] for m in metrics)
    end = evs[-1]["data"]
    assert end["phase"] == "Succeeded" and end["result"]
    # Status mirrors the stream.
    assert st["result"] == end["result"]
    assert st["usage"]["llmCalls"] == 4 and st["usage"]["toolCalls"] == 1
    assert st["usage"]["totalTokens"] == sum(m["inputTokens"] + m["outputTokens"] for m in metrics)
    assert st["usage"]["costUSD"] > 0
    assert st["lastEventId"] == evs[-1]["id"]
    assert st["streamPath"] == f"/api/v1/runs/{namespace}/happy/events"
    # `agentrun watch` (the README's way to follow a run) replays the same stream.
    watched = subprocess.run(
        [
            sys.executable,
            "-m",
            "agentrun_operator.cli",
            "watch",
            f"{namespace}/happy",
            "--redis-url",
            redis_url,
        ],
        env={**os.environ, "KUBECONFIG": str(kubectl.plane.kubeconfig("admin"))},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert watched.returncode == 0, watched.stderr
    assert "⚙ k8s_list" in watched.stdout and "■ Succeeded" in watched.stdout
    assert end["result"] in watched.stdout
    conditions = {c["type"]: c["status"] for c in st["conditions"]}
    assert conditions["Finished"] == "True" and conditions["Running"] == "False"
    described = kubectl("describe", "agentrun", "happy", "-n", namespace).stdout
    assert "run started" in described and "Succeeded" in described


def test_metrics_after_a_run_show_its_tokens_cost_and_ttft(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess
) -> None:
    create_run(kubectl, namespace, "counted", goal=marker("metrics") + " look")
    st = wait_phase(kubectl, namespace, "counted", "Succeeded", "Failed")
    value = metrics(operator.metrics_port)
    usage = st["usage"]
    ns = {"namespace": namespace, "model": "mock"}
    assert value("agentrun_tokens_total", kind="input", **ns) == usage["inputTokens"]
    assert value("agentrun_tokens_total", kind="output", **ns) == usage["outputTokens"]
    assert value("agentrun_llm_calls_total", **ns) == usage["llmCalls"]
    assert abs(value("agentrun_cost_usd_total", **ns) - usage["costUSD"]) < 1e-9
    assert value("agentrun_llm_ttft_seconds_count", model="mock") >= usage["llmCalls"]
    assert value("agentrun_runs_finished_total", namespace=namespace, phase="Succeeded") == 1


def test_the_operator_never_writes_spec(kubectl: Kubectl, namespace: str) -> None:
    create_run(kubectl, namespace, "gitops", goal=marker("gitops") + " look around")
    wait_phase(kubectl, namespace, "gitops", "Succeeded", "Failed")
    # The raw object: kubectl >= 1.21 hides managedFields from `get -o json`.
    path = f"/apis/agentrun.dev/v1alpha1/namespaces/{namespace}/agentruns/gitops"
    body = json.loads(kubectl("get", "--raw", path).stdout)
    managers = {
        m["manager"]
        for m in body["metadata"]["managedFields"]
        if "f:spec" in json.dumps(m.get("fieldsV1", {}))
    }
    assert managers == {"kubectl-create"}, managers
    assert "kopf.zalando.org/last-handled-configuration" not in (
        body["metadata"].get("annotations") or {}
    )


def test_a_tool_call_the_service_account_may_not_make_is_an_error_the_agent_sees(
    kubectl: Kubectl, namespace: str, r: redis_sync.Redis
) -> None:
    uid = create_run(kubectl, namespace, "forbidden", goal=marker("forbidden") + " list pods")
    st = wait_phase(kubectl, namespace, "forbidden", "Succeeded", "Failed")
    assert st["phase"] == "Succeeded"
    done = [
        e["data"]
        for e in stream(r, uid)
        if e["type"] == "tool" and e["data"]["status"] != "started"
    ]
    assert done and done[0]["status"] == "failed"
    assert "forbidden" in json.dumps(done[0]["result"]).lower()


# -- limits -------------------------------------------------------------------------------


def test_the_step_limit_fails_the_run_with_a_reason(
    kubectl: Kubectl, namespace: str, agent_sa: str, r: redis_sync.Redis, script: Script
) -> None:
    m = script.add(
        marker("steps"),
        [{"text": "plan"}, {"tool_calls": [{"name": "k8s_list", "arguments": {"kind": "pods"}}]}],
    )
    uid = create_run(
        kubectl,
        namespace,
        "steps",
        goal=m,
        serviceAccountName=agent_sa,
        tools=["k8s_list"],
        limits={"maxSteps": 2},
    )
    st = wait_phase(kubectl, namespace, "steps", "Failed", "Succeeded")
    assert st["phase"] == "Failed"
    finished = next(c for c in st["conditions"] if c["type"] == "Finished")
    assert finished["reason"] == "MaxStepsExceeded" and "maxSteps is 2" in st["message"]
    evs = stream(r, uid)
    fault = next(e["data"] for e in evs if e["type"] == "fault")
    assert fault == {"message": st["message"], "code": "MaxStepsExceeded", "fatal": True}
    assert evs[-1]["data"]["phase"] == "Failed"
    assert_clean_stream(evs)


def test_the_token_limit_fails_the_run(kubectl: Kubectl, namespace: str) -> None:
    create_run(
        kubectl, namespace, "tokens", goal=marker("tokens") + " look", limits={"maxTokens": 5}
    )
    st = wait_phase(kubectl, namespace, "tokens", "Failed", "Succeeded")
    assert st["phase"] == "Failed" and "spec.limits.maxTokens is 5" in st["message"]


def test_the_cost_limit_fails_the_run(kubectl: Kubectl, namespace: str, script: Script) -> None:
    m = script.add(
        marker("cost"),
        [{"text": "plan", "usage": {"prompt_tokens": 1_000_000, "completion_tokens": 10}}],
    )
    create_run(kubectl, namespace, "cost", goal=m, limits={"maxCostUSD": 0.01})
    st = wait_phase(kubectl, namespace, "cost", "Failed", "Succeeded")
    assert st["phase"] == "Failed" and "spec.limits.maxCostUSD is 0.01" in st["message"]
    assert st["usage"]["costUSD"] > 0.01


def test_the_time_limit_fails_a_run_stuck_on_the_model(
    kubectl: Kubectl, namespace: str, script: Script
) -> None:
    m = script.add(marker("timeout"), [{"hang": True}])
    create_run(kubectl, namespace, "slow", goal=m, limits={"timeout": "2s"})
    st = wait_phase(kubectl, namespace, "slow", "Failed", "Succeeded", timeout=30)
    assert st["phase"] == "Failed" and "spec.limits.timeout is 2s" in st["message"]


# -- stop ---------------------------------------------------------------------------------

LONG_TEXT = " ".join(f"word{i}" for i in range(400))


def test_stop_by_kubectl_patch_during_tokens(
    kubectl: Kubectl, namespace: str, r: redis_sync.Redis, script: Script
) -> None:
    m = script.add(marker("stop-tokens"), [{"text": LONG_TEXT, "tokens_per_second": 20}])
    uid = create_run(kubectl, namespace, "stoppable", goal=m)
    wait_event(r, uid, "a first token", lambda e: e["type"] == "token")
    started = time.monotonic()
    kubectl(
        "patch",
        "agentrun",
        "stoppable",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"stop":true}}',
    )
    st = wait_phase(kubectl, namespace, "stoppable", "Stopped", "Succeeded", "Failed")
    elapsed = time.monotonic() - started
    assert st["phase"] == "Stopped", st
    evs = stream(r, uid)
    assert_clean_stream(evs)
    assert evs[-2]["type"] == "workflow" and evs[-2]["data"]["state"] == "stopped"
    assert evs[-1]["data"]["phase"] == "Stopped"
    tokens = "".join(e["data"]["text"] for e in evs if e["type"] == "token")
    assert len(tokens) < len(LONG_TEXT), "the stream went on after the stop"
    # Stopped is written after the run's task has ended: nothing can call the model now.
    assert script.calls_for(m) == 1
    print(f"stop by patch → Stopped in {elapsed:.2f}s")


def test_stop_through_the_redis_control_channel_while_waiting_on_the_model(
    kubectl: Kubectl, namespace: str, r: redis_sync.Redis, script: Script
) -> None:
    m = script.add(marker("stop-control"), [{"hang": True}])
    uid = create_run(kubectl, namespace, "ctl", goal=m)
    wait_event(
        r,
        uid,
        "planning to start",
        lambda e: e["type"] == "workflow" and e["data"]["state"] == "planning",
    )
    wait_for("the model call to begin", lambda: script.calls_for(m) >= 1)
    r.publish(events.control_key(uid), json.dumps({"action": "stop", "by": "alice"}))
    st = wait_phase(kubectl, namespace, "ctl", "Stopped", "Failed", timeout=15)
    assert st["phase"] == "Stopped" and st["stoppedBy"] == "alice"
    assert stream(r, uid)[-1]["data"] == {"phase": "Stopped", "result": "", "stoppedBy": "alice"}


def test_a_run_created_stopped_never_calls_the_model(
    kubectl: Kubectl, namespace: str, r: redis_sync.Redis, script: Script
) -> None:
    m = marker("stop-early")
    uid = create_run(kubectl, namespace, "early", goal=m, stop=True)
    st = wait_phase(kubectl, namespace, "early", "Stopped", "Succeeded", "Failed")
    assert st["phase"] == "Stopped"
    assert script.calls_for(m) == 0
    assert stream(r, uid)[-1]["data"]["phase"] == "Stopped"


# -- crash, delete, TTL -------------------------------------------------------------------


def test_kill_9_mid_run_resumes_without_repeating_the_side_effect(
    kubectl: Kubectl,
    namespace: str,
    agent_sa: str,
    r: redis_sync.Redis,
    script: Script,
    operator: OperatorProcess,
) -> None:
    kubectl("create", "deployment", "web", "--image=nginx", "-n", namespace)
    m = script.add(
        marker("crash"),
        [
            {"text": "plan: scale web to 3"},
            {
                "tool_calls": [
                    {
                        "name": "k8s_scale",
                        "arguments": {"kind": "Deployment", "name": "web", "replicas": 3},
                    }
                ]
            },
            {"text": LONG_TEXT, "tokens_per_second": 40},
        ],
    )
    uid = create_run(
        kubectl,
        namespace,
        "crashy",
        goal=m,
        serviceAccountName=agent_sa,
        tools=["k8s_scale", "k8s_get"],
        approval={"required": []},
    )
    scaled = wait_event(
        r,
        uid,
        "the scale call to succeed",
        lambda e: e["type"] == "tool" and e["data"]["status"] == "succeeded",
    )
    wait_event(
        r,
        uid,
        "tokens after the tool call",
        lambda e: e["type"] == "token" and e["id"] > scaled["id"],
    )
    operator.kill()
    operator.start()
    st = wait_phase(kubectl, namespace, "crashy", "Succeeded", "Failed", timeout=90)
    assert st["phase"] == "Succeeded"
    evs = stream(r, uid)
    assert_clean_stream(evs)
    assert any(e["type"] == "workflow" and e["data"]["state"] == "resumed" for e in evs)
    outcomes = [e["data"] for e in evs if e["type"] == "tool" and e["data"]["status"] != "started"]
    assert [o["status"] for o in outcomes] == ["succeeded"], "the scale was reported once"
    deploy = json.loads(kubectl("get", "deploy", "web", "-n", namespace, "-o", "json").stdout)
    assert deploy["spec"]["replicas"] == 3
    assert deploy["metadata"]["generation"] == 2, "scaled exactly once"
    stamp = deploy["metadata"]["annotations"]["agentrun.dev/last-call-id"]
    assert stamp == scaled["data"]["callId"]


def test_deleting_a_run_mid_stream_stops_it_and_removes_its_redis_keys(
    kubectl: Kubectl, namespace: str, r: redis_sync.Redis, script: Script
) -> None:
    m = script.add(marker("delete"), [{"text": LONG_TEXT, "tokens_per_second": 20}])
    uid = create_run(kubectl, namespace, "doomed", goal=m)
    wait_event(r, uid, "a first token", lambda e: e["type"] == "token")
    kubectl("delete", "agentrun", "doomed", "-n", namespace, "--timeout=30s")
    wait_for(
        "the run's Redis keys to go", lambda: r.keys(f"agentrun:{{{uid}}}:*") == [], timeout=15
    )


def test_ttl_deletes_a_finished_run_and_its_stream(
    kubectl: Kubectl, namespace: str, r: redis_sync.Redis
) -> None:
    uid = create_run(
        kubectl, namespace, "shortlived", goal=marker("ttl") + " look", ttlSecondsAfterFinished=1
    )
    wait_for(
        "the finished run to be deleted by its TTL",
        lambda: (
            kubectl("get", "agentrun", "shortlived", "-n", namespace, check=False).returncode != 0
        ),
        timeout=60,
    )
    wait_for("its Redis keys to go", lambda: r.keys(f"agentrun:{{{uid}}}:*") == [], timeout=15)


async def test_the_keys_of_runs_deleted_behind_the_operators_back_are_swept(
    kubectl: Kubectl,
    namespace: str,
    r: redis_sync.Redis,
    redis_server: RedisServer,
    cluster: ControlPlane,
) -> None:
    # A run deleted while Redis was away, and the operator restarted before it came back:
    # nothing remembers its keys but the keys themselves.
    live = create_run(kubectl, namespace, "kept", goal=marker("sweep") + " look")
    assert wait_phase(kubectl, namespace, "kept", "Succeeded", "Failed")["phase"] == "Succeeded"
    k = await kube.Kube.from_kubeconfig(cluster.kubeconfig("agentrun-operator"))
    this_cluster = await k.cluster_id()
    assert r.hget(events.meta_key(live), "cluster") == this_cluster.encode(), "runs are stamped"

    def ghost(run: str, stamp: str | None = this_cluster) -> str:
        uid = str(uuid.uuid4())
        event = {"v": 1, "run": run, "uid": uid, "seq": 1, "type": "workflow", "data": {}}
        r.xadd(events.events_key(uid), {"data": json.dumps(event)})
        r.hset(events.calls_key(uid), "c-000000000001", '{"state": "done"}')
        if stamp is not None:
            r.hset(events.meta_key(uid), "cluster", stamp)
        return uid

    gone = ghost(f"{namespace}/deleted-long-ago")
    # Not this operator's to judge: another operator's namespace, another cluster's run
    # (sharing this Redis), keys from before runs were stamped.
    kept = [
        ghost("elsewhere/not-mine"),
        ghost(f"{namespace}/other-cluster", stamp=str(uuid.uuid4())),
        ghost(f"{namespace}/unstamped", stamp=None),
    ]
    store = RunStore.connect(redis_server.url)
    registry = Registry(
        settings=config.Settings(namespaces=["op-*"]), k8s=k, store=store, saver=None
    )
    registry.cluster_id = this_cluster
    try:
        # With the operator's own rights. (The operator's own periodic sweep may get there
        # first: the same code.)
        await registry.sweeps.sweep_orphans()
    finally:
        await store.close()
        await k.close()
    assert r.keys(f"agentrun:{{{gone}}}:*") == [], "the deleted run's keys are gone"
    for uid in kept:
        assert r.exists(events.events_key(uid), events.calls_key(uid)) == 2, uid
        r.delete(events.events_key(uid), events.calls_key(uid), events.meta_key(uid))
    assert r.xlen(events.events_key(live)) > 0, "a run that exists keeps its stream"


# -- model endpoint -----------------------------------------------------------------------


def test_a_model_endpoint_outside_the_allow_list_is_refused_at_apply(
    kubectl: Kubectl, namespace: str
) -> None:
    doc = {
        "apiVersion": "agentrun.dev/v1alpha1",
        "kind": "AgentRun",
        "metadata": {"name": "exfil"},
        "spec": {"goal": marker("exfil"), "model": {"baseURL": "http://198.51.100.7/v1"}},
    }
    proc = kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(doc), check=False)
    assert proc.returncode != 0
    assert "spec.model.baseURL http://198.51.100.7/v1 is not in the operator's allow-list" in (
        proc.stderr
    )


def test_a_model_endpoint_that_is_down_fails_with_a_clear_message(
    kubectl: Kubectl, namespace: str, dead_endpoint: str, r: redis_sync.Redis
) -> None:
    uid = create_run(
        kubectl, namespace, "down", goal=marker("down"), model={"baseURL": dead_endpoint}
    )
    st = wait_phase(kubectl, namespace, "down", "Failed", "Succeeded", timeout=60)
    assert st["phase"] == "Failed" and "unreachable" in st["message"], st["message"]
    fault = next(e["data"] for e in stream(r, uid) if e["type"] == "fault")
    assert fault["code"] == "ModelEndpointUnreachable"


def test_an_unreadable_api_key_secret_fails_naming_the_field(
    kubectl: Kubectl, namespace: str
) -> None:
    create_run(
        kubectl,
        namespace,
        "nokey",
        goal=marker("nokey"),
        model={"apiKeySecretRef": {"name": "llm", "key": "token"}},
    )
    st = wait_phase(kubectl, namespace, "nokey", "Failed", "Succeeded")
    assert st["phase"] == "Failed" and "spec.model.apiKeySecretRef" in st["message"]
    assert "Secret 'llm'" in st["message"]


def test_a_stop_arriving_twice_finishes_the_run_once(
    kubectl: Kubectl, namespace: str, r: redis_sync.Redis, script: Script
) -> None:
    """The UI and API stop both ways at once (spec.stop and the control channel)."""
    m = script.add(marker("stop-twice"), [{"hang": True}])
    uid = create_run(kubectl, namespace, "twice", goal=m)
    wait_for("the model call to begin", lambda: script.calls_for(m) >= 1)
    for _ in range(3):
        r.publish(events.control_key(uid), json.dumps({"action": "stop", "by": "alice"}))
    kubectl(
        "patch",
        "agentrun",
        "twice",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"stop":true}}',
    )
    for _ in range(3):
        r.publish(events.control_key(uid), json.dumps({"action": "stop", "by": "alice"}))
    st = wait_phase(kubectl, namespace, "twice", "Stopped", "Failed", "Succeeded", timeout=30)
    assert st["phase"] == "Stopped" and st["stoppedBy"] == "alice"
    evs = stream(r, uid)
    assert_clean_stream(evs)
    assert [e["data"]["state"] for e in evs if e["type"] == "workflow"][-1] == "stopped"
