"""ToolApprovals and the admission rules for them and for AgentRuns.

Owns: ToolApproval names, labels and bodies; when an approval is settled (votes, quorum,
expiry); and every admission decision as a pure function of (operation, requester, new
object, old object, run). The webhook server only moves AdmissionReviews in and out.
Pure: no I/O, no kopf, no Kubernetes client, no Redis. Identities come only from the
admission request's userInfo, which the API server vouches for; nothing a client writes
into decidedBy, votes or the agentrun.dev annotations is ever trusted.
"""

from __future__ import annotations

import datetime as dt
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from agentrun_operator import contract, models

# Nesting allowed below an object's root. ToolApproval spec.arguments is free-form (the only
# such field), and a real patch or manifest nests a dozen levels; the API server takes up to
# 10,000, where Python's JSON decoder and comparisons run out of stack (~1,000).
MAX_NESTING = 64
# A tool call's arguments become spec.arguments, two levels below the ToolApproval's root;
# but the API server mirrors them into metadata.managedFields[0].fieldsV1.f:spec.f:arguments,
# six levels down, before the webhook sees the object.
MAX_ARGUMENT_NESTING = MAX_NESTING - 6


def deeper_than(value: Any, most: int) -> list[str] | None:
    """The path to the first value nested deeper than ``most`` levels (iteratively), or None."""
    todo: list[tuple[Any, list[str]]] = [(value, [])]
    while todo:
        item, path = todo.pop()
        if len(path) > most:
            return path
        if isinstance(item, dict):
            todo.extend((v, [*path, str(k)]) for k, v in item.items())
        elif isinstance(item, list):
            todo.extend((v, [*path, f"[{i}]"]) for i, v in enumerate(item))
    return None


OPERATOR_WRITTEN = ("runName", "callId", "tool", "server", "arguments", "reason", "rule")
MAX_COMMENT = 2048  # spec.comment and a vote's comment (models.ToolApprovalSpec)


@dataclass(frozen=True)
class User:
    username: str
    groups: tuple[str, ...] = ()

    @classmethod
    def of(cls, info: Mapping[str, Any]) -> User:
        return cls(str(info.get("username") or ""), tuple(info.get("groups") or ()))

    def as_dict(self) -> dict[str, Any]:
        return {"username": self.username, "groups": list(self.groups)}


def approval_name(run: str, call_id: str) -> str:
    return f"{run}-{call_id}"


def toolapproval_body(
    *,
    namespace: str,
    run: str,
    run_uid: str,
    call_id: str,
    tool: str,
    arguments: Mapping[str, Any],
    reason: str,
    rule: Mapping[str, Any] | None = None,
    again: bool = False,
    server: str | None = None,
) -> dict[str, Any]:
    """A ToolApproval; ``again``: the second one of a call whose first went Stale (NAME-2)."""
    suffix = contract.REASK_SUFFIX if again else ""
    return {
        "apiVersion": models.API_VERSION,
        "kind": "ToolApproval",
        "metadata": {
            "name": approval_name(run, call_id) + suffix,
            "namespace": namespace,
            "labels": {contract.RUN_LABEL: run, contract.CALL_ID_LABEL: call_id},
            "ownerReferences": [
                {
                    "apiVersion": models.API_VERSION,
                    "kind": "AgentRun",
                    "name": run,
                    "uid": run_uid,
                    "controller": True,
                    "blockOwnerDeletion": False,
                }
            ],
        },
        "spec": {
            "runName": run,
            "callId": call_id,
            "tool": tool,
            "arguments": dict(arguments),
            # Empty strings are left out: the 1.20 API server of the test ground reads "" in a
            # custom resource as null and refuses it.
            **({"reason": reason[:16384]} if reason else {}),
            **({"rule": dict(rule)} if rule else {}),
            **({"server": server} if server else {}),
        },
    }


def needed(ta: Mapping[str, Any], min_approvals: int) -> int:
    """Approvals a ToolApproval needs: the run's own floor, or more when a policy rule
    asked for more (spec.rule.minApprovals)."""
    rule = (ta.get("spec") or {}).get("rule") or {}
    asked = rule.get("minApprovals") if isinstance(rule, Mapping) else None
    return max(min_approvals, asked if isinstance(asked, int) else 0)


