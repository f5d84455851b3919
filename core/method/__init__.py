"""core/method: see docs/architecture.md."""
