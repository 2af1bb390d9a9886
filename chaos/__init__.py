"""The chaos harness: kills nodes of a test cluster (or a real one) and measures failovers."""
