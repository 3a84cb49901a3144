"""The mock LLM against the real langchain-openai client over a real socket.

Covers: streamed text arrives in several chunks and joins to the scripted text; usage (input,
output, cache reads) comes from the final chunk, scripted or counted; a scripted tool call
arrives through ``bind_tools`` with its name, arguments and id; replies are chosen by the
number of assistant messages and the last one repeats; ``tokens_per_second`` and ``delay_ms``
really space the stream; an error reply raises ``APIStatusError`` with its status and honours
``retry``; a wrong API key gets 401; a ``hang`` is cancellable by the client and blocks
neither other requests nor shutdown; the default script plays plan → ``k8s_list`` → summary;
the test controls; the threaded variant from sync code; the command line.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from agentrun_operator.mockllm import MockLLM, MockLLMThread

from support import newest_only, wait_for

pytestmark = newest_only("the mock LLM has no Kubernetes in it")


@pytest.fixture
async def mock() -> AsyncIterator[MockLLM]:
    server = MockLLM()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def chat(server: MockLLM | MockLLMThread, *, key: str = "sk-test", **overrides: Any) -> ChatOpenAI:
    """The operator's client, as the operator builds it; no retries unless a test asks."""
    options: dict[str, Any] = {"streaming": True, "stream_usage": True, "max_retries": 0}
    return ChatOpenAI(
        base_url=server.base_url,
        api_key=key,
        model="mock",
        **{**options, **overrides},
    )


async def collect(
    model: Any, messages: list[BaseMessage]
) -> tuple[list[AIMessageChunk], list[float]]:
    """The streamed chunks and when each arrived."""
    chunks: list[AIMessageChunk] = []
    times: list[float] = []
    async for chunk in model.astream(messages):
        chunks.append(chunk)
        times.append(time.monotonic())
    return chunks, times