def approver_lists(
    ta: Mapping[str, Any], approval: models.EffectiveApproval
) -> list[tuple[str, models.Approvers]]:
    """Every approver list a vote must match (where each comes from, the list): the run's,
    its policies' and the asking rule's. Empty lists (anyone) are left out."""
    found = [("spec.approval.approvers", approval.approvers)]
    found += [("an AgentPolicy's approval.approvers", a) for a in approval.policy_approvers]
    rule = (ta.get("spec") or {}).get("rule")
    if isinstance(rule, Mapping):
        match = models.RuleMatch.model_validate(rule)
        found += [(f"{match.policy} rule {match.name}", a) for a in match.approvers]
    return [(where, a) for where, a in found if a.users or a.groups]


# -- settling -----------------------------------------------------------------------------

Outcome = Literal["approved", "denied", "expired"]


@dataclass
class Settled:
    outcome: Outcome
    by: str
    comment: str = ""
    voters: list[dict[str, Any]] = field(default_factory=list)
    # The identity whose vote settled it (status.decidedBy); None when it expired.
    decided_by: dict[str, Any] | None = None


def tally(votes: Iterable[Mapping[str, Any]]) -> tuple[list[str], list[Mapping[str, Any]]]:
    """Distinct approvers (in order) and the denying votes."""
    approvers: list[str] = []
    denials: list[Mapping[str, Any]] = []
    for vote in votes:
        if vote.get("decision") == "Denied":
            denials.append(vote)
        elif vote.get("decision") == "Approved" and vote.get("username") not in approvers:
            approvers.append(str(vote.get("username")))
    return approvers, denials


def settle(ta: Mapping[str, Any], *, min_approvals: int, now: dt.datetime) -> Settled | None:
    """The approval's outcome, or None while it still waits."""
    votes = counted_votes(ta)
    approvers, denials = tally(votes)
    if denials:
        first = denials[0]
        return Settled(
            "denied",
            str(first.get("username")),
            str(first.get("comment") or ""),
            votes,
            _identity(first),
        )
    if len(approvers) >= min_approvals:
        comments = "; ".join(str(v.get("comment")) for v in votes if v.get("comment"))
        last = [v for v in votes if v.get("decision") == "Approved"][-1]
        return Settled("approved", ", ".join(approvers), comments, votes, _identity(last))
    expires = parse_time((ta.get("status") or {}).get("expiresAt"))
    if expires is not None and now >= expires:
        return Settled("expired", "timeout", "nobody decided in time")
    return None


