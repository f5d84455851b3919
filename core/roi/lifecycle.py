"""Taking back what a ROI learned: delete samples (to a trash, never destroyed), reset a ROI, relabel an image
stored under the other label, roll back to a kept version, and the suspicious OK samples a fit reports.

Every operation that touches several files is journaled: `pending.json` says what it does, then the
files are moved and the model reopened (`RoiModel.open`), which finishes whatever `pending.json` names
before it loads. A kill at any step therefore ends, at the next start, in the new version, never in a mix
of the old and the new (tests/test_lifecycle.py, tests/test_faults.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from core.errors import BackboneMismatchError, InputError
from core.ids import safe_text, validate_id
from core.method.branch import Branch
from core.roi.index import RoiIndex
from core.roi.sample_store import Sample, SampleStore
from core.roi.versions import RoiVersions, clear_pending, read_pending, write_pending
from core.storage import KINDS, RoiStore, atomic_write_bytes, utc_now

log = logging.getLogger(__name__)
SUSPECT_POLICIES = ("accept", "flag", "refuse")
MAX_IDS = 1000


@dataclass
class LifecycleSettings:
    """Config `lifecycle` (docs/configuration.md)."""

    versions_kept: int = 10  # manifest + bank + threshold of the last N versions, for rollback
    suspect_policy: str = "flag"  # accept | flag | refuse an OK sample whose leave-one-out score is an outlier
    suspect_z: float = 3.5  # modified z-score (median, MAD; Iglewicz & Hoaglin cut-off) of its leave-one-out score
    suspect_min_samples: int = 8  # fewer scored OK samples: no judgement
    trash_keep: int = 500  # per ROI and kind: at most this many trashed samples not needed by a kept version
    trash_max_age_days: float | None = 90.0  # and none older than this (None: no age limit)
    max_ng_samples: int = 200  # stored NG samples per ROI; more are refused (too_many_samples)


class RoiModel(Protocol):
    """What these operations need of a ROI's model (core/roi/model.py has it): its files, versions, index
    and samples, and a way to reload all of it after files moved."""

    store: RoiStore
    versions: RoiVersions
    lifecycle: LifecycleSettings
    index: RoiIndex
    samples: SampleStore
    manifest: dict
    identity: dict

    @property
    def branches(self) -> Sequence[Branch]: ...
    @property
    def version(self) -> int: ...
    @property
    def threshold(self) -> float | None: ...
    def open(self) -> None: ...
    def state(self) -> dict: ...


def find_suspects(ok_scores: dict[str, float], threshold: float | None, s: LifecycleSettings) -> list[dict]:
    """OK samples whose leave-one-out score is an outlier among the ROI's OK samples: robust z-score above
    `suspect_z` and above the threshold the other samples alone would give (their highest score). Such a
    sample most likely shows a defect: while it stays in the bank, that defect scores low."""
    if s.suspect_policy == "accept" or len(ok_scores) < s.suspect_min_samples:
        return []
    values = np.asarray(list(ok_scores.values()), np.float64)
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median))) * 1.4826 or 1e-9
    out = []
    for sid, score in ok_scores.items():
        z = (score - median) / mad
        others_max = float(np.max(values[values != score])) if (values != score).any() else score
        if z > s.suspect_z and score > others_max:
            out.append({"sample_id": sid, "loo_score": round(score, 6), "z": round(z, 2),
                        "threshold": None if threshold is None else round(float(threshold), 6)})
    return sorted(out, key=lambda x: -x["z"])


def find_ng_suspects(ok_scores: dict[str, float], ng_scores: dict[str, float], s: LifecycleSettings) -> list[dict]:
    """NG samples that score like the ROI's good parts: below the median of its OK leave-one-out scores
    (more normal than half of them). Such a label is most likely a good part sent as NG (by mistake, or by
    someone who wants the threshold down): it is reported, kept out of the NG-aware ranking and of the
    threshold, and with suspect_policy `refuse` not kept at all."""
    if s.suspect_policy == "accept" or len(ok_scores) < s.suspect_min_samples or not ng_scores:
        return []
    values = np.asarray(list(ok_scores.values()), np.float64)
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median))) * 1.4826 or 1e-9
    return [{"sample_id": sid, "kind": "ng", "loo_score": round(score, 6), "z": round((score - median) / mad, 2),
             "ok_median": round(median, 6)} for sid, score in ng_scores.items() if score < median]


def check_ng_room(model: RoiModel, adding: int, s: LifecycleSettings) -> None:
    """InputError too_many_samples when `adding` NG samples would pass lifecycle.max_ng_samples."""
    have = len(model.store.list_samples("ng"))
    if adding and have + adding > s.max_ng_samples:
        raise InputError(f"{model.store.role_id}/{model.store.roi_id} has {have} NG samples; {adding} more would pass "
                         f"lifecycle.max_ng_samples ({s.max_ng_samples}): delete old ones (samples --delete) first",
                         code="too_many_samples")


def ids_from(value: object) -> object:
    """sample_ids as sent: a list, or one string of ids separated by commas (an MQTT v5 user property)."""
    if isinstance(value, str):
        return [x.strip() for x in value.split(",") if x.strip()]
    return value


def check_ids(ids: object) -> list[str]:
    if not isinstance(ids, list) or not ids or len(ids) > MAX_IDS:
        raise InputError(f"sample_ids must be a list of 1-{MAX_IDS} sample ids", code="invalid_sample_ids")
    return [validate_id(i, "sample_id") if isinstance(i, str) else validate_id(safe_text(i, 60), "sample_id")
            for i in ids]


def delete_samples(model: RoiModel, ids: object, reason: str = "deleted by request", change: str = "delete",
                   mask: bool = False) -> dict:
    """Move samples (any kind) to the ROI's trash; the bank, threshold and state follow in a new version.
    Unknown ids refuse the whole request (unknown_sample): nothing is moved."""
    wanted = check_ids(ids) if ids or not mask else []
    stored = {kind: {r.sample_id for r in model.store.list_samples(kind)} for kind in KINDS}
    unknown = [i for i in wanted if not any(i in stored[k] for k in KINDS)]
    if unknown:
        raise InputError(f"no stored sample {', '.join(unknown[:5])} in {model.store.role_id}/{model.store.roi_id}"
                         f"{' (and more)' if len(unknown) > 5 else ''}", code="unknown_sample")
    by_kind = {kind: [i for i in dict.fromkeys(wanted) if i in stored[kind]] for kind in KINDS}
    before = model.version
    write_pending(model.store, {"op": "delete", "ids": by_kind, "reason": reason, "change": change, "mask": mask})
    model.open()
    log.warning("%s/%s: %s: %d OK and %d NG samples moved to trash (%s); version %d -> %d", model.store.role_id,
                model.store.roi_id, change, len(by_kind["ok"]), len(by_kind["ng"]), reason, before, model.version)
    return {"deleted": by_kind, **model.state()}


def reset_roi(model: RoiModel) -> dict:
    """Every sample and the mask to the trash: the ROI starts again (its versions stay for a rollback)."""
    ids = [r.sample_id for kind in KINDS for r in model.store.list_samples(kind)]
    return delete_samples(model, ids, "ROI reset", change="reset", mask=True)


def rollback(model: RoiModel, version: object) -> dict:
    """Back to a kept version: its samples (from the trash), mask, banks and threshold, as a NEW version
    (history is never rewritten). Refused when the version is not kept or its samples left the trash."""
    try:
        to = int(str(version))
    except ValueError:
        raise InputError(f"version must be a version number, got {safe_text(version, 40)!r}",
                         code="invalid_version") from None
    got = model.versions.read(to)
    if got is None:
        kept = model.versions.versions()
        raise InputError(f"version {to} of {model.store.role_id}/{model.store.roi_id} is not kept (kept: "
                         f"{', '.join(map(str, kept)) or 'none'})", code="unknown_version")
    manifest, samples, _ = got
    if manifest.get("backbone") != model.identity:
        raise BackboneMismatchError(f"version {to} was built with backbone {manifest.get('backbone', {}).get('name')}"
                                    f", the agent runs {model.identity['name']}")
    missing = [sid for kind in KINDS for sid in samples.get(kind, []) if model.store.find_sample(sid, (kind,)) is None]
    if missing:
        raise InputError(f"version {to} needs {len(missing)} samples that are no longer stored or in the trash "
                         f"(e.g. {missing[0]})", code="version_unavailable")
    before = model.version
    write_pending(model.store, {"op": "rollback", "to": to, "new_version": before + 1})
    model.open()
    log.warning("%s/%s: rolled back to version %d as version %d (threshold %s)", model.store.role_id,
                model.store.roi_id, to, model.version, model.threshold)
    return {"rolled_back_to": to, **model.state()}


def finish_pending(model: RoiModel) -> dict | None:
    """Finish the journaled operation of this ROI, if any (called by RoiModel.open before it loads)."""
    op = read_pending(model.store)
    if op is None:
        return None
    store = model.store
    if op.get("op") == "delete":
        for kind in KINDS:
            for sid in op.get("ids", {}).get(kind, []):
                store.trash(kind, sid, str(op.get("reason", "deleted")))
        if op.get("mask"):
            _mask_to_trash(model)
    elif op.get("op") == "rollback" and model.versions.read(int(op["to"])) is not None:
        _redo_rollback(model, op)
    else:
        log.warning("%s/%s: pending.json names nothing that can be finished (%s): dropped", store.role_id,
                    store.roi_id, safe_text(op, 200))
        clear_pending(store)
        return None
    return op


def _mask_to_trash(model: RoiModel) -> None:
    mask = model.store.mask_path
    if mask.exists():
        target = model.store.root / "trash" / "mask"
        target.mkdir(parents=True, exist_ok=True)
        os.replace(mask, target / f"mask-{utc_now().replace(':', '').replace('-', '')}.png")


def _redo_rollback(model: RoiModel, op: dict) -> None:
    """Every step can be done again: samples moved to match, the index made to match them, then the
    version's banks and its manifest under the new version number."""
    to = int(op["to"])
    got = model.versions.read(to)
    if got is None:  # checked by the caller
        raise InputError(f"version {to} is not kept", code="unknown_version")
    manifest, samples, path = got
    store = model.store
    for kind in KINDS:
        want = list(samples.get(kind, []))
        current = {r.sample_id for r in store.list_samples(kind)}
        for sid in sorted(current - set(want)):
            store.trash(kind, sid, f"rollback to version {to}")
        for sid in want:
            if sid not in current:
                store.untrash(kind, sid)
    if (path / "mask.png").exists():
        atomic_write_bytes(store.mask_path, (path / "mask.png").read_bytes())
    else:
        _mask_to_trash(model)
    for kind in KINDS:
        model.index.sync_kind(model.samples, kind)
    for branch in model.branches:
        saved = path / branch.bank_path.name
        if saved.exists():
            atomic_write_bytes(branch.bank_path, saved.read_bytes())
        else:
            branch.bank_path.unlink(missing_ok=True)
    store.write_manifest({**manifest, "version": int(op["new_version"]), "rollback_of": to, "change": "rollback",
                          "updated_utc": utc_now()})


