// An independent OPC UA client (node-opcua) for tests/test_opcua.py: connects to the agent, subscribes to the
// ResultReady events on the Server object, waits for N of them, then reads the ROI's nodes. One JSON line per
// event ({"kind": "event", ...}) and one for the read ({"kind": "read", ...}); exit 1 on any failure.
const {
  OPCUAClient, AttributeIds, TimestampsToReturn, constructEventFilter, ClientMonitoredItem, DataType,
} = require("node-opcua-client");

const url = process.argv[2];
const expected = parseInt(process.argv[3] || "1", 10);
const FIELDS = ["ResultId", "ResultCounter", "Score", "IsAnomaly", "ErrorCode", "RoleId", "RoiId", "Threshold"];

(async () => {
  const client = OPCUAClient.create({ endpointMustExist: false, connectionStrategy: { maxRetry: 3 } });
  await client.connect(url);
  const session = await client.createSession();
  const ns = (await session.readNamespaceArray()).indexOf("urn:anomaly-agent:vision");
  if (ns < 0) throw new Error("namespace urn:anomaly-agent:vision not found");
  const sub = await session.createSubscription2({
    requestedPublishingInterval: 50, requestedLifetimeCount: 600, requestedMaxKeepAliveCount: 20,
    maxNotificationsPerPublish: 100, publishingEnabled: true, priority: 1,
  });
  const filter = constructEventFilter(FIELDS.map((f) => `${ns}:${f}`));
  const item = ClientMonitoredItem.create(sub, { nodeId: "ns=0;i=2253", attributeId: AttributeIds.EventNotifier },
    { samplingInterval: 0, discardOldest: false, queueSize: 1000, filter }, TimestampsToReturn.Both);
  await new Promise((resolve) => { item.on("initialized", resolve); setTimeout(resolve, 5000); });
  console.log(JSON.stringify({ kind: "ready" })); // the test drops its images only after this line
  let seen = 0;
  const done = new Promise((resolve) => {
    item.on("changed", (values) => {
      const ev = { kind: "event" };
      FIELDS.forEach((f, i) => { ev[f] = values[i].value; });
      if (ev.ResultId === null) return; // not one of ours
      console.log(JSON.stringify(ev));
      seen += 1;
      if (seen >= expected) resolve();
    });
  });
  const timer = setTimeout(() => { console.error("timed out waiting for events"); process.exit(1); }, 90000);
  await done;
  clearTimeout(timer);
  const names = ["ResultCounter", "Score", "ResultId", "State/SamplesOk"];
  const reads = await session.read([
    ...names.map((n) => ({ nodeId: `ns=${ns};s=Rois/st1/tire/${n}`, attributeId: AttributeIds.Value })),
    { nodeId: `ns=${ns};s=AnomalyAgent/State`, attributeId: AttributeIds.Value },
  ]);
  const out = { kind: "read" };
  names.forEach((n, i) => { out[n.replace("State/", "")] = reads[i].value.value; });
  out.State = reads[names.length].value.value;
  console.log(JSON.stringify(out));
  await sub.terminate();
  await session.close();
  await client.disconnect();
  process.exit(0);
})().catch((err) => { console.error(err && err.stack ? err.stack : String(err)); process.exit(1); });
