"""A ROI as one archive, to copy a trained ROI to a second station with the same camera.

The archive is a gzip'd tar holding `export.json` (format, ids, model version, backbone and branch
identities, settings, the SHA-256 of every other file), `manifest.json`, the banks (`bank.npz`,
`b1-bank.npz`, ...), `mask.png` when there is one, and every stored sample (`samples/<kind>/<id>.<ext>`
and its JSON). The embedding index is not in it: the importing station embeds the samples again on first
use (same backbone, same rows), and then trusts the bank, so it predicts the same scores.

Import (core/roi/importer.py) trusts nothing in the archive: every member is listed, bounded, checked against
its SHA-256 and its schema in a staging folder before one rename makes it a ROI.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

from core.errors import InputError
from core.roi.importer import ImportLimits, import_roi
from core.storage import KINDS, RoiStore, read_json, utc_now

__all__ = ["FORMAT", "ImportLimits", "export_roi", "import_roi"]

FORMAT = 1


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files(store: RoiStore) -> tuple[dict, dict[str, bytes]]:
    """(manifest, archive name -> bytes) of one consistent version: read again when a change came between."""
    for _ in range(5):
        manifest = store.read_manifest()
        if manifest is None:
            raise InputError(f"ROI {store.role_id}/{store.roi_id} has no model", code="unknown_roi")
        files: dict[str, bytes] = {}
        for kind in KINDS:
            meta = read_json(store.index_dir / f"{kind}.json") or {"entries": []}
            ids = [e["sample_id"] for e in meta["entries"]] or [r.sample_id for r in store.list_samples(kind)]
            for sid in ids:
                got = store.sample_file(kind, sid)
                if got is None:
                    break
                files[f"samples/{kind}/{sid}.json"] = json.dumps(got[0], indent=1, sort_keys=True).encode()
                files[f"samples/{kind}/{got[1].name}"] = got[1].read_bytes()
        for bank in sorted(store.index_dir.glob("*bank.npz")):
            files[bank.name] = bank.read_bytes()
        if store.mask_path.exists():
            files["mask.png"] = store.mask_path.read_bytes()
        again = store.read_manifest()
        if again is not None and again.get("version") == manifest.get("version"):
            files["manifest.json"] = json.dumps(manifest, indent=1, sort_keys=True).encode()
            return manifest, files
    raise InputError("the ROI kept changing during the export; try again", code="busy")


def export_roi(data_root: Path, role_id: str, roi_id: str) -> bytes:
    store = RoiStore(data_root, role_id, roi_id)
    manifest, files = _files(store)
    meta = {"format": FORMAT, "role_id": role_id, "roi_id": roi_id, "model_version": manifest["version"],
            "backbone": manifest["backbone"], "branches": [b["identity"] for b in manifest.get("branches", [])],
            "settings": manifest.get("settings"), "exported_utc": utc_now(),
            "files": {name: _sha(data) for name, data in sorted(files.items())}}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in [("export.json", json.dumps(meta, indent=1).encode()), *sorted(files.items())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