def label_conflicts(model: RoiModel, kind: str, samples: list[Sample], relabel: bool) -> None:
    """An image stored under the other label: refused (conflicting_label), or with `relabel` moved to the
    trash from the other set first (then stored under this one)."""
    other = "ng" if kind == "ok" else "ok"
    known = model.samples.known(other)  # cached: not every sample JSON read again on each fit
    hits = list(dict.fromkeys(known[h] for h in (hashlib.sha256(d).hexdigest() for d, _, _ in samples) if h in known))
    if not hits:
        return
    if not relabel:
        raise InputError(f"{len(hits)} image(s) are already stored as {other.upper()} sample(s) ({', '.join(hits[:3])}"
                         f"); send relabel=true to move them to {kind.upper()}", code="conflicting_label")
    delete_samples(model, hits, f"relabelled as {kind}", change="relabel")


def sample_list(store: RoiStore) -> list[dict]:
    """One line per stored sample (read from disk, safe beside the worker): what the CLI `samples` prints and
    GET /samples returns. `loo_score`: the leave-one-out score of the last threshold update (the most recent
    `holdout_max` OK samples and every NG sample have one), `suspect`: named in `suspect_samples`."""
    manifest = store.read_manifest() or {}
    scores = manifest.get("sample_scores", {})
    suspects = {x["sample_id"] for x in manifest.get("suspect_samples", [])}
    out = []
    for kind in KINDS:
        for rec in store.list_samples(kind):
            m = rec.meta
            out.append({"sample_id": rec.sample_id, "kind": kind, "sha256": m.get("sha256"),
                        "source": m.get("source"), "request_id": m.get("request_id"),
                        "timestamp_utc": m.get("timestamp_utc"), "mm_per_px": m.get("mm_per_px"),
                        "loo_score": scores.get(kind, {}).get(rec.sample_id), "suspect": rec.sample_id in suspects})
    return out


