"""agent/opcua: see docs/architecture.md."""
