"""The OPC UA server against real clients (issue 25): the agent as a subprocess with OPC UA on a free
loopback port, images by the watched folder and by MQTT, a real `asyncua` client in this process
subscribed to ResultReady events and reading the handshake; a node-opcua client (an independent
implementation) reading the same nodes and receiving the events; security (anonymous refused on a
non-loopback endpoint, user/password, Basic256Sha256 SignAndEncrypt with a trusted client certificate);
configuration errors exit 2 naming the key."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from asyncua import Client, ua
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.agent_proc import Agent, Observer
from tests.broker import Broker, free_port
from tests.conftest import AGENT_ENV_KEYS
from tests.require import missing

ROOT = Path(__file__).resolve().parents[1]
NS = "urn:anomaly-agent:vision"


def _drop(src: Path, dst: Path) -> None:
    """An image into the watched folder as a camera should: written beside it, then renamed in (the agent
    may claim a file the moment it appears; shutil.copy's chmod after the write then found it gone)."""
    tmp = dst.parents[4] / f".{dst.name}.part"  # the data root: same file system, outside the inbox
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _opcua_env(port: int, **extra: str) -> dict[str, str]:
    return {"ANOMALY_AGENT_OPCUA__ENABLED": "true", "ANOMALY_AGENT_OPCUA__PORT": str(port), **extra}


class Events:
    def __init__(self) -> None:
        self.items: list = []

    def event_notification(self, event: object) -> None:
        self.items.append(event)


async def _subscribe(client: Client) -> tuple[int, Events]:
    idx = await client.get_namespace_index(NS)
    etype = await client.nodes.root.get_child(["0:Types", "0:EventTypes", "0:BaseEventType",
                                               f"{idx}:ResultReadyEventType"])
    events = Events()
    sub = await client.create_subscription(20, events)
    await sub.subscribe_events(client.nodes.server, etype)
    return idx, events


async def _read(client: Client, idx: int, name: str) -> object:
    return await client.get_node(ua.NodeId(f"Rois/st1/tire/{name}", idx)).read_value()


async def _ack(client: Client, idx: int, value: int) -> None:
    await client.get_node(ua.NodeId("Rois/st1/tire/ResultAck", idx)).write_value(
        ua.DataValue(ua.Variant(value, ua.VariantType.UInt32)))


async def _wait(cond, timeout: float = 90) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout * 10)):
        if cond():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("timed out")


