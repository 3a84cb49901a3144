"""Settings: defaults, parsing, and start-up errors that name the variable."""

from __future__ import annotations

import pytest

from agentrun_operator import config


def test_defaults_allow_only_the_default_endpoint() -> None:
    s = config.load({})
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.allowed_base_urls == [s.model_base_url]
    assert s.max_concurrent_runs == 50


def test_lists_and_json_are_parsed() -> None:
    s = config.load(
        {
            "AGENTRUN_NAMESPACES": "a, b,,c",
            "AGENTRUN_MODEL_BASE_URL_ALLOW": "http://x/v1,https://y",
            "AGENTRUN_PRICES": '{"m": {"input": 1, "output": 2}}',
        }
    )
    assert s.namespaces == ["a", "b", "c"]
    assert s.allowed_base_urls == ["http://x/v1", "https://y"]
    assert s.price_table()["m"].output == 2
    assert "gpt-4o" in s.price_table()


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"AGENTRUN_REDIS_ULR": "x"}, "AGENTRUN_REDIS_ULR"),
        ({"AGENTRUN_MAX_CONCURRENT_RUNS": "many"}, "AGENTRUN_MAX_CONCURRENT_RUNS"),
        ({"AGENTRUN_MAX_CONCURRENT_RUNS": "0"}, "AGENTRUN_MAX_CONCURRENT_RUNS"),
        ({"AGENTRUN_PRICES": "{not json"}, "AGENTRUN_PRICES"),
        ({"AGENTRUN_MODEL_BASE_URL": "localhost:8000"}, "AGENTRUN_MODEL_BASE_URL"),
        ({"AGENTRUN_OTEL_ENDPOINT": "jaeger:4317"}, "AGENTRUN_OTEL_ENDPOINT"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(config.ConfigError, match=named):
        config.load(env)


def test_the_api_key_is_never_echoed() -> None:
    s = config.load({"AGENTRUN_MODEL_API_KEY": "sk-secret-value"})
    assert "sk-secret-value" not in repr(s)


def test_unknown_setting_suggests_a_close_name() -> None:
    with pytest.raises(config.ConfigError, match="did you mean AGENTRUN_REDIS_URL"):
        config.load({"AGENTRUN_REDIS_ULR": "x"})


def test_a_redis_password_never_shows_in_the_settings() -> None:
    settings = config.load({"AGENTRUN_REDIS_URL": "rediss://agentrun-operator:s3cr3t@redis:6380/0"})
    assert settings.redis_url.startswith("rediss://") and "s3cr3t" not in repr(settings)
