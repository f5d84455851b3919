"""Single inputs that used to stop an intake thread or every later start ("poison pills"): each gets its
own answer, the next normal input is answered, a restart comes up, nothing outside the data root moves."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from agent.mqtt.durable import Spool
from core.errors import InputError
from core.ids import ID_PATTERN, safe_text
from core.storage import read_bounded
from tests.agent_proc import Agent, Observer, folder_completions, wait_for
from tests.broker import Broker
from tests.test_daemon import drop, img_bytes

NESTED = b'{"a":' + b"[" * 100_000


def test_safe_text_escapes_what_cannot_reach_a_file_a_log_or_a_key() -> None:
    assert safe_text("st1\nFAKE LOG LINE") == "st1\\x0aFAKE LOG LINE"
    assert safe_text("\x1b[31mred") == "\\x1b[31mred"
    assert safe_text(os.fsdecode(b"bad\xffname.png")) == "bad\\udcffname.png"  # a non-UTF-8 file name
    assert safe_text("x" * 10_000) == "x" * 200
    for text in ("a\ud800b", "\x00", "ok"):
        safe_text(text).encode("utf-8")  # always encodable
    assert not ID_PATTERN.match("roi\n") and ID_PATTERN.match("roi")


def test_bounded_reader_refuses_links_fifos_and_oversize_files_before_reading(tmp_path: Path) -> None:
    big = tmp_path / "sparse.png"
    with open(big, "wb") as fh:
        fh.truncate(3 << 30)  # 3 GB, sparse: reading it would cost 3 GB of RAM
    with pytest.raises(InputError) as err:
        read_bounded(big, 1 << 20)
    assert err.value.code == "file_too_large"
    link = tmp_path / "zero.png"
    link.symlink_to("/dev/zero")
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    for path in (link, fifo):
        with pytest.raises(InputError) as err:
            read_bounded(path, 1 << 20)  # neither follows the link nor blocks on the FIFO
        assert err.value.code == "not_a_regular_file"
    (tmp_path / "ok.png").write_bytes(b"12345")
    assert read_bounded(tmp_path / "ok.png", 5) == b"12345"


def test_answered_log_takes_any_key_and_the_next_start_reads_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    keys = [os.fsdecode(b"folder:/p/bad\xffname.png@t"), "rid\nwith newline", "lone \ud800 surrogate"]
    for k in keys:
        spool.answer(k, None, [])
    again = Spool(tmp_path)  # a restart
    assert all(again.known(k) for k in keys) and not again.known("other")


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _bomb16() -> bytes:
    """A 16-bit RGB PNG of 9999x9999 in ~600 KB: 600 MB once decoded (3.9 GB of RSS before the cap)."""
    import cv2
    import numpy as np

    return cv2.imencode(".png", np.zeros((9999, 9999, 3), np.uint16))[1].tobytes()


def _peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("VmHWM")).split()[1]) / 1024


def test_poison_pills_through_the_folder_mqtt_and_http(data_root: Path, tire: Path, broker: Broker,
                                                       tmp_path: Path) -> None:
    import base64

    import httpx

    from tests.broker import free_port

    decoy = tmp_path / "decoy"  # outside the data root: must stay exactly as it is
    (decoy / "a" / "b").mkdir(parents=True)
    (decoy / "a" / "b" / "c.png").write_bytes(img_bytes(tire))
    (decoy / "secret.png").write_bytes(b"not yours")
    before = _tree_hashes(decoy)
    obs = Observer(broker.port)
    port = free_port()
    agent = Agent(data_root, broker.port, http_port=port,
                  env={"ANOMALY_AGENT_MQTT__MAX_PAYLOAD_BYTES": str(1 << 20)}).start()
    inbox = data_root / "inbox" / "st1" / "tire" / "predict"
    good = img_bytes(tire)
    bomb = _bomb16()
    inbox.mkdir(parents=True, exist_ok=True)
    drop(inbox, "nested.png", good, NESTED.decode())  # type: ignore[arg-type]  # sidecar: deep nesting
    badname = os.fsencode(inbox) + b"/bad\xffname.png"
    with open(badname, "wb") as fh:
        fh.write(good)
    drop(inbox, "heatfalse.png", good, {"heatmap": "false"})
    os.mkfifo(inbox / "fifo.png")
    (inbox / "link.png").symlink_to(decoy / "secret.png")
    (data_root / "inbox" / "evil").symlink_to(decoy)  # a symlinked folder: role/roi/action below it
    long_name = "L" * 230 + ".png"
    drop(inbox, long_name, good)
    drop(inbox, "bomb16.png", bomb)
    drop(inbox, "longid.png", good, {"request_id": "r" * 10_000})
    obs.publish("anomaly/st1/tire/predict", NESTED)
    obs.publish("anomaly/st1/tire/predict", json.dumps({"request_id": "lone\ud800x", "image_b64": ""}))
    obs.publish("anomaly/st1/tire/predict", json.dumps({"request_id": "k" * 10_000, "image_b64": ""}))
    obs.publish("anomaly/st1/tire/predict", json.dumps({"request_id": "bomb16",
                                                        "image_b64": base64.b64encode(bomb).decode()}))
    # over the v5 Maximum Packet Size the agent announced: the broker never sends it (no memory spent)
    obs.publish("anomaly/st1/tire/predict", b"\x89PNG" + b"\0" * (3 << 20))
    obs.publish("anomaly/st1/tire/predict", json.dumps({"request_id": "mqtt-after",
                                                        "image_b64": base64.b64encode(good).decode()}))
    with httpx.Client(base_url=agent.http, timeout=60) as c:
        form = {"role_id": "st1", "roi_id": "tire"}
        pills = [({**form, "request_id": "h" * 10_000}, good), (form, bomb), (form, NESTED),
                 ({"role_id": "st1\n", "roi_id": "tire"}, good)]
        codes = []
        for data, body in pills:
            r = c.post("/predict", data=data, files={"file": ("x.png", body, "image/png")})
            codes.append(r.json()["error"]["code"])
            after = c.post("/predict", data=form, files={"file": ("ok.png", good, "image/png")})
            assert after.status_code == 200, after.text  # after each pill, a normal input is answered
        assert codes == ["invalid_field", "too_many_bytes", "unknown_format", "invalid_id"], codes
    drop(inbox, "after.png", good)
    results = data_root / "results" / "st1" / "tire"
    wait_for(lambda: (results / "after.json").exists() and (results / "nested.json").exists()
             and (results / "bomb16.json").exists() and (results / "longid.json").exists()
             and (results / "heatfalse.json").exists() and os.path.exists(os.fsencode(results) + b"/bad\xffname.json"),
             90, "every folder file answered")
    nested = json.loads((results / "nested.json").read_text())
    assert nested["status"] == "error" and nested["error"]["code"] == "invalid_sidecar", nested
    assert "heatmap_file" not in json.loads((results / "heatfalse.json").read_text())["data"]
    invalid = data_root / "rejected" / "_invalid"
    wait_for(lambda: len(list(invalid.glob("*.error.json"))) >= 3, 30, "link, FIFO and long name rejected")
    codes = sorted(json.loads(p.read_text())["code"] for p in invalid.glob("*.error.json"))
    assert codes == ["name_too_long", "not_a_regular_file", "not_a_regular_file"], codes
    wait_for(lambda: any(r["status"] == "error" and r["error"]["code"] == "invalid_json" for r in obs.results()),
             30, "the nested MQTT payload answered")
    wait_for(lambda: any(r["request_id"] == safe_text("lone\ud800x") for r in obs.results()), 30, "lone surrogate id")
    wait_for(lambda: any(r["request_id"] == "mqtt-after" for r in obs.results()), 60, "MQTT answered after the pills")
    by_id = {r["request_id"]: r for r in obs.results()}
    assert by_id["k" * 64 + "...(cut)"]["error"]["code"] == "invalid_request_id"
    assert by_id["bomb16"]["error"]["code"] == "too_many_bytes" and by_id["mqtt-after"]["status"] == "ok"
    assert not any(r.get("error", {}).get("code") == "payload_too_large" for r in obs.results())
    for name, code in (("bomb16", "too_many_bytes"), ("longid", "invalid_request_id")):
        res = json.loads((results / f"{name}.json").read_text())
        assert res["error"]["code"] == code and len(res["request_id"]) < 100, res
    peak = _peak_rss_mb(agent.proc.pid)
    assert peak < 1500, f"peak RSS {peak:.0f} MB"  # the 16-bit bombs cost 3.9 GB before the cap
    time.sleep(1.5)  # two rescans: nothing below the symlinked folder may be touched
    assert _tree_hashes(decoy) == before and (decoy / "a" / "b" / "c.png").exists()
    assert agent.sigterm() == 0
    agent.start()  # a restart comes up (answered.log and processing/ hold the pills' traces) and answers
    drop(inbox, "after_restart.png", good)
    wait_for(lambda: (results / "after_restart.json").exists(), 60, "answered after the restart")
    assert set(folder_completions(data_root, "tire").values()) == {1}
    assert _tree_hashes(decoy) == before
    assert agent.sigterm() == 0
    obs.close()


def test_a_chunked_http_body_is_stopped_at_the_limit(data_root: Path) -> None:
    """No Content-Length (Transfer-Encoding: chunked): the body is counted as it streams and refused
    at max_request_bytes (1 MB here) while the client is still sending 64 MB."""
    import select
    import socket

    from tests.broker import free_port

    port = free_port()
    agent = Agent(data_root, env={"ANOMALY_AGENT_HTTP__MAX_REQUEST_BYTES": str(1 << 20)}, http_port=port).start()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
              b"Content-Type: multipart/form-data; boundary=b\r\n\r\n")
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
    s.sendall(b"%x\r\n%s\r\n" % (len(head), head))  # a valid multipart start, then an endless file
    chunk = b"x" * 65536
    sent, answer = 0, b""
    while sent < 64 << 20:
        try:
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            break  # the agent stopped reading and closed
        sent += len(chunk)
        if select.select([s], [], [], 0)[0]:
            answer = s.recv(65536)
            break
    deadline = time.monotonic() + 10
    while b"}" not in answer and time.monotonic() < deadline:  # headers and body may come apart
        more = s.recv(65536)
        if not more:
            break
        answer += more
    s.close()
    assert answer.startswith(b"HTTP/1.1 413") and b"payload_too_large" in answer, answer[:300]
    assert sent < 16 << 20, sent  # refused long before the end of the body
    assert agent.sigterm() == 0


def test_a_request_id_is_scoped_by_roi_and_action_and_a_reuse_is_answered(data_root: Path, tire: Path,
                                                                          broker: Broker) -> None:
    """Two stations numbering from 1: the same id on another ROI or action is a new request. The same id on
    the same ROI and action: with the same payload its stored result comes again (`replay: true`, also after
    a restart); with another payload `duplicate_request` (before, both were dropped unanswered)."""
    import base64

    obs = Observer(broker.port)
    agent = Agent(data_root, broker.port).start()
    image = json.dumps({"request_id": "1", "image_b64": base64.b64encode(img_bytes(tire)).decode()})
    other = json.dumps({"request_id": "1", "image_b64": base64.b64encode(img_bytes(tire, "hole")).decode()})

    def answers() -> list[dict]:
        return [r for r in obs.results() if r["request_id"] == "1"]

    obs.publish("anomaly/st1/tire/predict", image)
    obs.publish("anomaly/st1/other/predict", image)
    wait_for(lambda: len(answers()) == 2, 60, "two answers to id 1")
    first = next(r for r in answers() if r["roi_id"] == "tire")
    assert first["status"] == "ok" and "replay" not in first
    obs.publish("anomaly/st1/tire/predict", image)  # the same request again (a PLC retrying)
    obs.publish("anomaly/st1/tire/predict", other)  # another image under a used id
    wait_for(lambda: len(answers()) == 4, 60, "four answers to id 1")
    assert agent.sigterm() == 0
    agent.start()
    obs.publish("anomaly/st1/tire/predict", image)
    wait_for(lambda: len(answers()) == 5, 60, "the replay after a restart")
    got = [(r["roi_id"], r["status"], (r.get("error") or {}).get("code"), r.get("replay", False)) for r in answers()]
    assert sorted(got[:2]) == [("other", "error", "model_not_fitted", False), ("tire", "ok", None, False)], got
    assert got[2:] == [("tire", "ok", None, True), ("tire", "error", "duplicate_request", False),
                       ("tire", "ok", None, True)], got
    replays = [r for r in answers() if r.get("replay")]
    # the stored result, not a rerun: a rerun would score the same image alike, but carry its own timestamp
    assert replays and all(r["timestamp_utc"] == first["timestamp_utc"] and r["data"] == first["data"]
                           for r in replays), (first, replays)
    dup = next(r for r in answers() if r["status"] == "error" and r["roi_id"] == "tire")
    assert "another payload" in dup["error"]["message"]
    assert agent.sigterm() == 0
    obs.close()
