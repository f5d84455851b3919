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
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from agent.config import AgentConfig
from agent.folder.results import FOLDER_ACTIONS, NAME_MAX_BYTES, FolderResults
from agent.intake import Intake
from agent.jobs import Outcome
from agent.process.backoff import Backoff
from core.errors import AnomalyError
from core.ids import ID_PATTERN, safe_text, short_request_id
from core.storage import read_bounded, read_json

log = logging.getLogger(__name__)

try:  # watchdog holds an unpaired IN_MOVED_FROM for 0.5 s, which delays every rename-into by that much
    from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper

    InotifyMoveEventGrouper.delay = 0.02  # the kernel emits both halves of a rename together
except ImportError:  # pragma: no cover - other platforms / watchdog versions
    pass

SIDECAR_MAX_BYTES = 64 * 1024
IGNORED_SUFFIXES = (".part", ".tmp", ".json")


def is_candidate(name: str) -> bool:
    return not name.startswith(".") and not name.lower().endswith(IGNORED_SUFFIXES)


class FolderIngest(FileSystemEventHandler):
    name = "folder"

    def __init__(self, cfg: AgentConfig, intake: Intake) -> None:
        self.cfg = cfg
        self.intake = intake
        self.worker = intake.worker
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
        self.results = FolderResults(cfg.data_root, intake)

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

    def close(self) -> None:
        """Nothing left to flush: every result file is written before its image moves on."""

    # --------------------------------------------------------------- events
    def on_closed(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._take(Path(os.fsdecode(event.src_path)))

    def on_moved(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._take(Path(os.fsdecode(event.dest_path)))

    def _rescan_loop(self) -> None:
        """Scan, clean up, wait, again; a failing step (out of descriptors, a disk error) backs off and
        is tried again: the thread never ends before the agent stops."""
        backoff = Backoff("folder-rescan")
        initial, last_cleanup, delay = True, 0.0, 0.0
        interval = min(self.cfg.folder.rescan_s, max(0.2, self.cfg.folder.stable_s))
        while not self._stop.wait(delay):
            try:
                self.scan(initial=initial)
                initial = False
                if time.monotonic() - last_cleanup > 3600:
                    last_cleanup = time.monotonic()
                    self.cleanup_done()
                backoff.ok()
                delay = interval
            except OSError as exc:
                delay = backoff.failed(exc)

    def cleanup_done(self, now: float | None = None) -> int:
        """Delete processed images in done/ older than folder.done_retention_days, and refused ones (with
        their .error.json) in rejected/ older than folder.rejected_retention_days (None: keep)."""
        f = self.cfg.folder
        removed = 0
        for folder, days, pattern in (("done", f.done_retention_days, "*/*/*/*"),
                                      ("rejected", f.rejected_retention_days, "*/*/*/*"),
                                      ("rejected", f.rejected_retention_days, "_invalid/*")):
            if days is None:
                continue
            cutoff = (now or time.time()) - days * 86400
            gone = 0
            for path in (self.data_root / folder).glob(pattern):
                try:
                    st = path.lstat()  # a link or FIFO moved aside is removed itself, never what it points to
                    if not stat.S_ISDIR(st.st_mode) and st.st_mtime < cutoff:
                        path.unlink()
                        gone += 1
                except FileNotFoundError:
                    continue
            if gone:
                log.info("retention: removed %d files older than %s days from %s/", gone, days, folder)
            removed += gone
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
                self.results.reject_unclaimed(path, self.inbox, role, roi, action, kind)
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
                    self.results.recovered(path, role, roi, action, stored)  # the crash came after the result file
                    continue
                log.info("recovering claimed file %s", safe_text(path, 1000))
                self._enqueue(path, role, roi, action)
            except Exception:
                log.exception("folder: leftover %s could not be finished; left in processing/", safe_text(path, 1000))

    def _enqueue(self, claimed: Path, role: str, roi: str, action: str) -> None:
        """Read the claimed file (bounded) and its sidecar, submit the job; any failure of this one file
        becomes its error result (the file moves to rejected/), never the intake thread's end."""
        default_id = safe_text(f"folder:{role}/{roi}/{action}/{claimed.name}")
        stub = self.intake.stub("folder", role, roi, action, default_id, "folder", self.results.deliver, claimed)
        sidecar = claimed.with_suffix(".json")
        try:
            raw: dict = {"source": "folder", "file_name": claimed.name}
            rid = None
            if sidecar.exists():
                try:
                    side = json.loads(read_bounded(sidecar, SIDECAR_MAX_BYTES))
                    if not isinstance(side, dict):
                        raise ValueError("sidecar must be a JSON object")
                except (ValueError, RecursionError, AnomalyError) as exc:
                    raise AnomalyError(f"{safe_text(sidecar.name)}: {safe_text(exc, 300)}", "invalid_sidecar") from exc
                raw.update({k: side[k] for k in ("mm_per_px", "source", "heatmap") if k in side})
                rid = side.get("request_id") or None
                stub.request_id = short_request_id(rid) if rid else default_id
            job = self.intake.build_job("folder", role, roi, action, [], rid, raw, self.results.deliver, claimed,
                                        FOLDER_ACTIONS, default_id)
            job.images = [read_bounded(claimed, self.cfg.limits.max_bytes)]
        except AnomalyError as exc:
            self.results.deliver(stub, Outcome(self.intake.refuse(stub, exc.code, exc.message)))
            return
        except Exception as exc:  # noqa: BLE001 - whatever one file does, it gets an answer
            log.exception("folder: %s could not be read", safe_text(claimed.name))
            self.results.deliver(stub, Outcome(self.intake.refuse(stub, "unreadable_file",
                                                                  safe_text(f"{claimed.name}: {exc}", 300))))
            return
        self.intake.submit(job)  # blocks while the queue is full: the rest waits in the inbox

