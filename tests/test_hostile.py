"""Hostile and broken input: a generated corpus (tests/hostile_inputs.py) and property-based fuzzing
(hypothesis) of the decode/validate entry point and the MQTT payload parser, then the corpus through
every ingress of a running agent (folder, MQTT, HTTP): every input ends as one result or one error with
the expected code, and the agent keeps running.

ANOMALY_RELIABILITY_OUT=dir writes the figures (inputs tried, crashes, unclear errors) as fuzz.json.
"""

from __future__ import annotations

import base64
import json
import os
from collections import Counter
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.mqtt.ingest import parse_request
from core.errors import InputError
from core.image_io import decode_image
from tests.agent_proc import Agent, Observer, wait_for
from tests.broker import Broker, free_port
from tests.hostile_inputs import BAD_IDS, OK, Case, corpus
from tests.test_daemon import drop

CORPUS = corpus()
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


CORE = Counter()  # inputs tried per core-level suite, written to fuzz_core.json (ANOMALY_RELIABILITY_OUT)


@pytest.fixture(scope="module", autouse=True)
def core_figures():
    yield
    if os.environ.get("ANOMALY_RELIABILITY_OUT") and CORE:
        out = Path(os.environ["ANOMALY_RELIABILITY_OUT"])
        out.mkdir(parents=True, exist_ok=True)
        # every one of them ended decoded or in the product's own InputError with a code: else the run failed
        (out / "fuzz_core.json").write_text(json.dumps({"inputs": dict(CORE), "crashes": 0, "unclear": 0}, indent=1))


def outcome(call: object) -> str:
    try:
        call()  # type: ignore[operator]
        return OK
    except InputError as exc:
        return exc.code


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_corpus_decodes_or_fails_with_its_code(case: Case) -> None:
    got = outcome(lambda: decode_image(case.data, mm_per_px=case.mm_per_px, min_side=8))
    assert got in case.expect, (case.name, got)
    CORE["decode_image_corpus"] += 1


def test_exif_orientation_is_applied() -> None:
    from tests.hostile_inputs import exif_rotated_jpeg

    assert decode_image(exif_rotated_jpeg()).size == (48, 64)  # stored 64x48, orientation 6


def _valid_images() -> list[bytes]:
    return [c.data for c in CORPUS if c.expect == {OK} and c.mm_per_px is None]


@FUZZ
@given(st.binary(max_size=4096))
def test_fuzz_decode_random_bytes(data: bytes) -> None:
    CORE["decode_image_random_bytes"] += 1
    try:
        decode_image(data, min_side=8)
    except InputError as exc:
        assert exc.code and exc.message


@FUZZ
@given(st.sampled_from(range(len(_valid_images()))), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                              max_size=12),
       st.integers(0, 10**6), st.sampled_from(["flip", "truncate", "insert"]))
def test_fuzz_decode_mutated_images(index: int, edits: list[tuple[int, int]], cut: int, how: str) -> None:
    """Valid PNG/JPEG/TIFF/BMP files with bytes changed, cut or inserted: decoded, or one InputError."""
    CORE["decode_image_mutated"] += 1
    data = bytearray(_valid_images()[index])
    for pos, value in edits:
        if how == "flip":
            data[pos % len(data)] = value
        elif how == "insert":
            data.insert(pos % len(data), value)
    if how == "truncate":
        data = data[: cut % len(data)]
    try:
        img = decode_image(bytes(data), min_side=8)
        assert img.rgb.dtype.name == "float32" and float(img.rgb.min()) >= 0 and float(img.rgb.max()) <= 1
    except InputError as exc:
        assert exc.code and exc.message


json_values = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                       max_size=4), max_leaves=12)
request_keys = st.sampled_from(["image_b64", "images_b64", "mm_per_px", "source", "heatmap", "threshold", "reset",
                                "policy", "request_id", "ok_percentile"])


