"""agent/folder: see docs/architecture.md."""
