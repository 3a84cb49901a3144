"""The web UI in Debian's real headless Chromium, driven by Playwright (executable_path: no
browser download).

Covers: logging in with a token (the HttpOnly cookie), the run list, opening a run whose
history replays and whose tokens then stream live into the page, a tool card and an
approval card with the preview of what the call would change, Approve (a POST with the
CSRF token; the ToolApproval's decision checked with kubectl), the browser's own reconnect
by Last-Event-ID after the server drops the stream (no token shown twice), Stop (spec.stop
checked with kubectl), the end of the run, and a screenshot (/tmp/agentrun-ui.png;
/tmp/agentrun-ui-failure.png when a step fails).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Page as PlaywrightPage
from playwright.async_api import TimeoutError as PlaywrightTimeout
from playwright.async_api import async_playwright
from redis import asyncio as aioredis

from agentrun_harness import sse as sse_harness
from agentrun_harness.controlplane import ControlPlane
from agentrun_harness.redisserver import RedisServer

from sse_support import sse_settings
from support import Kubectl, newest_only, require_tool, set_run_status

pytestmark = newest_only("the web UI in Chromium does not depend on the Kubernetes version")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = Path("/tmp/agentrun-ui.png")
FAILURE_SCREENSHOT = Path("/tmp/agentrun-ui-failure.png")


@pytest.fixture(autouse=True)
def chromium_installed() -> None:
    require_tool(CHROMIUM, package="chromium")


class Page:
    """A Playwright page of Debian's headless Chromium, with the waits these tests use."""

    def __init__(self, page: PlaywrightPage) -> None:
        self.page = page

    async def js(self, expression: str) -> Any:
        return await self.page.evaluate(expression)

    async def until(self, condition: str, *, what: str, timeout: float = 10) -> Any:
        """Resolve when the page's ``condition`` holds (checked every animation frame)."""
        try:
            handle = await self.page.wait_for_function(
                f"() => {{ try {{ return ({condition}); }} catch (e) {{ return false; }} }}",
                timeout=timeout * 1000,
            )
        except PlaywrightTimeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None
        return await handle.json_value()

    async def screenshot(self, path: Path) -> None:
        await self.page.screenshot(path=str(path))


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Page]:
    """A fresh browser and page; a screenshot of the page when the test fails in it."""
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic"],
        )
        try:
            context = await browser.new_context(viewport={"width": 1200, "height": 1000})
            page = Page(await context.new_page())
            try:
                yield page
            except BaseException:
                with contextlib.suppress(Exception):
                    await page.screenshot(FAILURE_SCREENSHOT)
                raise
        finally:
            await browser.close()


async def log_in(page: Page, url: str, token: str) -> None:
    """Open ``url``, and log in with ``token`` through the login form (typed, as a person)."""
    await page.page.goto(url)
    await page.until("!document.getElementById('login').hidden", what="the login form")
    await page.page.locator("#token").press_sequentially(token)
    await page.page.locator("#login-form button").click()


def create(kubectl: Kubectl, manifest: dict[str, Any]) -> str:
    out = kubectl("create", "-f", "-", "-o", "jsonpath={.metadata.uid}", input=json.dumps(manifest))
    return out.stdout.strip()


