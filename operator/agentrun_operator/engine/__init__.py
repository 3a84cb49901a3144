"""The run engine: executes AgentRuns as asyncio tasks. Where is X?

- ``registry``: the entry points kopf calls (a run appears, a vote, a spec edit, stop,
  deletion, shutdown), the concurrency queue, and the first sight that fixes a run's
  settings (after its namespace's AgentPolicies);
- ``execution``: one run's task (lease, workflow, resume, time limit, waiting out an
  outage);
- ``stopping``: the stop state machine every stop goes through;
- ``judging``: each call's dry run (its preview) and the AgentPolicy rules, before
  anyone is asked: gated, denied, refused or free;
- ``gate``: ToolApprovals (create, settle, report, cancel, ask again once when the object
  changed after an approval) and AwaitingApproval;
- ``binding``: the run's model and tools (``RunDeps`` for the workflow), budgets,
  exactly-once tool calls;
- ``mcptools``: a run's MCP tools (pinned at first sight, offered as functions, arguments
  checked against their schema, called as the run);
- ``policybook``: the AgentPolicies and namespace labels as they are now, from watches;
- ``emitter``: the run's events (typed payloads) and status writes;
- ``finishing``: how runs end, with a task or without one;
- ``sweeps``: clocks (approval expiries, TTL) and the keys of runs that are gone;
- ``common``: ``RunRef``, ``Services``, ``RunFailed`` and small helpers.

Redis is reached only through ``store`` and ``events``; Kubernetes only through ``kube``.
"""

from agentrun_operator.engine.registry import Registry

__all__ = ["Registry"]
