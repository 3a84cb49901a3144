"""``agentrun approvals`` / ``agentrun approve`` / ``agentrun deny``: people's side of
ToolApprovals from the command line, as the person themselves (their kubeconfig).

Owns listing approvals and patching a decision. Never writes identities: the admission
webhook records who decided from the API server's word.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from agentrun_operator import contract, kube


class DecisionError(Exception):
    pass


async def list_approvals(
    *, namespace: str, everything: bool = False, out: TextIO = sys.stdout
) -> int:
    k = await kube.Kube.from_env()
    try:
        items = await k.list_toolapprovals(namespace=namespace, label_selector=contract.RUN_LABEL)
    finally:
        await k.close()
    rows = [("CALL ID", "RUN", "TOOL", "STATE", "DECIDED BY", "CHANGE", "ARGUMENTS")]
    details: list[str] = []
    for ta in sorted(items, key=lambda t: t["metadata"].get("creationTimestamp", "")):
        spec, st = ta.get("spec") or {}, ta.get("status") or {}
        state = st.get("state") or "Pending"
        if not everything and state != "Pending":
            continue
        args = ", ".join(f"{k}={v}" for k, v in (spec.get("arguments") or {}).items())
        by = (st.get("decidedBy") or spec.get("decidedBy") or {}).get("username", "")
        preview = st.get("preview") or {}
        rows.append(
            (
                spec.get("callId", ""),
                spec.get("runName", ""),
                spec.get("tool", ""),
                state,
                by,
                str(preview.get("summary") or "")[:60],
                args[:60],
            )
        )
        if state == "Pending" and (preview or spec.get("rule")):
            details.append(_preview_text(spec.get("callId", ""), preview, spec.get("rule")))
    if len(rows) == 1:
        print(f"no {'' if everything else 'pending '}approvals in namespace {namespace}", file=out)
        return 0
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out
        )
    for text in details:
        print(f"\n{text}", file=out)
    return 0


def _preview_text(call_id: str, preview: dict[str, Any], rule: dict[str, Any] | None) -> str:
    """What a pending call would change (status.preview), and the policy rule that asked
    for it (spec.rule), for a person about to decide."""
    target = preview.get("target") or {}
    where = "/".join(p for p in (target.get("namespace"), target.get("name")) if p)
    head = f"{call_id}: {preview.get('operation', 'update')} {target.get('kind', '')} {where}"
    if preview.get("approximate"):
        head += " (approximate: a webhook of the cluster does not support dry run)"
    lines = [head.rstrip()]
    for change in preview.get("changes") or []:
        before = change.get("before") if change.get("before") is not None else "(absent)"
        after = change.get("after") if change.get("after") is not None else "(absent)"
        lines.append(f"  {change.get('path')}: {before} -> {after}")
    if preview.get("moreChanges"):
        lines.append(f"  ... and {preview['moreChanges']} more")
    if preview.get("owner"):
        fate = "replaces it" if preview.get("replaced") else "owns it"
        lines.append(f"  {preview['owner']} {fate}")
    if rule:
        why = f": {rule['message']}" if rule.get("message") else ""
        lines.append(f"  asked by {rule.get('policy')} rule {rule.get('name')}{why}")
    return "\n".join(lines)


async def decide(
    *, namespace: str, call_id: str, decision: str, comment: str | None
) -> dict[str, Any]:
    """Patch ``spec.decision`` of the approval for ``call_id``; the webhook records who."""
    k = await kube.Kube.from_env()
    try:
        found = await k.list_toolapprovals(
            namespace=namespace, label_selector=f"{contract.CALL_ID_LABEL}={call_id}"
        )
        if not found:
            raise DecisionError(
                f"no ToolApproval with call id {call_id} in namespace {namespace} "
                "(agentrun approvals -n NAMESPACE lists the pending ones)"
            )
        # A call asked again after its approval went Stale has two: the newest not Stale.
        current = contract.current_approval(found)
        assert current is not None
        name = current["metadata"]["name"]
        patch: dict[str, Any] = {"spec": {"decision": decision}}
        if comment:
            patch["spec"]["comment"] = comment
        try:
            return await k.patch_toolapproval(namespace=namespace, name=name, patch=patch)
        except kube.KubeError as e:
            raise DecisionError(f"{name}: {e.message or e}") from e
    finally:
        await k.close()


async def decide_all(
    *, namespace: str, run: str, decision: str, comment: str | None
) -> list[tuple[str, str | None]]:
    """Decide every pending approval of ``run``; each gets its own recorded vote.

    Returns (approval name, error or None) per approval, so one refusal (say, a call the
    person already decided) does not hide the others.
    """
    k = await kube.Kube.from_env()
    results: list[tuple[str, str | None]] = []
    try:
        found = await k.list_toolapprovals(
            namespace=namespace, label_selector=f"{contract.RUN_LABEL}={run}"
        )
        pending = [ta for ta in found if (ta.get("status") or {}).get("state") in (None, "Pending")]
        for ta in sorted(pending, key=lambda t: t["metadata"]["name"]):
            name = ta["metadata"]["name"]
            patch: dict[str, Any] = {"spec": {"decision": decision}}
            if comment:
                patch["spec"]["comment"] = comment
            try:
                await k.patch_toolapproval(namespace=namespace, name=name, patch=patch)
                results.append((name, None))
            except kube.KubeError as e:
                results.append((name, e.message or str(e)))
    finally:
        await k.close()
    return results
