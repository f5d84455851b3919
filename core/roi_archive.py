"""A ROI as one archive, to copy a trained ROI to a second station with the same camera.

The archive is a gzip'd tar holding `export.json` (format, ids, model version, backbone and branch
identities, settings, the SHA-256 of every other file), `manifest.json`, the banks (`bank.npz`,
`b1-bank.npz`, ...), `mask.png` when there is one, and every stored sample (`samples/<kind>/<id>.<ext>`
and its JSON). The embedding index is not in it: the importing station embeds the samples again on first
use (same backbone, same rows), and then trusts the bank, so it predicts the same scores.

Import trusts nothing in the archive: only regular files with names of the form above (no directory,
link, `..` or absolute path), each checked against its SHA-256, no file left unlisted, the backbone
identity equal to the running one, ids valid, the target ROI new. Files are written to a temporary
directory in the data root and renamed into place: a refused or interrupted import writes nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
import tempfile
from pathlib import Path

from .errors import BackboneMismatchError, InputError
from .ids import safe_text, validate_id
from .storage import KINDS, RoiStore, fsync_dir, read_json, utc_now

FORMAT = 1
NAME = re.compile(r"\A(manifest\.json|mask\.png|(b\d{1,2}-)?bank\.npz"
                  r"|samples/(ok|ng)/[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63})\Z")
MAX_MEMBERS = 200_000


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


def _read_members(data: bytes, max_bytes: int) -> dict[str, bytes]:
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InputError(f"not a ROI archive (tar.gz): {exc}", code="invalid_archive") from None
    out: dict[str, bytes] = {}
    total = 0
    with tar:
        try:
            for n, member in enumerate(tar):
                name = member.name
                if n >= MAX_MEMBERS:
                    raise InputError("the archive holds too many files", code="invalid_archive")
                if not member.isfile() or not (name == "export.json" or NAME.match(name)) or name in out:
                    raise InputError(f"the archive holds {safe_text(name, 120)!r}, which a ROI archive never holds "
                                     "(only regular files, no paths outside the ROI)", code="invalid_archive")
                total += member.size
                if total > max_bytes:
                    raise InputError(f"the archive unpacks to more than {max_bytes >> 20} MiB, more than an import "
                                     "holds in memory: copy the ROI's folder under models/ instead",
                                     code="invalid_archive")
                fh = tar.extractfile(member)
                out[name] = fh.read() if fh is not None else b""
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise InputError(f"the archive is damaged: {exc}", code="invalid_archive") from None
    return out


MAX_UNPACKED = 1 << 30  # an archive is verified in memory: a larger ROI is copied as files (docs/deploy.md, Backup)


def check_archive(data: bytes, identity: dict, branches: list[dict], max_bytes: int = MAX_UNPACKED
                  ) -> tuple[dict, dict]:
    """(export.json, name -> bytes) of a verified archive, or InputError / BackboneMismatchError."""
    members = _read_members(data, max_bytes)
    try:
        meta = json.loads(members.pop("export.json"))
    except (KeyError, ValueError):
        raise InputError("the archive has no readable export.json", code="invalid_archive") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("files"), dict):
        raise InputError(f"export.json is not of format {FORMAT}", code="invalid_archive")
    listed = meta["files"]
    if set(listed) != set(members):
        odd = sorted(set(listed) ^ set(members))[:3]
        raise InputError(f"the archive's files differ from its list (e.g. {safe_text(odd, 120)})",
                         code="invalid_archive")
    for name, data_ in members.items():
        if _sha(data_) != listed[name]:
            raise InputError(f"{safe_text(name, 120)}: checksum mismatch (changed after export)",
                             code="checksum_mismatch")
    if meta.get("backbone") != identity or meta.get("branches") != branches:
        raise BackboneMismatchError(f"the archive was made with {safe_text((meta.get('backbone') or {}).get('name'))}"
                                    f" (resolution {safe_text((meta.get('backbone') or {}).get('resolution'))}); "
                                    f"this ROI runs {identity.get('name')} (resolution {identity.get('resolution')})")
    for name in members:
        if name.startswith("samples/") and name.endswith(".json"):
            sample = json.loads(members[name])
            image = f"samples/{name.split('/')[1]}/{sample.get('image_file') if isinstance(sample, dict) else ''}"
            if image not in members:
                raise InputError(f"{name}: its image is not in the archive", code="invalid_archive")
    return meta, members


def import_roi(data_root: Path, data: bytes, identity: dict, branches: list[dict], role_id: str | None = None,
               roi_id: str | None = None) -> dict:
    """Unpack a verified archive as a new ROI (its own ids, or role_id / roi_id); returns what was imported."""
    meta, members = check_archive(data, identity, branches)
    role = validate_id(role_id or meta.get("role_id"), "role_id")
    roi = validate_id(roi_id or meta.get("roi_id"), "roi_id")
    store = RoiStore(data_root, role, roi)
    if store.exists() or store.root.exists():
        raise InputError(f"ROI {role}/{roi} exists on this station; import under other ids or delete it first",
                         code="roi_exists")
    staging = Path(data_root) / "tmp"
    staging.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="import-", dir=staging))
    try:
        manifest = json.loads(members.pop("manifest.json"))
        manifest.update(role_id=role, roi_id=roi, imported_utc=utc_now(), imported_from=f"{meta.get('role_id')}/"
                        f"{meta.get('roi_id')} version {meta.get('model_version')}")
        members["manifest.json"] = json.dumps(manifest, indent=1, sort_keys=True).encode()
        for name, blob in members.items():
            if name.endswith("bank.npz"):
                name = f"index/{name}"
            if name.startswith("samples/") and name.endswith(".json"):
                blob = json.dumps({**json.loads(blob), "role_id": role, "roi_id": roi}, indent=1,
                                  sort_keys=True).encode()
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)
        store.root.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(store.root)  # one step: the ROI is there whole, or not at all
        fsync_dir(store.root.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    counts = {k: sum(1 for n in members if n.startswith(f"samples/{k}/") and n.endswith(".json")) for k in KINDS}
    return {"role_id": role, "roi_id": roi, "model_version": manifest["version"], "samples": counts,
            "threshold": manifest["threshold"]["value"], "imported_from": manifest["imported_from"]}
