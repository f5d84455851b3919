"""Watched drop folders: <inbox>/<role_id>/<roi_id>/{predict,fit_ok,send_ng}/<name>.<ext>.

A file is taken only when complete: on close-after-write or rename-into (inotify via watchdog), or
by the periodic rescan once its size and mtime have been stable for `stable_s` (catches network
shares and events lost to an inotify overflow). Names starting with '.' or ending in .part / .tmp
are never taken; `<name>.json` next to an image is its sidecar (mm_per_px, source, request_id).

Each file is claimed by an atomic rename into <data_root>/processing/..., so two agents or a
restart never take it twice; claimed files are finished first on the next start. The result goes
to <data_root>/results/<role>/<roi>/<name>.json (written before the image moves on), then the image
moves to done/ or, when it cannot be used, to rejected/ with <name>.error.json.

Every completion (a result file written for a claim) is also appended to
<data_root>/results/completions.log (one JSON line, fsynced): result files are overwritten by a second
processing of the same file, the log is not, so "exactly once" on the folder side is checked from it.

With MQTT on, the result is mirrored to the result topic after its file is written, under a key
unique to this claim: a restart that finds the result file but not the image moved on mirrors the
stored result again, and the MQTT outbox drops it if it had already taken it (one message per file).
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from core.errors import AnomalyError, InputError
from core.ids import ID_PATTERN, request_id_from, safe_text, short_request_id
from core.storage import atomic_write_bytes, atomic_write_json, read_bounded, read_json, utc_now

from .config import AgentConfig
from .jobs import Job
from .worker import Worker

log = logging.getLogger(__name__)

try:  # watchdog holds an unpaired IN_MOVED_FROM for 0.5 s, which delays every rename-into by that much
    from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper

    InotifyMoveEventGrouper.delay = 0.02  # the kernel emits both halves of a rename together
except ImportError:  # pragma: no cover - other platforms / watchdog versions
    pass

FOLDER_ACTIONS = ("predict", "fit_ok", "send_ng")
NAME_MAX_BYTES = 200  # longer names are refused: the result, heatmap and error files must fit NAME_MAX
SIDECAR_MAX_BYTES = 64 * 1024
COMPLETIONS_LOG = "completions.log"
COMPLETIONS_LOG_MAX = 32 << 20  # then rotated to completions.log.1
IGNORED_SUFFIXES = (".part", ".tmp", ".json")


def is_candidate(name: str) -> bool:
    return not name.startswith(".") and not name.lower().endswith(IGNORED_SUFFIXES)


class FolderIngest(FileSystemEventHandler):
    def __init__(self, cfg: AgentConfig, worker: Worker) -> None:
        self.cfg = cfg
        self.worker = worker
        self.inbox = cfg.inbox
        self.data_root = cfg.data_root
        self.processing = self.data_root / "processing"
        self.inbox.mkdir(parents=True, exist_ok=True)
        self._observer = Observer()
        self._stop = threading.Event()
        self._seen: dict[Path, tuple[int, float, float]] = {}  # path -> (size, mtime, first seen)
        self._lock = threading.Lock()
        self._log_lock = threading.Lock()
        self._scanner = threading.Thread(target=self._rescan_loop, name="folder-rescan", daemon=True)
        # e.g. MQTT: publish folder results too; (result, key): a repeated key is published only once
        self.mirror: Callable[[dict, str | None], None] | None = None

    # -------------------------------------------------------------- control
    def start(self) -> None:
        self._recover()
        self._observer.schedule(self, str(self.inbox), recursive=True)
        self._observer.start()
        self._scanner.start()
        self.worker.watch("folder-events", self._observer)
        self.worker.watch("folder-rescan", self._scanner)
        log.info("watching %s (rescan every %.0f s)", self.inbox, self.cfg.folder.rescan_s)

    def stop(self) -> None:
        self._stop.set()
        self._observer.stop()
        self._observer.join(timeout=5)
        self._scanner.join(timeout=5)

    # --------------------------------------------------------------- events
    def on_closed(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._take(Path(os.fsdecode(event.src_path)))

    def on_moved(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._take(Path(os.fsdecode(event.dest_path)))

    def _rescan_loop(self) -> None:
        self.scan(initial=True)
        last_cleanup = 0.0
        while not self._stop.wait(min(self.cfg.folder.rescan_s, max(0.2, self.cfg.folder.stable_s))):
            self.scan()
            if time.monotonic() - last_cleanup > 3600:
                last_cleanup = time.monotonic()
                self.cleanup_done()

    def cleanup_done(self, now: float | None = None) -> int:
        """Delete processed images in done/ older than folder.done_retention_days (None: keep)."""
        days = self.cfg.folder.done_retention_days
        if days is None:
            return 0
        cutoff = (now or time.time()) - days * 86400
        removed = 0
        for path in (self.data_root / "done").glob("*/*/*/*"):
            try:
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        if removed:
            log.info("retention: removed %d processed files older than %s days from done/", removed, days)
        return removed

    def scan(self, initial: bool = False) -> None:
        """Take files whose size and mtime have not changed for stable_s."""
        now = time.monotonic()
        present = set()
        for path in self.inbox.glob("*/*/*/*"):
            if not is_candidate(path.name) or self._kind(path) is None:
                continue
            present.add(path)
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            prev = self._seen.get(path)
            if prev and prev[0] == st.st_size and prev[1] == st.st_mtime:
                if now - prev[2] >= self.cfg.folder.stable_s:
                    self._take(path)
            else:
                self._seen[path] = (st.st_size, st.st_mtime, now)
        for gone in set(self._seen) - present:
            self._seen.pop(gone, None)

    # ---------------------------------------------------------------- claim
    def _parts(self, path: Path) -> tuple[str, str, str] | None:
        try:
            rel = path.relative_to(self.inbox)
        except ValueError:
            return None
        if len(rel.parts) != 4:
            return None
        return rel.parts[0], rel.parts[1], rel.parts[2]

    def _kind(self, path: Path) -> str | None:
        """"file": a regular file reached without a symlink; "special": a link, FIFO, device or folder
        named like an image (moved aside, never opened); None: gone, or below a symlinked folder (never
        touched: it may lead outside the data root)."""
        try:
            st = os.lstat(path)
            rel = path.relative_to(self.inbox)
        except (OSError, ValueError):
            return None
        folder = self.inbox
        for part in rel.parts[:-1]:
            folder = folder / part
            if folder.is_symlink():
                return None
        return "file" if stat.S_ISREG(st.st_mode) else "special"

    def _take(self, path: Path) -> None:
        try:
            self._take_one(path)
        except Exception:  # one file never stops intake: log it, leave it for the next scan
            log.exception("folder: could not take %s", safe_text(path, 1000))

    def _take_one(self, path: Path) -> None:
        if self._stop.is_set() or not is_candidate(path.name):
            return
        parts = self._parts(path)
        if parts is None:
            return
        role, roi, action = parts
        with self._lock:
            self._seen.pop(path, None)
            kind = self._kind(path)
            if kind is None:
                return
            if (kind == "special" or not (ID_PATTERN.match(role) and ID_PATTERN.match(roi))
                    or action not in FOLDER_ACTIONS or len(os.fsencode(path.name)) > NAME_MAX_BYTES):
                self._reject_unclaimed(path, role, roi, action, kind)
                return
            target = self.processing / role / roi / action / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(path, target)  # the claim: atomic, only one taker wins
            except FileNotFoundError:
                return
            sidecar = path.with_suffix(".json")
            if sidecar.exists():
                try:
                    os.rename(sidecar, target.with_suffix(".json"))
                except FileNotFoundError:
                    pass
        self._enqueue(target, role, roi, action)

    def _recover(self) -> None:
        """Files claimed before a crash: finish them first (a result already written is not redone)."""
        for path in sorted(self.processing.glob("*/*/*/*")):
            try:  # each leftover on its own: one that fails is logged and left, never stops the start
                if not (path.is_file() and is_candidate(path.name)):
                    continue
                role, roi, action = path.relative_to(self.processing).parts[:3]
                result = self.data_root / "results" / role / roi / f"{path.stem}.json"
                stored = read_json(result) if result.exists() else None
                if stored is not None and stored.get("claim") == str(path):
                    self._finish(path, role, roi, action, stored)  # the crash came after the result file
                    continue
                log.info("recovering claimed file %s", safe_text(path, 1000))
                self._enqueue(path, role, roi, action)
            except Exception:
                log.exception("folder: leftover %s could not be finished; left in processing/", safe_text(path, 1000))

    def _enqueue(self, claimed: Path, role: str, roi: str, action: str) -> None:
        """Read the claimed file (bounded) and its sidecar, submit the job; any failure of this one file
        becomes its error result (the file moves to rejected/), never the intake thread's end."""
        from .jobs import error_result

        meta: dict = {"source": "folder"}
        request_id = safe_text(f"folder:{role}/{roi}/{action}/{claimed.name}")
        sidecar = claimed.with_suffix(".json")
        job = Job(role, roi, action, [], request_id, meta, on_result=self._deliver, ingress="folder")
        job.meta["claim"] = str(claimed)
        try:
            if sidecar.exists():
                try:
                    side = json.loads(read_bounded(sidecar, SIDECAR_MAX_BYTES))
                    if not isinstance(side, dict):
                        raise ValueError("sidecar must be a JSON object")
                except (ValueError, RecursionError, AnomalyError) as exc:
                    raise AnomalyError(f"{safe_text(sidecar.name)}: {safe_text(exc, 300)}", "invalid_sidecar") from exc
                for key in ("mm_per_px", "source", "heatmap"):
                    if key in side:
                        meta[key] = safe_text(side[key]) if key == "source" else side[key]
                if side.get("request_id"):
                    try:
                        job.request_id = request_id_from(side["request_id"])
                    except InputError:
                        job.request_id = short_request_id(side["request_id"])
                        raise
            job.images = [read_bounded(claimed, self.cfg.limits.max_bytes)]
        except AnomalyError as exc:
            self._deliver(job, error_result(job, exc.code, exc.message))
            return
        except Exception as exc:  # noqa: BLE001 - whatever one file does, it gets an answer
            log.exception("folder: %s could not be read", safe_text(claimed.name))
            self._deliver(job, error_result(job, "unreadable_file", safe_text(f"{claimed.name}: {exc}", 300)))
            return
        self.worker.submit(job)  # blocks while the queue is full: the rest waits in the inbox

    # -------------------------------------------------------------- results
    def _deliver(self, job: Job, result: dict) -> None:
        claimed = Path(job.meta["claim"])
        out_dir = self.data_root / "results" / job.role_id / job.roi_id
        payload = {**result, "file": claimed.name, "claim": str(claimed)}
        png_b64 = (result.get("data") or {}).pop("heatmap_png_b64", None) if result["status"] == "ok" else None
        if png_b64:
            import base64

            atomic_write_bytes(out_dir / f"{claimed.stem}.heatmap.png", base64.b64decode(png_b64))
            payload["data"]["heatmap_file"] = f"{claimed.stem}.heatmap.png"
        atomic_write_json(out_dir / f"{claimed.stem}.json", payload)  # the commit point (see _recover)
        self._log_completion(job, payload)
        self._finish(claimed, job.role_id, job.roi_id, job.action, payload)

    def _log_completion(self, job: Job, payload: dict) -> None:
        """Append-only evidence of each processing (result files are overwritten; this is not)."""
        line = json.dumps({"role_id": job.role_id, "roi_id": job.roi_id, "action": job.action,
                           "file": payload["file"], "claim": payload["claim"], "request_id": job.request_id,
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

    def _finish(self, claimed: Path, role: str, roi: str, action: str, payload: dict) -> None:
        """After the result file: mirror it (once per claim), the error file, move the image on."""
        if self.mirror is not None:
            key = f"folder:{payload['claim']}@{payload.get('timestamp_utc')}"
            self.mirror({k: v for k, v in payload.items() if k != "claim"}, key)
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

    def _reject_unclaimed(self, path: Path, role: str, roi: str, action: str, kind: str = "file") -> None:
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
                          {"code": code, "message": msg, "path": safe_text(path.relative_to(self.inbox), 1000),
                           "timestamp_utc": utc_now()})
        log.warning("rejected %s: %s (%s)", safe_text(path, 1000), msg, code)
