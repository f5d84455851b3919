"""On-disk layout of one ROI model under the data root, with atomic writes.

<data_root>/models/<role_id>/<roi_id>/
    manifest.json                      version, backbone, settings, threshold, counts
    mask.png                           optional ROI mask (non-zero = inspected)
    samples/{ok,ng}/<id>.<ext>         every fit_ok / send_ng image exactly as received
    samples/{ok,ng}/<id>.json          role_id, roi_id, mm_per_px, timestamp_utc, source, sha256, ...
    index/{ok,ng}.f32 + {ok,ng}.json   embedding index: raw patch features appended per sample
    index/bank.npz                     the coreset: global row numbers into ok.f32

Every JSON / npz file is written to a temp file, fsynced and renamed. The embedding files are
append-only; their JSON (written after the append) says how many rows are valid, so a crash in
the middle of an append only leaves ignored bytes at the end.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import stat
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from core.errors import InputError
from core.ids import ID_PATTERN, safe_join, safe_text, validate_id
from core.roi.state_files import StateFileError, check_index, check_manifest, check_sample

log = logging.getLogger(__name__)

KINDS = ("ok", "ng")
EXT_BY_FORMAT = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp", "TIFF": "tif"}


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temp name must fit NAME_MAX (255 bytes) whatever the final name's length
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:64]}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def read_bounded(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file, opened without following a symlink and checked against max_bytes
    before anything is read (a sparse 3 GB file, /dev/zero behind a link or a FIFO never get read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{path.name}: a symbolic link, not a file", code="not_a_regular_file") from exc
        raise
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{path.name}: not a regular file", code="not_a_regular_file")
        if st.st_size > max_bytes:
            raise InputError(f"{path.name}: {st.st_size} bytes, over limits.max_bytes ({max_bytes})",
                             code="file_too_large")
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while being read
        raise InputError(f"{path.name}: over limits.max_bytes ({max_bytes})", code="file_too_large")
    return data


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def read_json(path: Path) -> dict | None:
    """The JSON object in a file; None when the file is missing or unreadable (logged: corrupt)."""
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        log.warning("corrupt file %s (%s): ignored, rebuilt from what else is stored", path, exc)
        return None
    if not isinstance(obj, dict):
        log.warning("corrupt file %s (not a JSON object): ignored", path)
        return None
    return obj


@dataclass
class SampleRecord:
    sample_id: str
    kind: str
    image_path: Path
    meta: dict


LAZY_RESERVE_MAX = 8 << 30  # reserve a memory_fit copy's whole bound up front when it is at most this


class EmbeddingStore:
    """Append-only float32 rows [n, dim] with a JSON of sample entries (offset, count, grid, sizes)."""

    def __init__(self, directory: Path, kind: str) -> None:
        self.data_path = directory / f"{kind}.f32"
        self.meta_path = directory / f"{kind}.json"
        self.meta = index_meta(self.meta_path) or {"identity": None, "dim": 0, "rows": 0, "entries": []}
        have = self.data_path.stat().st_size if self.data_path.exists() else 0
        if have < self.rows * int(self.meta.get("dim") or 0) * 4:  # rows missing from the data file
            log.warning("%s holds %d bytes, fewer than its %d rows need: rebuilt", self.data_path, have, self.rows)
            self.meta = {"identity": None, "dim": 0, "rows": 0, "entries": []}
        self._ram: np.ndarray | None = None
        self._ram_rows = 0
        self._ram_cap = 1 << 62  # rows the RAM copy may hold (memory_fit_max_mb), set by array()
        self._over_bound_logged = False

    @property
    def rows(self) -> int:
        return int(self.meta["rows"])

    @property
    def entries(self) -> list[dict]:
        return self.meta["entries"]

    def reset(self, identity: dict, dim: int) -> None:
        self.data_path.parent.mkdir(parents=True, exist_ok=True)
        self.data_path.write_bytes(b"")
        self.meta = {"identity": identity, "dim": dim, "rows": 0, "entries": []}
        atomic_write_json(self.meta_path, self.meta)
        self._ram = None

    def append(self, items: list[tuple[dict, np.ndarray]]) -> None:
        """items: (entry without offset/count, features [n_i, dim]) -> appended and committed."""
        rows = self.rows
        with open(self.data_path, "r+b" if self.data_path.exists() else "wb") as fh:
            fh.truncate(rows * self.meta["dim"] * 4)  # drop bytes of an append that never committed
            fh.seek(0, os.SEEK_END)
            new_entries = []
            for entry, feats in items:
                arr = np.ascontiguousarray(feats, dtype=np.float32)
                fh.write(arr.tobytes())
                new_entries.append({**entry, "offset": rows, "count": int(arr.shape[0])})
                rows += arr.shape[0]
            fh.flush()
            os.fsync(fh.fileno())
        self.meta["entries"].extend(new_entries)
        self.meta["rows"] = rows
        atomic_write_json(self.meta_path, self.meta)
        if self._ram is not None and rows > self._ram_cap:  # over the RAM bound: memory-mapped from now on
            self._drop_ram()
        if self._ram is not None:  # keep the RAM copy in step instead of reloading it
            if rows > self._ram.shape[0]:  # only when the bound is too large to reserve up front
                grown = self._allocate(rows, self.meta["dim"])
                grown[: self._ram_rows] = self._ram[: self._ram_rows]
                self._ram = grown
            for entry, (_, feats) in zip(new_entries, items, strict=True):
                self._ram[entry["offset"] : entry["offset"] + entry["count"]] = feats
            self._ram_rows = rows

    def array(self, in_ram: bool, ram_max_mb: float = float("inf")) -> np.ndarray:
        """All valid rows: a RAM copy (memory_fit, while it fits in ram_max_mb) or a read-only memory map
        (pages read on demand and left to the page cache, which the kernel can reclaim)."""
        dim, rows = self.meta["dim"], self.rows
        if rows == 0:
            return np.zeros((0, dim), np.float32)
        mm = np.memmap(self.data_path, dtype=np.float32, mode="r", shape=(rows, dim))
        self._ram_cap = int(ram_max_mb * 2**20 // (4 * dim)) if math.isfinite(ram_max_mb) else 1 << 62
        if in_ram and rows > self._ram_cap:
            if not self._over_bound_logged:
                log.warning("%s: %d MB of embeddings exceed memory_fit_max_mb (%g MB): memory-mapped instead of "
                            "held in RAM", self.data_path, rows * dim * 4 >> 20, ram_max_mb)
                self._over_bound_logged = True
            self._drop_ram()
            return mm
        if not in_ram:
            return mm
        if self._ram is None or self._ram_rows != rows:
            self._ram = self._allocate(rows, dim)
            self._ram[:rows] = mm
            self._ram_rows = rows
        return self._ram[:rows]

    def keep(self, ids: set[str]) -> list[str]:
        """Drop the rows of every sample not in `ids` (a deleted or relabelled sample), order kept; returns
        the dropped sample ids. The data file is rewritten beside and renamed, then the JSON: a crash in
        between leaves a JSON whose rows the file lacks, which the next start rebuilds from the samples."""
        dropped = [e["sample_id"] for e in self.entries if e["sample_id"] not in ids]
        if not dropped:
            return []
        dim, kept, rows = int(self.meta["dim"]), [], 0
        mm = np.memmap(self.data_path, dtype=np.float32, mode="r", shape=(self.rows, dim)) if self.rows else None
        tmp = self.data_path.with_name(f".{self.data_path.name}.keep.tmp")
        with open(tmp, "wb") as fh:
            for e in self.entries:
                if e["sample_id"] in ids and mm is not None:
                    fh.write(np.ascontiguousarray(mm[e["offset"] : e["offset"] + e["count"]]).tobytes())
                    kept.append({**e, "offset": rows})
                    rows += e["count"]
            fh.flush()
            os.fsync(fh.fileno())
        del mm
        os.replace(tmp, self.data_path)
        fsync_dir(self.data_path.parent)
        self.meta = {**self.meta, "rows": rows, "entries": kept}
        atomic_write_json(self.meta_path, self.meta)
        self._drop_ram()
        return dropped

    def _allocate(self, rows: int, dim: int) -> np.ndarray:
        """Room for the RAM copy. With a bound up to LAZY_RESERVE_MAX, the whole bound at once: a large
        np.empty is an anonymous mapping whose pages only count once written, so the copy then never
        moves (no old + new arrays side by side while it grows); otherwise room for twice the rows."""
        cap_bytes = self._ram_cap * dim * 4
        if cap_bytes <= LAZY_RESERVE_MAX:
            return np.empty((self._ram_cap, dim), np.float32)
        return np.empty((min(2 * rows, self._ram_cap), dim), np.float32)

    def _drop_ram(self) -> None:
        self._ram = None
        self._ram_rows = 0


class RoiStore:
    """Files of one (role_id, roi_id); ids are validated and cannot escape the data root."""

    def __init__(self, data_root: Path, role_id: str, roi_id: str) -> None:
        self.role_id = validate_id(role_id, "role_id")
        self.roi_id = validate_id(roi_id, "roi_id")
        self.root = safe_join(Path(data_root), "models", self.role_id, self.roi_id)
        self.index_dir = self.root / "index"
        self.manifest_path = self.root / "manifest.json"
        self.mask_path = self.root / "mask.png"

    def exists(self) -> bool:
        """A model on disk: its manifest, or stored OK samples to rebuild it from (a lost manifest.json)."""
        if self.manifest_path.exists():
            return True
        ok = self.samples_dir("ok")
        return ok.is_dir() and any(p.suffix == ".json" for p in ok.iterdir())

    def samples_dir(self, kind: str) -> Path:
        return self.root / "samples" / kind

    def embeddings(self, kind: str) -> EmbeddingStore:
        return EmbeddingStore(self.index_dir, kind)

    def save_sample(self, kind: str, data: bytes, fmt: str, meta: dict, sha: str | None = None) -> SampleRecord:
        """Store image bytes as received + metadata JSON; returns the record (id = time + sha prefix)."""
        sha = sha or hashlib.sha256(data).hexdigest()
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        sample_id = f"{stamp}_{sha[:12]}"
        directory = self.samples_dir(kind)
        image_path = directory / f"{sample_id}.{EXT_BY_FORMAT.get(fmt, 'img')}"
        atomic_write_bytes(image_path, data)
        full_meta = {"role_id": self.role_id, "roi_id": self.roi_id, "sample_id": sample_id, "kind": kind,
                     "sha256": sha, "image_file": image_path.name, "timestamp_utc": utc_now(), **meta}
        atomic_write_json(directory / f"{sample_id}.json", full_meta)
        return SampleRecord(sample_id, kind, image_path, full_meta)

    def list_samples(self, kind: str) -> list[SampleRecord]:
        """Samples whose JSON and image both exist, oldest first."""
        out = []
        directory = self.samples_dir(kind)
        if not directory.exists():
            return out
        for meta_path in sorted(directory.glob("*.json")):
            meta = sample_meta(meta_path)
            if meta is None:
                continue
            image_path = directory / meta["image_file"]
            if image_path.is_file():
                out.append(SampleRecord(meta_path.stem, kind, image_path, meta))
        return out

    def unreadable_samples(self, kind: str) -> list[Path]:
        """Sample JSONs that cannot be read (corrupt) or whose image is gone."""
        directory = self.samples_dir(kind)
        bad = []
        for meta_path in sorted(directory.glob("*.json")) if directory.exists() else []:
            meta = sample_meta(meta_path)
            if meta is None or not (directory / meta["image_file"]).is_file():
                bad.append(meta_path)
        return bad

    def quarantine_file(self, path: Path, reason: str) -> Path:
        """Move one state file of this ROI (manifest.json, pending.json...) to quarantine/files/ with the reason:
        never deleted, never read again by the agent."""
        target = self.root / "quarantine" / "files"
        target.mkdir(parents=True, exist_ok=True)
        stamp = utc_now().replace(":", "").replace("-", "")
        dst = target / f"{path.name}-{stamp}"
        os.replace(path, dst)
        atomic_write_json(target / f"{dst.name}.reason.json", {"file": path.name, "reason": reason,
                                                               "timestamp_utc": utc_now()})
        fsync_dir(self.root)
        log.error("%s/%s: %s quarantined to %s: %s", self.role_id, self.roi_id, path.name, dst, reason)
        return dst

    def quarantine(self, kind: str, sample_id: str, reason: str) -> Path:
        """Move a sample's files aside (never deleted) to quarantine/<kind>/ with the reason."""
        target = self.root / "quarantine" / kind
        target.mkdir(parents=True, exist_ok=True)
        for path in self.samples_dir(kind).glob(f"{sample_id}.*"):
            os.replace(path, target / path.name)
        atomic_write_json(target / f"{sample_id}.reason.json", {"sample_id": sample_id, "reason": reason,
                                                                "timestamp_utc": utc_now()})
        log.warning("%s/%s: %s sample %s quarantined (%s)", self.role_id, self.roi_id, kind, sample_id, reason)
        return target

    def trash(self, kind: str, sample_id: str, reason: str) -> bool:
        """Move a sample's files to trash/<kind>/ with the reason (a delete, a relabel, a rollback): never
        destroyed, restorable by `untrash`. The JSON goes first, so a half-moved sample is no longer listed.
        False when the sample is not stored (already moved)."""
        src = self.samples_dir(kind)
        target = self.root / "trash" / kind
        meta = sample_meta(src / f"{sample_id}.json")
        if meta is None:  # not stored; a crash between the two renames left its image behind: moved now
            moved = sample_meta(target / f"{sample_id}.json")
            if moved is not None and (src / moved["image_file"]).is_file():
                os.replace(src / moved["image_file"], target / moved["image_file"])
            return False
        target.mkdir(parents=True, exist_ok=True)
        atomic_write_json(target / f"{sample_id}.reason.json", {"sample_id": sample_id, "kind": kind,
                                                                "reason": reason, "timestamp_utc": utc_now()})
        os.replace(src / f"{sample_id}.json", target / f"{sample_id}.json")
        image = meta["image_file"]
        if (src / image).is_file():
            os.replace(src / image, target / image)
        fsync_dir(target)
        fsync_dir(src)
        log.warning("%s/%s: %s sample %s moved to trash (%s)", self.role_id, self.roi_id, kind, sample_id, reason)
        return True

    def untrash(self, kind: str, sample_id: str) -> bool:
        """Bring a trashed sample back (image first, then its JSON, which makes it listed again)."""
        src = self.root / "trash" / kind
        meta = sample_meta(src / f"{sample_id}.json")
        if meta is None:
            return (self.samples_dir(kind) / f"{sample_id}.json").exists()
        image = meta["image_file"]
        dst = self.samples_dir(kind)
        if (src / image).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            os.replace(src / image, dst / image)
        elif not (dst / image).is_file():  # (already back: a crash between the two renames, redone now)
            return False
        os.replace(src / f"{sample_id}.json", dst / f"{sample_id}.json")
        (src / f"{sample_id}.reason.json").unlink(missing_ok=True)
        fsync_dir(dst)
        return True

    def sample_file(self, kind: str, sample_id: str, in_trash: bool = False) -> tuple[dict, Path] | None:
        """(metadata, image path) of a stored (or trashed) sample, None when there is none."""
        directory = self.root / "trash" / kind if in_trash else self.samples_dir(kind)
        meta = sample_meta(directory / f"{validate_id(sample_id, 'sample_id')}.json")
        if meta is None:
            return None
        image = directory / meta["image_file"]
        return (meta, image) if image.is_file() and image.parent == directory else None

    def find_sample(self, sample_id: str, kinds: tuple[str, ...] = KINDS) -> tuple[dict, Path] | None:
        """(metadata, image path) of a sample of any of `kinds`, stored or in the trash."""
        for kind in kinds:
            for in_trash in (False, True):
                got = self.sample_file(kind, sample_id, in_trash)
                if got is not None:
                    return got
        return None

    def known_hashes(self, kind: str) -> dict[str, str]:
        return {s.meta.get("sha256", ""): s.sample_id for s in self.list_samples(kind)}

    def read_manifest(self) -> dict | None:
        """The manifest when it passes its schema (core/roi/state_files.py); None when there is none or it cannot
        be used, and then `manifest_error` says why (None: there is no manifest.json)."""
        self.manifest_error: str | None = None
        raw = read_json(self.manifest_path)
        if raw is None:
            if self.manifest_path.exists():
                self.manifest_error = "manifest.json is not a readable JSON object"
            return None
        try:
            return check_manifest(raw)
        except StateFileError as exc:
            self.manifest_error = exc.message
            return None

    def write_manifest(self, manifest: dict) -> None:
        atomic_write_json(self.manifest_path, manifest)

    def load_mask(self) -> tuple[np.ndarray | None, str | None]:
        """(mask, None), (None, None) when there is none, or (None, reason) when the file was unusable:
        then it is moved to quarantine/mask/ with the reason (never deleted) and the ROI has no mask."""
        if not self.mask_path.exists():
            return None, None
        mask, reason = read_mask(self.mask_path)
        if reason is None:
            return mask, None
        target = self.root / "quarantine" / "mask"
        target.mkdir(parents=True, exist_ok=True)
        stamp = utc_now().replace(":", "").replace("-", "")
        os.replace(self.mask_path, target / f"mask-{stamp}.png")
        atomic_write_json(target / f"mask-{stamp}.reason.json", {"reason": reason, "timestamp_utc": utc_now()})
        log.warning("%s/%s: %s: moved to %s; the ROI is scored over the whole image until a mask is set again",
                    self.role_id, self.roi_id, reason, target)
        return None, f"{reason} (quarantined {utc_now()}); scored over the whole image until a mask is set again"

    def save_mask(self, png: bytes) -> None:
        atomic_write_bytes(self.mask_path, png)


