"""The OPC UA address space of the agent, modelled on OPC 40100 (Machine Vision) where it fits
(docs/opcua.md has the node tree and the mapping):

    Objects/AnomalyAgent                      the vision system (VisionSystemType's role)
        State, Problems, AgentId, Backbone, Device        from /health: Operational or Error
        Rois/<role_id>/<roi_id>               one object per ROI (its role/ROI is the recipe/configuration id)
            ResultId, CreationTime, IsAnomaly, Score, Threshold, ModelVersion, InferenceMs, DefectCount,
            TotalAreaMm2, ErrorCode, HasResult, ResultCounter   the current result (ResultCounter written last)
            ResultAck (writable), ResultsWaiting, ResultsLost    the handshake (agent/opcua/handshake.py)
            State/ RoleId, RoiId, Fitted, SamplesOk, SamplesNg, ModelVersion, Threshold, DriftState, Unloadable
    Types/EventTypes/BaseEventType/ResultReadyEventType  one event per result, emitted by the Server object

NodeIds are strings in the agent's namespace (`urn:anomaly-agent:vision`), stable across restarts:
`Rois/<role_id>/<roi_id>/<Name>` and `Rois/<role_id>/<roi_id>/State/<Name>`, so a PLC program can
address them directly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from asyncua import Server, ua
from asyncua.common.node import Node
from asyncua.server.event_generator import EventGenerator

from agent.opcua.handshake import Handshake

log = logging.getLogger(__name__)
NAMESPACE = "urn:anomaly-agent:vision"
V = ua.VariantType
RESULT_VARS: list[tuple[str, ua.VariantType]] = [
    ("ResultId", V.String), ("CreationTime", V.DateTime), ("IsAnomaly", V.Boolean), ("Score", V.Double),
    ("Threshold", V.Double), ("ModelVersion", V.UInt32), ("InferenceMs", V.Double), ("DefectCount", V.UInt32),
    ("TotalAreaMm2", V.Double), ("ErrorCode", V.String), ("HasResult", V.Boolean)]
HANDSHAKE_VARS = [("ResultsWaiting", V.UInt32), ("ResultsLost", V.UInt32)]
STATE_VARS: list[tuple[str, ua.VariantType]] = [
    ("RoleId", V.String), ("RoiId", V.String), ("Fitted", V.Boolean), ("SamplesOk", V.UInt32),
    ("SamplesNg", V.UInt32), ("ModelVersion", V.UInt32), ("Threshold", V.Double), ("DriftState", V.String),
    ("Unloadable", V.String)]
SYSTEM_VARS = [("State", V.String), ("Problems", V.String), ("AgentId", V.String), ("Backbone", V.String),
               ("Device", V.String)]
EVENT_FIELDS = [*RESULT_VARS, ("ResultCounter", V.UInt32), ("RoleId", V.String), ("RoiId", V.String)]
DEFAULTS = {V.String: "", V.Boolean: False, V.Double: 0.0, V.UInt32: 0}
# before a ROI's first result (and after a reset): HasResult false, ResultCounter 0, Score and TotalAreaMm2 -1;
# IsAnomaly false means nothing until HasResult is true (docs/opcua.md)
NO_RESULT = {"HasResult": False, "Score": -1.0, "TotalAreaMm2": -1.0, "Threshold": -1.0}


def result_values(result: dict) -> dict[str, object]:
    """A result payload (ok or error) as the values of RESULT_VARS. TotalAreaMm2 is -1 when the image came
    without mm_per_px (no area in mm²); scores of an error are 0 and its ErrorCode says why."""
    data = result.get("data") or {}
    defects = data.get("defects") or {}
    area = defects.get("total_area_mm2")
    try:
        created = datetime.strptime(result["timestamp_utc"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    except (KeyError, ValueError):
        created = datetime.now(timezone.utc)
    err = result.get("error") or {}
    return {"ResultId": str(result.get("request_id", "")), "CreationTime": created,
            "IsAnomaly": bool(data.get("is_anomaly", False)), "Score": float(data.get("score") or 0.0),
            "Threshold": float(data.get("threshold") or 0.0), "ModelVersion": int(data.get("model_version") or 0),
            "InferenceMs": float(data.get("inference_ms") or 0.0), "DefectCount": int(defects.get("count") or 0),
            "TotalAreaMm2": float(area) if area is not None else -1.0, "ErrorCode": str(err.get("code", "")),
            "HasResult": True}


@dataclass
class RoiNodes:
    obj: Node
    vars: dict[str, Node]
    state: dict[str, Node]
    ack: Node
    counter: Node
    handshake: Handshake
    values: dict[str, object] = field(default_factory=dict)


class AddressSpace:
    """Builds and updates the nodes; every method runs in the OPC UA server's event loop."""

    def __init__(self, server: Server, handshake: bool, buffer: int,
                 exists: Callable[[str, str], bool] = lambda _role, _roi: True, max_rois: int = 1000) -> None:
        """exists: whether the agent has this ROI (a node is made only for one it has, at most max_rois)."""
        self.server = server
        self.handshake, self.buffer = handshake, buffer
        self.exists, self.max_rois = exists, max_rois
        self._refused = 0
        self.idx = 0
        self.rois: dict[tuple[str, str], RoiNodes] = {}
        self.by_ack: dict[ua.NodeId, tuple[str, str]] = {}
        self.system: dict[str, Node] = {}
        self.events: EventGenerator | None = None
        self._rois_folder: Node | None = None

    def nid(self, name: str) -> ua.NodeId:
        return ua.NodeId(name, self.idx)

    async def build(self) -> None:
        self.idx = await self.server.register_namespace(NAMESPACE)
        objects = self.server.nodes.objects
        agent = await objects.add_object(self.nid("AnomalyAgent"), ua.QualifiedName("AnomalyAgent", self.idx))
        for name, vt in SYSTEM_VARS:
            self.system[name] = await agent.add_variable(self.nid(f"AnomalyAgent/{name}"),
                                                         ua.QualifiedName(name, self.idx), DEFAULTS[vt], varianttype=vt)
        self._rois_folder = await agent.add_folder(self.nid("Rois"), ua.QualifiedName("Rois", self.idx))
        etype = await self.server.create_custom_event_type(
            self.idx, "ResultReadyEventType", ua.ObjectIds.BaseEventType, [(n, vt) for n, vt in EVENT_FIELDS])
        self.events = await self.server.get_event_generator(etype, ua.ObjectIds.Server)

    async def roi(self, role: str, roi: str) -> RoiNodes | None:
        """The ROI's nodes, made on first use; None for a ROI the agent does not have (a request to an id
        from outside, refused model_not_fitted) or past limits.max_rois: nothing from outside makes nodes."""
        key = (role, roi)
        if key in self.rois:
            return self.rois[key]
        if self._rois_folder is None:
            raise RuntimeError("opcua: the address space is not built yet")
        if len(self.rois) >= self.max_rois or not self.exists(role, roi):
            self._refused += 1
            if self._refused in (1, 10, 100) or self._refused % 1000 == 0:
                log.warning("opcua: no nodes for %d results of ROIs the agent does not have (or past "
                            "limits.max_rois %d), e.g. %s/%s", self._refused, self.max_rois, role[:40], roi[:40])
            return None
        base = f"Rois/{role}/{roi}"
        obj = await self._rois_folder.add_object(self.nid(base), ua.QualifiedName(f"{role}/{roi}", self.idx))
        nodes = {}
        for name, vt in [*RESULT_VARS, ("ResultCounter", V.UInt32), *HANDSHAKE_VARS]:
            nodes[name] = await obj.add_variable(self.nid(f"{base}/{name}"), ua.QualifiedName(name, self.idx),
                                                 NO_RESULT.get(name, DEFAULTS.get(vt, datetime.fromtimestamp(
                                                     0, timezone.utc))),
                                                 varianttype=vt)
        ack = await obj.add_variable(self.nid(f"{base}/ResultAck"), ua.QualifiedName("ResultAck", self.idx), 0,
                                     varianttype=V.UInt32)
        await ack.set_writable()
        state_obj = await obj.add_object(self.nid(f"{base}/State"), ua.QualifiedName("State", self.idx))
        state = {}
        for name, vt in STATE_VARS:
            state[name] = await state_obj.add_variable(self.nid(f"{base}/State/{name}"),
                                                       ua.QualifiedName(name, self.idx), DEFAULTS[vt], varianttype=vt)
        await self._write(state["RoleId"], role, V.String)
        await self._write(state["RoiId"], roi, V.String)
        shake = Handshake(self.buffer, self.handshake)
        self.rois[key] = RoiNodes(obj, nodes, state, ack, nodes["ResultCounter"], shake)
        self.by_ack[ack.nodeid] = key
        return self.rois[key]

    async def _write(self, node: Node, value: object, vt: ua.VariantType) -> None:
        await self.server.write_attribute_value(node.nodeid, ua.DataValue(ua.Variant(value, vt)))

    async def result(self, result: dict) -> None:
        """A prediction result of a ROI: its event now; its values when it becomes current (handshake)."""
        r = await self.roi(result["role_id"], result["roi_id"])
        if r is None:
            return
        values = result_values(result)
        current = r.handshake.push(values)
        await self._fire(result["role_id"], result["roi_id"], values, r.handshake.counter)
        if current is not None:
            await self._show(r, current)
        await self._handshake_vars(r)

    async def ack(self, key: tuple[str, str], value: int) -> None:
        r = self.rois.get(key)
        if r is None:  # removed meanwhile (a reset)
            return
        nxt = r.handshake.ack(value)
        if nxt is not None:
            await self._show(r, nxt)
        await self._handshake_vars(r)

    async def _show(self, r: RoiNodes, current: dict) -> None:
        for name, vt in RESULT_VARS:  # every value first, the counter last: a PLC that sees a new counter
            await self._write(r.vars[name], current[name], vt)  # reads the values of that result
        await self._write(r.counter, current["counter"], V.UInt32)

    async def _handshake_vars(self, r: RoiNodes) -> None:
        await self._write(r.vars["ResultsWaiting"], r.handshake.pending, V.UInt32)
        await self._write(r.vars["ResultsLost"], r.handshake.lost, V.UInt32)

    async def _fire(self, role: str, roi: str, values: dict, counter: int) -> None:
        if self.events is None:
            raise RuntimeError("opcua: the address space is not built yet")
        ev = self.events.event
        for name, _ in RESULT_VARS:
            setattr(ev, name, values[name])
        ev.ResultCounter, ev.RoleId, ev.RoiId = counter, role, roi
        ev.SourceName = f"{role}/{roi}"
        ev.Severity = 500 if values["IsAnomaly"] or values["ErrorCode"] else 100
        verdict = "error " + values["ErrorCode"] if values["ErrorCode"] else "NG" if values["IsAnomaly"] else "OK"
        await self.events.trigger(message=f"{role}/{roi} result {counter}: {verdict}")

    async def remove(self, role: str, roi: str) -> None:
        """A ROI reset or gone: its nodes go (made again, with the same ids, when it is fitted again)."""
        r = self.rois.pop((role, roi), None)
        if r is None:
            return
        self.by_ack.pop(r.ack.nodeid, None)
        await self.server.delete_nodes([r.obj], recursive=True)
        log.info("opcua: nodes of ROI %s/%s removed (reset or removed)", role, roi)

    async def state(self, role: str, roi: str, state: dict) -> None:
        bad = state.get("unloadable")
        samples = state.get("samples") or {}
        if not bad and (not self.exists(role, roi) or (state.get("threshold") is None
                                                        and not samples.get("ok") and not samples.get("ng"))):
            await self.remove(role, roi)
            return
        r = await self.roi(role, roi)
        if r is None:
            return
        values: dict[str, tuple[object, ua.VariantType]] = {"Unloadable": (bad["reason"] if bad else "", V.String)}
        if not bad:
            th = state.get("threshold")
            values.update(Fitted=(th is not None, V.Boolean), SamplesOk=(int(samples.get("ok", 0)), V.UInt32),
                          SamplesNg=(int(samples.get("ng", 0)), V.UInt32),
                          ModelVersion=(int(state.get("model_version") or 0), V.UInt32),
                          Threshold=(float(th) if th is not None else 0.0, V.Double))
            drift = state.get("drift") or {}
            if drift.get("state"):
                values["DriftState"] = (str(drift["state"]), V.String)
        for name, (value, vt) in values.items():
            await self._write(r.state[name], value, vt)

    async def health(self, body: dict) -> None:
        values = {"State": "Operational" if body.get("status") == "online" else "Error",
                  "Problems": "; ".join(body.get("problems", [])), "AgentId": str(body.get("agent_id", "")),
                  "Backbone": str((body.get("backbone") or {}).get("name", "")), "Device": str(body.get("device", ""))}
        for name, value in values.items():
            await self._write(self.system[name], value, V.String)
