"""agentrun operator: runs AgentRuns as LangGraph workflows and streams their events to Redis."""