def read_mask(path: Path) -> tuple[np.ndarray | None, str | None]:
    """(mask as bool, None) of a mask file, or (None, why it cannot be used)."""
    try:
        mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    except cv2.error:
        mask = None
    if mask is not None and (mask > 0).any():
        return mask > 0, None
    return None, "mask.png cannot be decoded" if mask is None else "mask.png has no non-zero pixel"


def sample_meta(path: Path) -> dict | None:
    """A sample's JSON when it passes its schema (ids, a plain image file name, sha256), else None (logged)."""
    meta = read_json(path)
    if meta is None:
        return None
    try:
        return check_sample(meta, f"sample JSON {path.name}")
    except StateFileError as exc:
        log.warning("%s: %s", safe_text(path, 300), exc.message)
        return None


def index_meta(path: Path) -> dict | None:
    """An embedding index's JSON when it passes its schema, else None: the index is rebuilt from the samples."""
    meta = read_json(path)
    if meta is None:
        return None
    try:
        return check_index(meta, path.name)
    except StateFileError as exc:
        log.warning("%s: %s: rebuilt from the samples", safe_text(path, 300), exc.message)
        return None


def _is_id(name: str) -> bool:
    return bool(ID_PATTERN.match(name)) and not name.startswith(".")


def list_rois(data_root: Path) -> list[tuple[str, str]]:
    """(role_id, roi_id) of every folder with a manifest.json; folders whose names are not valid ids (made
    by hand: never by the agent) are left out with a warning, never opened."""
    base = Path(data_root) / "models"
    if not base.exists():
        return []
    out = []
    for m in base.glob("*/*/manifest.json"):
        role, roi = m.parent.parent.name, m.parent.name
        if _is_id(role) and _is_id(roi):
            out.append((role, roi))
        else:
            log.warning("models/%s/%s: not valid ids: ignored", safe_text(role, 80), safe_text(roi, 80))
    return sorted(out)
