"""Each ROI's drift state (core/drift.py) in the daemon: fed by every prediction, kept on disk
(`models/<role>/<roi>/drift.json`, so a restart keeps the window), read by /models, the CLI `models`, the
MQTT state topic, /metrics and the operator page. A change of state is logged at WARNING."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from core.drift import DriftMonitor, DriftSettings
from core.roi.model import RoiModel
from core.roi.state_files import StateFileError, check_drift
from core.storage import RoiStore, atomic_write_json, read_json

log = logging.getLogger(__name__)
SAVE_EVERY = 25  # predictions between writes of the window (and at every change of state)


def drift_path(data_root: Path, role_id: str, roi_id: str) -> Path:
    return RoiStore(data_root, role_id, roi_id).root / "drift.json"


def saved_drift(data_root: Path, role_id: str, roi_id: str) -> dict | None:
    """drift.json when it passes its schema (core/roi/state_files.py); None when absent or unusable (a hand-edited
    file with a string where a number belongs is logged and ignored: the window starts again)."""
    path = drift_path(data_root, role_id, roi_id)
    saved = read_json(path)
    if saved is None:
        return None
    try:
        return check_drift(saved)
    except StateFileError as exc:
        log.warning("%s/%s: %s: ignored, the drift window starts again", role_id, roi_id, exc.message)
        return None


def read_drift(data_root: Path, role_id: str, roi_id: str) -> dict | None:
    """The last evaluated drift state of a ROI, from disk (None before its first predictions)."""
    saved = saved_drift(data_root, role_id, roi_id)
    return saved.get("last") if saved else None


class DriftTracker:
    def __init__(self, data_root: Path, settings: DriftSettings) -> None:
        self.data_root = Path(data_root)
        self.settings = settings
        self._monitors: dict[tuple[str, str], DriftMonitor] = {}
        self._last: dict[tuple[str, str], dict] = {}
        self._unsaved: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()  # the worker adds, the operator page reads the history

    def observe(self, model: RoiModel, score: float, is_anomaly: bool) -> dict | None:
        """Add one prediction; the new drift state when its `state` changed, else None."""
        key = (model.store.role_id, model.store.roi_id)
        mon = self._monitors.get(key)
        if mon is None:
            saved = saved_drift(self.data_root, *key)
            try:
                mon = DriftMonitor(self.settings, saved)
            except (TypeError, ValueError, AttributeError) as exc:  # a hand-edited file must not fail predictions
                log.warning("%s/%s: drift.json unusable (%s): the window starts again", *key, exc)
                mon = DriftMonitor(self.settings)
            self._monitors[key] = mon
        with self._lock:
            mon.add(score, is_anomaly)
        state = mon.evaluate(model.threshold, model.manifest.get("ok_scores", []))
        before = self._last.get(key, {}).get("state", mon.last_state)
        self._last[key] = state
        changed = state["state"] != before
        self._unsaved[key] = self._unsaved.get(key, 0) + 1
        if changed or self._unsaved[key] >= SAVE_EVERY:
            self._save(key, mon, state)
        if changed:
            log.warning("%s/%s: drift %s -> %s (%s; recent OK median %s, usual %s, threshold %s, NG rate %s)", *key,
                        before, state["state"], "; ".join(state["reasons"]) or "back to usual",
                        state["recent_ok_median"], state["reference_ok_median"], state["threshold"], state["ng_rate"])
            return state
        return None

    def _save(self, key: tuple[str, str], mon: DriftMonitor, state: dict) -> None:
        try:
            atomic_write_json(drift_path(self.data_root, *key), {**mon.to_dict(state["state"]), "last": state})
            mon.last_state = state["state"]
            self._unsaved[key] = 0
        except OSError as exc:  # a full disk must not fail the prediction that was already answered
            log.warning("%s/%s: drift state not saved: %s", *key, exc)

    def history(self, role_id: str, roi_id: str) -> list[tuple[float, bool]]:
        """The ROI's last predictions (score, is_anomaly), oldest first, up to the drift window."""
        mon = self._monitors.get((role_id, roi_id))
        if mon is None:
            return []
        with self._lock:
            return list(mon.recent)

    def current(self, role_id: str, roi_id: str) -> dict | None:
        key = (role_id, roi_id)
        return self._last.get(key) or read_drift(self.data_root, role_id, roi_id)

    def forget(self, role_id: str, roi_id: str) -> None:
        """A rollback, delete or reset made another model: start the window again."""
        key = (role_id, roi_id)
        self._monitors.pop(key, None)
        self._last.pop(key, None)
        drift_path(self.data_root, role_id, roi_id).unlink(missing_ok=True)