def test_every_result_reaches_opcua_once_in_order_with_the_handshake(data_root: Path, tire: Path,
                                                                    broker: Broker) -> None:
    port = free_port()
    agent = Agent(data_root, broker.port, env=_opcua_env(port, ANOMALY_AGENT_OPCUA__RESULT_BUFFER="4")).start()
    station = Observer(broker.port)
    images = sorted((tire / "test" / "good" / "rgb").glob("*.png"))[:3] + sorted(
        (tire / "test" / "cut" / "rgb").glob("*.png"))[:3]

    async def run() -> None:
        async with Client(f"opc.tcp://127.0.0.1:{port}/anomaly-agent") as client:
            idx, events = await _subscribe(client)
            assert await client.get_node(ua.NodeId("AnomalyAgent/State", idx)).read_value() == "Operational"
            assert await _read(client, idx, "State/SamplesOk") == 6  # the state of a ROI fitted before the start
            inbox = data_root / "inbox" / "st1" / "tire" / "predict"
            inbox.mkdir(parents=True, exist_ok=True)
            for i, p in enumerate(images[:3]):  # by the watched folder ...
                _drop(p, inbox / f"f{i}.png")
            await _wait(lambda: len(events.items) >= 3)
            for i, p in enumerate(images[3:]):  # ... and by MQTT, plus one input the agent refuses
                station.publish("anomaly/st1/tire/predict", json.dumps(
                    {"request_id": f"m{i}", "image_b64": base64.b64encode(p.read_bytes()).decode()}))
            station.publish("anomaly/st1/tire/predict", json.dumps(
                {"request_id": "bad", "image_b64": base64.b64encode(b"not an image").decode()}))
            await _wait(lambda: len(events.items) >= 7)
            await asyncio.sleep(1.0)  # nothing more may come: each result once
            got = [(e.ResultId, e.ResultCounter) for e in events.items]
            assert len(got) == 7 and [c for _, c in got] == list(range(1, 8)), got
            by_mqtt = {r["request_id"]: r for r in station.results()}
            for e in events.items:
                if e.ResultId.startswith("m"):
                    d = by_mqtt[e.ResultId]["data"]
                    assert (e.Score, e.IsAnomaly, e.Threshold, e.ModelVersion, e.DefectCount) == (
                        d["score"], d["is_anomaly"], d["threshold"], d["model_version"], d["defects"]["count"])
                    assert e.ErrorCode == ""
            bad = next(e for e in events.items if e.ResultId == "bad")
            assert bad.ErrorCode == by_mqtt["bad"]["error"]["code"] and bad.ErrorCode
            assert any(e.IsAnomaly for e in events.items if e.ResultId.startswith("m"))

            # the handshake: a slow PLC reads result 1 until it acks; of 6 more, the buffer (4) kept the newest
            order = [rid for rid, _ in got]
            assert await _read(client, idx, "ResultCounter") == 1 and await _read(client, idx, "ResultId") == order[0]
            assert (await _read(client, idx, "ResultsWaiting"), await _read(client, idx, "ResultsLost")) == (4, 2)
            await _ack(client, idx, 7)  # not the current number: changes nothing
            assert await _read(client, idx, "ResultCounter") == 1
            seen = [(1, order[0])]
            while await _read(client, idx, "ResultsWaiting"):
                await _ack(client, idx, seen[-1][0])
                counter = await _read(client, idx, "ResultCounter")
                seen.append((counter, await _read(client, idx, "ResultId")))
            assert seen == [(1, order[0])] + [(n, order[n - 1]) for n in range(4, 8)], seen  # in order, none twice
            m2 = by_mqtt["m2"]["data"] if "m2" in by_mqtt else None
            if seen[-1][1] == "m2" and m2 is not None:
                assert await _read(client, idx, "Score") == m2["score"]
        # a client that reconnects reads the current values
        async with Client(f"opc.tcp://127.0.0.1:{port}/anomaly-agent") as again:
            idx = await again.get_namespace_index(NS)
            assert await _read(again, idx, "ResultCounter") == 7 and await _read(again, idx, "ResultsLost") == 2

    try:
        asyncio.run(run())
        assert agent.sigterm() == 0
    finally:
        station.close()
        agent.cleanup()


def _node_client() -> Path:
    local = ROOT.parent / "node-opcua" / "node_modules" / "node-opcua-client"
    if not shutil.which("node") or not local.is_dir():
        missing("node-opcua is not installed (npm install --prefix ../node-opcua node-opcua-client@2; .ci/run does)")
    return local.parent


