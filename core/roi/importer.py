"""Import of a ROI archive (core/roi/archive.py makes them): everything verified before anything is used.

An archive comes from outside: it may be damaged, crafted, or simply too big. So the import

1. takes one archive at a time (a second one meanwhile is refused `busy`), checks `limits.max_rois` and
   the free space first;
2. reads `export.json` (the first member, as the exporter writes it) by its schema: the list of members
   with their SHA-256, the ids, the backbone (equal to the running one, else `backbone_mismatch`);
3. streams every further member to a staging folder under `<data_root>/tmp/`, in chunks (never a whole
   member in memory), refusing at once a member that is not listed, not a regular file, listed twice,
   bigger than its kind may be (a sample image: `limits.max_bytes`; JSON: 16 MiB; a bank:
   BANK_MAX_BYTES) or past the archive's unpacked size (`limits.import_max_mb`) or file count
   (`limits.import_max_files`), and checking each one's SHA-256 as it streams;
4. checks what the members hold: the manifest by its schema (finite threshold, counts, ids), every
   sample JSON by its schema with its image in the archive and decodable within the intake limits, no
   image without its JSON, banks that are real `.npz` files of the shape a bank has, the mask a PNG;
5. only then renames the staging folder to `models/<role>/<roi>` in one step.

Any refusal is an `InputError` with code `invalid_archive` (or `checksum_mismatch`, `too_many_rois`,
`roi_exists`, `disk_full`, `busy`) and a reason; the staging folder is removed, so nothing is left.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tarfile
import tempfile
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import cv2
import numpy as np

from core.errors import AnomalyError, BackboneMismatchError, InputError, StorageError
from core.ids import safe_text, validate_id
from core.roi.state_files import StateFileError, check_export, check_manifest, check_sample
from core.storage import KINDS, RoiStore, fsync_dir, list_rois, utc_now

log = logging.getLogger(__name__)

EXT_HEADER_MAX_BYTES = 64 << 10  # a pax or GNU long-name header: tarfile reads it whole, so it is bounded first
JSON_MAX_BYTES = 16 << 20  # export.json, manifest.json (its per-sample scores grow with the samples), sample JSON
BANK_MAX_BYTES = 256 << 20  # a coreset of 100,000 patches of 384 dims is 150 MiB
CHUNK = 1 << 20
RESERVE = 1 << 20  # free space the data root keeps after an import
_ONE_AT_A_TIME = threading.Lock()


@dataclass
class ImportLimits:
    """Bounds of one import (config `limits`): unpacked bytes and files, a sample image's bytes, ROIs."""

    max_unpacked_bytes: int = 1 << 30
    max_files: int = 20_000
    max_image_bytes: int = 64 << 20
    max_rois: int | None = None


def _refuse(message: str, code: str = "invalid_archive") -> InputError:
    return InputError(message, code=code)


def import_roi(data_root: Path, source: bytes | Path, identity: dict, branches: list[dict],
               role_id: str | None = None, roi_id: str | None = None, limits: ImportLimits | None = None,
               check_image: Callable[[bytes], object] | None = None,
               prepare: Callable[[Path, str, str], object] | None = None) -> dict:
    """Verify an archive (bytes, or a file streamed from disk) and add it as a new ROI (its own ids, or
    role_id / roi_id). check_image: decodes a sample image with the intake's limits, raising InputError.
    prepare(root, role, roi): called on the verified ROI at `root/models/role/roi` (a data root of its own)
    before it is renamed into place, e.g. to embed its samples so that its first request finds its index."""
    if not _ONE_AT_A_TIME.acquire(blocking=False):
        raise _refuse("another import is running; try again when it has finished", "busy")
    try:
        return _Import(Path(data_root), identity, branches, limits or ImportLimits(), check_image, prepare).run(
            source, role_id, roi_id)
    finally:
        _ONE_AT_A_TIME.release()


