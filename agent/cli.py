"""`anomaly-agent` command line: fit, predict, calibrate, models, mask, run; samples, rollback, export, import
(agent/cli_lifecycle.py).

Exit codes: 0 success; 1 at least one input could not be used (the others were processed);
2 invalid configuration or usage; 3 the model or backbone is not ready (not fitted, weights missing).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from agent.cli_lifecycle import LIFECYCLE_COMMANDS, cmd_samples_list, lifecycle_parsers
from agent.config import ConfigError, check_service_files, load_config
from agent.control.client import DaemonRuns, take_or_find_daemon
from agent.control.forward import forward, writes
from agent.drift import read_drift
from agent.runtime import Runtime, expand_inputs, setup_logging
from core import __version__
from core.errors import AnomalyError, InputError, ModelNotReadyError, WeightsNotFoundError
from core.ids import validate_id
from core.method.thresholds import requested_policy

log = logging.getLogger("anomaly_agent")
EXIT_OK, EXIT_INPUT, EXIT_CONFIG, EXIT_NOT_READY = 0, 1, 2, 3


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _error_line(path: Path, exc: AnomalyError) -> dict:
    return {"file": str(path), "error": exc.to_dict()}


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"no such file: {path}", code="file_not_found") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a directory", code="file_not_found") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc}", code="file_unreadable") from None


def _role_roi(args: argparse.Namespace) -> tuple[str, str]:
    return validate_id(args.role, "role_id"), validate_id(args.roi, "roi_id")


def _load_sample(rt: Runtime, path: Path, args: argparse.Namespace) -> tuple[bytes, object, dict] | None:
    """(bytes, decoded image, metadata) for a sample file, or None after printing its error line."""
    try:
        data = _read(path)
        return data, rt.decode(data, args.mm_per_px, (args.role, args.roi)), {"source": args.source or "cli",
                                                                              "file_name": path.name}
    except InputError as exc:
        _emit(_error_line(path, exc))
        return None


def cmd_fit(rt: Runtime, args: argparse.Namespace) -> int:
    role, roi = _role_roi(args)
    model = rt.model(role, roi)
    files = expand_inputs(args.images)
    failed = 0
    bs = max(1, model.settings.fit_batch_size)
    with tqdm(total=len(files), desc=f"fit {role}/{roi}", unit="img", file=sys.stderr,
              disable=args.quiet) as bar:

        def chunks() -> Iterator[list]:
            nonlocal failed
            for start in range(0, len(files), bs):  # decoded a chunk at a time: memory stays bounded
                loaded = [_load_sample(rt, path, args) for path in files[start : start + bs]]
                failed += sum(s is None for s in loaded)
                bar.update(len(loaded))
                yield [s for s in loaded if s is not None]

        t0 = time.perf_counter()
        rep = model.fit_ok_in_steps(chunks(), relabel=args.relabel)
    state = model.state()
    _emit({"fitted": f"{role}/{roi}", "added": len(rep["added"]) - len(rep.get("refused", [])),
           "duplicates": len(rep["duplicates"]), **({"refused": rep["refused"]} if rep.get("refused") else {}),
           "failed": failed, "threshold_ms": rep["timings_ms"].get("threshold", 0.0),
           "total_ms": round((time.perf_counter() - t0) * 1000, 1), **state})
    return EXIT_INPUT if failed else EXIT_OK


def cmd_predict(rt: Runtime, args: argparse.Namespace) -> int:
    role, roi = _role_roi(args)
    model = rt.model(role, roi)
    heatmap = args.heatmap or bool(args.heatmap_dir) or rt.heatmap_default(role, roi)
    if args.heatmap_dir:
        Path(args.heatmap_dir).mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in expand_inputs(args.images):
        try:
            t0 = time.perf_counter()
            data = _read(path)
            img = rt.decode(data, args.mm_per_px, (role, roi))
            decode_ms = (time.perf_counter() - t0) * 1000
            pred = model.predict([img], heatmap=heatmap)[0]
        except InputError as exc:
            failed += 1
            _emit(_error_line(path, exc))
            continue
        pred.add_decode(decode_ms)
        png = pred.heatmap_png
        out = {"file": str(path), **pred.to_dict()}
        if png is not None:
            if args.heatmap_dir:
                target = Path(args.heatmap_dir) / f"{path.stem}.heatmap.png"
                target.write_bytes(png)
                out["heatmap_file"] = str(target)
            if args.heatmap:
                out["heatmap_png_b64"] = base64.b64encode(png).decode()
        _emit(out)
    return EXIT_INPUT if failed else EXIT_OK


def cmd_calibrate(rt: Runtime, args: argparse.Namespace) -> int:
    role, roi = _role_roi(args)
    model = rt.model(role, roi)
    if args.threshold is not None or args.reset or args.policy is not None:
        policy = requested_policy(args.policy, args.threshold, args.reset)
        _emit(model.calibrate(policy, args.threshold, args.ok_percentile, args.ng_margin, args.ng_recall,
                              out_of_range=args.allow_out_of_range))
        return EXIT_OK
    if not args.images:
        raise InputError("give NG images, --threshold V, --policy P or --reset", code="usage")
    loaded = [_load_sample(rt, path, args) for path in expand_inputs(args.images)]
    samples = [s for s in loaded if s is not None]
    failed = len(loaded) - len(samples)
    rep = model.send_ng(samples, relabel=args.relabel)
    _emit({"calibrated": f"{role}/{roi}", "added": len(rep["added"]), "duplicates": len(rep["duplicates"]),
           "failed": failed, **{k: v for k, v in rep.items() if k not in ("added", "duplicates")}})
    return EXIT_INPUT if failed else EXIT_OK


def cmd_mask(rt: Runtime, args: argparse.Namespace) -> int:
    role, roi = _role_roi(args)
    _emit(rt.model(role, roi).set_mask(_read(Path(args.mask))))
    return EXIT_OK


def cmd_models(data_root: Path) -> int:
    from core.roi.manifest import unusable_rois
    from core.roi.model import stored_rois

    for _, state in stored_rois(data_root):
        drift = read_drift(data_root, state["role_id"], state["roi_id"])
        _emit({**state, "drift": drift} if drift else state)
    for state in unusable_rois(data_root):  # listed with the reason, never a failure of the whole command
        _emit(state)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anomaly-agent", description="Visual anomaly detection per ROI (PatchCore).")
    p.add_argument("--version", action="version", version=f"anomaly-agent {__version__}")
    p.add_argument("--config", type=Path, default=None, help="YAML config (default: config/agent.yaml)")
    p.add_argument("--data-root", type=Path, default=None, help="override data_root")
    p.add_argument("--backbone", default=None, help="auto, dinov2_vits14, dinov2_vits14_reg4, efficientnet_lite0")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N")
    p.add_argument("--log-level", default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True)

    def roi_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--role", required=True, help="role_id ([A-Za-z0-9_.-]{1,64})")
        sp.add_argument("--roi", required=True, help="roi_id ([A-Za-z0-9_.-]{1,64})")

    sp = sub.add_parser("fit", help="add OK images to a ROI's model")
    roi_args(sp)
    sp.add_argument("images", nargs="+", help="image files or directories")
    sp.add_argument("--mm-per-px", type=float, default=None)
    sp.add_argument("--source", default=None)
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.add_argument("--relabel", action="store_true", help="an image stored as NG moves to OK (else refused)")
    sp = sub.add_parser("predict", help="score images; one JSON line per image on stdout")
    roi_args(sp)
    sp.add_argument("images", nargs="+")
    sp.add_argument("--mm-per-px", type=float, default=None)
    sp.add_argument("--heatmap", action="store_true", help="add heatmap_png_b64 to each line")
    sp.add_argument("--heatmap-dir", default=None, help="write <name>.heatmap.png files here")
    sp = sub.add_parser("calibrate", help="add NG images (threshold calibration) or set a manual threshold")
    roi_args(sp)
    sp.add_argument("images", nargs="*")
    sp.add_argument("--mm-per-px", type=float, default=None)
    sp.add_argument("--source", default=None)
    sp.add_argument("--threshold", type=float, default=None, help="manual threshold override")
    sp.add_argument("--allow-out-of-range", action="store_true",
                    help="accept a --threshold outside the range the ROI's own scores allow (0.5x lowest..2x highest)")
    sp.add_argument("--reset", action="store_true", help="drop a manual override or policy, back to the config")
    sp.add_argument("--policy", choices=["auto", "ok_only", "config"], default=None,
                    help="recompute the threshold with this policy (kept for later fits; config: the configured one)")
    sp.add_argument("--ok-percentile", type=float, default=None, help="with --policy: percentile of OK scores")
    sp.add_argument("--ng-margin", type=float, default=None, help="with --policy auto: 0..1 from top OK to lowest NG")
    sp.add_argument("--ng-recall", type=float, default=None,
                    help="with --policy auto: share of NG samples that must score above the threshold")
    sp.add_argument("--relabel", action="store_true", help="an image stored as OK moves to NG (else refused)")
    sp = sub.add_parser("mask", help="set a ROI mask PNG (non-zero = inspected)")
    roi_args(sp)
    sp.add_argument("mask")
    sub.add_parser("models", help="list ROIs: samples, threshold, versions, suspects, drift")
    lifecycle_parsers(sub, roi_args)
    sp = sub.add_parser("run", help="run the daemon (watched folders, MQTT)")
    sp.add_argument("--mqtt-host", default=None)
    sp.add_argument("--mqtt-port", type=int, default=None)
    sp.add_argument("--http-port", type=int, default=None, help="serve HTTP on this port (needs http.enabled)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {"data_root": args.data_root, "backbone.name": args.backbone, "device": args.device,
                 "log_level": args.log_level}
    if args.command == "run":
        overrides.update({"mqtt.host": args.mqtt_host, "mqtt.port": args.mqtt_port, "http.port": args.http_port})
    try:
        cfg = load_config(args.config, overrides={k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in overrides.items()})
    except ConfigError as exc:
        print(f"anomaly-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(cfg.log_level)
    if args.command == "models":
        return cmd_models(cfg.data_root)
    if args.command == "samples" and not args.delete and not args.reset:
        return cmd_samples_list(cfg.data_root, args)
    try:
        if args.command == "run":
            from agent.daemon import run_daemon

            check_service_files(cfg)
            rc = run_daemon(cfg)
            # everything is drained, closed and on disk: leave now, not after the interpreter's teardown of torch
            # and of library threads (4-17 s on a busy station); nothing is left that could be lost
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
        command = {"fit": cmd_fit, "predict": cmd_predict, "calibrate": cmd_calibrate, "mask": cmd_mask,
                   **LIFECYCLE_COMMANDS}[args.command]
        if not writes(args):  # reads what is on disk: what the daemon (if one runs) serves
            return command(Runtime(cfg), args)
        try:
            lock = take_or_find_daemon(cfg.data_root)
        except DaemonRuns as running:  # one writer per data root: the daemon applies it on its worker
            return forward(cfg.data_root, args, running.holder)
        with lock:
            return command(Runtime(cfg), args)
    except (ModelNotReadyError, WeightsNotFoundError) as exc:
        print(f"anomaly-agent: {exc.message}", file=sys.stderr)
        return EXIT_NOT_READY
    except InputError as exc:
        print(f"anomaly-agent: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG if exc.code in ("invalid_id", "usage") else EXIT_INPUT
    except ConfigError as exc:
        print(f"anomaly-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except AnomalyError as exc:  # roi_unloadable, backbone_mismatch, disk_full, busy...: said, never a traceback
        print(f"anomaly-agent: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_NOT_READY if exc.code == "roi_unloadable" else EXIT_INPUT
    except ValueError as exc:
        print(f"anomaly-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
