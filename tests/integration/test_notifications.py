"""Notifications to real HTTP receivers on loopback: a Slack-style receiver sees pending →
approved → run finished, in order, with a link to the UI; a generic JSON receiver gets the
fields; a receiver that is down is retried but never slows the run."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import yaml

from agentrun_harness.controlplane import free_port

from support import Kubectl, Script, create_run, marker, wait_for, wait_phase


class Receiver:
    def __init__(self) -> None:
        self.got: list[tuple[float, dict[str, Any]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                outer.got.append((time.monotonic(), json.loads(self.rfile.read(length))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[tuple[Receiver, Receiver]]:
    slack, generic = Receiver(), Receiver()
    yield slack, generic
    slack.close()
    generic.close()


@pytest.fixture
def namespace(op_namespace: str) -> str:
    return op_namespace


pytestmark = pytest.mark.usefixtures("operator")


def test_people_hear_of_approvals_and_ends_and_a_dead_receiver_costs_nothing(
    kubectl: Kubectl,
    namespace: str,
    agent_sa: str,
    script: Script,
    receivers: tuple[Receiver, Receiver],
) -> None:
    slack, generic = receivers
    dead = f"http://127.0.0.1:{free_port()}/hook"
    routes = [
        {"url": dead, "format": "json", "namespaces": [namespace]},
        {"url": slack.url, "format": "slack", "namespaces": [namespace]},
        {"url": generic.url, "format": "json", "namespaces": ["op-*"], "events": ["run.finished"]},
    ]
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "agentrun-notifications", "namespace": "agentrun-system"},
        "data": {"routes.yaml": yaml.safe_dump(routes)},
    }
    kubectl("apply", "-f", "-", input=json.dumps(cm))
    kubectl("create", "deployment", "web", "--image=nginx", "-n", namespace)
    goal = script.add(
        marker("notify"),
        [
            {"text": "plan"},
            {
                "tool_calls": [
                    {
                        "name": "k8s_scale",
                        "arguments": {"kind": "Deployment", "name": "web", "replicas": 2},
                    }
                ]
            },
            {"text": "done"},
        ],
    )
    create_run(
        kubectl,
        namespace,
        "loud",
        goal=goal,
        serviceAccountName=agent_sa,
        tools=["k8s_scale"],
        approval={"allowSelfApproval": True},
    )
    wait_for("the pending notification", lambda: len(slack.got) >= 1, timeout=30)
    ta = json.loads(kubectl("get", "ta", "-n", namespace, "-o", "json").stdout)["items"][0]
    kubectl.as_user("admin")(
        "patch",
        "ta",
        ta["metadata"]["name"],
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"decision":"Approved"}}',
    )
    decided_at = time.monotonic()
    assert wait_phase(kubectl, namespace, "loud", "Succeeded", "Failed")["phase"] == "Succeeded"
    finished_at = time.monotonic()
    wait_for("three notifications", lambda: len(slack.got) >= 3, timeout=15)
    texts = [body["text"] for _, body in slack.got]
    assert list(slack.got[0][1]) == ["text"], "a Slack incoming-webhook body"
    assert "wants to call k8s_scale" in texts[0]
    assert "(spec.replicas 1\u21922)" in texts[0], texts[0]  # the preview of the change
    assert "approved by admin" in texts[1]
    assert f"Run {namespace}/loud succeeded" in texts[2]
    assert f"https://agentrun.example.com/#/runs/{namespace}/loud" in texts[0]
    wait_for("the generic receiver", lambda: len(generic.got) >= 1, timeout=15)
    assert [b["event"] for _, b in generic.got] == ["run.finished"]
    assert generic.got[0][1]["phase"] == "Succeeded" and generic.got[0][1]["run"] == "loud"
    # The dead receiver is retried for seconds (0.5 + 1 s of backoff per message); the run
    # went from decision to Succeeded without waiting for it.
    assert finished_at - decided_at < 3.0, finished_at - decided_at