def joined(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total


@tool
def k8s_scale(kind: str, name: str, replicas: int) -> str:
    """Scale a workload."""
    return "ok"


@tool
def k8s_list(kind: str) -> str:
    """List objects of a kind."""
    return "[]"


async def test_streamed_text_arrives_in_several_chunks_and_joins_to_the_script(
    mock: MockLLM,
) -> None:
    text = "The deployment web has three ready replicas, all healthy."
    mock.set_script([{"match": "web", "replies": [{"text": text}]}])

    chunks, _ = await collect(chat(mock), [HumanMessage("how is web doing?")])

    texts = [c.content for c in chunks if c.content]
    assert len(texts) == len(text.split())
    assert "".join(str(t) for t in texts) == text
    assert joined(chunks).response_metadata["finish_reason"] == "stop"


async def test_usage_is_counted_from_the_request_and_the_stream(mock: MockLLM) -> None:
    mock.set_script([{"replies": [{"text": "one two three"}]}])

    chunks, _ = await collect(
        chat(mock), [SystemMessage("be brief"), HumanMessage("count these five words please")]
    )

    # langchain-core closes the stream with an empty chunk of its own, after the usage one.
    with_usage = [i for i, c in enumerate(chunks) if c.usage_metadata]
    last_text = max(i for i, c in enumerate(chunks) if c.content)
    assert len(with_usage) == 1 and with_usage[0] > last_text, "usage comes on the final chunk"
    usage = chunks[with_usage[0]].usage_metadata
    assert usage is not None
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (7, 3, 10)
    assert usage.get("input_token_details", {}).get("cache_read") == 0


async def test_scripted_usage_reports_cache_reads(mock: MockLLM) -> None:
    scripted = {"prompt_tokens": 1200, "completion_tokens": 9, "cached_tokens": 1024}
    mock.set_script([{"replies": [{"text": "cached", "usage": scripted}]}])

    chunks, _ = await collect(chat(mock), [HumanMessage("hi")])

    usage = joined(chunks).usage_metadata
    assert usage is not None
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (
        1200,
        9,
        1209,
    )
    assert usage.get("input_token_details", {}).get("cache_read") == 1024


async def test_a_scripted_tool_call_arrives_through_bind_tools(mock: MockLLM) -> None:
    arguments = {"kind": "deployment", "name": "web", "replicas": 3}
    mock.set_script(
        [
            {
                "match": "scale",
                "tools_present": True,
                "replies": [{"tool_calls": [{"name": "k8s_scale", "arguments": arguments}]}],
            }
        ]
    )
    model = chat(mock).bind_tools([k8s_scale])

    chunks, _ = await collect(model, [HumanMessage("scale web to 3")])

    assert sum(1 for c in chunks if c.tool_call_chunks) > 2, "arguments come in fragments"
    message = joined(chunks)
    assert message.response_metadata["finish_reason"] == "tool_calls"
    [call] = message.tool_calls
    assert call["name"] == "k8s_scale"
    assert call["args"] == arguments
    assert call["id"] is not None and call["id"].startswith("call_")
    assert mock.calls[-1]["tools"] == ["k8s_scale"]


async def test_text_and_tool_calls_without_streaming(mock: MockLLM) -> None:
    mock.set_script(
        [
            {
                "replies": [
                    {
                        "text": "Scaling now.",
                        "tool_calls": [
                            {"name": "k8s_scale", "arguments": {"kind": "deployment"}},
                            {"name": "k8s_list", "arguments": {"kind": "pods"}},
                        ],
                    }
                ]
            }
        ]
    )
    model = chat(mock, streaming=False).bind_tools([k8s_scale, k8s_list])

    message = await model.ainvoke([HumanMessage("go")])

    assert isinstance(message, AIMessage)
    assert message.content == "Scaling now."
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [
        ("k8s_scale", {"kind": "deployment"}),
        ("k8s_list", {"kind": "pods"}),
    ]
    assert len({c["id"] for c in message.tool_calls}) == 2
    assert message.usage_metadata is not None
    assert message.usage_metadata["input_tokens"] == 1
    assert mock.calls[-1]["stream"] is False


async def test_the_reply_is_chosen_by_the_number_of_assistant_messages(mock: MockLLM) -> None:
    mock.set_script(
        [
            {"match": "other", "replies": [{"text": "wrong rule"}]},
            {"match": "goal", "replies": [{"text": "first"}, {"text": "second"}, {"text": "last"}]},
        ]
    )
    model = chat(mock)
    goal = HumanMessage("the goal")
    said = [AIMessage("a"), HumanMessage("more"), AIMessage("b"), HumanMessage("more")]

    answers = [
        (await model.ainvoke([goal, *said[:n]])).content for n in (0, 2, 4)
    ]  # 0, 1 and 2 assistant messages
    again = (await model.ainvoke([goal, *said, AIMessage("c"), AIMessage("d")])).content

    assert answers == ["first", "second", "last"]
    assert again == "last", "past the end, the last reply repeats"
    assert [c["reply"] for c in mock.calls] == [0, 1, 2, 4]
    assert {c["rule"] for c in mock.calls} == {1}


async def test_the_rule_matches_the_first_user_message_only(mock: MockLLM) -> None:
    mock.set_script([{"match": "restart", "replies": [{"text": "matched"}]}])

    answer = await chat(mock).ainvoke(
        [HumanMessage("look around"), AIMessage("ok"), HumanMessage("restart it")]
    )

    assert answer.content != "matched"
    assert mock.calls[-1]["rule"] is None


async def test_tokens_per_second_spaces_the_tokens() -> None:
    # 11 tokens at 20/s: about 0.5 s from the first text chunk to the last.
    async with MockLLM(tokens_per_second=20) as server:
        server.set_script([{"replies": [{"text": " ".join(["word"] * 11)}]}])
        chunks, times = await collect(chat(server), [HumanMessage("go")])

    arrived = [t for c, t in zip(chunks, times, strict=True) if c.content]
    assert len(arrived) == 11
    assert 0.35 < arrived[-1] - arrived[0] < 3


async def test_a_reply_can_override_the_rate_and_delay_its_first_token(mock: MockLLM) -> None:
    text = " ".join(["word"] * 6)
    mock.set_script([{"replies": [{"text": text, "delay_ms": 300, "tokens_per_second": 10}]}])

    started = time.monotonic()
    chunks, times = await collect(chat(mock), [HumanMessage("go")])

    arrived = [t for c, t in zip(chunks, times, strict=True) if c.content]
    assert arrived[0] - started >= 0.25
    assert 0.35 < arrived[-1] - arrived[0] < 3  # 5 gaps at 10/s


async def test_an_error_reply_raises_with_its_status(mock: MockLLM) -> None:
    mock.set_script([{"replies": [{"error": {"status": 503, "message": "overloaded"}}]}])

    with pytest.raises(openai.APIStatusError) as raised:
        await chat(mock).ainvoke([HumanMessage("go")])

    assert raised.value.status_code == 503
    assert "overloaded" in str(raised.value)
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["type"] == "server_error"


async def test_an_error_reply_can_forbid_the_client_to_retry(mock: MockLLM) -> None:
    mock.set_script([{"replies": [{"error": {"status": 500, "retry": False}}]}])

    with pytest.raises(openai.InternalServerError):
        await chat(mock, max_retries=3).ainvoke([HumanMessage("go")])

    assert len(mock.calls) == 1


async def test_a_wrong_api_key_is_refused_with_401() -> None:
    async with MockLLM(api_key="sk-right") as server:
        with pytest.raises(openai.AuthenticationError) as raised:
            await chat(server, key="sk-wrong-key").ainvoke([HumanMessage("go")])
        answer = await chat(server, key="sk-right").ainvoke([HumanMessage("go")])
        async with httpx.AsyncClient() as client:
            health = await client.get(server.base_url.removesuffix("/v1") + "/healthz")

    assert raised.value.status_code == 401
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["code"] == "invalid_api_key"
    assert answer.content
    assert health.status_code == 200, "health needs no key"
    assert len(server.calls) == 1, "refused requests are not recorded"


async def test_a_hanging_reply_is_cancellable_and_others_are_still_served(
    mock: MockLLM,
) -> None:
    mock.set_script(
        [
            {"match": "hang", "replies": [{"hang": True}]},
            {"replies": [{"text": "still here"}]},
        ]
    )
    hung = asyncio.create_task(collect(chat(mock), [HumanMessage("hang please")]))
    await asyncio.to_thread(wait_for, "the hanging request", lambda: mock.calls, timeout=10)
    await asyncio.sleep(0.2)
    assert not hung.done()

    hung.cancel()
    with pytest.raises(asyncio.CancelledError):
        await hung
    answer = await asyncio.wait_for(chat(mock).ainvoke([HumanMessage("hello")]), timeout=5)

    assert answer.content == "still here"


async def test_a_hanging_reply_does_not_block_shutdown() -> None:
    server = MockLLM(script=[{"replies": [{"hang": True}]}])
    await server.start()
    hung = asyncio.create_task(chat(server).ainvoke([HumanMessage("hang")]))
    await asyncio.to_thread(wait_for, "the hanging request", lambda: server.calls, timeout=10)

    await asyncio.wait_for(server.stop(), timeout=5)

    with pytest.raises(openai.APIConnectionError):
        await asyncio.wait_for(hung, timeout=5)


async def test_the_default_script_plays_a_read_only_kubernetes_agent(mock: MockLLM) -> None:
    model = chat(mock).bind_tools([k8s_list])
    goal = HumanMessage("why is my app slow?")

    plan = await model.ainvoke([goal])
    act = await model.ainvoke([goal, plan])
    assert isinstance(act, AIMessage)
    [call] = act.tool_calls
    result = ToolMessage("[]", tool_call_id=call["id"] or "")
    summary = await model.ainvoke([goal, plan, act, result])
    without_tools = await chat(mock).ainvoke([goal, AIMessage("plan")])

    assert str(plan.content).startswith("Plan:")
    assert (call["name"], call["args"]) == ("k8s_list", {"kind": "pods"})
    assert str(summary.content).startswith("Summary:")
    assert without_tools.content and not getattr(without_tools, "tool_calls", [])
    again = await model.ainvoke([goal])
    assert again.content == plan.content, "deterministic"


async def test_the_test_controls(mock: MockLLM) -> None:
    root = mock.base_url.removesuffix("/v1")
    await chat(mock).bind_tools([k8s_list]).ainvoke([HumanMessage("first")])

    async with httpx.AsyncClient(base_url=root) as client:
        calls = (await client.get("/_calls")).json()
        deleted = (await client.delete("/_calls")).json()
        after = (await client.get("/_calls")).json()
        put = await client.put("/_script", content="- replies:\n    - text: from yaml\n")
        bad = await client.put("/_script", content="- replies: []\n")
        script = (await client.get("/_script")).json()
        models = (await client.get("/v1/models")).json()

    answer = await chat(mock).ainvoke([HumanMessage("second")])

    [call] = calls
    assert call["model"] == "mock"
    assert call["tools"] == ["k8s_list"]
    assert call["messages"] == [{"role": "user", "content": "first"}]
    assert abs(call["timestamp"] - time.time()) < 60
    assert (deleted, after) == ({"deleted": 1}, [])
    assert put.json() == {"rules": 1}
    assert bad.status_code == 400 and "replies" in bad.json()["error"]["message"]
    assert script == [{"replies": [{"text": "from yaml"}]}]
    assert [m["id"] for m in models["data"]] == ["mock"]
    assert answer.content == "from yaml"


def test_the_threaded_variant_serves_sync_code() -> None:
    with MockLLMThread(script=[{"replies": [{"text": "from a thread"}]}]) as server:
        answer = chat(server).invoke([HumanMessage("go")])
        calls = server.calls

    assert answer.content == "from a thread"
    assert len(calls) == 1


def test_the_command_line_serves_until_interrupted(tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text('[{"replies": [{"text": "from the file"}]}]')
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agentrun_operator.cli",
            "mock-llm",
            "--port",
            "0",
            "--script",
            str(script),
            "--tokens-per-second",
            "0",
            "--api-key",
            "sk-cli",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    ) as proc:
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            base_url = first.split()[-1]
            assert base_url.startswith("http://127.0.0.1:"), first
            model = ChatOpenAI(
                base_url=base_url,
                api_key="sk-cli",
                model="mock",
                max_retries=0,
            )
            answer = model.invoke([HumanMessage("go")])
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()

    assert answer.content == "from the file"
    assert code == 0
