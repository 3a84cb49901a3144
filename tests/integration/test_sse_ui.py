"""The web UI in Debian's real headless Chromium, driven over the Chrome DevTools Protocol.

Covers: logging in with a token (the HttpOnly cookie), the run list, opening a run whose
history replays and whose tokens then stream live into the page, a tool card and an
approval card, Approve (a POST with the CSRF token; the ToolApproval's decision checked
with kubectl), the browser's own reconnect by Last-Event-ID after the server drops the
stream (no token shown twice), Stop (spec.stop checked with kubectl), the end of the run,
and a screenshot (/tmp/agentrun-ui.png; /tmp/agentrun-ui-failure.png when a step fails).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis import asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect

from agentrun_harness import sse as sse_harness
from agentrun_harness.controlplane import ControlPlane
from agentrun_harness.redisserver import RedisServer

from sse_support import sse_settings
from support import Kubectl, require_tool

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = Path("/tmp/agentrun-ui.png")
FAILURE_SCREENSHOT = Path("/tmp/agentrun-ui-failure.png")


@pytest.fixture(autouse=True)
def chromium_installed() -> None:
    require_tool(CHROMIUM, package="chromium")


class CDP:
    """A page of a headless Chromium, over one DevTools websocket (flat sessions)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self.session: str | None = None
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            if "id" in msg and msg["id"] in self.pending:
                fut = self.pending.pop(msg["id"])
                if "error" in msg:
                    fut.set_exception(AssertionError(f"CDP error: {msg['error']}"))
                else:
                    fut.set_result(msg.get("result", {}))
            elif "method" in msg:
                self.events.setdefault(msg["method"], asyncio.Queue()).put_nowait(msg["params"])

    async def send(
        self, method: str, params: dict[str, Any] | None = None, *, browser: bool = False
    ) -> dict[str, Any]:
        mid = next(self.ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[mid] = fut
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params or {}}
        if self.session and not browser:
            msg["sessionId"] = self.session
        await self.ws.send(json.dumps(msg))
        async with asyncio.timeout(30):
            return await fut

    async def event(self, method: str, *, timeout: float = 15) -> dict[str, Any]:
        queue = self.events.setdefault(method, asyncio.Queue())
        try:
            async with asyncio.timeout(timeout):
                return await queue.get()
        except TimeoutError:
            raise AssertionError(f"no {method} within {timeout}s") from None

    async def js(self, expression: str) -> Any:
        answer = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
        )
        if "exceptionDetails" in answer:
            raise AssertionError(f"page script failed: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    async def until(self, condition: str, *, what: str, timeout: float = 10) -> Any:
        """Resolve when the page's ``condition`` holds, woken by DOM mutations (no polling)."""
        script = f"""new Promise((resolve, reject) => {{
          const check = () => {{
            try {{ const v = ({condition}); if (v) {{ resolve(v); return true; }} }}
            catch (e) {{}}
            return false;
          }};
          if (check()) return;
          const obs = new MutationObserver(() => {{ if (check()) obs.disconnect(); }});
          obs.observe(document,
            {{subtree: true, childList: true, characterData: true, attributes: true}});
          setTimeout(() => {{
            obs.disconnect();
            reject(new Error({json.dumps("timed out waiting for " + what)}));
          }}, {int(timeout * 1000)});
        }})"""
        return await self.js(script)

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot", {"format": "png"})
        path.write_bytes(base64.b64decode(shot["data"]))


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[CDP]:
    profile = tempfile.mkdtemp(prefix="agentrun-chromium-")
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        "about:blank",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        async with asyncio.timeout(30):
            while True:
                line = (await proc.stderr.readline()).decode()
                assert line, "chromium exited before its DevTools listened:\n" + "".join(lines)
                lines.append(line)
                m = re.search(r"DevTools listening on (ws://\S+)", line)
                if m:
                    break
        drain = asyncio.create_task(proc.stderr.read())  # keep its pipe from filling
        async with connect(m.group(1), max_size=None) as ws:
            cdp = CDP(ws)
            target = await cdp.send("Target.createTarget", {"url": "about:blank"})
            attached = await cdp.send(
                "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
            )
            cdp.session = attached["sessionId"]
            await cdp.send("Page.enable")
            await cdp.send("Runtime.enable")
            await cdp.send(
                "Emulation.setDeviceMetricsOverride",
                {"width": 1200, "height": 1000, "deviceScaleFactor": 1, "mobile": False},
            )
            try:
                yield cdp
            finally:
                cdp.reader.cancel()
        drain.cancel()
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


async def log_in(page: CDP, url: str, token: str) -> None:
    """Open ``url``, and log in with ``token`` through the login form (typed, as a person)."""
    await page.send("Page.navigate", {"url": url})
    await page.event("Page.loadEventFired")
    await page.until("!document.getElementById('login').hidden", what="the login form")
    await page.js("document.getElementById('token').focus()")
    await page.send("Input.insertText", {"text": token})
    await page.js("document.querySelector('#login-form button').click()")


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
        try:
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
                },
            )
            await page.until(
                "document.querySelector('.card.tool .result').textContent.includes('replicas')",
                what="the tool card",
            )
            card = f"document.querySelector('.card.approval[data-call-id=\"{call}\"]')"
            await page.until(f"{card}.querySelector('button.approve')", what="the Approve button")
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
            await page.until(
                "document.getElementById('conn').textContent === 'ended'", what="the end"
            )
            assert await page.js("document.getElementById('run-phase').textContent") == "Stopped"
            assert await page.js("document.getElementById('m-ttft').textContent") == "85 ms"
            await page.screenshot(SCREENSHOT)
            assert SCREENSHOT.stat().st_size > 10_000
        except BaseException:
            with contextlib.suppress(Exception):
                await page.screenshot(FAILURE_SCREENSHOT)
            raise


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
        try:
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
        except BaseException:
            with contextlib.suppress(Exception):
                await page.screenshot(FAILURE_SCREENSHOT)
            raise
