"""The lock that makes one process the writer of a data root (`<data_root>/agent.lock`).

The daemon takes it at start and holds it while it runs. A CLI command that changes a ROI (fit, calibrate,
samples --delete/--reset, rollback --to, mask, import) takes it for its own run when no daemon holds it; when a
daemon does, the command goes to that daemon instead (agent/control/client.py), so the daemon applies it on
its worker and every output (state topic, OPC UA, page) shows it. A daemon that starts while a CLI command
holds the lock waits for it. The lock is an advisory `flock`: released by the kernel when its process ends,
also on a kill -9, so a crash never leaves a data root locked.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from core.storage import utc_now

NAME = "agent.lock"


class DataRootLock:
    def __init__(self, data_root: Path, owner: str) -> None:
        self.path = Path(data_root) / NAME
        self.owner = owner  # "daemon" or "cli"
        self._fd: int | None = None

    def acquire(self, wait_s: float = 0.0) -> bool:
        """Take the lock, waiting up to `wait_s`; False when another process still holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "owner": self.owner, "since_utc": utc_now()}).encode(), 0)
        self._fd = fd
        return True

    def holder(self) -> dict:
        """Who holds the lock, as it wrote itself ({} when unreadable)."""
        try:
            got = json.loads(self.path.read_bytes()[:4096] or b"{}")
            return got if isinstance(got, dict) else {}
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            finally:
                os.close(self._fd)  # closing releases the flock
                self._fd = None

    def __enter__(self) -> DataRootLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
