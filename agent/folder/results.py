"""Folder results: <data_root>/results/<role>/<roi>/<name>.json (+ .heatmap.png), the append-only
completions.log, the error file in rejected/, and the image moved to done/ or rejected/."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path

from agent.intake import Intake
from agent.jobs import Job, Outcome
from core.ids import safe_text
from core.storage import atomic_write_bytes, atomic_write_json, utc_now

log = logging.getLogger(__name__)

FOLDER_ACTIONS = ("predict", "fit_ok", "send_ng")
NAME_MAX_BYTES = 200  # longer names are refused: the result, heatmap and error files must fit NAME_MAX
COMPLETIONS_LOG = "completions.log"
COMPLETIONS_LOG_MAX = 32 << 20  # then rotated to completions.log.1


class FolderResults:
    def __init__(self, data_root: Path, intake: Intake) -> None:
        self.data_root = data_root
        self.intake = intake
        self._log_lock = threading.Lock()

    def deliver(self, job: Job, outcome: Outcome) -> None:
        """A job's outcome: the result file (with the heatmap as a file next to it), then the rest."""
        claimed = job.origin
        if not isinstance(claimed, Path):
            raise TypeError("a folder job carries its claimed path as origin")
        out_dir = self.data_root / "results" / job.role_id / job.roi_id
        payload = {**outcome.result, "file": claimed.name, "claim": str(claimed)}
        if outcome.heatmap_png is not None and outcome.send_heatmap and "data" in payload:
            atomic_write_bytes(out_dir / f"{claimed.stem}.heatmap.png", outcome.heatmap_png)
            payload["data"] = {**payload["data"], "heatmap_file": f"{claimed.stem}.heatmap.png"}
        atomic_write_json(out_dir / f"{claimed.stem}.json", payload)  # the commit point (see FolderIngest._recover)
        self._log_completion(job.role_id, job.roi_id, job.action, payload)
        self.finish(claimed, job.role_id, job.roi_id, job.action, payload)

    def _log_completion(self, role: str, roi: str, action: str, payload: dict) -> None:
        """Append-only evidence of each processing (result files are overwritten; this is not)."""
        line = json.dumps({"role_id": role, "roi_id": roi, "action": action,
                           "file": payload["file"], "claim": payload["claim"], "request_id": payload.get("request_id"),
                           "status": payload.get("status"), "timestamp_utc": payload.get("timestamp_utc")},
                          ensure_ascii=True) + "\n"
        path = self.data_root / "results" / COMPLETIONS_LOG
        with self._log_lock:
            if path.exists() and path.stat().st_size > COMPLETIONS_LOG_MAX:
                os.replace(path, path.with_suffix(".log.1"))  # one generation kept: bounded on disk
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)

    def recovered(self, claimed: Path, role: str, roi: str, action: str, payload: dict) -> None:
        """A kill came after the result file: its completion line is written now if the kill also came
        before that line (found by CI: a kill between the two left a processing with no line)."""
        path = self.data_root / "results" / COMPLETIONS_LOG
        mark = json.dumps({"claim": payload["claim"]}, ensure_ascii=True)[1:-1]
        stamp = json.dumps({"timestamp_utc": payload.get("timestamp_utc")}, ensure_ascii=True)[1:-1]
        with self._log_lock:
            lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        if not any(mark in line and stamp in line for line in lines):
            self._log_completion(role, roi, action, payload)
        self.finish(claimed, role, roi, action, payload)

    def finish(self, claimed: Path, role: str, roi: str, action: str, payload: dict) -> None:
        """After the result file: mirror it (once per claim), the error file, move the image on."""
        key = f"folder:{payload['claim']}@{payload.get('timestamp_utc')}"
        self.intake.publish("folder", {k: v for k, v in payload.items() if k != "claim"}, key)
        ok = payload.get("status") == "ok"
        if not ok:
            err_dir = self.data_root / "rejected" / role / roi / action
            atomic_write_json(err_dir / f"{claimed.stem}.error.json", {**(payload.get("error") or {}),
                                                                        "file": claimed.name,
                                                                        "timestamp_utc": utc_now()})
        self._move_on(claimed, role, roi, action, ok=ok)

    def _move_on(self, claimed: Path, role: str, roi: str, action: str, ok: bool) -> None:
        target_dir = self.data_root / ("done" if ok else "rejected") / role / roi / action
        target_dir.mkdir(parents=True, exist_ok=True)
        for src in (claimed, claimed.with_suffix(".json")):
            if src.exists():
                dst = target_dir / src.name
                if dst.exists():
                    dst = target_dir / f"{src.stem}.{int(time.time() * 1000)}{src.suffix}"
                os.replace(src, dst)

    def reject_unclaimed(self, path: Path, inbox: Path, role: str, roi: str, action: str, kind: str = "file") -> None:
        """Bad ids, an unknown action folder, a name too long, or not a regular file: moved aside (the
        link or FIFO itself, never what it points to) with the reason; ids never become paths."""
        target_dir = self.data_root / "rejected" / "_invalid"
        target_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        # unique: the same file name may be rejected from several bad folders within one second; short
        # enough that it and its .error.json fit NAME_MAX
        short = os.fsdecode(os.fsencode(path.name)[:120])
        dst = target_dir / f"{stamp}_{uuid.uuid4().hex[:8]}_{short}"
        os.replace(path, dst)
        if kind == "special":
            code, msg = "not_a_regular_file", "only regular files are taken (not links, FIFOs, devices or folders)"
        elif len(os.fsencode(path.name)) > NAME_MAX_BYTES:
            code, msg = "name_too_long", f"file names are limited to {NAME_MAX_BYTES} bytes"
        elif action not in FOLDER_ACTIONS:
            code, msg = "unknown_action", f"folder action {action!r} is not one of {', '.join(FOLDER_ACTIONS)}"
        else:
            code, msg = "invalid_id", f"role/roi folder {role!r}/{roi!r} is not a valid id ([A-Za-z0-9_.-]{{1,64}})"
        atomic_write_json(dst.with_name(dst.name + ".error.json"),
                          {"code": code, "message": msg, "path": safe_text(path.relative_to(inbox), 1000),
                           "timestamp_utc": utc_now()})
        log.warning("rejected %s: %s (%s)", safe_text(path, 1000), msg, code)
