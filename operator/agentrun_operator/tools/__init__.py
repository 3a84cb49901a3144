"""The ``k8s_*`` tools the agent calls, executed as the run's service account.

Where things are:
- ``arguments``: each tool's arguments (a pydantic model per tool, also the JSON Schema the
  model sees) and their validation;
- ``reads`` / ``writes``: the read-only and the mutating tool bodies;
- ``landing``: exactly-once after a crash (mutating tools stamp ``agentrun.dev/last-call-id``
  on the object they change; ``landed`` reads it back);
- ``results``: compact result forms, Secret redaction, the size cap (pure);
- ``dryrun``: the preview of a mutating call (server-side dry run), before anyone is asked;
- ``catalog``: descriptions, the OpenAI function specs, and dispatch of one call.

Never: raises for anything the model or the cluster did; lets a Secret's
``data``/``stringData`` out; writes anything from a read-only tool; acts with the operator's
own identity.
"""

from agentrun_operator.tools.arguments import (
    ARGUMENTS,
    ApplyArgs,
    ArgumentError,
    LogsArgs,
    PatchArgs,
    ToolOutcome,
    parse_arguments,
)
from agentrun_operator.tools.catalog import TOOLS, openai_tools, run_tool
from agentrun_operator.tools.dryrun import (
    Bound,
    PreviewRefused,
    changed_since,
    check_bound,
    preview,
)
from agentrun_operator.tools.landing import landed
from agentrun_operator.tools.results import (
    LAST_APPLIED,
    REDACTED,
    RESTARTED_AT,
    cap,
    merge,
    redact,
    redact_deep,
    redact_secret,
    redacted_arguments,
    size,
    summarize,
)
from agentrun_operator.tools.writes import json_patch_with_stamp

__all__ = [
    "ARGUMENTS",
    "LAST_APPLIED",
    "REDACTED",
    "RESTARTED_AT",
    "TOOLS",
    "ApplyArgs",
    "ArgumentError",
    "Bound",
    "LogsArgs",
    "PatchArgs",
    "PreviewRefused",
    "ToolOutcome",
    "cap",
    "changed_since",
    "check_bound",
    "json_patch_with_stamp",
    "landed",
    "merge",
    "openai_tools",
    "parse_arguments",
    "preview",
    "redact",
    "redact_deep",
    "redact_secret",
    "redacted_arguments",
    "run_tool",
    "size",
    "summarize",
]
