"""Which namespaces' runs the uninstall hook deletes: the operator's own globs only."""

from __future__ import annotations

import pytest

from agentrun_operator import config


@pytest.mark.parametrize(
    ("namespace", "globs", "expected"),
    [
        ("team-a", [], True),  # no globs: the operator watches every namespace
        ("team-a", ["team-*"], True),
        ("ops", ["team-*"], False),
        ("ops", ["team-*", "ops"], True),
        ("team-a", ["Team-*"], False),  # namespace names are lower case; no case folding
    ],
)
def test_only_the_operators_namespaces(namespace: str, globs: list[str], expected: bool) -> None:
    assert config.in_namespaces(namespace, globs) is expected


def test_the_cli_parses_globs_and_timeout() -> None:
    from agentrun_operator import cli

    args = cli.build_parser().parse_args(["delete-runs", "--namespaces=a-*,b", "--timeout=30"])
    assert (args.namespaces, args.timeout) == ("a-*,b", 30.0)
