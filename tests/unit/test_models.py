"""The pydantic models parse what the API server stores and refuse what the CRD refuses."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from agentrun_operator import models


def test_a_minimal_spec_gets_the_documented_defaults() -> None:
    spec = models.AgentRunSpec.model_validate({"goal": "find the crashing pod"})
    assert spec.tools == list(models.READ_ONLY_TOOLS)
    assert spec.approval.required == list(models.MUTATING_TOOLS)
    assert spec.approval.min_approvals == 1
    assert spec.approval.on_timeout == "deny"
    assert spec.limits.max_steps == 25
    assert spec.stop is False
    assert spec.model.provider == "openai" and spec.model.base_url is None


def test_camel_case_aliases_round_trip() -> None:
    raw = {
        "goal": "g",
        "model": {"baseURL": "http://127.0.0.1:1/v1", "apiKeySecretRef": {"name": "k", "key": "v"}},
        "limits": {"maxCostUSD": 1.5, "maxSteps": 3},
        "serviceAccountName": "agent",
        "ttlSecondsAfterFinished": 60,
    }
    spec = models.AgentRunSpec.model_validate(raw)
    assert spec.model.base_url == "http://127.0.0.1:1/v1"
    assert spec.limits.max_cost_usd == 1.5
    dumped = spec.model_dump(by_alias=True, exclude_defaults=True)
    assert dumped["model"]["baseURL"] == "http://127.0.0.1:1/v1"
    assert dumped["limits"]["maxCostUSD"] == 1.5


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({}, "goal"),
        ({"goal": ""}, "goal"),
        ({"goal": "g", "tools": ["k8s_nuke"]}, "tools"),
        ({"goal": "g", "limits": {"timeout": "5 minutes"}}, "limits.timeout"),
        ({"goal": "g", "limits": {"maxSteps": 0}}, "limits.maxSteps"),
        ({"goal": "g", "approval": {"onTimeout": "ignore"}}, "approval.onTimeout"),
    ],
)
def test_invalid_specs_name_the_field(raw: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        models.AgentRunSpec.model_validate(raw)
    locs = [".".join(str(p) for p in e["loc"]) for e in err.value.errors()]
    assert any(loc.startswith(field) for loc in locs), locs


def test_status_serialises_in_kubernetes_shape() -> None:
    status = models.AgentRunStatus(
        phase="Running",
        usage=models.Usage(input_tokens=3, output_tokens=4, total_tokens=7, cost_usd=0.01),
    )
    body = status.model_dump(by_alias=True, exclude_none=True, mode="json")
    assert body["phase"] == "Running"
    assert body["usage"]["totalTokens"] == 7 and body["usage"]["costUSD"] == 0.01


def test_usage_totals_read_back_field_by_field() -> None:
    usage = models.Usage.from_status(
        {"inputTokens": 10, "outputTokens": "x", "costUSD": 0.5, "llmCalls": -3, "ttftMs": 80}
    )
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (10, 0, 10)
    assert (usage.cost_usd, usage.llm_calls, usage.ttft_ms) == (0.5, 0, 80)
    usage.add_call(models.CallUsage(input_tokens=5, output_tokens=7, cost_usd=0.25, ttft_ms=9))
    assert usage.as_status() == {
        "inputTokens": 15,
        "outputTokens": 7,
        "totalTokens": 22,
        "cachedTokens": 0,
        "costUSD": 0.75,
        "ttftMs": 80,
        "llmCalls": 1,
        "toolCalls": 0,
    }
    assert models.Usage.from_status(None).as_status()["totalTokens"] == 0
