"""The OpenAI-compatible chat model: building it, streaming one call, and accounting for it.

Owns: ChatOpenAI construction (any OpenAI-compatible endpoint: OpenAI, vLLM, Ollama,
LiteLLM), one streamed call with its token callback, usage (input, output and cached
tokens as the endpoint reports them; nothing is counted locally, so no tokenizer data is
ever downloaded), TTFT/TTR, and cost from the price table.
Never: talks to Kubernetes or Redis, or logs the API key.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias, cast

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from agentrun_operator import config, models

TokenSink = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class ModelConfig:
    """A run's resolved model: spec.model merged with the operator's defaults."""

    name: str
    base_url: str
    api_key: str = field(repr=False)
    temperature: float | None = None


def build(model: ModelConfig, *, timeout: float, max_retries: int) -> BaseChatModel:
    kwargs: dict[str, Any] = {}
    if model.temperature is not None:
        kwargs["temperature"] = model.temperature
    return ChatOpenAI(
        model=model.name,
        base_url=model.base_url,
        # OpenAI-compatible servers without auth still need some key in the header.
        api_key=SecretStr(model.api_key or "unused"),
        streaming=True,
        # Ask for usage in the stream (stream_options.include_usage).
        stream_usage=True,
        timeout=timeout,
        max_retries=max_retries,
        **kwargs,
    )


def price_of(model: str, prices: dict[str, config.Price]) -> config.Price | None:
    """The model's price, or None when the table has none (then no cost is counted, and a
    run with a cost limit refuses to start)."""
    price = prices.get(model)
    if price is None:
        # Dated variants ("gpt-4o-2024-08-06") share the base model's price.
        base = max((p for p in prices if model.startswith(p)), key=len, default=None)
        price = prices[base] if base else None
    return price


def cost(usage: models.CallUsage, *, model: str, prices: dict[str, config.Price]) -> float:
    price = price_of(model, prices)
    if price is None:
        return 0.0
    cached = min(usage.cached_tokens, usage.input_tokens)
    cached_price = price.cached if price.cached is not None else price.input
    dollars = (
        (usage.input_tokens - cached) * price.input
        + cached * cached_price
        + usage.output_tokens * price.output
    ) / 1_000_000
    return round(dollars, 8)


# While a call streams, its output tokens are estimated from the deltas (about four
# characters a token, at least one per delta) until the endpoint reports its usage.
CHARS_PER_TOKEN = 4

# Called with the call's estimated output tokens so far; raises to cut the call.
BudgetCheck: TypeAlias = Callable[[int], None]


def estimate_tokens(text: str) -> int:
    return max(1, -(-len(text) // CHARS_PER_TOKEN)) if text else 0


async def stream_call(
    chat: BaseChatModel,
    messages: Sequence[BaseMessage],
    *,
    on_token: TokenSink,
    model_name: str,
    prices: dict[str, config.Price],
    budget: BudgetCheck | None = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[AIMessage, models.CallUsage]:
    """Stream one call, passing text to ``on_token``; return the whole message and figures.

    ``budget`` sees the estimated output so far after every delta; what it raises ends the
    stream at once (closing the connection, so the endpoint stops generating)."""
    started = time.monotonic()
    metrics = models.CallUsage()
    acc: AIMessageChunk | None = None
    estimated = 0
    # aclosing: a call cut short (a budget, a stop) closes its HTTP response at once.
    # ``headers`` (a traceparent) go with this request only (the OpenAI client's
    # extra_headers), so a model server that traces joins the run's trace.
    extra: dict[str, Any] = {"extra_headers": dict(headers)} if headers else {}
    stream = cast("AsyncGenerator[Any, None]", chat.astream(list(messages), **extra))
    async with contextlib.aclosing(stream) as chunks:
        async for chunk in chunks:
            if not isinstance(chunk, AIMessageChunk):
                continue
            text = chunk.content if isinstance(chunk.content, str) else ""
            if metrics.ttft_ms is None and (text or chunk.tool_call_chunks):
                metrics.ttft_ms = int((time.monotonic() - started) * 1000)
            if text:
                await on_token(text)
            acc = chunk if acc is None else acc + chunk
            if budget is not None:
                args = "".join(str(c.get("args") or "") for c in chunk.tool_call_chunks)
                estimated += estimate_tokens(text + args)
                budget(estimated)
    metrics.ttr_ms = int((time.monotonic() - started) * 1000)
    if acc is None:
        acc = AIMessageChunk(content="")
    usage: Mapping[str, Any] = acc.usage_metadata or {}
    metrics.input_tokens = int(usage.get("input_tokens", 0))
    metrics.output_tokens = int(usage.get("output_tokens", 0))
    details: Mapping[str, Any] = usage.get("input_token_details") or {}
    metrics.cached_tokens = int(details.get("cache_read", 0) or 0)
    metrics.cost_usd = cost(metrics, model=model_name, prices=prices)
    message = AIMessage(
        content=acc.content,
        tool_calls=acc.tool_calls,
        invalid_tool_calls=acc.invalid_tool_calls,
        usage_metadata=acc.usage_metadata,
        id=acc.id,
        response_metadata=acc.response_metadata,
    )
    return message, metrics