class _Import:
    def __init__(self, data_root: Path, identity: dict, branches: list[dict], limits: ImportLimits,
                 check_image: Callable[[bytes], object] | None,
                 prepare: Callable[[Path, str, str], object] | None = None) -> None:
        self.data_root, self.identity, self.branches = data_root, identity, branches
        self.limits, self.check_image, self.prepare = limits, check_image, prepare
        self.staging: Path | None = None
        self.written = 0

    def run(self, source: bytes | Path, role_id: str | None, roi_id: str | None) -> dict:
        self._check_room()
        size = len(source) if isinstance(source, bytes) else Path(source).stat().st_size
        self._check_space(size)
        tmp_root = self.data_root / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix="import-", dir=tmp_root))
        work: Path | None = None
        try:
            meta = self._unpack(source)
            role = validate_id(role_id or meta["role_id"], "role_id")
            roi = validate_id(roi_id or meta["roi_id"], "roi_id")
            manifest = self._check_contents(meta, role, roi)
            store = RoiStore(self.data_root, role, roi)
            if store.exists() or store.root.exists():
                raise _refuse(f"ROI {role}/{roi} exists on this station; import under other ids or delete it first",
                              "roi_exists")
            if self.prepare is not None:  # e.g. embed the samples: off the worker, before the ROI is visible
                work, self.staging = _prepared(self.staging, tmp_root, role, roi, self.prepare)
            self._check_room()  # again: a ROI may have been made while this one was verified
            store.root.parent.mkdir(parents=True, exist_ok=True)
            self.staging.rename(store.root)  # one step: the ROI is there whole, or not at all
            fsync_dir(store.root.parent)
            self.staging = None
        finally:
            if self.staging is not None:
                shutil.rmtree(self.staging, ignore_errors=True)
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
            try:
                tmp_root.rmdir()  # empty again: a refused import leaves nothing under the data root
            except OSError:
                pass
        counts = {k: sum(1 for n in meta["files"] if n.startswith(f"samples/{k}/") and n.endswith(".json"))
                  for k in KINDS}
        log.info("imported ROI %s/%s from %s (%d files, %d bytes unpacked)", role, roi, manifest["imported_from"],
                 len(meta["files"]) + 1, self.written)
        return {"role_id": role, "roi_id": roi, "model_version": manifest["version"], "samples": counts,
                "threshold": manifest["threshold"]["value"], "imported_from": manifest["imported_from"]}

    def _dir(self) -> Path:
        if self.staging is None:
            raise RuntimeError("the import has no staging folder (run() makes it)")
        return self.staging

    # ------------------------------------------------------------- limits
    def _check_room(self) -> None:
        cap = self.limits.max_rois
        if cap is not None and len(list_rois(self.data_root)) >= cap:
            raise _refuse(f"this station already has {cap} ROIs (limits.max_rois): the archive would be one more",
                          "too_many_rois")

    def _check_space(self, need: int) -> None:
        self.data_root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.data_root).free
        if free < need + RESERVE:
            raise StorageError(f"the data root has {free >> 10} KiB free; the archive needs about {need >> 10} KiB "
                               "more: nothing was imported", code="disk_full")

    def _member_limit(self, name: str) -> int:
        if name.endswith(".json"):
            return JSON_MAX_BYTES
        if name.endswith("bank.npz"):
            return BANK_MAX_BYTES
        return self.limits.max_image_bytes  # sample images and the mask

    # ------------------------------------------------------------- unpack
    def _unpack(self, source: bytes | Path) -> dict:
        fh: IO[bytes]
        try:
            fh = open(source, "rb") if isinstance(source, Path) else _BytesReader(source)
            # a stream: members one after another, never seeked; headers bounded before tarfile reads them
            tar = tarfile.open(fileobj=fh, mode="r|*", tarinfo=_BoundedTarInfo)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise _refuse(f"not a ROI archive (tar.gz): {safe_text(exc, 200)}") from None
        try:
            with fh, tar:
                return self._members(tar)
        except (tarfile.TarError, EOFError, zipfile.BadZipFile) as exc:
            raise _refuse(f"the archive is damaged: {safe_text(exc, 200)}") from None
        except OSError as exc:
            if exc.errno is not None:  # the data root (a full disk): the worker's storage errors
                raise
            raise _refuse(f"the archive is damaged: {safe_text(exc, 200)}") from None  # e.g. a bad gzip stream

    def _members(self, tar: tarfile.TarFile) -> dict:
        meta: dict | None = None
        seen: set[str] = set()
        for member in tar:
            name = member.name
            self.written += getattr(member, "header_bytes", tarfile.BLOCKSIZE)  # headers unpack too
            if self.written > self.limits.max_unpacked_bytes:
                raise _refuse(f"the archive unpacks to more than limits.import_max_mb "
                              f"({self.limits.max_unpacked_bytes >> 20} MiB), counting its headers")
            if not member.isfile():
                raise _refuse(f"the archive holds {safe_text(name, 120)!r}, which is not a regular file (a ROI "
                              "archive holds only files)")
            if meta is None:
                if name != "export.json":
                    raise _refuse("export.json is not the archive's first member (archives of `export` start with it)")
                meta = self._export_json(tar, member)
                continue
            listed = meta["files"]
            if name not in listed or name in seen:
                raise _refuse(f"the archive holds {safe_text(name, 120)!r}, which its export.json does not list"
                              f"{' (or lists once)' if name in seen else ''}")
            seen.add(name)
            self._stream(tar, member, listed[name])
        if meta is None:
            raise _refuse("the archive has no export.json")
        missing = sorted(set(meta["files"]) - seen)
        if missing:
            raise _refuse(f"export.json lists {len(missing)} files the archive lacks "
                          f"(e.g. {safe_text(missing[0], 120)})")
        return meta

    def _export_json(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> dict:
        if member.size > JSON_MAX_BYTES:
            raise _refuse(f"export.json is {member.size} bytes, over {JSON_MAX_BYTES >> 20} MiB")
        raw = _read(tar, member)
        try:
            meta = check_export(json.loads(raw))
        except (ValueError, UnicodeDecodeError) as exc:
            raise _refuse(f"export.json is not JSON: {safe_text(exc, 120)}") from None
        except StateFileError as exc:
            raise _refuse(exc.message) from None
        if len(meta["files"]) + 1 > self.limits.max_files:
            raise _refuse(f"the archive lists {len(meta['files']) + 1} files, over limits.import_max_files "
                          f"({self.limits.max_files})")
        if meta["backbone"] != self.identity or meta["branches"] != self.branches:
            theirs, ours = meta["backbone"], self.identity
            raise BackboneMismatchError(f"the archive was made with {safe_text(theirs.get('name'), 80)} (resolution "
                                        f"{safe_text(theirs.get('resolution'), 20)}); this ROI runs {ours.get('name')} "
                                        f"(resolution {ours.get('resolution')})")
        if "manifest.json" not in meta["files"]:
            raise _refuse("export.json does not list manifest.json")
        return meta

    def _stream(self, tar: tarfile.TarFile, member: tarfile.TarInfo, sha: str) -> None:
        name = member.name
        limit = self._member_limit(name)
        if member.size > limit:
            raise _refuse(f"{safe_text(name, 120)} is {member.size} bytes, over the {limit >> 20} MiB such a file may "
                          "have (a sample image: limits.max_bytes)")
        if self.written + member.size > self.limits.max_unpacked_bytes:
            raise _refuse(f"the archive unpacks to more than limits.import_max_mb "
                          f"({self.limits.max_unpacked_bytes >> 20} MiB)")
        if member.size + RESERVE > shutil.disk_usage(self.data_root).free:
            raise StorageError(f"the data root cannot hold {safe_text(name, 120)} ({member.size} bytes): nothing was "
                               "imported", code="disk_full")
        staging = self._dir()
        path = staging / (f"index/{name}" if name.endswith("bank.npz") else name)
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        src = tar.extractfile(member)
        if src is None:
            raise _refuse(f"{safe_text(name, 120)} cannot be read")
        with open(path, "wb") as out:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
        self.written += member.size
        if digest.hexdigest() != sha:
            raise _refuse(f"{safe_text(name, 120)}: checksum mismatch (changed after export)", "checksum_mismatch")

    # ----------------------------------------------------------- contents
    def _json(self, rel: str) -> object:
        staging = self._dir()
        try:
            return json.loads((staging / rel).read_bytes())
        except (ValueError, UnicodeDecodeError) as exc:
            raise _refuse(f"{safe_text(rel, 120)} is not JSON: {safe_text(exc, 120)}") from None

    def _check_contents(self, meta: dict, role: str, roi: str) -> dict:
        staging = self._dir()
        files = set(meta["files"])
        try:
            manifest = check_manifest(self._json("manifest.json"), "the archive's manifest.json")
        except StateFileError as exc:
            raise _refuse(exc.message) from None
        manifest.update(role_id=role, roi_id=roi, imported_utc=utc_now(), imported_from=f"{meta['role_id']}/"
                        f"{meta['roi_id']} version {meta['model_version']}")
        _write_json(staging / "manifest.json", manifest)
        images: set[str] = set()
        for name in sorted(files):
            if name.startswith("samples/") and name.endswith(".json"):
                images.add(self._check_sample(name, meta["files"], role, roi))
        for name in sorted(files):
            if name.startswith("samples/") and not name.endswith(".json") and name not in images:
                raise _refuse(f"{safe_text(name, 120)} belongs to no sample of the archive")
            if name.endswith("bank.npz"):
                self._check_bank(name)
        if "mask.png" in files:
            mask = cv2.imread(str(staging / "mask.png"), cv2.IMREAD_GRAYSCALE)
            if mask is None or not (mask > 0).any():
                raise _refuse("mask.png is not a PNG with non-zero pixels")
        return manifest

    def _check_sample(self, name: str, files: dict[str, str], role: str, roi: str) -> str:
        staging = self._dir()
        kind = name.split("/")[1]
        try:
            sample = check_sample(self._json(name), safe_text(name, 120))
        except StateFileError as exc:
            raise _refuse(exc.message) from None
        if f"{sample['sample_id']}.json" != name.rsplit("/", 1)[1]:
            raise _refuse(f"{safe_text(name, 120)}: its sample_id is not its file name")
        image = f"samples/{kind}/{sample['image_file']}"
        if image not in files or image.endswith(".json"):
            raise _refuse(f"{safe_text(name, 120)}: its image is not in the archive")
        if files[image] != sample["sha256"]:  # the listed hash, checked against the bytes while they streamed
            raise _refuse(f"{safe_text(image, 120)}: not the image its sample JSON names (sha256)")
        if self.check_image is not None:
            try:  # at most limits.max_bytes (checked while streaming)
                self.check_image((staging / image).read_bytes())
            except AnomalyError as exc:
                raise _refuse(f"{safe_text(image, 120)}: {exc.code}: {exc.message}") from None
        _write_json(staging / name, {**sample, "role_id": role, "roi_id": roi})
        return image

    def _check_bank(self, name: str) -> None:
        """A bank is an .npz of `rows` (int64 [n]) and `feats` (float32 [n, d]): read from the headers only,
        so a crafted one is never loaded into memory here."""
        staging = self._dir()
        allowed = {"bank.npz", *(f"b{i}-bank.npz" for i in range(1, len(self.branches)))}
        if name not in allowed:
            raise _refuse(f"{safe_text(name, 60)}: the running backbone has no such branch")
        try:
            with zipfile.ZipFile(staging / "index" / name) as z:
                shapes = {}
                for key in ("rows", "feats"):
                    with z.open(f"{key}.npy") as f:
                        fmt = np.lib.format
                        read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
                        shape, _, dtype = read(f)
                    shapes[key] = (shape, dtype)
        except (KeyError, ValueError, OSError, zipfile.BadZipFile) as exc:
            raise _refuse(f"{safe_text(name, 60)} is not a bank: {safe_text(exc, 120)}") from None
        (rows, rdt), (feats, fdt) = shapes["rows"], shapes["feats"]
        if not (len(rows) == 1 and len(feats) == 2 and feats[0] == rows[0] and rdt.kind == "i" and fdt.kind == "f"):
            raise _refuse(f"{safe_text(name, 60)} is not a bank: rows {rows} {rdt}, feats {feats} {fdt}")


def _prepared(staging: Path, tmp_root: Path, role: str, roi: str, prepare: Callable[[Path, str, str], object]
              ) -> tuple[Path, Path]:
    """The staged ROI moved to `<work>/models/<role>/<roi>` (a data root of its own) and prepared there."""
    work = Path(tempfile.mkdtemp(prefix="prepare-", dir=tmp_root))
    (work / "models" / role).mkdir(parents=True)
    moved = staging.rename(work / "models" / role / roi)
    prepare(work, role, roi)
    return work, moved


class _BoundedTarInfo(tarfile.TarInfo):
    """A member header that refuses an extended header (pax, GNU long name/link) over EXT_HEADER_MAX_BYTES
    before tarfile reads it into memory (it reads such a header whole: a 400 MB pax comment would be
    held, and counted nowhere), and tells how many header bytes the member took (`header_bytes`)."""

    header_bytes: int = tarfile.BLOCKSIZE

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        extended = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                    tarfile.GNUTYPE_LONGLINK)
        if self.type in extended:
            if self.size > EXT_HEADER_MAX_BYTES:
                raise _refuse(f"the archive has an extended header (pax / GNU long name) of {self.size} bytes, over "
                              f"{EXT_HEADER_MAX_BYTES >> 10} KiB: archives of `export` have none")
            start = self.offset
            member = super()._proc_member(tarfile_)  # reads the extended header, then the member's own
            member.header_bytes = member.offset_data - start
            return member
        return super()._proc_member(tarfile_)


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    fh = tar.extractfile(member)
    return fh.read(member.size) if fh is not None else b""


class _BytesReader:
    """A read-only stream over bytes (tarfile's stream mode wants read() and close() only)."""

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n is None or n < 0 else min(len(self._view), self._pos + n)
        out = bytes(self._view[self._pos : end])
        self._pos = end
        return out

    def close(self) -> None:
        self._view.release()

    def __enter__(self) -> _BytesReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
