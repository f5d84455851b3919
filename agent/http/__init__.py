"""agent/http: see docs/architecture.md."""
