"""Bounds a long-running agent needs: ROIs on disk and in memory, decoded image size, a lost manifest,
the answer counts of a fit, and a /health that says when intake has died or an input waits too long."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.config import AgentConfig
from agent.health import health_body
from agent.jobs import Job, Outcome
from agent.runtime import Runtime
from agent.worker import Worker
from core.errors import InputError
from core.image_io import decode_image
from core.storage import RoiStore
from tests.test_daemon import img_bytes


def _cfg(root: Path, **limits: object) -> AgentConfig:
    return AgentConfig.model_validate({"data_root": str(root), "device": "cpu",
                                       "backbone": {"name": "efficientnet_lite0", "resolution": 192},
                                       "defaults": {"coreset_min": 1000}, "limits": limits})


def _fit(rt: Runtime, roi: str, data: bytes) -> dict:
    return rt.model("st1", roi).fit_ok([(data, rt.decode(data), {"source": "test"})])


def test_decoded_bytes_are_capped_from_the_header() -> None:
    """Pixels alone let a 16-bit colour image of 9999x9999 (600 KB as PNG) cost 3.9 GB: the header says
    pixels x channels x bytes per sample, refused before decoding."""
    bomb = cv2.imencode(".png", np.zeros((9999, 9999, 3), np.uint16))[1].tobytes()
    with pytest.raises(InputError) as err:
        decode_image(bomb)
    assert err.value.code == "too_many_bytes" and "599880006 bytes" in err.value.message
    small16 = cv2.imencode(".png", np.zeros((300, 200, 3), np.uint16))[1].tobytes()
    with pytest.raises(InputError):
        decode_image(small16, max_decoded_bytes=300 * 200 * 3 * 2 - 1)  # two bytes per sample counted
    assert decode_image(small16, max_decoded_bytes=300 * 200 * 3 * 2).bit_depth == 16


def test_roi_count_is_bounded_and_least_recently_used_models_leave_memory(tmp_path: Path, tire: Path) -> None:
    rt = Runtime(_cfg(tmp_path / "data", max_rois=3, max_loaded_rois=2, idle_unload_s=0.5))
    data = img_bytes(tire)
    for roi in ("a", "b", "c"):
        _fit(rt, roi, data)
    assert rt.loaded_keys() == [("st1", "b"), ("st1", "c")]  # "a", the least recently used, left when "c" came
    with pytest.raises(InputError) as err:
        _fit(rt, "d", data)
    assert err.value.code == "too_many_rois" and "limits.max_rois" in err.value.message
    assert not RoiStore(tmp_path / "data", "st1", "d").root.exists()  # nothing made on disk for the refused ROI
    score = rt.model("st1", "a", create=False).predict([rt.decode(data)])[0].score  # loads again from disk
    assert rt.loaded_keys() == [("st1", "c"), ("st1", "a")]  # and "b" made room for it
    assert score == pytest.approx(0.0, abs=0.05)  # its own training image
    _fit(rt, "a", img_bytes(tire, i=1))  # an existing ROI may still learn
    time.sleep(0.6)
    assert len(rt.unload_idle()) == 2 and rt.loaded_count() == 0


def test_a_deleted_manifest_is_rebuilt_from_the_samples_by_the_agent(tmp_path: Path, fitted_template: Path,
                                                                      tire: Path) -> None:
    """reliability.md promised it; the agent said model_not_fitted because only the manifest was looked for."""
    root = tmp_path / "data"
    shutil.copytree(fitted_template, root)
    rt = Runtime(_cfg(root))
    probe = rt.decode(img_bytes(tire, "hole"))
    before = rt.model("st1", "tire", create=False).predict([probe])[0]
    (root / "models" / "st1" / "tire" / "manifest.json").unlink()
    rt.forget("st1", "tire")
    model = rt.model("st1", "tire", create=False)
    after = model.predict([probe])[0]
    assert model.manifest["counts"]["ok"] == 6 and after.score == pytest.approx(before.score, abs=1e-5)
    assert after.threshold == pytest.approx(before.threshold, rel=1e-6)
    assert (root / "models" / "st1" / "tire" / "manifest.json").exists()


def test_added_counts_only_what_was_stored(tmp_path: Path, fitted_template: Path, tire: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(fitted_template, root)
    cfg = _cfg(root)
    worker = Worker(lambda: Runtime(cfg), cfg.worker)
    worker.start()
    stored = sorted((tire / "train" / "good" / "rgb").glob("*.png"))[0].read_bytes()  # in the template
    new = img_bytes(tire, i=3)
    answers: list[dict] = []
    done = threading.Event()

    def got(_job: Job, outcome: Outcome) -> None:
        answers.append(outcome.result)
        done.set()

    worker.submit(Job("st1", "tire", "fit_ok", [stored, new, new], "r1", reply=got))
    assert done.wait(120)
    worker.stop()
    data = answers[0]["data"]
    # one image already stored, one sent twice in this request: only the repeat is a duplicate in the batch
    assert (data["added"], data["duplicates"], data["duplicates_in_batch"], data["samples"]["ok"]) == (1, 2, 1, 7), data


def test_health_tells_a_dead_intake_thread_and_an_input_waiting_too_long(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "data")
    cfg.worker.stuck_after_s = 0.3
    rt = Runtime(cfg)
    worker = Worker(lambda: rt, cfg.worker)  # not started: a submitted job waits, as behind a hung worker
    body = health_body(rt, worker, time.monotonic(), "t")
    assert body["status"] == "online" and body["oldest_unanswered_s"] is None
    dead = threading.Thread(target=lambda: None, name="folder-rescan")
    dead.start()
    dead.join()
    worker.watch("folder-rescan", dead)
    worker.submit(Job("st1", "tire", "predict", [b""], "r1"))
    time.sleep(0.4)
    body = health_body(rt, worker, time.monotonic(), "t")
    assert body["status"] == "degraded" and body["intake"] == {"folder-rescan": False}, body
    assert body["oldest_unanswered_s"] >= 0.3 and len(body["problems"]) == 2, body
    assert worker.dead_intakes() == ["folder-rescan"]


def test_watchdog_pings_stop_while_an_intake_thread_is_dead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pings go to a real notify socket; a dead intake thread stops them (systemd then restarts us)."""
    import socket

    from agent.daemon import Heartbeat, Notifier

    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "2")  # ping at every call
    cfg = _cfg(tmp_path / "data")
    worker = Worker(lambda: None, cfg.worker)  # type: ignore[arg-type, return-value]
    beat = Heartbeat(Notifier())
    beat.worker = worker
    alive = threading.Event()
    thread = threading.Thread(target=alive.wait, name="mqtt-feed")
    thread.start()
    worker.watch("mqtt-feed", thread)
    beat()
    assert b"WATCHDOG=1" in sock.recv(100)
    alive.set()
    thread.join()
    beat()
    with pytest.raises(TimeoutError):
        sock.recv(100)
    sock.close()


