"""Issue 33: the agent attacked as a stranger on the network would (folder + HTTP on loopback without a
token + MQTT + OPC UA with only signed channels, one real ROI), each finding reproduced against a real
agent under the open-file limit of a systemd unit (`prlimit --nofile=1024:1024`) and now refused or
bounded with nothing changed, while every real request is answered exactly once:

1. cross-site posts to every state-changing route, a DNS-rebinding Host, out-of-range thresholds;
2. a session on a None channel the config does not list, opened by hand with a low-level client;
3. 1000 idle OPC UA sockets, 40 idle and 300 slow HTTP clients;
4. 300 predicts to unknown ROI ids over MQTT (no OPC UA nodes), ResultAck written by a second client.
"""

from __future__ import annotations

import asyncio
import base64
import json
import resource
import shutil
import socket
from pathlib import Path

import httpx
from asyncua import Client, ua

from tests.agent_proc import Agent, Observer, wait_for
from tests.broker import Broker, free_port
from tests.test_http import error_of, form, uploads
from tests.test_opcua import NS, _client_cert, _drop

ROLE, ROI = "st1", "tire"
EVIL = {"origin": "http://evil.example", "sec-fetch-site": "cross-site"}


def _state(c: httpx.Client) -> tuple:
    m = c.get(f"/models/{ROLE}/{ROI}").json()
    return m["model_version"], m["threshold"], m["samples"]["ok"], m["samples"]["ng"]


def _cross_site_posts(c: httpx.Client, good: list[Path], archive: bytes, sample_id: str) -> dict[str, httpx.Response]:
    """Every route that changes a model, posted as a page on another site would make the browser post it."""
    bodies = {
        "/fit_ok": dict(data=form(), files=uploads(good[:1])),
        "/send_ng": dict(data=form(), files=uploads(good[:1])),
        "/calibrate": dict(data=form(policy="manual", threshold=50)),
        "/reset": dict(data=form()),
        "/rollback": dict(data=form(version=1)),
        "/import": dict(data={"role_id": ROLE, "roi_id": "copy"},
                        files=[("file", ("a.tar.gz", archive, "application/gzip"))]),
        "/label": dict(data={"request_id": "x", "label": "ng"}),
        "/ui/threshold": dict(data=form(threshold=50)),
        "/predict": dict(data=form(), files=uploads(good[:1], "file")),
    }
    out = {path: c.post(path, headers=EVIL, **kw) for path, kw in bodies.items()}
    out["DELETE /samples"] = c.delete(f"/samples/{ROLE}/{ROI}/{sample_id}", headers=EVIL)
    # the other spellings of "not this page": another port of the same host, an opaque origin, a referer only
    out["same-site"] = c.post("/reset", data=form(), headers={"sec-fetch-site": "same-site"})
    out["null"] = c.post("/reset", data=form(), headers={"origin": "null"})
    out["referer"] = c.post("/reset", data=form(), headers={"referer": "http://evil.example/page"})
    return out


