"""CLI commands that change a ROI, sent to the daemon that serves the data root (agent/control/client.py):
the same arguments, the same output lines as when the CLI runs them itself, and the daemon's version."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent.control.client import send
from agent.runtime import expand_inputs
from core.errors import AnomalyError, InputError
from core.ids import validate_id

WRITES = ("fit", "calibrate", "mask", "samples", "rollback", "import")


def writes(args: argparse.Namespace) -> bool:
    """Does this command change the data root (the others only read it)?"""
    if args.command in ("samples",):
        return bool(args.delete or args.reset)
    if args.command == "rollback":
        return args.to is not None
    return args.command in WRITES


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _data(answer: dict) -> dict:
    for err in answer.get("errors", []):
        _emit(err)
    result = answer.get("result")
    if result is None:
        raise InputError("no file could be read by the daemon", code="file_unreadable")
    if result["status"] != "ok":
        raise AnomalyError(result["error"]["message"], code=result["error"]["code"])
    return result["data"]


def forward(data_root: Path, args: argparse.Namespace, holder: dict) -> int:
    """Run `args` through the daemon; the exit code the CLI returns (1: some input could not be used)."""
    role, roi = validate_id(args.role, "role_id"), validate_id(args.roi, "roi_id")
    print(f"anomaly-agent: the daemon (pid {holder.get('pid', '?')}) serves {data_root}: sent to it",
          file=sys.stderr)
    meta = {k: v for k, v in (("source", getattr(args, "source", None) or "cli"),
                              ("mm_per_px", getattr(args, "mm_per_px", None)),
                              ("relabel", getattr(args, "relabel", False))) if v is not None}
    if args.command in ("fit", "calibrate") and getattr(args, "images", None):
        files = expand_inputs(args.images)
        answer = send(data_root, "fit_ok" if args.command == "fit" else "send_ng", role, roi, files, meta)
        data = _data(answer)
        key = "fitted" if args.command == "fit" else "calibrated"
        _emit({key: f"{role}/{roi}", "failed": len(answer.get("errors", [])), "version_by": "daemon", **data})
        return 1 if answer.get("errors") else 0
    if args.command == "calibrate":
        if getattr(args, "allow_out_of_range", False):
            raise InputError("--allow-out-of-range is not sent to a running daemon; stop it to set such a "
                             "threshold", code="usage")
        if args.threshold is None and not args.reset and args.policy is None:
            raise InputError("give NG images, --threshold V, --policy P or --reset", code="usage")
        params = {"policy": args.policy, "threshold": args.threshold, "reset": args.reset,  # read as the CLI does
                  "ok_percentile": args.ok_percentile, "ng_margin": args.ng_margin, "ng_recall": args.ng_recall}
        _emit(_data(send(data_root, "calibrate", role, roi, None, {k: v for k, v in params.items()
                                                                   if v not in (None, False)})))
        return 0
    if args.command == "samples":
        action = "reset" if args.reset else "delete_samples"
        params = {} if args.reset else {"sample_ids": list(args.delete)}
        _emit(_data(send(data_root, action, role, roi, None, params)))
        return 0
    if args.command == "rollback":
        _emit(_data(send(data_root, "rollback", role, roi, None, {"version": args.to})))
        return 0
    raise InputError(f"`{args.command}` is not sent to a running daemon: stop it first (or use its HTTP API)",
                     code="usage")