def test_a_flood_on_one_ingress_leaves_the_queue_to_the_others() -> None:
    """Issue 33: 3000 MQTT requests filled the one queue and HTTP's /predict got queue_full. One ingress holds
    at most worker.ingress_share of the queue; the others find room; a job taken by the worker frees a place."""
    from agent.config import WorkerConfig

    worker = Worker(lambda: None, WorkerConfig(queue_size=8, ingress_share=0.5))  # type: ignore[arg-type,return-value]

    def job(ingress: str, i: int) -> Job:
        return Job("st1", "r", "predict", [b"x"], f"{ingress}-{i}", ingress=ingress)

    flood = [worker.submit(job("mqtt", i), timeout=0) for i in range(20)]
    assert flood.count(True) == 4 and not any(flood[4:])  # half the queue, then backpressure
    assert [worker.submit(job("http", i), timeout=0) for i in range(5)] == [True] * 4 + [False]
    t0 = time.monotonic()
    assert not worker.submit(job("mqtt", 99), timeout=0.3) and time.monotonic() - t0 >= 0.25  # waits, then no
    taken = worker._next(0)
    assert taken is not None and taken.ingress == "mqtt"
    # taken out of the queue but not run yet (set aside by a burst or another ROI's work): it still counts
    assert not worker.submit(job("mqtt", 100), timeout=0) and worker.depth() == 7
    worker._process_safely([taken])  # run (here it fails: no model) and answered: its place is free
    assert worker.submit(job("mqtt", 100), timeout=0)  # the place it left
    assert worker.depth() == 8


def test_long_model_work_answers_other_rois_between_its_steps_and_never_recursively() -> None:
    """agent/process/batches.py Between: the progress ticks of one ROI's long work (a tuning, a threshold
    update) serve the other ROIs' waiting predictions every `every_s`, only while some ROI's work runs, and
    a tick from inside such an answer does nothing."""
    import time

    from agent.process.batches import Between

    served: list[tuple[str, str]] = []
    between: Between

    def serve(busy: tuple[str, str]) -> None:
        served.append(busy)
        between.tick()  # the answered prediction's own progress: must not serve again from inside

    between = Between(lambda: None, serve, every_s=0.05)
    between.tick()
    assert served == []  # no ROI at work: nothing to serve around
    with between.working(("st1", "a")):
        for _ in range(20):  # a long step loop: about 0.2 s of ticks
            between.tick()
            time.sleep(0.01)
        with between.working(("st1", "b")):  # nested work (a served prediction) names its own ROI
            assert between.busy == ("st1", "b")
        assert between.busy == ("st1", "a")
    assert 2 <= len(served) <= 6 and set(served) == {("st1", "a")}, served  # throttled, never recursive
    assert between.busy is None
