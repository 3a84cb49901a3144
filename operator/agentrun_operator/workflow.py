"""The agent's LangGraph workflow: plan → act (LLM with tools) → judge (dry runs and policy
rules) → approval gate → tools → act … → verify → done, bounded by a step limit.

Owns the graph's shape, its state and routing. Everything with side effects (the LLM call
and its streaming, tool execution, events) comes in through :class:`Deps`, which the run
registry implements, so this module is testable without a cluster and imports no kopf, no
Kubernetes client and no Redis. Nodes may run more than once (LangGraph re-runs a node
after a crash or an ``interrupt()``), so they are free of side effects before their
``interrupt()`` and leave exactly-once guarantees to ``Deps.tool_call``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from typing import Annotated, Any, Literal, Protocol, TypedDict

from langchain_core.messages import (
    AIMessage,
    AnyMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import interrupt

SYSTEM_PROMPT = """You are agentrun, an agent that operates a Kubernetes cluster for a \
platform team. Your namespace is {namespace}. Work towards the goal with the tools you are \
given; each call acts with the rights of the run's service account, and some calls wait \
for a human's approval. Prefer reading before changing. Be concise."""

PLAN_PROMPT = "Before acting, write a short numbered plan (at most 5 steps) for the goal."
VERIFY_PROMPT = (
    "Check the work against the goal. Then give the final answer for the person who asked: "
    "what you found or changed, and anything they must do. Be brief."
)


class LimitExceeded(Exception):
    """A bound of spec.limits was reached; the run fails with this reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Decision(TypedDict, total=False):
    # refused: the API server refused a dry run of the call (nobody was asked).
    decision: Literal["approved", "denied", "expired", "cancelled", "refused"]
    by: str
    comment: str
    # For an approved call with a preview: the ToolApproval and the object as it was
    # approved (the call runs only if the object is still that version).
    approval: str
    target: dict[str, Any]


class Verdict(TypedDict, total=False):
    """How one call was judged before anyone is asked: its dry run and the policy rules."""

    gated: bool  # it waits for people
    refused: str  # the API server refused its dry run: it fails with this, nobody asked
    denied: dict[str, str]  # a policy rule denied it ({by, comment}): nobody asked
    preview: dict[str, Any]  # what it would change (models.Preview, as JSON)
    rule: dict[str, Any]  # the policy rule that asked for people (models.RuleMatch)
    server: str  # an MCP tool's MCPServer


class RunState(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]
    step: int
    # The model's tool-call id -> our call id, minted when the model asked for the call.
    call_ids: dict[str, str]
    decisions: dict[str, Decision]
    # The last turn's calls, judged (our call id -> verdict). A checkpoint from before the
    # judge node has none: then the run's approval.required list decides.
    verdicts: dict[str, Verdict]
    result: str


class Deps(Protocol):
    """What the workflow needs from the outside world, per run."""

    goal: str
    namespace: str
    max_steps: int
    tools: Sequence[str]
    required: frozenset[str]

    async def llm(
        self, messages: Sequence[BaseMessage], *, node: str, with_tools: bool
    ) -> AIMessage: ...

    async def workflow_event(self, state: str, *, node: str, step: int) -> None: ...

    def node_span(self, node: str) -> AbstractContextManager[None]:
        """A trace span around one execution of a workflow node."""
        ...

    async def tool_call(
        self,
        *,
        name: str,
        arguments: dict[str, Any],
        call_id: str,
        decision: Decision | None,
        gated: bool,
    ) -> str: ...

    def mint_call_id(self) -> str: ...

    async def judge(self, calls: list[dict[str, Any]]) -> dict[str, Verdict]:
        """Each call's dry run and policy verdict (by our call id), before anyone is asked."""
        ...

    def argument_error(self, name: str, arguments: dict[str, Any]) -> str | None:
        """What is wrong with a call's arguments (the call then fails as a tool error, and
        nobody is asked to approve it), or None."""
        ...


def initial_state(deps: Deps) -> RunState:
    return {
        "messages": [
            SystemMessage(SYSTEM_PROMPT.format(namespace=deps.namespace)),
            HumanMessage(deps.goal),
        ],
        "step": 0,
        "call_ids": {},
        "decisions": {},
    }


def last_ai(state: RunState) -> AIMessage | None:
    for message in reversed(state.get("messages", [])):
        if isinstance(message, AIMessage):
            return message
    return None


def calls_of(state: RunState) -> list[dict[str, Any]]:
    """The tool calls of the last model turn, each with our call id under ``call_id``."""
    message = last_ai(state)
    if message is None:
        return []
    ids = state.get("call_ids", {})
    calls = [
        {"name": c["name"], "args": c["args"], "id": c["id"], "call_id": ids.get(c.get("id") or "")}
        for c in message.tool_calls
    ]
    # Calls whose arguments were not valid JSON still need an answer to the model.
    calls += [
        {
            "name": c.get("name") or "unknown",
            "args": {},
            "id": c.get("id"),
            "call_id": ids.get(c.get("id") or ""),
            "invalid": c.get("error") or "arguments are not valid JSON",
        }
        for c in message.invalid_tool_calls
    ]
    return calls


def gated(call: dict[str, Any], state: RunState, required: frozenset[str]) -> bool:
    """Whether a call waits for people: as it was judged, else (a checkpoint from before
    the judge node) as the run's approval.required list says."""
    verdict = state.get("verdicts", {}).get(call["call_id"] or "")
    if verdict is None:
        return call["name"] in required
    return bool(verdict.get("gated"))


