"""The daemon's local control socket (`<data_root>/control.sock`): how a CLI command changes a ROI the daemon
serves. Only the daemon's own user (and root) may connect: the socket is mode 0600 and each connection's
peer credentials (SO_PEERCRED) are checked. One request per connection, one JSON line each way:

    {"action": "fit_ok", "role_id": "st1", "roi_id": "a", "files": ["/abs/path.png", ...], "params": {...}}
 -> {"result": <the job's result, as every ingress gets it>, "errors": [{"file": ..., "error": {...}}]}

Actions: fit_ok, send_ng, calibrate (with files: NG samples; without: the threshold policy), delete_samples,
rollback, reset. The daemon reads the named files itself (as its own user, each bounded by
limits.max_bytes): an unreadable file is an error line, the others are processed. The job runs on the worker
like any other (ingress `cli`): one version, the state topic, OPC UA and the page all follow.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
import uuid
from pathlib import Path

from agent.intake import Intake
from agent.jobs import Job, Outcome, error_result
from core.errors import AnomalyError

log = logging.getLogger(__name__)
SOCKET = "control.sock"
MAX_REQUEST = 1 << 20  # one JSON line: actions, ids and paths, never image bytes
MAX_CLIENTS = 4
ACTIONS = ("fit_ok", "send_ng", "calibrate", "delete_samples", "rollback", "reset")
TIMEOUT_S = 3600.0  # a big fit on a busy worker: the CLI waits as long as the job takes


class ControlServer:
    name = "control"

    def __init__(self, data_root: Path, intake: Intake, max_bytes: int) -> None:
        self.path = Path(data_root) / SOCKET
        self.intake = intake
        self.max_bytes = max_bytes
        self._sock: socket.socket | None = None
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._accepting = False

    def start(self) -> None:
        if len(os.fsencode(self.path)) > 100:
            log.warning("control socket path too long for AF_UNIX (%s): CLI commands on this data root are "
                        "refused while the daemon runs", self.path)
            return
        self.path.unlink(missing_ok=True)  # a stale one: the data root lock says no other daemon runs
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(MAX_CLIENTS)
        self._sock, self._accepting = sock, True
        threading.Thread(target=self._accept, name="control", daemon=True).start()
        log.info("control socket %s: CLI commands on this data root go through this daemon", self.path)

    def stop(self) -> None:
        self._accepting = False
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self.path.unlink(missing_ok=True)

    def close(self) -> None:
        return None

    def _accept(self) -> None:
        while self._accepting and self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed at stop
            if not self._slots.acquire(blocking=False):
                self._send(conn, {"error": {"code": "busy", "message": f"{MAX_CLIENTS} CLI commands already wait"}})
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._send(conn, self._handle(conn))
        except Exception:  # one bad request never stops the socket
            log.exception("control: request failed")
        finally:
            self._slots.release()

    def _handle(self, conn: socket.socket) -> dict:
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid not in (os.getuid(), 0):
            log.warning("control: refused a connection from uid %d (only the daemon's user and root)", uid)
            return {"error": {"code": "unauthorized", "message": "only the daemon's user or root may use it"}}
        conn.settimeout(10)
        raw = recv_line(conn, MAX_REQUEST)
        if raw is None:
            return {"error": {"code": "request_too_large", "message": f"over {MAX_REQUEST} bytes"}}
        try:
            req = json.loads(raw)
            action, role, roi = req["action"], req["role_id"], req["roi_id"]
            if action not in ACTIONS:
                raise ValueError(f"unknown action {str(action)[:40]!r}")
            files, params = list(req.get("files") or []), dict(req.get("params") or {})
        except (ValueError, KeyError, TypeError) as exc:
            return {"error": {"code": "invalid_request", "message": str(exc)[:200]}}
        if not self._accepting:
            return {"error": {"code": "shutting_down", "message": "the daemon is stopping"}}
        images, errors = [], []
        for f in files:
            try:
                images.append(self._read(Path(str(f))))
            except OSError as exc:
                errors.append({"file": str(f)[:500], "error": {"code": "file_unreadable", "message": str(exc)[:300]}})
            except ValueError as exc:
                errors.append({"file": str(f)[:500], "error": {"code": "file_too_large", "message": str(exc)}})
        if files and not images:
            return {"errors": errors}
        return {"result": self._run(role, roi, action, images, params), "errors": errors}

    def _read(self, path: Path) -> bytes:
        with open(path, "rb") as fh:
            data = fh.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise ValueError(f"{path.name}: over limits.max_bytes ({self.max_bytes} bytes)")
        return data

    def _run(self, role: str, roi: str, action: str, images: list[bytes], params: dict) -> dict:
        done = threading.Event()
        box: list[Outcome] = []

        def reply(_job: Job, outcome: Outcome) -> None:  # in the worker thread
            box.append(outcome)
            done.set()
            self.intake.publish("cli", outcome.result)

        rid = str(params.pop("request_id", "") or f"cli-{uuid.uuid4().hex}")
        try:
            job = self.intake.build_job("cli", role, roi, action, images, rid, {"source": "cli", **params}, reply)
        except AnomalyError as exc:
            return error_result(Job(str(role)[:64], str(roi)[:64], action, [], rid), exc.code, exc.message)
        if not self.intake.submit(job, timeout=60):
            return error_result(job, "queue_full", "the worker queue stayed full for 60 s; retry later")
        if not done.wait(TIMEOUT_S):
            return error_result(job, "timeout", "no result within an hour; the job stays queued and runs")
        return box[0].result

    @staticmethod
    def _send(conn: socket.socket, obj: dict) -> None:
        try:
            conn.sendall((json.dumps(obj) + "\n").encode())
        except OSError:
            pass  # the CLI went away: its job still ran (or runs) and is logged


def recv_line(sock: socket.socket, limit: int | None = None) -> bytes | None:
    """One JSON line from a control connection (to its newline or the peer's close); None past `limit` bytes."""
    raw = b""
    while not raw.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        raw += chunk
        if limit is not None and len(raw) > limit:
            return None
    return raw
