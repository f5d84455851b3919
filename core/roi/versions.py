"""The last versions of a ROI's model, kept so that a bad change can be rolled back.

Every change of a ROI's model (fit, NG samples, calibrate, mask, delete, rollback) writes a new manifest
version; right after it this module keeps a snapshot of that version under `versions/<version>/`:

    manifest.json    the manifest as written (threshold, settings, counts, scores)
    samples.json     the sample ids of each kind the version was built from
    bank.npz, b1-bank.npz, ...   the coreset banks (hard links: bank files are only ever replaced whole)
    mask.png         the mask in force, if any

A snapshot is written to a hidden directory and renamed into place, so a kill leaves it whole or absent.
Only the newest `keep` snapshots stay (bounded disk); sample files are never copied (a rollback takes
them back from the trash, core/roi/lifecycle.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from core.roi.state_files import StateFileError, check_manifest, check_pending, check_version_samples
from core.storage import RoiStore, atomic_write_json, fsync_dir, read_json

log = logging.getLogger(__name__)


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


class RoiVersions:
    def __init__(self, store: RoiStore, keep: int = 10) -> None:
        self.store = store
        self.dir = store.root / "versions"
        self.keep = max(1, keep)

    def snapshot(self, manifest: dict, banks: list[Path], samples: dict[str, list[str]]) -> None:
        version = int(manifest["version"])
        final = self.dir / f"{version:08d}"
        tmp = self.dir / f".tmp-{version:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        (tmp / "samples.json").write_text(json.dumps(samples))
        for bank in banks:
            if bank.exists():
                link_or_copy(bank, tmp / bank.name)
        if self.store.mask_path.exists():
            link_or_copy(self.store.mask_path, tmp / "mask.png")
        for path in tmp.iterdir():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)  # the same version again: a redone operation after a kill
        os.replace(tmp, final)
        fsync_dir(self.dir)
        self.prune()

    def prune(self) -> None:
        """Keep the last `keep` versions, and the last version before each change of kind (the model before a
        calibration, before a delete, before the next fits...; the `keep` most recent of those): ten NG drops
        do not push the model they changed out of reach of a rollback."""
        versions = self.versions()
        keep = set(versions[-self.keep :]) | set(self.pinned(versions))
        for old in versions:
            if old not in keep:
                shutil.rmtree(self.dir / f"{old:08d}", ignore_errors=True)

    def pinned(self, versions: list[int] | None = None) -> list[int]:
        """The kept versions whose successor was another kind of change (at most `keep`, the most recent)."""
        versions = self.versions() if versions is None else versions
        kinds = {v: self._change(v) for v in versions}
        return [a for a, b in zip(versions, versions[1:], strict=False) if kinds[a] != kinds[b]][-self.keep :]

    def _change(self, version: int) -> str | None:
        """A kept version's cause (fit_ok, send_ng, calibrate, delete...) from its manifest; None unreadable."""
        m = read_json(self.dir / f"{version:08d}" / "manifest.json")
        return str(m.get("change")) if isinstance(m, dict) else None

    def versions(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(p.name) for p in self.dir.iterdir() if p.is_dir() and p.name.isdigit())

    def path(self, version: int) -> Path | None:
        p = self.dir / f"{int(version):08d}"
        return p if (p / "manifest.json").is_file() and (p / "samples.json").is_file() else None

    def read(self, version: int) -> tuple[dict, dict[str, list[str]], Path] | None:
        """(manifest, sample ids per kind, directory) of a kept version, None when it is not kept."""
        p = self.path(version)
        if p is None:
            return None
        manifest, samples = read_json(p / "manifest.json"), read_json(p / "samples.json")
        if manifest is None or samples is None:
            return None
        try:
            return check_manifest(manifest, f"versions/{p.name}/manifest.json"), check_version_samples(samples), p
        except StateFileError as exc:  # a hand-edited snapshot is not a version that can be rolled back to
            log.warning("%s/%s: %s: not offered for a rollback", self.store.role_id, self.store.roi_id, exc.message)
            return None

    def summary(self) -> list[dict]:
        """One line per kept version, newest last: what the operator picks a rollback target from."""
        out = []
        versions = self.versions()
        pins = set(self.pinned(versions)) - set(versions[-self.keep :])
        for v in versions:
            got = self.read(v)
            if got is None:
                continue
            m = got[0]
            out.append({"version": v, "change": m.get("change", "fit"), "updated_utc": m.get("updated_utc"),
                        "pinned": v in pins,
                        "threshold": m["threshold"]["value"], "threshold_method": m["threshold"]["method"],
                        "samples": {"ok": m["counts"]["ok"], "ng": m["counts"]["ng"]},
                        **({"rollback_of": m["rollback_of"]} if "rollback_of" in m else {})})
        return out


def write_pending(store: RoiStore, op: dict) -> None:
    atomic_write_json(store.root / "pending.json", op)


def read_pending(store: RoiStore) -> dict | None:
    """The journaled operation, when pending.json passes its schema; a file that fails it (hand-edited,
    crafted: wrong types, path-like ids) is quarantined and nothing is finished from it."""
    path = store.root / "pending.json"
    op = read_json(path)
    if op is None:
        if path.exists():
            store.quarantine_file(path, "pending.json is not a readable JSON object: nothing finished from it")
        return None
    try:
        return check_pending(op)
    except StateFileError as exc:
        store.quarantine_file(path, f"{exc.message}: nothing finished from it")
        return None


def clear_pending(store: RoiStore) -> None:
    (store.root / "pending.json").unlink(missing_ok=True)
    fsync_dir(store.root)
