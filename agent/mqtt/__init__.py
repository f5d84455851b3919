"""agent/mqtt: see docs/architecture.md."""
