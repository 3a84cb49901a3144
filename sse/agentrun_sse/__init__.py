"""agentrun SSE server: serves run event streams from Redis to web UIs and CLIs."""