def _idle_sockets(port: int, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        out.append(s)
    return out


def _closed_by_peer(s: socket.socket) -> bool:
    s.settimeout(0.2)
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


async def _opcua_checks(url: str, cert: Path, key: Path) -> dict:
    out: dict = {}
    # 2. a None channel, opened by hand: HELLO, OpenSecureChannel(None), then CreateSession
    raw = Client(url)
    await raw.connect_socket()
    try:
        await raw.send_hello()
        await raw.open_secure_channel()
        try:
            await raw.create_session()
            out["none_session"] = "created"
        except ua.UaStatusCodeError as exc:
            out["none_session"] = exc.code
        await raw.close_secure_channel()
    finally:
        raw.disconnect_socket()

    async def signed(user: str | None) -> Client:
        client = Client(url)
        client.application_uri = "urn:anomaly-agent-test:plc"
        if user:
            client.set_user(user)
            client.set_password("plc-secret")
        await client.set_security_string(f"Basic256Sha256,Sign,{cert},{key}")
        await client.connect()
        return client

    # 4. the address space holds the real ROI only; an anonymous session reads but cannot acknowledge
    anon = await signed(None)
    try:
        idx = await anon.get_namespace_index(NS)
        rois = await anon.get_node(ua.NodeId("Rois", idx)).get_children()
        out["rois"] = sorted([(await n.read_browse_name()).Name for n in rois])
        counter = await anon.get_node(ua.NodeId(f"Rois/{ROLE}/{ROI}/ResultCounter", idx)).read_value()
        out["counter"] = counter
        try:
            await anon.get_node(ua.NodeId(f"Rois/{ROLE}/{ROI}/ResultAck", idx)).write_value(
                ua.DataValue(ua.Variant(counter, ua.VariantType.UInt32)))
            out["anonymous_ack"] = "written"
        except ua.UaStatusCodeError as exc:
            out["anonymous_ack"] = exc.code
        out["waiting_after_anonymous"] = await anon.get_node(
            ua.NodeId(f"Rois/{ROLE}/{ROI}/ResultsWaiting", idx)).read_value()
    finally:
        await anon.disconnect()
    plc = await signed("plc")
    try:
        await plc.get_node(ua.NodeId(f"Rois/{ROLE}/{ROI}/ResultAck", idx)).write_value(
            ua.DataValue(ua.Variant(out["counter"], ua.VariantType.UInt32)))
        out["plc_ack"] = "written"
        out["waiting_after_plc"] = await plc.get_node(
            ua.NodeId(f"Rois/{ROLE}/{ROI}/ResultsWaiting", idx)).read_value()
    finally:
        await plc.disconnect()
    return out


async def _rois_now(url: str, cert: Path, key: Path) -> list[str]:
    client = Client(url)
    client.application_uri = "urn:anomaly-agent-test:plc"
    client.set_user("plc")
    client.set_password("plc-secret")
    await client.set_security_string(f"Basic256Sha256,Sign,{cert},{key}")
    async with client:
        idx = await client.get_namespace_index(NS)
        return sorted([(await n.read_browse_name()).Name for n in
                       await client.get_node(ua.NodeId("Rois", idx)).get_children()])


def test_a_stranger_changes_no_model_and_exhausts_nothing(tmp_path: Path, data_root: Path, tire: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # this test process holds ~1400 sockets itself
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    good = sorted((tire / "test" / "good" / "rgb").glob("*.png"))
    broker = Broker(tmp_path / "broker")
    broker.start()
    pw = tmp_path / "opcua.pass"
    pw.write_text("plc-secret\n")
    cert, key = _client_cert(tmp_path, "plc")
    http_port, opc_port = free_port(), free_port()
    agent = Agent(data_root, broker.port, http_port=http_port, env={
        "ANOMALY_AGENT_OPCUA__ENABLED": "true", "ANOMALY_AGENT_OPCUA__PORT": str(opc_port),
        "ANOMALY_AGENT_OPCUA__USERNAME": "plc", "ANOMALY_AGENT_OPCUA__PASSWORD_FILE": str(pw),
        "ANOMALY_AGENT_OPCUA__SECURITY": '["Basic256Sha256_Sign"]', "ANOMALY_AGENT_OPCUA__HELLO_TIMEOUT_S": "2",
        "ANOMALY_AGENT_HTTP__HEADER_TIMEOUT_S": "3", "ANOMALY_AGENT_HTTP__RECENT_RESULTS": "5"})
    agent.args = ["prlimit", "--nofile=1024:1024", *agent.args]  # a systemd unit's default open-file limit
    agent.start()
    obs = Observer(broker.port)
    held: list[socket.socket] = []
    try:
        with httpx.Client(base_url=agent.http, timeout=120) as c:
            before = _state(c)
            archive = c.get(f"/export/{ROLE}/{ROI}").content
            sample_id = c.get(f"/samples/{ROLE}/{ROI}").json()[0]["sample_id"]

            # 1. cross-site writes: every route refused, nothing changed; framed refusals
            answers = _cross_site_posts(c, good, archive, sample_id)
            assert {k: (r.status_code, error_of(r)) for k, r in answers.items()} == {
                k: (403, "cross_site") for k in answers}
            assert all(r.headers.get("x-frame-options") == "DENY" for r in answers.values())
            assert _state(c) == before and not (data_root / "models" / ROLE / "copy").exists()
            # DNS rebinding: the page's own name is on no list, even when the browser calls it same-origin
            evil_host = {"host": f"evil.example:{http_port}"}
            assert (c.get("/", headers=evil_host).status_code, error_of(c.get("/", headers=evil_host))) == (
                403, "host_not_allowed")
            rebound = c.post("/calibrate", data=form(policy="manual", threshold=0.5), headers={
                **evil_host, "origin": f"http://evil.example:{http_port}", "sec-fetch-site": "same-origin"})
            assert (rebound.status_code, error_of(rebound)) == (403, "host_not_allowed")
            # API clients (no browser headers) and the agent's own page still work; thresholds in range only
            for value in (50, 1e308, 1e-300):
                r = c.post("/calibrate", data=form(policy="manual", threshold=value))
                assert (r.status_code, error_of(r)) == (422, "invalid_threshold"), value
            assert _state(c) == before
            own = c.post("/calibrate", data=form(policy="manual", threshold=before[1]),
                         headers={"origin": agent.http, "sec-fetch-site": "same-origin"})
            assert own.status_code == 200 and own.json()["threshold"] == before[1]
            assert c.post("/calibrate", data=form(policy="config")).status_code == 200
            version = _state(c)[0]

            # 4. 300 predicts to ids the agent does not have, over MQTT: all answered, no node made
            junk = base64.b64encode(b"not an image").decode()
            for i in range(300):
                obs.publish(f"anomaly/evil{i}/r{i}/predict", json.dumps({"request_id": f"evil-{i}", "image_b64": junk}))
            wait_for(lambda: len([m for m in obs.results() if str(m.get("request_id", "")).startswith("evil-")])
                     >= 300, 120, "300 answers to strangers")

            # 3. the flood: 1000 idle OPC UA sockets, 40 idle and 300 slow HTTP clients (one header line each)
            held += _idle_sockets(opc_port, 1000)
            held += _idle_sockets(http_port, 40)
            slow = _idle_sockets(http_port, 300)
            for s in slow:
                try:
                    s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                except OSError:
                    pass  # already closed by the cap
            held += slow
            # real work under the flood, by MQTT and the folder: each answered exactly once
            obs.publish(f"anomaly/{ROLE}/{ROI}/predict", json.dumps({
                "request_id": "real-mqtt", "image_b64": base64.b64encode(good[0].read_bytes()).decode()}))
            assert obs.wait_result("real-mqtt", 120)["status"] == "ok"
            inbox = data_root / "inbox" / ROLE / ROI / "predict"
            inbox.mkdir(parents=True, exist_ok=True)
            _drop(good[1], inbox / "real-folder.png")
            result = data_root / "results" / ROLE / ROI / "real-folder.json"
            wait_for(result.exists, 120, "the folder's result")
            folder_result = json.loads(result.read_text())
            assert folder_result["status"] == "ok"
            # the slow and idle HTTP clients are closed by the agent (header timeout), then HTTP serves again
            wait_for(lambda: all(_closed_by_peer(s) for s in slow), 30, "slow HTTP clients closed")
            with httpx.Client(base_url=agent.http, timeout=120) as c2:
                r = c2.post("/predict", data=form(request_id="real-http"), files=uploads(good[2:3], "file"))
                assert r.status_code == 200 and r.json()["request_id"] == "real-http"
                health = c2.get("/health").json()
            assert health["status"] == "online", health
            # OPC UA: the idle sockets were closed (no HELLO), a PLC connects
            opc = asyncio.run(_opcua_checks(f"opc.tcp://127.0.0.1:{opc_port}/anomaly-agent", cert, key))
            assert opc["none_session"] == ua.StatusCodes.BadSecurityPolicyRejected, opc
            assert opc["rois"] == [f"{ROLE}/{ROI}"], opc["rois"][:5]
            assert opc["anonymous_ack"] == ua.StatusCodes.BadUserAccessDenied, opc
            assert opc["plc_ack"] == "written", opc
            with httpx.Client(base_url=agent.http, timeout=120) as c3:
                assert _state(c3)[0] == version
                # a ROI reset loses its nodes (its owner, an API client, may reset it)
                assert c3.post("/reset", data=form()).status_code == 200
            url = f"opc.tcp://127.0.0.1:{opc_port}/anomaly-agent"
            wait_for(lambda: asyncio.run(_rois_now(url, cert, key)) == [], 30, "the reset ROI's nodes removed")
        for s in held:
            s.close()
        assert agent.alive() and agent.sigterm() == 0
        log = agent.log.read_text()
        for thread in ("opcua", "mqtt-out", "folder-rescan", "http"):
            assert f"intake thread(s) {thread}" not in log
        assert "Too many open files" not in log, log[-3000:]
        assert "open files: limit 1024" in log
        refusals = [ln for ln in log.splitlines() if "max_connections" in ln or "no HELLO" in ln]
        assert 0 < len(refusals) < 20, refusals[:20]  # a flood is a few lines, not 28,000 a minute
        real = ("real-mqtt", folder_result["request_id"], "real-http")
        assert sorted(m["request_id"] for m in obs.results() if m.get("request_id") in real) == sorted(real)
    finally:
        for s in held:
            s.close()
        obs.close()
        agent.cleanup()
        broker.stop()
        shutil.rmtree(tmp_path / "broker", ignore_errors=True)