def apply_suspect_policy(model: RoiModel, report: dict) -> dict:
    """After a fit or a send_ng: with policy `refuse`, the samples of this request found suspect (OK ones that
    score like defects, NG ones that score like good parts) go to the trash again (reported in `refused`);
    with `flag` they are only reported (`suspect_samples` of the state)."""
    if model.lifecycle.suspect_policy != "refuse":
        return report
    added = set(report.get("added", []))
    bad = [x["sample_id"] for x in model.manifest.get("suspect_samples", []) if x["sample_id"] in added]
    if not bad:
        return report
    state = delete_samples(model, bad, "suspect: an OK sample scoring like a defect, or an NG one like a good part",
                           change="refuse_suspect")
    state.pop("deleted", None)
    return {**report, **state, "refused": bad}


def check_settings(s: LifecycleSettings) -> None:
    if s.suspect_policy not in SUSPECT_POLICIES:
        raise ValueError(f"suspect_policy must be one of {SUSPECT_POLICIES}")


def prune_trash(model: RoiModel, now: float | None = None) -> int:
    """Bound a ROI's trash/ (every delete, relabel and rollback puts full image copies there): per kind, the
    samples a kept version needs stay (a rollback takes them back); of the others the newest `trash_keep`
    stay, none older than `trash_max_age_days`. Returns how many samples were removed for good."""
    s, store = model.lifecycle, model.store
    needed: set[str] = set()
    for v in model.versions.versions():
        got = model.versions.read(v)
        if got is not None:
            needed.update(sid for kind in KINDS for sid in got[1].get(kind, []))
    cutoff = (now or time.time()) - s.trash_max_age_days * 86400 if s.trash_max_age_days is not None else None
    removed = 0
    for kind in KINDS:
        directory = store.root / "trash" / kind
        if not directory.is_dir():
            continue
        trashed = sorted(((p.stat().st_mtime, p.name[: -len(".reason.json")]) for p in directory.glob("*.reason.json")),
                         reverse=True)  # newest first
        spare = [(t, sid) for t, sid in trashed if sid not in needed]
        for i, (t, sid) in enumerate(spare):
            if i >= s.trash_keep or (cutoff is not None and t < cutoff):
                for path in directory.glob(f"{sid}.*"):
                    path.unlink(missing_ok=True)
                removed += 1
    if removed:
        log.info("%s/%s: %d trashed samples removed for good (lifecycle.trash_keep %d, trash_max_age_days %s)",
                 store.role_id, store.roi_id, removed, s.trash_keep, s.trash_max_age_days)
    return removed