@FUZZ
@given(st.sampled_from(["predict", "fit_ok", "send_ng", "calibrate"]),
       st.one_of(st.binary(max_size=512), st.dictionaries(request_keys, json_values, max_size=6).map(
           lambda d: json.dumps(d).encode()), st.text(max_size=200).map(str.encode)),
       st.dictionaries(st.sampled_from(["mm_per_px", "source", "heatmap", "threshold", "policy"]),
                       st.text(max_size=20), max_size=3))
def test_fuzz_mqtt_payload_parser(action: str, payload: bytes, user: dict) -> None:
    CORE["mqtt_parser"] += 1
    try:
        images, meta = parse_request(action, payload, user, 1 << 20)
    except InputError as exc:
        codes = {"payload_too_large", "invalid_json", "invalid_base64", "missing_image", "invalid_payload"}
        assert exc.code in codes, exc.code
        return
    assert all(isinstance(i, bytes) for i in images) and isinstance(meta, dict)
    assert action == "calibrate" or images


# ----------------------------------------------------------------- through every ingress, end to end
def test_hostile_corpus_through_folder_mqtt_and_http(tmp_path: Path, data_root: Path) -> None:
    root = data_root
    broker = Broker(tmp_path / "broker")
    broker.start()
    port = free_port()
    agent = Agent(root, broker.port, http_port=port, env={"ANOMALY_AGENT_MQTT__MAX_PAYLOAD_BYTES": "2000000"}).start()
    obs = Observer(broker.port)
    outcomes: dict[str, list[tuple[str, str, frozenset[str]]]] = {"folder": [], "mqtt": [], "http": []}

    def code_of(result: dict) -> str:
        return OK if result["status"] == "ok" else result["error"]["code"]

    try:
        inbox = root / "inbox" / "st1" / "tire" / "predict"
        for c in CORPUS:  # folder: the image, with a sidecar for mm_per_px
            drop(inbox, c.filename, c.data, None if c.mm_per_px is None else {"mm_per_px": c.mm_per_px})
        for name, text in (("sidecar_not_json", "{nope"), ("sidecar_list", "[1, 2]"),
                           ("sidecar_mm_text", json.dumps({"mm_per_px": "abc"}))):
            drop(inbox, f"{name}.png", CORPUS[0].data, text)  # type: ignore[arg-type]
        for c in CORPUS:  # MQTT: JSON with base64
            obs.publish("anomaly/st1/tire/predict", json.dumps({"request_id": f"m-{c.name}", "mm_per_px": c.mm_per_px,
                                                                "image_b64": base64.b64encode(c.data).decode()}))
        mqtt_only = [("not_json", b"{nope", {"invalid_json"}), ("json_array", b"[1]", {"invalid_payload"}),
                     ("bad_base64", json.dumps({"request_id": "m-bad_base64", "image_b64": "!!!"}).encode(),
                      {"invalid_base64"}),
                     ("b64_not_string", json.dumps({"request_id": "m-b64_not_string", "image_b64": 5}).encode(),
                      {"invalid_base64"}),
                     ("over_limit", json.dumps({"request_id": "m-over_limit", "image_b64": "A" * 2_100_000}).encode(),
                      {"payload_too_large"})]
        for _name, payload, _ in mqtt_only:
            obs.publish("anomaly/st1/tire/predict", payload)
        for role, roi in BAD_IDS:
            if "/" not in role + roi and "\0" not in role + roi:  # not a topic level at all / not a legal topic
                obs.publish(f"anomaly/{role}/{roi}/predict", CORPUS[0].data)
        with httpx.Client(base_url=agent.http, timeout=120) as c:
            for case in CORPUS:
                data = {"role_id": "st1", "roi_id": "tire"}
                if case.mm_per_px is not None:
                    data["mm_per_px"] = str(case.mm_per_px)
                r = c.post("/predict", data=data, files={"file": (case.filename, case.data, "image/png")})
                got = OK if r.status_code == 200 else r.json()["error"]["code"]
                expect = case.expect | ({"invalid_field"} if case.mm_per_px is not None else set())
                outcomes["http"].append((case.name, got, frozenset(expect)))
            for role, roi in BAD_IDS:
                r = c.post("/predict", data={"role_id": role, "roi_id": roi},
                           files={"file": ("x.png", CORPUS[0].data, "image/png")})
                outcomes["http"].append((f"id {role!r}/{roi!r}", r.json().get("error", {}).get("code", OK),
                                         frozenset({"invalid_id"})))

        # MQTT answers, by request id (raw-bytes requests without one: by the error code on their topic)
        for c in CORPUS:
            outcomes["mqtt"].append((c.name, code_of(obs.wait_result(f"m-{c.name}", 120)), c.expect))
        for name, _, expect in mqtt_only:
            rid = f"m-{name}"
            if name in ("not_json", "json_array"):
                got = wait_for(lambda e=expect: next((code_of(r) for r in obs.results() if r["request_id"].startswith(
                    "gen:") and code_of(r) in e), None), 60, name)
            else:
                got = code_of(obs.wait_result(rid, 60))
            outcomes["mqtt"].append((name, got, frozenset(expect)))
        for role, roi in BAD_IDS:
            if "/" not in role + roi and "\0" not in role + roi:
                got = wait_for(lambda r=role, o=roi: next((code_of(x) for x in obs.results() if x["role_id"] == r
                                                           and x["roi_id"] == o), None), 60, f"id {role}/{roi}")
                outcomes["mqtt"].append((f"id {role!r}/{roi!r}", got, frozenset({"invalid_id"})))

        # folder answers: results/<role>/<roi>/<stem>.json, one per file
        results = root / "results" / "st1" / "tire"
        expected_files = [(c.name, Path(c.filename).stem, c.expect) for c in CORPUS] + [
            (n, n, frozenset({"invalid_sidecar", "invalid_mm_per_px"})) for n in ("sidecar_not_json", "sidecar_list",
                                                                                   "sidecar_mm_text")]
        wait_for(lambda: all((results / f"{stem}.json").exists() for _, stem, _ in expected_files), 120,
                 "a folder result for every file")
        for name, stem, expect in expected_files:
            outcomes["folder"].append((name, code_of(json.loads((results / f"{stem}.json").read_text())), expect))
        for role, roi in (("stätion", "roi"), ("st1", "r" * 65), ("st1", "roi name")):
            drop(root / "inbox" / role / roi / "predict", "x.png", CORPUS[0].data)
        rejected = root / "rejected" / "_invalid"
        wait_for(lambda: len(list(rejected.glob("*.error.json"))) == 3, 60, "bad-id folders rejected")
        for err in rejected.glob("*.error.json"):
            outcomes["folder"].append((err.name, json.loads(err.read_text())["code"], frozenset({"invalid_id"})))
        assert agent.alive(), agent.log.read_text()[-3000:]
        assert "Traceback" not in agent.log.read_text(), agent.log.read_text()[-3000:]
    finally:
        obs.close()
        broker.stop()

    figures = {ingress: {"inputs": len(rows), "crashes": 0 if agent.alive() else 1,
                         "unclear": [(n, got) for n, got, exp in rows if got not in exp]}
               for ingress, rows in outcomes.items()}
    print(json.dumps(figures, indent=1))
    if os.environ.get("ANOMALY_RELIABILITY_OUT"):
        out = Path(os.environ["ANOMALY_RELIABILITY_OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "fuzz.json").write_text(json.dumps({"figures": figures, "outcomes": {
            k: [(n, g, sorted(e)) for n, g, e in v] for k, v in outcomes.items()}}, indent=1))
    assert all(not f["unclear"] for f in figures.values()), figures
    assert agent.sigterm() == 0
