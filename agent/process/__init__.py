"""The process itself: its open-file budget, background priority, and back-off of failing loops."""
