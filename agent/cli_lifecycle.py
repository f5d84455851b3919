"""CLI commands of a ROI's lifecycle (core/roi/lifecycle.py, core/roi/archive.py): samples (list, fetch, delete,
reset), rollback, export, import. Each prints JSON; the same operations as the HTTP and MQTT actions."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from agent.runtime import Runtime
from core.errors import InputError
from core.ids import validate_id
from core.roi import lifecycle
from core.roi.archive import export_roi
from core.storage import RoiStore, atomic_write_bytes


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _ids(args: argparse.Namespace) -> tuple[str, str]:
    return validate_id(args.role, "role_id"), validate_id(args.roi, "roi_id")


def cmd_samples_list(data_root: Path, args: argparse.Namespace) -> int:
    """One JSON line per sample; --fetch ID --out FILE writes that sample's image (also from the trash)."""
    store = RoiStore(data_root, *_ids(args))
    if args.fetch:
        got = store.find_sample(args.fetch)
        if got is None:
            raise InputError(f"no sample {args.fetch} in {store.role_id}/{store.roi_id} (nor in its trash)",
                             code="unknown_sample")
        out = Path(args.out or got[1].name)
        atomic_write_bytes(out, got[1].read_bytes())
        _emit({**got[0], "written": str(out)})
        return 0
    for line in lifecycle.sample_list(store):
        _emit(line)
    return 0


def cmd_samples(rt: Runtime, args: argparse.Namespace) -> int:
    model = rt.model(*_ids(args), create=False)
    if args.reset:
        _emit(lifecycle.reset_roi(model))
    else:
        _emit(lifecycle.delete_samples(model, args.delete, "deleted from the CLI"))
    return 0


def cmd_rollback(rt: Runtime, args: argparse.Namespace) -> int:
    model = rt.model(*_ids(args), create=False)
    if args.to is None:
        for line in model.versions.summary():
            _emit(line)
        return 0
    _emit(lifecycle.rollback(model, args.to))
    return 0


def cmd_export(rt: Runtime, args: argparse.Namespace) -> int:
    role, roi = _ids(args)
    data = export_roi(rt.cfg.data_root, role, roi)
    atomic_write_bytes(Path(args.file), data)
    _emit({"exported": f"{role}/{roi}", "file": args.file, "bytes": len(data)})
    return 0


def cmd_import(rt: Runtime, args: argparse.Namespace) -> int:
    got = rt.import_roi(Path(args.file), args.role, args.roi)  # streamed from the file, never held whole
    model = rt.model(got["role_id"], got["roi_id"], create=False)  # embeds the samples now, not at the first part
    _emit({**got, **model.state()})
    return 0


LIFECYCLE_COMMANDS: dict[str, Callable[[Runtime, argparse.Namespace], int]] = {
    "samples": cmd_samples, "rollback": cmd_rollback, "export": cmd_export, "import": cmd_import}


def lifecycle_parsers(sub: argparse._SubParsersAction, roi_args: Callable[[argparse.ArgumentParser], None]) -> None:
    sp = sub.add_parser("samples", help="list a ROI's samples (JSON lines); --delete IDs, --reset, --fetch ID")
    roi_args(sp)
    sp.add_argument("--delete", nargs="+", metavar="ID", default=None, help="move these samples to the ROI's trash")
    sp.add_argument("--reset", action="store_true", help="every sample and the mask to the trash")
    sp.add_argument("--fetch", metavar="ID", default=None, help="write this sample's image (--out FILE)")
    sp.add_argument("--out", default=None)
    sp = sub.add_parser("rollback", help="list the kept versions, or --to VERSION (a new version)")
    roi_args(sp)
    sp.add_argument("--to", type=int, default=None)
    sp = sub.add_parser("export", help="write a ROI as one archive (tar.gz) for another station")
    roi_args(sp)
    sp.add_argument("file")
    sp = sub.add_parser("import", help="add a ROI from an archive (verified; refused if the ROI exists)")
    sp.add_argument("file")
    sp.add_argument("--role", default=None, help="import under this role_id (default: the archive's)")
    sp.add_argument("--roi", default=None, help="import under this roi_id (default: the archive's)")
