"""The MQTT journal/outbox on real files: what a restart finds after a crash at each step of answering."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from agent.mqtt.durable import Spool, read_outbox

MSGS = [{"topic": "anomaly/st1/tire/result", "payload": '{"request_id": "r1"}', "qos": 1},
        {"topic": "station/replies", "payload": '{"request_id": "r1"}', "qos": 1, "correlation_b64": "AQI="}]


def test_crash_after_the_outbox_write_does_not_process_the_request_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    seq = spool.record("r1", {"topic": "anomaly/st1/tire/predict", "request_id": "r1"}, b"{}")
    spool.enqueue(MSGS, "r1")  # answer()'s first step; the process dies before answered.log has the key
    assert not (tmp_path / "answered.log").exists() or "r1" not in (tmp_path / "answered.log").read_text()

    after = Spool(tmp_path)
    assert after.pending() == []  # the result is already in the outbox: not a second result
    assert after.known("r1")
    assert not (tmp_path / "journal" / f"{seq:016d}.json").exists()
    assert "r1" in (tmp_path / "answered.log").read_text().split()
    (out,) = after.outgoing()
    assert read_outbox(out) == ("r1", MSGS)  # both messages of the answer, in one file
    out.unlink()  # published
    assert Spool(tmp_path).known("r1")  # a redelivery of the request is still recognised


def test_crash_before_the_outbox_write_processes_the_request_after_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.record("r2", {"topic": "anomaly/st1/tire/predict", "request_id": "r2"}, b"payload")
    after = Spool(tmp_path)
    ((meta, payload),) = after.pending()
    assert meta["key"] == "r2" and payload == b"payload" and after.known("r2")
    after.answer("r2", meta["seq"], MSGS[:1])
    assert Spool(tmp_path).pending() == []


def test_outbox_files_of_an_older_agent_are_still_sent(tmp_path: Path) -> None:
    (tmp_path / "outbox").mkdir(parents=True)
    old = tmp_path / "outbox" / "0000000000000007.json"
    old.write_text(json.dumps(MSGS[0]))
    spool = Spool(tmp_path)
    assert spool.outgoing() == [old] and read_outbox(old) == (None, [MSGS[0]])
    spool.enqueue(MSGS[:1], "r3")
    assert [p.name for p in spool.outgoing()][0] == old.name  # sent first: sequence numbers continue after it


def test_a_key_is_answered_once_and_the_log_stays_at_its_window(tmp_path: Path) -> None:
    spool = Spool(tmp_path, remember=5)
    assert spool.answer_once("folder:x@1", MSGS[:1]) and not spool.answer_once("folder:x@1", MSGS[:1])
    assert not Spool(tmp_path, remember=5).answer_once("folder:x@1", MSGS[:1])  # also after a restart
    assert len(spool.outgoing()) == 1
    for i in range(40):
        spool.answer(f"k{i}", None, [])
    lines = (tmp_path / "answered.log").read_text().splitlines()
    assert len(lines) <= 2 * 5 + 1 and lines[-1] == "k39"  # compacted while running, newest kept
    assert Spool(tmp_path, remember=5).known("k39") and not Spool(tmp_path, remember=5).known("k30")


def test_the_publisher_keeps_an_outbox_file_until_answered_log_has_its_key(tmp_path: Path) -> None:
    """answer() wakes the publisher as soon as the outbox file is on disk (before answered.log is fsynced):
    the publisher may send it, but must not delete it before the key is logged, or a crash in between
    would find the request in the journal and answer it a second time."""
    spool = Spool(tmp_path)
    seq = spool.record("r3", {"topic": "anomaly/st1/tire/predict", "request_id": "r3"}, b"{}")
    events: list[str] = []

    def publisher() -> None:  # what OutboxPublisher does once woken: send, then wait_logged, then unlink
        (path,) = spool.outgoing()
        key, _ = read_outbox(path)
        events.append("sent")
        spool.wait_logged(key)
        events.append("may delete: " + ("logged" if "r3" in (tmp_path / "answered.log").read_text().split()
                                         else "NOT logged"))

    thread = threading.Thread(target=publisher)

    def written() -> None:
        thread.start()
        deadline = time.monotonic() + 30
        while events != ["sent"] and time.monotonic() < deadline:  # the publisher has sent (however loaded)
            time.sleep(0.01)
        time.sleep(0.3)  # ... and given time to go on: it must still be waiting, answered.log is written after
        events.append("answer logs the key")

    spool.answer("r3", seq, MSGS[:1], written=written)
    thread.join(5)
    assert events == ["sent", "answer logs the key", "may delete: logged"], events
    assert Spool(tmp_path).pending() == [] and Spool(tmp_path).known("r3")