def test_a_node_opcua_client_reads_the_nodes_and_gets_the_events(data_root: Path, tire: Path) -> None:
    modules = _node_client()
    port = free_port()
    agent = Agent(data_root, env=_opcua_env(port, ANOMALY_AGENT_OPCUA__HANDSHAKE="false")).start()
    try:
        script = ROOT / "tests" / "opcua_node_client.js"
        proc = subprocess.Popen(["node", str(script), f"opc.tcp://127.0.0.1:{port}/anomaly-agent", "2"],
                                env={**os.environ, "NODE_PATH": str(modules)}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        # the client connected and subscribed; node-opcua prints its own lines before it on a first run
        # ("Creating default certificate ..."): read up to the JSON line, never blocking on a hung client
        deadline, first, skipped = time.monotonic() + 60, "", []
        while '"ready"' not in first and time.monotonic() < deadline and proc.poll() is None:
            readable, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if readable:
                first = proc.stdout.readline()
                skipped.append(first)
        assert '"ready"' in first, (skipped, proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        time.sleep(0.5)  # the monitored item's first publish cycle
        inbox = data_root / "inbox" / "st1" / "tire" / "predict"
        inbox.mkdir(parents=True, exist_ok=True)
        for i, p in enumerate(sorted((tire / "test" / "good" / "rgb").glob("*.png"))[:2]):
            _drop(p, inbox / f"n{i}.png")
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (out, err)
        lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        assert not [x for x in lines if x["kind"] == "ready"]  # read above
        events = [x for x in lines if x["kind"] == "event"]
        assert sorted(e["ResultId"] for e in events) == ["folder:st1/tire/predict/n0.png",
                                                         "folder:st1/tire/predict/n1.png"], lines
        final = next(x for x in lines if x["kind"] == "read")
        assert final["ResultCounter"] == 2 and final["State"] == "Operational" and final["SamplesOk"] == 6
        assert final["Score"] == next(e["Score"] for e in events if e["ResultCounter"] == 2)
        assert agent.sigterm() == 0
    finally:
        agent.cleanup()


def _client_cert(tmp: Path, name: str) -> tuple[Path, Path]:
    key, cert = tmp / f"{name}_key.pem", tmp / f"{name}_cert.der"
    asyncio.run(setup_self_signed_certificate(key, cert, f"urn:anomaly-agent-test:{name}", socket.gethostname(),
                                              [ExtendedKeyUsageOID.CLIENT_AUTH], {"commonName": name}))
    return cert, key


def test_security_anonymous_refused_off_loopback_user_password_and_encrypted_sessions(tmp_path: Path,
                                                                                     data_root: Path) -> None:
    port = free_port()
    pw = tmp_path / "opcua.pass"
    pw.write_text("plc-secret\n")
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    cert, key = _client_cert(tmp_path, "plc")
    shutil.copy(cert, trusted / cert.name)
    other_cert, other_key = _client_cert(tmp_path, "stranger")
    agent = Agent(data_root, env=_opcua_env(port, ANOMALY_AGENT_OPCUA__HOST="0.0.0.0",
                                            ANOMALY_AGENT_OPCUA__USERNAME="plc",
                                            ANOMALY_AGENT_OPCUA__PASSWORD_FILE=str(pw),
                                            ANOMALY_AGENT_OPCUA__TRUSTED_CLIENTS=str(trusted))).start()
    url = f"opc.tcp://127.0.0.1:{port}/anomaly-agent"

    async def anonymous() -> None:
        async with Client(url):
            pass

    async def user(password: str, policy: str | None = None, c: Path = cert, k: Path = key) -> str:
        client = Client(url)
        client.set_user("plc")
        client.set_password(password)
        if policy:
            client.application_uri = f"urn:anomaly-agent-test:{'plc' if c == cert else 'stranger'}"
            await client.set_security_string(f"Basic256Sha256,{policy},{c},{k}")
        async with client:
            idx = await client.get_namespace_index(NS)
            return await client.get_node(ua.NodeId("AnomalyAgent/State", idx)).read_value()

    def refused(run: object) -> str:
        """The status code name a refusal carries (a timeout or a crash is not a refusal)."""
        with pytest.raises(ua.UaStatusCodeError) as exc:
            asyncio.run(run)  # type: ignore[arg-type]
        return ua.StatusCode(exc.value.code).name

    try:
        assert refused(anonymous()) in ("BadIdentityTokenInvalid", "BadIdentityTokenRejected")
        assert refused(user("wrong")) in ("BadUserAccessDenied", "BadIdentityTokenRejected")
        assert asyncio.run(user("plc-secret")) == "Operational"
        assert asyncio.run(user("plc-secret", "SignAndEncrypt")) == "Operational"
        assert asyncio.run(user("plc-secret", "Sign")) == "Operational"
        untrusted = refused(user("plc-secret", "SignAndEncrypt", other_cert, other_key))  # not in trusted_clients
        assert untrusted in ("BadCertificateUntrusted", "BadSecurityChecksFailed", "BadIdentityTokenRejected"), (
            untrusted)
        assert agent.sigterm() == 0
    finally:
        agent.cleanup()
    log = agent.log.read_text()
    assert "plc-secret" not in log and "refused user 'plc'" in log
    assert (data_root / "opcua" / "server_cert.der").is_file()  # made on first start


def test_bad_opcua_configuration_exits_2_naming_the_key(tmp_path: Path, data_root: Path) -> None:
    env = {**os.environ, **AGENT_ENV_KEYS, "ANOMALY_AGENT_OPCUA__ENABLED": "true"}
    cli = [sys.executable, "-m", "agent.cli", "--config", str(ROOT / "config" / "agent.yaml"), "--data-root",
           str(data_root), "run"]

    def run(**extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(cli, env={**env, **extra}, capture_output=True, text=True, timeout=120)

    r = run(ANOMALY_AGENT_OPCUA__HOST="0.0.0.0")
    assert r.returncode == 2 and "opcua" in r.stderr and "loopback" in r.stderr, r.stderr[-800:]
    (tmp_path / "cert.der").write_bytes(b"x")
    r = run(ANOMALY_AGENT_OPCUA__CERTIFICATE=str(tmp_path / "cert.der"),
            ANOMALY_AGENT_OPCUA__PRIVATE_KEY=str(tmp_path / "missing.pem"))
    assert r.returncode == 2 and "opcua.private_key" in r.stderr, r.stderr[-800:]
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        r = run(ANOMALY_AGENT_OPCUA__PORT=str(busy.getsockname()[1]))
    finally:
        busy.close()
    assert r.returncode == 2 and "opcua.port" in r.stderr, r.stderr[-800:]


def test_a_plc_that_connects_mid_stream_and_reconnects_misses_no_result_and_reads_none_twice(
        data_root: Path, tire: Path) -> None:
    """docs/opcua.md "Start-up and reconnect, step by step", run by a client: before the first result every
    value says "no result yet"; results made while no PLC is connected wait; a PLC that connects mid-stream
    and later reconnects reads each result exactly once, in order."""
    port = free_port()
    agent = Agent(data_root, env=_opcua_env(port, ANOMALY_AGENT_OPCUA__RESULT_BUFFER="16")).start()
    images = sorted((tire / "test" / "good" / "rgb").glob("*.png"))[:3] + sorted(
        (tire / "test" / "hole" / "rgb").glob("*.png"))[:3]
    inbox = data_root / "inbox" / "st1" / "tire" / "predict"
    inbox.mkdir(parents=True, exist_ok=True)
    results = data_root / "results" / "st1" / "tire"
    seen: list[str] = []

    def drop(batch: range) -> None:  # one at a time: the order the PLC must see is the order of the results
        for i in batch:
            _drop(images[i], inbox / f"f{i}.png")
            _wait_sync(lambda i=i: (results / f"f{i}.json").exists())

    async def plc(want: int) -> None:
        """One session of the recipe: read counter and ack, take an unread current result, then scan."""
        async with Client(f"opc.tcp://127.0.0.1:{port}/anomaly-agent") as client:
            idx = await client.get_namespace_index(NS)
            counter, acked = await _read(client, idx, "ResultCounter"), await _read(client, idx, "ResultAck")
            last = counter
            if await _read(client, idx, "HasResult") and counter and acked != counter:
                seen.append(await _read(client, idx, "ResultId"))
                await _ack(client, idx, counter)
            while len(seen) < want:
                await _wait_async(client, idx, last)
                last = await _read(client, idx, "ResultCounter")
                seen.append(await _read(client, idx, "ResultId"))
                await _ack(client, idx, last)

    async def before_any() -> None:
        async with Client(f"opc.tcp://127.0.0.1:{port}/anomaly-agent") as client:
            idx = await client.get_namespace_index(NS)
            nothing = {name: await _read(client, idx, name) for name in
                       ("HasResult", "ResultCounter", "IsAnomaly", "Score", "TotalAreaMm2", "ResultId")}
            assert nothing == {"HasResult": False, "ResultCounter": 0, "IsAnomaly": False, "Score": -1.0,
                               "TotalAreaMm2": -1.0, "ResultId": ""}, nothing
            drop(range(0, 1))
            await _wait_async(client, idx, 0)
            assert await _read(client, idx, "HasResult") is True and await _read(client, idx, "ResultCounter") == 1

    try:
        asyncio.run(before_any())  # result 1 is current, unread
        drop(range(1, 3))  # 2, 3 wait behind it: no PLC connected
        asyncio.run(plc(2))  # connects mid-stream: takes 1 (unread current), then 2; disconnects
        drop(range(3, 6))
        asyncio.run(plc(6))  # reconnects: 3 became current while it was away: read, not skipped
    finally:
        agent.sigterm()
    assert seen == [f"folder:st1/tire/predict/f{i}.png" for i in range(6)], seen


def _wait_sync(cond, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    from tests.agent_proc import wait_for

    wait_for(cond, timeout, "results")


async def _wait_async(client: Client, idx: int, last: int, timeout: float = 60) -> None:
    for _ in range(int(timeout * 10)):
        if await _read(client, idx, "ResultCounter") != last:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("no new result")
