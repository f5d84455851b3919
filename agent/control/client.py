"""The CLI's side of one writer per data root (agent/control/lock.py): run a changing command directly under
the data root's lock, or send it to the daemon that holds it (agent/control/server.py) and print its answer."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from agent.control.lock import DataRootLock
from agent.control.server import SOCKET, recv_line
from core.errors import AnomalyError

WAIT_FOR_CLI_S = 60.0  # another CLI command holds the lock: wait this long for it


class DaemonRuns(Exception):
    """A daemon holds the data root: the command goes through it."""

    def __init__(self, holder: dict) -> None:
        super().__init__(f"a daemon (pid {holder.get('pid', '?')}) serves this data root")
        self.holder = holder


def take_or_find_daemon(data_root: Path) -> DataRootLock:
    """The data root's lock for this command; DaemonRuns when a running daemon holds it; AnomalyError busy
    when another CLI command still holds it after WAIT_FOR_CLI_S."""
    lock = DataRootLock(data_root, "cli")
    if lock.acquire():
        return lock
    holder = lock.holder()
    if holder.get("owner") == "daemon":
        raise DaemonRuns(holder)
    if lock.acquire(WAIT_FOR_CLI_S):
        return lock
    raise AnomalyError(f"another command (pid {holder.get('pid', '?')}) changes this data root; retry when it ends",
                       code="busy")


def send(data_root: Path, action: str, role_id: str, roi_id: str, files: list[Path] | None = None,
         params: dict | None = None, timeout: float = 3600.0) -> dict:
    """One request to the daemon's control socket; its answer ({"result": ..., "errors": [...]} or
    {"error": ...})."""
    req = {"action": action, "role_id": role_id, "roi_id": roi_id,
           "files": [str(Path(f).resolve()) for f in files or []], "params": params or {}}
    path = Path(data_root) / SOCKET
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise AnomalyError(f"a daemon serves this data root but its control socket {path} cannot be reached "
                               f"({exc.strerror or exc}); use its HTTP or MQTT API, or stop it",
                               code="daemon_unreachable") from None
        sock.sendall((json.dumps(req) + "\n").encode())
        raw = recv_line(sock) or b""
    try:
        answer = json.loads(raw)
    except ValueError:
        raise AnomalyError("the daemon closed the control connection without an answer", code="daemon_unreachable"
                           ) from None
    if "error" in answer:
        raise AnomalyError(answer["error"].get("message", "refused"), code=answer["error"].get("code", "refused"))
    return answer
