"""Durable request journal and result outbox for MQTT (exactly-once answers across crashes).

journal/<seq>.json + <seq>.bin   a request as received (metadata + raw payload), written and
                                 fsynced BEFORE the broker gets its PUBACK; removed once its
                                 result is in the outbox.
outbox/<seq>.json                the messages answering one request ({"key", "messages"}), written
                                 in one atomic step: this file is what makes a request answered.
                                 Removed only after the broker's PUBACK of every message in it.
answered.log                     request keys already answered (a redelivery is dropped).

A crash between writing the outbox file and appending to answered.log leaves the key only in the
outbox: start-up reads it from there, so the journal entry is not processed a second time. A crash
between a PUBLISH and the removal of its outbox file sends that message again after the restart
(QoS 1 is at-least-once): the copy is byte-identical, never a second result.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from core.ids import safe_text
from core.storage import atomic_write_bytes, atomic_write_json

KEY_MAX = 4096  # keys are request ids (<= 200) or claim paths: one escaped line each in answered.log


class Replies:
    """The last `keep` answers by request key, with the hash of the request's payload: a request repeated
    with the same id and payload is answered again from here (`replay: true`). Best effort (not fsynced):
    losing one after a power cut only turns a replay into a `duplicate_request` answer."""

    def __init__(self, root: Path, keep: int) -> None:
        self.root = root
        self.keep = keep
        root.mkdir(parents=True, exist_ok=True)
        files = sorted(root.glob("*.json"), key=lambda p: p.stat().st_mtime)
        self._files: OrderedDict[str, Path] = OrderedDict((p.stem, p) for p in files)
        self._lock = threading.Lock()
        self._prune()

    @staticmethod
    def _name(key: str) -> str:
        return hashlib.sha256(key.encode("utf-8", "backslashreplace")).hexdigest()[:40]

    def put(self, key: str, payload_sha: str, messages: list[dict]) -> None:
        if self.keep <= 0:
            return
        name = self._name(key)
        path = self.root / f"{name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "payload_sha256": payload_sha, "messages": messages}))
        os.replace(tmp, path)
        with self._lock:
            self._files.pop(name, None)
            self._files[name] = path
            self._prune()

    def get(self, key: str) -> dict | None:
        with self._lock:
            path = self._files.get(self._name(key))
        try:
            entry = json.loads(path.read_text()) if path else None
        except (OSError, ValueError):
            return None
        return entry if isinstance(entry, dict) and entry.get("key") == key else None

    def _prune(self) -> None:
        while len(self._files) > self.keep:
            _, path = self._files.popitem(last=False)
            path.unlink(missing_ok=True)


class Spool:
    def __init__(self, root: Path, remember: int = 100_000) -> None:
        self.journal = root / "journal"
        self.outbox = root / "outbox"
        self.answered_log = root / "answered.log"
        for d in (self.journal, self.outbox):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._logging: set[str] = set()  # keys whose outbox file may be written but answered.log lacks them
        self._logged_cond = threading.Condition(self._lock)
        self._remember = remember
        self._answered: OrderedDict[str, None] = OrderedDict()
        if self.answered_log.exists():
            for line in self.answered_log.read_text(errors="backslashreplace").splitlines()[-remember:]:
                self._answered[safe_text(line, KEY_MAX)] = None
        for path in self.outgoing():  # answered, but the crash came before answered.log had it
            try:
                key = read_outbox(path)[0]
            except (OSError, ValueError):
                continue  # the publisher drops an unreadable file
            if key is not None:
                self._answered[safe_text(key, KEY_MAX)] = None
        self._compact()
        existing = [int(p.stem) for d in (self.journal, self.outbox) for p in d.glob("*.json") if p.stem.isdigit()]
        self._seq = itertools.count(max(existing, default=int(time.time() * 1000)) + 1)
        self._inflight: dict[str, int] = {}
        for meta in self.journal.glob("*.json"):
            try:
                self._inflight[json.loads(meta.read_text())["key"]] = int(meta.stem)
            except (ValueError, KeyError, OSError):
                continue

    def _compact(self) -> None:
        atomic_write_bytes(self.answered_log, "".join(f"{k}\n" for k in self._answered).encode())
        self._logged = len(self._answered)

    def known(self, key: str) -> bool:
        key = safe_text(key, KEY_MAX)
        with self._lock:
            return key in self._answered or key in self._inflight

    def in_flight(self, key: str) -> bool:
        """Recorded, not answered yet."""
        key = safe_text(key, KEY_MAX)
        with self._lock:
            return key in self._inflight and key not in self._answered

    # ---------------------------------------------------------- journal
    def record(self, key: str, meta: dict, payload: bytes) -> int:
        key = safe_text(key, KEY_MAX)
        with self._lock:
            seq = next(self._seq)
            self._inflight[key] = seq
        try:
            atomic_write_bytes(self.journal / f"{seq:016d}.bin", payload)
            atomic_write_json(self.journal / f"{seq:016d}.json", {**meta, "key": key, "seq": seq})
        except OSError:  # e.g. a full disk: not recorded, so the same request may come again
            with self._lock:
                self._inflight.pop(key, None)
            self._drop_journal(seq)
            raise
        return seq

    def pending(self) -> list[tuple[dict, bytes]]:
        """Recorded requests not yet answered (oldest first); answered leftovers are cleared."""
        out = []
        for meta_path in sorted(self.journal.glob("*.json")):
            try:
                meta = json.loads(meta_path.read_text())
                payload = meta_path.with_suffix(".bin").read_bytes()
            except (ValueError, OSError):
                meta_path.unlink(missing_ok=True)
                continue
            if meta["key"] in self._answered:
                self._drop_journal(meta["seq"])
                continue
            out.append((meta, payload))
        return out

    def _drop_journal(self, seq: int) -> None:
        for suffix in (".json", ".bin"):
            (self.journal / f"{seq:016d}{suffix}").unlink(missing_ok=True)

    # ----------------------------------------------------------- outbox
    def answer(self, key: str | None, seq: int | None, messages: list[dict],
               written: Callable[[], None] | None = None) -> None:
        """Put result messages in the outbox, mark the request answered, drop it from the journal.

        written(): called as soon as the outbox file is on disk (wakes the publisher), before answered.log
        has the key; the publisher then keeps the file until it has (`wait_logged`): a crash in between
        finds the key in the outbox, so the request is not taken from the journal again."""
        key = None if key is None else safe_text(key, KEY_MAX)
        if key is not None:
            with self._lock:
                self._logging.add(key)
        try:
            if messages:
                self.enqueue(messages, key)
            if written is not None:
                written()
            if key is not None:
                self._log_answered(key)
        finally:
            if key is not None:
                with self._logged_cond:
                    self._logging.discard(key)
                    self._logged_cond.notify_all()
        if seq is not None:
            self._drop_journal(seq)

    def _log_answered(self, key: str) -> None:
        with self._lock:
            with open(self.answered_log, "a") as fh:
                fh.write(f"{key}\n")
                fh.flush()
                os.fsync(fh.fileno())
            self._answered[key] = None
            while len(self._answered) > self._remember:
                self._answered.popitem(last=False)
            self._logged += 1
            if self._logged > 2 * self._remember:  # months of uptime: keep the log at its window
                self._compact()
            self._inflight.pop(key, None)

    def wait_logged(self, key: str | None, timeout: float = 30.0) -> None:
        """Until answered.log has `key` (or its answer failed): an outbox file may go only after that."""
        if key is None:
            return
        key = safe_text(key, KEY_MAX)
        with self._logged_cond:
            self._logged_cond.wait_for(lambda: key not in self._logging, timeout)

    def answer_once(self, key: str, messages: list[dict]) -> bool:
        """answer() unless `key` was already answered (e.g. a result mirrored again after a restart)."""
        if self.known(key):
            return False
        self.answer(key, None, messages)
        return True

    def enqueue(self, messages: list[dict], key: str | None = None) -> None:
        with self._lock:
            seq = next(self._seq)
        atomic_write_json(self.outbox / f"{seq:016d}.json", {"key": key, "messages": messages})

    def outgoing(self) -> list[Path]:
        return sorted(self.outbox.glob("*.json"))


def read_outbox(path: Path) -> tuple[str | None, list[dict]]:
    """(request key, messages) of an outbox file (also the one-message files of older agents).

    Raises OSError / ValueError for a file that cannot be read.
    """
    entry = json.loads(path.read_text())
    if "messages" not in entry:  # written by an older agent: one message per file
        return None, [entry]
    return entry.get("key"), list(entry["messages"])