async def test_log_in_watch_tokens_stream_approve_reconnect_and_stop_in_chromium(
    cluster: ControlPlane,
    redis_server: RedisServer,
    kubectl: Kubectl,
    namespace: str,
    redis: aioredis.Redis,
) -> None:
    uid = create(
        kubectl,
        {
            "apiVersion": "agentrun.dev/v1alpha1",
            "kind": "AgentRun",
            "metadata": {"name": "ui-run", "namespace": namespace},
            "spec": {"goal": "scale web to 3"},
        },
    )
    call = "c-00000000abcd"
    create(
        kubectl,
        {
            "apiVersion": "agentrun.dev/v1alpha1",
            "kind": "ToolApproval",
            "metadata": {
                "name": f"ui-run-{call}",
                "namespace": namespace,
                "labels": {"agentrun.dev/run": "ui-run", "agentrun.dev/call-id": call},
            },
            "spec": {
                "runName": "ui-run",
                "callId": call,
                "tool": "k8s_scale",
                "arguments": {"replicas": 3},
            },
        },
    )
    op = await sse_harness.FakeOperator(redis, uid=uid, run=f"{namespace}/ui-run").start()
    await op.emit("workflow", {"state": "planning", "node": "plan", "step": 1})
    await op.emit("token", {"text": "Looking ", "node": "act"})  # history, replayed on open
    conf = sse_settings(cluster, redis_server.url, heartbeat_seconds=1.0)
    async with sse_harness.LiveServer(conf) as server, chromium() as page:
        await log_in(page, server.url + "/", cluster.token("admin"))
        links = "[...document.querySelectorAll('#run-table a')]"
        is_ours = f"a => a.textContent === {json.dumps(f'{namespace}/ui-run')}"
        await page.until(f"{links}.some({is_ours})", what="the run in the list")
        # The session cookie is HttpOnly: the page's script never sees the token.
        visible = await page.js("document.cookie")
        assert "agentrun_csrf=" in visible and cluster.token("admin") not in visible
        await page.js(f"{links}.find({is_ours}).click()")
        answer = "document.getElementById('answer').textContent"
        await page.until(f"{answer} === 'Looking '", what="the replayed token")
        await page.until("document.getElementById('conn').textContent === 'live'", what="live")
        # Tokens arrive live, one event at a time, and show as they come.
        for word in ("at ", "the ", "deployment."):
            await op.emit("token", {"text": word, "node": "act"})
            await page.until(f"{answer}.endsWith({json.dumps(word)})", what=f"token {word!r}")
        assert await page.js(answer) == "Looking at the deployment."
        await op.emit(
            "tool",
            {
                "callId": "c-00000000aaaa",
                "name": "k8s_get",
                "arguments": {"kind": "Deployment"},
                "status": "succeeded",
                "result": {"replicas": 1},
            },
        )
        await op.emit("workflow", {"state": "awaiting_approval", "node": "gate", "step": 2})
        await op.emit(
            "approval",
            {
                "callId": call,
                "approval": f"ui-run-{call}",
                "tool": "k8s_scale",
                "arguments": {"replicas": 3},
                "state": "pending",
                "preview": {
                    "summary": "spec.replicas 1→3",
                    "operation": "update",
                    "target": {"kind": "Deployment", "namespace": namespace, "name": "web"},
                    "changes": [{"path": "spec.replicas", "before": "1", "after": "3"}],
                },
                "rule": {
                    "policy": f"AgentPolicy {namespace}/guard",
                    "name": "big-scale",
                    "message": "needs two SRE leads",
                },
            },
        )
        await page.until(
            "document.querySelector('.card.tool .result').textContent.includes('replicas')",
            what="the tool card",
        )
        card = f"document.querySelector('.card.approval[data-call-id=\"{call}\"]')"
        await page.until(f"{card}.querySelector('button.approve')", what="the Approve button")
        # What the call would change, above the buttons.
        change = f"{card}.querySelector('.preview .change')"
        await page.until(f"{change}.textContent.includes('spec.replicas')", what="the preview")
        assert await page.js(f"{change}.querySelector('.before').textContent") == "1"
        assert await page.js(f"{change}.querySelector('.after').textContent") == "3"
        head = await page.js(f"{card}.querySelector('.preview-head').textContent")
        assert head == f"update Deployment {namespace}/web"
        rule = await page.js(f"{card}.querySelector('.rule').textContent")
        assert rule == f"Asked by AgentPolicy {namespace}/guard rule big-scale: needs two SRE leads"
        await page.until(
            "document.getElementById('run-phase').textContent === 'AwaitingApproval'",
            what="the phase",
        )
        await page.js(f"{card}.querySelector('.comment').value = 'ok by me'")
        await page.js(f"{card}.querySelector('button.approve').click()")
        status = f"{card}.querySelector('.status').textContent"
        await page.until(f"{status} === 'approving…'", what="the approval sent")
        ta = json.loads(
            kubectl("get", "ta", f"ui-run-{call}", "-n", namespace, "-o", "json").stdout
        )
        assert ta["spec"]["decision"] == "Approved" and ta["spec"]["comment"] == "ok by me"
        await op.emit(
            "approval",
            {
                "callId": call,
                "approval": f"ui-run-{call}",
                "tool": "k8s_scale",
                "state": "approved",
                "decidedBy": "admin",
            },
        )
        await page.until(f"{status} === 'approved by admin'", what="the approval settled")
        assert await page.js(f"{card}.querySelector('.actions').offsetParent === null")
        # The server drops the stream (as it does to a viewer that fell behind): the
        # browser reconnects by itself with Last-Event-ID and shows nothing twice.
        hub = server.ctx.hub
        dropped = 0
        for reader in list(hub._readers.values()):  # white-box: no public "kick" exists
            for viewer in list(reader.viewers):
                reader.viewers.discard(viewer)
                viewer.end("lagged")
                dropped += 1
        assert dropped == 1
        await page.until(
            "document.getElementById('run-notice').textContent.includes('Fell behind')",
            what="the lagged notice",
        )
        await page.until(
            "document.getElementById('conn').textContent === 'live'",
            what="live again",
            timeout=15,
        )
        await op.emit("token", {"text": " Scaling.", "node": "act"})
        await page.until(f"{answer}.endsWith(' Scaling.')", what="a token after the reconnect")
        assert await page.js(answer) == "Looking at the deployment. Scaling."
        await page.js("document.getElementById('stop').click()")
        await page.until(
            "document.getElementById('run-notice').textContent.startsWith('Stop requested')",
            what="stop sent",
        )
        stop = kubectl("get", "ar", "ui-run", "-n", namespace, "-o", "jsonpath={.spec.stop}")
        assert stop.stdout == "true"
        await op.emit(
            "metrics", {"inputTokens": 120, "outputTokens": 30, "costUSD": 0.0012, "ttftMs": 85}
        )
        await op.emit("end", {"phase": "Stopped", "result": "", "stoppedBy": "admin"})
        await page.until("document.getElementById('conn').textContent === 'ended'", what="the end")
        assert await page.js("document.getElementById('run-phase').textContent") == "Stopped"
        assert await page.js("document.getElementById('m-ttft').textContent") == "85 ms"
        await page.screenshot(SCREENSHOT)
        assert SCREENSHOT.stat().st_size > 10_000


