"""Durable request journal and result outbox for MQTT (exactly-once answers across crashes).

journal/<seq>.json + <seq>.bin   a request as received (metadata + raw payload), written and
                                 fsynced BEFORE the broker gets its PUBACK; removed once its
                                 result is in the outbox.
outbox/<seq>.json                a message to publish; removed only after the broker's PUBACK.
answered.log                     request keys already answered (a redelivery is dropped).
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

from core.storage import atomic_write_bytes, atomic_write_json


class Spool:
    def __init__(self, root: Path, remember: int = 100_000) -> None:
        self.journal = root / "journal"
        self.outbox = root / "outbox"
        self.answered_log = root / "answered.log"
        for d in (self.journal, self.outbox):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._remember = remember
        self._answered: OrderedDict[str, None] = OrderedDict()
        if self.answered_log.exists():
            for line in self.answered_log.read_text().splitlines()[-remember:]:
                self._answered[line] = None
            self.answered_log.write_text("".join(f"{k}\n" for k in self._answered))  # compact
        existing = [int(p.stem) for d in (self.journal, self.outbox) for p in d.glob("*.json") if p.stem.isdigit()]
        self._seq = itertools.count(max(existing, default=int(time.time() * 1000)) + 1)
        self._inflight: dict[str, int] = {}
        for meta in self.journal.glob("*.json"):
            try:
                self._inflight[json.loads(meta.read_text())["key"]] = int(meta.stem)
            except (ValueError, KeyError, OSError):
                continue

    def known(self, key: str) -> bool:
        with self._lock:
            return key in self._answered or key in self._inflight

    # ---------------------------------------------------------- journal
    def record(self, key: str, meta: dict, payload: bytes) -> int:
        with self._lock:
            seq = next(self._seq)
            self._inflight[key] = seq
        atomic_write_bytes(self.journal / f"{seq:016d}.bin", payload)
        atomic_write_json(self.journal / f"{seq:016d}.json", {**meta, "key": key, "seq": seq})
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
    def answer(self, key: str | None, seq: int | None, messages: list[dict]) -> None:
        """Put result messages in the outbox, mark the request answered, drop it from the journal."""
        for msg in messages:
            self.enqueue(msg)
        if key is not None:
            with self._lock:
                with open(self.answered_log, "a") as fh:
                    fh.write(f"{key}\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                self._answered[key] = None
                while len(self._answered) > self._remember:
                    self._answered.popitem(last=False)
                self._inflight.pop(key, None)
        if seq is not None:
            self._drop_journal(seq)

    def enqueue(self, msg: dict) -> None:
        with self._lock:
            seq = next(self._seq)
        atomic_write_json(self.outbox / f"{seq:016d}.json", msg)

    def outgoing(self) -> list[Path]:
        return sorted(self.outbox.glob("*.json"))