def counted_votes(ta: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The votes that count: a vote after the deadline never does (the webhook refuses
    them; one admitted while the webhook was down, or by a skewed clock, is ignored here),
    so onTimeout always wins."""
    expires = parse_time((ta.get("status") or {}).get("expiresAt"))
    return [dict(v) for v in (ta.get("spec") or {}).get("votes") or [] if not _late(v, expires)]


def _identity(vote: Mapping[str, Any]) -> dict[str, Any]:
    return {"username": str(vote.get("username") or ""), "groups": list(vote.get("groups") or [])}


def _late(vote: Mapping[str, Any], expires: dt.datetime | None) -> bool:
    at = parse_time(vote.get("at"))
    return expires is not None and (at is None or at > expires)


def parse_time(value: Any) -> dt.datetime | None:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def rfc3339(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- admission: ToolApproval --------------------------------------------------------------


def _annotation_path(key: str) -> str:
    return "/metadata/annotations/" + key.replace("~", "~0").replace("/", "~1")


def mutate_toolapproval(
    *,
    operation: str,
    user: User,
    obj: Mapping[str, Any],
    old: Mapping[str, Any] | None,
    operators: frozenset[str],
    now: dt.datetime,
) -> list[dict[str, Any]]:
    """JSON patch turning a decision request into one vote.

    ``spec.decision`` (with ``spec.comment``) is a write-only request: an update that carries
    it becomes exactly one vote with the API server's word for who sent it, and both fields
    are removed from the stored object. An update without it (labels, annotations, anything
    else) never votes, whoever sends it. decidedBy and votes are rewritten from the old
    object, whatever the client sent.
    """
    spec = obj.get("spec") or {}
    old_spec = (old or {}).get("spec") or {}
    ops: list[dict[str, Any]] = []
    votes = list(old_spec.get("votes") or []) if operation == "UPDATE" else []
    decided_by = old_spec.get("decidedBy") if operation == "UPDATE" else None
    requested = spec.get("decision")
    comment = spec.get("comment")
    casting = (
        operation == "UPDATE"
        and user.username not in operators
        # Anything else (a lower-case "approved", a comment over the limit) stays in the
        # object, so that the schema refuses it naming the field the person wrote.
        and requested in ("Approved", "Denied")
        and (comment is None or (isinstance(comment, str) and len(comment) <= MAX_COMMENT))
        # An object stored before decisions became write-only still carries its old
        # request: an edit that merely keeps it is not a new one.
        and (requested, comment) != (old_spec.get("decision"), old_spec.get("comment"))
    )
    if casting:
        vote = {**user.as_dict(), "decision": requested, "at": rfc3339(now)}
        if spec.get("comment"):
            vote["comment"] = str(spec["comment"])
        votes.append(vote)
        decided_by = user.as_dict()
    # Overwrite whatever the client sent, present or not.
    ops.append({"op": "add", "path": "/spec/votes", "value": votes})
    if decided_by is not None:
        ops.append({"op": "add", "path": "/spec/decidedBy", "value": decided_by})
    elif "decidedBy" in spec:
        ops.append({"op": "remove", "path": "/spec/decidedBy"})
    if casting:
        # The request is now a vote: it is not stored (nor is a legacy one it replaced).
        ops += [
            {"op": "remove", "path": f"/spec/{f}"} for f in ("decision", "comment") if f in spec
        ]
    return ops


def self_identities(namespace: str, settings: Mapping[str, Any]) -> frozenset[str]:
    """The identities a run acts as (its service account, which the operator impersonates):
    none of them may vote on that run's approvals."""
    sa = str(settings.get("serviceAccountName") or "default")
    return frozenset({f"system:serviceaccount:{namespace}:{sa}"})


def validate_toolapproval(
    *,
    operation: str,
    user: User,
    obj: Mapping[str, Any],
    old: Mapping[str, Any] | None,
    run: Mapping[str, Any] | None,
    operators: frozenset[str],
    now: dt.datetime,
) -> str | None:
    """None to allow, else the reason to refuse (shown to the person by kubectl).

    Votes are judged against the settings the operator fixed when it first saw the run
    (``status.effective``, ``status.createdBy``), never the live spec or annotations, which
    an editor could change while the AgentRun webhook (failurePolicy Ignore) is away.
    """
    spec = obj.get("spec") or {}
    if operation == "CREATE":
        if operators and user.username not in operators:
            return "ToolApprovals are created by the agentrun operator only"
        if spec.get("decision") or spec.get("votes") or spec.get("decidedBy"):
            return "a ToolApproval cannot be created with a decision; patch spec.decision later"
        return None
    if operation != "UPDATE" or old is None:
        return None
    old_spec = old.get("spec") or {}
    for name in OPERATOR_WRITTEN:
        if spec.get(name) != old_spec.get(name):
            return f"spec.{name} is written by the operator and cannot be changed"
    labels, old_labels = _labels(obj), _labels(old)
    for key in (contract.RUN_LABEL, contract.CALL_ID_LABEL):
        if labels.get(key) != old_labels.get(key):
            return f"label {key} is written by the operator and cannot be changed"
    old_votes = list(old_spec.get("votes") or [])
    votes = list(spec.get("votes") or [])
    if votes[: len(old_votes)] != old_votes or len(votes) > len(old_votes) + 1:
        return "spec.votes is recorded by the admission webhook and cannot be edited"
    if len(votes) == len(old_votes):
        request = (spec.get("decision"), spec.get("comment"))
        if spec.get("decision") is not None and request != (
            old_spec.get("decision"),
            old_spec.get("comment"),
        ):
            # Only agentrun's own identities get here (a person's valid request became a
            # vote above, an invalid one was refused by the schema).
            return f"{user.username} is agentrun's own identity and never decides approvals"
        if spec.get("comment") is not None and spec.get("comment") != old_spec.get("comment"):
            # Stored alone it would be taken into whoever's vote came next.
            return "spec.comment goes with a decision: send it together with spec.decision"
        return None
    vote = votes[-1]
    status = old.get("status") or {}
    state = status.get("state")
    if state in ("Expired", "Cancelled", "Approved", "Denied", "Stale"):
        return f"this approval is already {state.lower()}; it cannot be decided any more"
    expires = parse_time(status.get("expiresAt"))
    if state != "Pending" or expires is None:
        return (
            "this approval is not open for decisions yet: the operator has not written its "
            "status (state Pending, expiresAt); try again in a moment"
        )
    if now >= expires:
        return (
            f"this approval expired at {rfc3339(expires)}; a decision after the deadline does "
            "not count (the run's spec.approval.onTimeout applies)"
        )
    if run is None:
        return f"AgentRun {spec.get('runName')} not found; its approvals cannot be decided"
    run_status = run.get("status") or {}
    effective = run_status.get("effective")
    if not isinstance(effective, Mapping):
        return (
            f"run {spec.get('runName')} has no fixed settings yet (status.effective); the "
            "operator records them when it picks the run up: try again in a moment"
        )
    namespace = str((obj.get("metadata") or {}).get("namespace") or "")
    if user.username in operators or user.username in self_identities(namespace, effective):
        return (
            f"{user.username} is the identity run {spec.get('runName')} acts as; an agent "
            "never decides its own tool calls"
        )
    policy = models.EffectiveApproval.model_validate(effective.get("approval") or {})
    approvers, denials = tally(old_votes)
    if denials:
        return f"already denied by {denials[0].get('username')}"
    if len(approvers) >= needed(old, policy.min_approvals):
        return f"already approved by {', '.join(approvers)}"
    if any(v.get("username") == user.username for v in old_votes):
        return f"{user.username} has already decided this approval; one vote per person"
    for where, allowed in approver_lists(old, policy):
        if not (user.username in allowed.users or set(user.groups) & set(allowed.groups)):
            return (
                f"{user.username} is not among the approvers of run {spec.get('runName')} "
                f"({where}: users {allowed.users}, groups {allowed.groups})"
            )
    creator = run_status.get("createdBy")
    if (
        vote.get("decision") == "Approved"
        and creator
        and creator == user.username
        and not policy.allow_self_approval
    ):
        return (
            f"{user.username} created run {spec.get('runName')} and may not approve its tool "
            "calls (spec.approval.allowSelfApproval is false); ask another approver"
        )
    return None


def _labels(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return (obj.get("metadata") or {}).get("labels") or {}


# -- admission: AgentRun ------------------------------------------------------------------


def mutate_agentrun(
    *,
    operation: str,
    user: User,
    obj: Mapping[str, Any],
    old: Mapping[str, Any] | None,
) -> list[dict[str, Any]]:
    """Record the creator and the requester of spec.stop; restore them on any other edit."""
    annotations = dict((obj.get("metadata") or {}).get("annotations") or {})
    old_annotations = ((old or {}).get("metadata") or {}).get("annotations") or {}
    wanted = dict(annotations)
    for key in (contract.CREATED_BY, contract.STOPPED_BY):
        wanted.pop(key, None)
        if operation == "UPDATE" and key in old_annotations:
            wanted[key] = old_annotations[key]
    if operation == "CREATE":
        wanted[contract.CREATED_BY] = user.username
    elif operation == "UPDATE":
        stop = bool((obj.get("spec") or {}).get("stop"))
        was = bool(((old or {}).get("spec") or {}).get("stop"))
        if stop and not was:
            wanted[contract.STOPPED_BY] = user.username
    if wanted == annotations:
        return []
    return [{"op": "add", "path": "/metadata/annotations", "value": wanted}]


# Naming a service account for a run is using it: verb "use" on this virtual resource
# (granted by the agentrun-sa-user ClusterRole, per namespace, narrowed by resourceNames).
SA_USE = {"verb": "use", "group": models.GROUP, "resource": "serviceaccounts"}


def service_account_to_check(operation: str, obj: Mapping[str, Any]) -> str | None:
    """The service account whose use a create must be allowed, or None (the namespace's
    'default' account needs no permission: it is what every pod gets anyway)."""
    if operation != "CREATE":
        return None
    name = (obj.get("spec") or {}).get("serviceAccountName")
    return str(name) if name and name != "default" else None


def service_account_refusal(
    *,
    user: User,
    namespace: str,
    name: str,
    reason: str,
    field: str = "spec.serviceAccountName",
    kind: str = "run",
) -> str:
    doing = "run agents as" if kind == "run" else "have MCP servers reached as"
    return (
        f"{user.username} may not {doing} service account {namespace}/{name}: creating a "
        f"{kind} with {field} needs verb 'use' on resource "
        f"'serviceaccounts.{models.GROUP}' (name {name}) in namespace {namespace}; ask an "
        f"admin to bind the agentrun-sa-user ClusterRole there"
        + (f" (authorizer: {reason})" if reason else "")
    )


def _url_parts(url: str) -> tuple[str, str, int, list[str]] | None:
    """(scheme, host, port, path segments) of an http(s) URL, normalised as a client reads
    it (case, default port, dot segments, empty segments), or None when it is not one or
    carries credentials (``user@host`` makes a prefix match misleading)."""
    try:
        u = urllib.parse.urlsplit(url.strip())
        port = u.port
    except ValueError:
        return None
    scheme = u.scheme.lower()
    if scheme not in ("http", "https") or not u.hostname or u.username or u.password:
        return None
    segments: list[str] = []
    for part in urllib.parse.unquote(u.path).split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if segments:
                segments.pop()
            continue
        segments.append(part)
    return (
        scheme,
        u.hostname.lower().rstrip("."),
        port or (443 if scheme == "https" else 80),
        segments,
    )


def base_url_allowed(url: str, allowed: list[str]) -> bool:
    """Whether ``url`` lies under one of the ``allowed`` prefixes: same scheme, host and
    port, and a path that starts with the prefix's whole segments (so neither
    ``https://llm.example.com.evil.net`` nor ``https://llm.example.com/v1/../admin`` passes
    for ``https://llm.example.com/v1``)."""
    parts = _url_parts(url)
    if parts is None:
        return False
    for prefix in allowed:
        want = _url_parts(prefix)
        if want is not None and parts[:3] == want[:3] and parts[3][: len(want[3])] == want[3]:
            return True
    return False


def validate_agentrun(
    *,
    operation: str,
    obj: Mapping[str, Any],
    old: Mapping[str, Any] | None,
    allowed_base_urls: list[str],
) -> str | None:
    name = str((obj.get("metadata") or {}).get("name") or "")
    spec = obj.get("spec") or {}
    if operation == "CREATE":
        if len(name) > models.MAX_RUN_NAME:
            return (
                f"metadata.name is {len(name)} characters; AgentRun names are at most "
                f"{models.MAX_RUN_NAME} so they fit in label values"
            )
        base = ((spec.get("model") or {}).get("baseURL") or "").rstrip("/")
        allowed = [u.rstrip("/") for u in allowed_base_urls]
        if base and allowed and not base_url_allowed(base, allowed):
            return (
                f"spec.model.baseURL {base} is not in the operator's allow-list "
                f"({', '.join(allowed)}); use one of those or ask the operator's admin"
            )
        return None
    if operation != "UPDATE" or old is None:
        return None
    old_spec = old.get("spec") or {}
    changed = sorted(
        k for k in set(spec) | set(old_spec) if k != "stop" and spec.get(k) != old_spec.get(k)
    )
    if changed:
        fields = ", ".join(f"spec.{k}" for k in changed)
        return (
            f"{fields}: an AgentRun's spec cannot change after creation (only spec.stop "
            "can); create a new AgentRun instead"
        )
    if old_spec.get("stop") and not spec.get("stop"):
        return "spec.stop cannot go back to false: a stopped run stays stopped"
    return None