async def test_approve_all_pending_decides_each_call_on_its_own_in_chromium(
    cluster: ControlPlane,
    redis_server: RedisServer,
    kubectl: Kubectl,
    namespace: str,
    redis: aioredis.Redis,
) -> None:
    uid = create(
        kubectl,
        {
            "apiVersion": "agentrun.dev/v1alpha1",
            "kind": "AgentRun",
            "metadata": {"name": "many", "namespace": namespace},
            "spec": {"goal": "restart everything"},
        },
    )
    calls = ["c-0000000000a1", "c-0000000000a2"]
    for call in calls:
        create(
            kubectl,
            {
                "apiVersion": "agentrun.dev/v1alpha1",
                "kind": "ToolApproval",
                "metadata": {
                    "name": f"many-{call}",
                    "namespace": namespace,
                    "labels": {"agentrun.dev/run": "many", "agentrun.dev/call-id": call},
                },
                "spec": {"runName": "many", "callId": call, "tool": "k8s_delete_pod"},
            },
        )
    op = await sse_harness.FakeOperator(redis, uid=uid, run=f"{namespace}/many").start()
    await op.emit("workflow", {"state": "awaiting_approval", "node": "gate", "step": 2})
    for call in calls:
        await op.emit(
            "approval",
            {
                "callId": call,
                "approval": f"many-{call}",
                "tool": "k8s_delete_pod",
                "arguments": {"name": call},
                "state": "pending",
            },
        )
    conf = sse_settings(cluster, redis_server.url, heartbeat_seconds=1.0)
    async with sse_harness.LiveServer(conf) as server, chromium() as page:
        await log_in(page, server.url + f"/#/runs/{namespace}/many", cluster.token("admin"))
        cards = "document.querySelectorAll('.card.approval button.approve').length"
        await page.until(f"{cards} === 2", what="two pending approvals")
        await page.js("document.getElementById('approve-all').click()")
        statuses = (
            "[...document.querySelectorAll('.card.approval .status')].map(s => s.textContent)"
        )
        await page.until(
            f"{statuses}.filter(t => t === 'approving…').length === 2", what="two decisions"
        )
        for call in calls:
            ta = json.loads(
                kubectl("get", "ta", f"many-{call}", "-n", namespace, "-o", "json").stdout
            )
            assert ta["spec"]["decision"] == "Approved", ta["spec"]


async def test_a_traced_run_links_to_its_trace_in_chromium(
    cluster: ControlPlane,
    redis_server: RedisServer,
    kubectl: Kubectl,
    namespace: str,
    redis: aioredis.Redis,
) -> None:
    manifest = {
        "apiVersion": "agentrun.dev/v1alpha1",
        "kind": "AgentRun",
        "metadata": {"name": "traced", "namespace": namespace},
        "spec": {"goal": "traced"},
    }
    uid = create(kubectl, manifest)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    set_run_status(kubectl, namespace, "traced", {"phase": "Running", "traceId": trace_id})
    op = await sse_harness.FakeOperator(redis, uid=uid, run=f"{namespace}/traced").start()
    template = "https://jaeger.example.com/trace/{traceId}"
    conf = sse_settings(cluster, redis_server.url, trace_url=template)
    async with sse_harness.LiveServer(conf) as server, chromium() as page:
        await log_in(page, server.url + "/", cluster.token("admin"))
        await page.until("!document.getElementById('runs').hidden", what="the run list")
        await page.js(f"location.hash = '#/runs/{namespace}/traced'")
        link = "document.getElementById('run-trace')"
        assert await page.js(f"{link}.hidden"), "no link before the stream names a trace"
        await op.emit(
            "workflow", {"state": "planning", "node": "plan", "step": 1, "traceId": trace_id}
        )
        await page.until(f"!{link}.hidden", what="the trace link")
        assert await page.js(f"{link}.href") == template.replace("{traceId}", trace_id)
