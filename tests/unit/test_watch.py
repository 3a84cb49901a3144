"""agentrun watch's refusals, before anything is sent: a token never crosses the network in
clear text, and a URL that is not http(s) is named."""

from __future__ import annotations

import io

import pytest

from agentrun_operator import watch


@pytest.mark.parametrize(
    ("server", "says"),
    [
        ("http://agentrun.example.com", "in clear text"),
        ("http://10.0.0.7:8080", "in clear text"),
        ("ftp://agentrun.example.com", "expected an http:// or https:// URL"),
        ("agentrun.example.com", "expected an http:// or https:// URL"),
    ],
)
async def test_a_token_is_never_sent_in_clear_text_off_this_machine(server: str, says: str) -> None:
    with pytest.raises(watch.WatchError, match=says):
        await watch.watch_server(
            namespace="ns", name="r", server=server, token="t0ken", out=io.StringIO()
        )
