"""core/roi: see docs/architecture.md."""
