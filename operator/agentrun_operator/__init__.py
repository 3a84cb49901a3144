"""agentrun operator: runs AgentRuns as LangGraph workflows and streams their events to Redis."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("agentrun")
except PackageNotFoundError:  # run from a source tree without installing
    __version__ = "0.0.0"
