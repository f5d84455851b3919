"""agent/operator: see docs/architecture.md."""
