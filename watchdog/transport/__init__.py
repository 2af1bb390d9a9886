"""Connection plumbing shared by the agent and the observers (below both, above decide)."""
