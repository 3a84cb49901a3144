"""``agentrun delete-runs``: delete AgentRuns and wait until they are gone, e.g. from the
chart's pre-delete hook, so that ``helm uninstall`` leaves no run behind whose finalizer
waits for an operator that no longer exists (which would wedge its namespace's deletion).

Owns: listing runs across namespaces (filtered by the operator's namespace globs), deleting
them and waiting while the operator still runs to clean up each (its task, its pending
approvals, its Redis keys). Never removes a finalizer itself: that would lose the cleanup.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TextIO

from agentrun_operator import config, kube


async def delete_runs(
    *, namespaces: list[str], timeout: float, out: TextIO = sys.stdout, interval: float = 1.0
) -> int:
    """Delete every AgentRun in ``namespaces`` (globs; empty: all) and wait up to
    ``timeout`` seconds until they are gone. 0 when none remain, 1 otherwise."""
    k = await kube.Kube.from_env()
    try:
        runs = [
            (r["metadata"]["namespace"], r["metadata"]["name"])
            for r in await k.list_agentruns(namespace=None)
            if config.in_namespaces(r["metadata"]["namespace"], namespaces)
        ]
        for ns, name in runs:
            await k.delete_agentrun(namespace=ns, name=name)
            print(f"deleting agentrun {ns}/{name}", file=out)
        deadline = time.monotonic() + timeout
        left = runs
        while left:
            still = []
            for ns, name in left:
                if await k.get_agentrun(namespace=ns, name=name) is not None:
                    still.append((ns, name))
            left = still
            if not left or time.monotonic() > deadline:
                break
            await asyncio.sleep(interval)
    finally:
        await k.close()
    if left:
        names = ", ".join(f"{ns}/{name}" for ns, name in left)
        print(
            f"{len(left)} AgentRuns still there after {timeout:.0f}s: {names}. Is the operator "
            "running? Their finalizer waits for it to clean up.",
            file=out,
        )
        return 1
    print(f"deleted {len(runs)} AgentRuns", file=out)
    return 0