def pending_approvals(state: RunState, required: frozenset[str]) -> list[dict[str, Any]]:
    decided = state.get("decisions", {})
    return [
        c
        for c in calls_of(state)
        if gated(c, state, required) and not c.get("invalid") and c["call_id"] not in decided
    ]


def route_after_act(state: RunState) -> Literal["judge", "verify"]:
    message = last_ai(state)
    if message is not None and (message.tool_calls or message.invalid_tool_calls):
        return "judge"
    return "verify"


def _text(message: AIMessage) -> str:
    if isinstance(message.content, str):
        return message.content
    return "".join(
        part.get("text", "") if isinstance(part, dict) else str(part) for part in message.content
    )


def build(deps: Deps, *, checkpointer: BaseCheckpointSaver[Any] | None) -> CompiledStateGraph[Any]:
    async def plan(state: RunState) -> RunState:
        await deps.workflow_event("planning", node="plan", step=0)
        prompt = HumanMessage(PLAN_PROMPT)
        reply = await deps.llm([*state["messages"], prompt], node="plan", with_tools=False)
        return {"messages": [prompt, reply]}

    async def act(state: RunState) -> RunState:
        step = state.get("step", 0) + 1
        if step > deps.max_steps:
            raise LimitExceeded(
                "MaxStepsExceeded",
                f"step limit reached: spec.limits.maxSteps is {deps.max_steps}",
            )
        await deps.workflow_event("executing", node="act", step=step)
        reply = await deps.llm(state["messages"], node="act", with_tools=True)
        ids = dict(state.get("call_ids", {}))
        for call in [*reply.tool_calls, *reply.invalid_tool_calls]:
            model_id = call.get("id")
            if model_id and model_id not in ids:
                ids[model_id] = deps.mint_call_id()
        return {"messages": [reply], "step": step, "call_ids": ids}

    async def judge(state: RunState) -> RunState:
        # Dry runs and rules have no side effects; a node that runs again judges again.
        todo = [
            c
            for c in calls_of(state)
            if not c.get("invalid")
            and c["name"] in deps.tools
            and deps.argument_error(c["name"], c["args"]) is None
        ]
        return {"verdicts": await deps.judge(todo) if todo else {}}

    async def gate(state: RunState) -> RunState:
        verdicts = state.get("verdicts", {})
        waiting = [
            c
            for c in pending_approvals(state, deps.required)
            if deps.argument_error(c["name"], c["args"]) is None
        ]
        if not waiting:
            return {}

        def item(c: dict[str, Any]) -> dict[str, Any]:
            found = {"callId": c["call_id"], "tool": c["name"], "arguments": c["args"]}
            verdict = verdicts.get(c["call_id"]) or {}
            for key in ("preview", "rule", "server"):
                if verdict.get(key):
                    found[key] = verdict[key]
            return found

        # No side effects before interrupt(): this node runs again when resumed.
        answer: dict[str, Decision] = interrupt(
            {
                "approvals": [item(c) for c in waiting],
                "reason": _text(last_ai(state) or AIMessage("")),
            }
        )
        return {"decisions": {**state.get("decisions", {}), **answer}}

    async def tools(state: RunState) -> RunState:
        replies: list[AnyMessage] = []
        decisions = state.get("decisions", {})
        verdicts = state.get("verdicts", {})
        for call in calls_of(state):
            verdict = verdicts.get(call["call_id"] or "") or {}
            waits = gated(call, state, deps.required)
            decision = decisions.get(call["call_id"]) if waits else None
            if verdict.get("refused"):
                decision, waits = {"decision": "refused", "comment": verdict["refused"]}, True
            elif verdict.get("denied"):
                denied = verdict["denied"]
                decision = {"decision": "denied", "by": denied["by"], "comment": denied["comment"]}
                waits = True
            if call.get("invalid"):
                content = json.dumps(
                    {"error": f"tool call rejected: {call['invalid']}; send valid JSON arguments"}
                )
            elif call["name"] not in deps.tools:
                allowed = ", ".join(deps.tools) or "none"
                content = json.dumps(
                    {"error": f"tool {call['name']!r} is not allowed for this run ({allowed})"}
                )
            else:
                content = await deps.tool_call(
                    name=call["name"],
                    arguments=call["args"],
                    call_id=call["call_id"],
                    decision=decision,
                    gated=waits,
                )
            replies.append(
                ToolMessage(content=content, tool_call_id=call["id"] or call["call_id"] or "")
            )
        return {"messages": replies}

    async def verify(state: RunState) -> RunState:
        step = state.get("step", 0)
        await deps.workflow_event("verifying", node="verify", step=step)
        prompt = HumanMessage(VERIFY_PROMPT)
        reply = await deps.llm([*state["messages"], prompt], node="verify", with_tools=False)
        return {"messages": [prompt, reply], "result": _text(reply)}

    def traced(name: str, node: Callable[[RunState], Awaitable[RunState]]) -> Any:
        async def run(state: RunState) -> RunState:
            with deps.node_span(name):
                return await node(state)

        return run

    graph = StateGraph(RunState)
    for name, node in (
        ("plan", plan),
        ("act", act),
        ("judge", judge),
        ("gate", gate),
        ("tools", tools),
        ("verify", verify),
    ):
        graph.add_node(name, traced(name, node))
    graph.add_edge(START, "plan")
    graph.add_edge("plan", "act")
    graph.add_conditional_edges("act", route_after_act, ["judge", "verify"])
    graph.add_edge("judge", "gate")
    graph.add_edge("gate", "tools")
    graph.add_edge("tools", "act")
    graph.add_edge("verify", END)
    return graph.compile(checkpointer=checkpointer)
