"""The workflow graph with scripted Deps: routing plan → act → gate → tools → act → verify,
the step limit, fail-closed approvals through interrupt(), and resume after an interrupt."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from agentrun_operator import workflow


class ScriptedDeps:
    """Replies from a list; records events and tool calls."""

    def __init__(
        self,
        replies: list[AIMessage],
        *,
        required: frozenset[str] = frozenset(),
        verdicts: dict[str, workflow.Verdict] | None = None,
    ):
        self.goal = "find the crashing pod"
        self.namespace = "ns"
        self.max_steps = 5
        self.tools: Sequence[str] = ["k8s_list", "k8s_scale"]
        self.required = required
        # By tool name; a tool not listed is judged as the required list says.
        self.verdicts = verdicts or {}
        self.judged: list[str] = []
        self._replies = iter(replies)
        self.events: list[tuple[str, str]] = []
        self.executed: list[tuple[str, str, Any]] = []
        self._ids = itertools.count(1)

    async def llm(
        self, messages: Sequence[BaseMessage], *, node: str, with_tools: bool
    ) -> AIMessage:
        self.events.append(("llm", node))
        return next(self._replies)

    async def workflow_event(self, state: str, *, node: str, step: int) -> None:
        self.events.append(("workflow", state))

    def node_span(self, node: str) -> contextlib.AbstractContextManager[None]:
        self.events.append(("node", node))
        return contextlib.nullcontext()

    async def tool_call(
        self,
        *,
        name: str,
        arguments: dict[str, Any],
        call_id: str,
        decision: workflow.Decision | None,
        gated: bool,
    ) -> str:
        self.executed.append((name, call_id, decision))
        return '{"ok": true}'

    async def judge(self, calls: list[dict[str, Any]]) -> dict[str, workflow.Verdict]:
        self.judged += [c["call_id"] for c in calls]
        return {
            c["call_id"]: self.verdicts.get(c["name"], {"gated": c["name"] in self.required})
            for c in calls
        }

    def mint_call_id(self) -> str:
        return f"c-{next(self._ids):012x}"

    def argument_error(self, name: str, arguments: dict[str, Any]) -> str | None:
        return "argument 'kind': is required" if "kind" not in arguments else None


def tool_call(name: str, call_id: str = "m1") -> AIMessage:
    return AIMessage("", tool_calls=[{"name": name, "args": {"kind": "pods"}, "id": call_id}])


async def test_a_run_plans_acts_calls_a_tool_and_verifies() -> None:
    deps = ScriptedDeps(
        [AIMessage("1. list pods"), tool_call("k8s_list"), AIMessage("done"), AIMessage("All ok")]
    )
    graph = workflow.build(deps, checkpointer=None)
    result = await graph.ainvoke(workflow.initial_state(deps))
    assert result["result"] == "All ok"
    assert [e for e in deps.events if e[0] == "workflow"] == [
        ("workflow", "planning"),
        ("workflow", "executing"),
        ("workflow", "executing"),
        ("workflow", "verifying"),
    ]
    assert deps.executed == [("k8s_list", "c-000000000001", None)]
    tool_messages = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert tool_messages[0].tool_call_id == "m1"


async def test_the_step_limit_fails_the_run() -> None:
    deps = ScriptedDeps([AIMessage("plan")] + [tool_call("k8s_list", f"m{i}") for i in range(9)])
    deps.max_steps = 2
    graph = workflow.build(deps, checkpointer=None)
    with pytest.raises(workflow.LimitExceeded) as err:
        await graph.ainvoke(workflow.initial_state(deps))
    assert err.value.code == "MaxStepsExceeded"
    assert "maxSteps is 2" in err.value.message


async def test_a_tool_not_allowed_is_answered_without_executing() -> None:
    deps = ScriptedDeps([AIMessage("plan"), tool_call("k8s_delete_pod"), AIMessage("x")] * 2)
    graph = workflow.build(deps, checkpointer=None)
    result = await graph.ainvoke(workflow.initial_state(deps))
    assert deps.executed == []
    reply = next(m for m in result["messages"] if isinstance(m, ToolMessage))
    assert "not allowed" in str(reply.content)


async def test_a_required_tool_interrupts_and_resumes_with_the_decision() -> None:
    deps = ScriptedDeps(
        [AIMessage("plan"), tool_call("k8s_scale"), AIMessage("scaled"), AIMessage("final")],
        required=frozenset({"k8s_scale"}),
    )
    graph = workflow.build(deps, checkpointer=InMemorySaver())
    config: Any = {"configurable": {"thread_id": "t1"}}
    first = await graph.ainvoke(workflow.initial_state(deps), config)
    interrupts = first["__interrupt__"]
    assert len(interrupts) == 1
    approval = interrupts[0].value["approvals"][0]
    assert approval["tool"] == "k8s_scale" and approval["callId"] == "c-000000000001"
    assert deps.executed == []  # nothing runs before a decision
    decision: workflow.Decision = {"decision": "approved", "by": "alice", "comment": "go"}
    final = await graph.ainvoke(Command(resume={"c-000000000001": decision}), config)
    assert final["result"] == "final"
    assert deps.executed == [("k8s_scale", "c-000000000001", decision)]


async def test_a_required_call_with_bad_arguments_is_not_put_to_a_person() -> None:
    bad = AIMessage("", tool_calls=[{"name": "k8s_scale", "args": {"name": "web"}, "id": "m1"}])
    deps = ScriptedDeps(
        [AIMessage("plan"), bad, AIMessage("gave up"), AIMessage("final")],
        required=frozenset({"k8s_scale"}),
    )
    graph = workflow.build(deps, checkpointer=InMemorySaver())
    config: Any = {"configurable": {"thread_id": "t1"}}
    result = await graph.ainvoke(workflow.initial_state(deps), config)
    # No interrupt: the call goes straight to tool_call, undecided, which fails it as the
    # argument error it is.
    assert "__interrupt__" not in result
    assert result["result"] == "final"
    assert deps.executed == [("k8s_scale", "c-000000000001", None)]


async def test_invalid_tool_call_arguments_are_answered_not_crashed() -> None:
    bad = AIMessage(
        "",
        invalid_tool_calls=[
            {
                "name": "k8s_list",
                "args": "{not json",
                "id": "m9",
                "error": "bad json",
                "type": "invalid_tool_call",
            }
        ],
    )
    deps = ScriptedDeps([AIMessage("plan"), bad, AIMessage("ok"), AIMessage("final")])
    result = await workflow.build(deps, checkpointer=None).ainvoke(workflow.initial_state(deps))
    reply = next(m for m in result["messages"] if isinstance(m, ToolMessage))
    assert "bad json" in str(reply.content) and deps.executed == []


async def test_a_call_a_rule_gates_waits_with_its_preview_and_rule_though_not_required() -> None:
    preview = {"summary": "spec.replicas 1→3", "operation": "update"}
    rule = {"policy": "AgentPolicy ns/guard", "name": "big", "message": "m", "minApprovals": 2}
    deps = ScriptedDeps(
        [AIMessage("plan"), tool_call("k8s_list"), AIMessage("done"), AIMessage("final")],
        verdicts={"k8s_list": {"gated": True, "preview": preview, "rule": rule}},
    )
    graph = workflow.build(deps, checkpointer=InMemorySaver())
    config: Any = {"configurable": {"thread_id": "t1"}}
    first = await graph.ainvoke(workflow.initial_state(deps), config)
    item = first["__interrupt__"][0].value["approvals"][0]
    assert (item["preview"], item["rule"]) == (preview, rule)
    assert deps.executed == []
    decision: workflow.Decision = {"decision": "approved", "by": "alice", "comment": ""}
    await graph.ainvoke(Command(resume={"c-000000000001": decision}), config)
    assert deps.executed == [("k8s_list", "c-000000000001", decision)]
    assert deps.judged == ["c-000000000001"]  # judged once: resuming does not judge again


@pytest.mark.parametrize(
    ("verdict", "decision"),
    [
        (
            {"denied": {"by": "AgentPolicy ns/guard (rule system)", "comment": "no"}},
            {"decision": "denied", "by": "AgentPolicy ns/guard (rule system)", "comment": "no"},
        ),
        (
            {"refused": "k8s_scale: forbidden"},
            {"decision": "refused", "comment": "k8s_scale: forbidden"},
        ),
    ],
)
async def test_a_denied_or_refused_call_is_answered_without_asking_anyone(
    verdict: workflow.Verdict, decision: workflow.Decision
) -> None:
    deps = ScriptedDeps(
        [AIMessage("plan"), tool_call("k8s_scale"), AIMessage("ok"), AIMessage("final")],
        required=frozenset({"k8s_scale"}),
        verdicts={"k8s_scale": verdict},
    )
    graph = workflow.build(deps, checkpointer=InMemorySaver())
    result = await graph.ainvoke(workflow.initial_state(deps), {"configurable": {"thread_id": "t"}})
    assert "__interrupt__" not in result
    assert deps.executed == [("k8s_scale", "c-000000000001", decision)]


async def test_an_allowed_required_tool_runs_without_asking() -> None:
    deps = ScriptedDeps(
        [AIMessage("plan"), tool_call("k8s_scale"), AIMessage("ok"), AIMessage("final")],
        required=frozenset({"k8s_scale"}),
        verdicts={"k8s_scale": {"gated": False}},
    )
    graph = workflow.build(deps, checkpointer=InMemorySaver())
    result = await graph.ainvoke(workflow.initial_state(deps), {"configurable": {"thread_id": "t"}})
    assert "__interrupt__" not in result
    assert deps.executed == [("k8s_scale", "c-000000000001", None)]
