import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { FakeOnos } from "./fake-onos.js";
import { OnosClient, OnosSdn, intentKey, lastSegments, type OnosFlowRule, type OnosSdnConfig } from "./onos.js";
import type { PathSwitch, Placement } from "./types.js";

// Ferry hosts edge-a / edge-b are ONOS devices of:...01 / of:...02; the client is on of:...03 port 1.
const CLIENT_MAC = "02:00:0a:4d:00:64";
const WEB_MAC = "02:00:0a:4d:00:0a";
const APP = "org.onosproject.ovsdb";
const AUTH = "Basic " + Buffer.from("onos:rocks").toString("base64");

const hostsNew = [
  {
    id: "02:00:0A:4D:00:64/-1",
    mac: "02:00:0A:4D:00:64",
    vlan: "-1",
    ipAddresses: ["10.77.0.100"],
    locations: [{ elementId: "of:0000000000000003", port: "1" }],
  },
  {
    id: "02:00:0A:4D:00:0A/-1",
    mac: "02:00:0A:4D:00:0A",
    vlan: "-1",
    ipAddresses: ["10.77.0.10"],
    locations: [{ elementId: "of:0000000000000001", port: "7" }],
  },
];
const hostsLegacy = [
  {
    id: "02:00:0A:4D:00:64/-1",
    mac: "02:00:0A:4D:00:64",
    vlan: "-1",
    ipAddresses: ["10.77.0.100"],
    location: { elementId: "of:0000000000000003", port: "1" },
  },
];

const web: Placement = { container: "web", ip: "10.77.0.10", mac: WEB_MAC, host: "edge-a", ofport: 7, opId: "create-1" };
const sw: PathSwitch = {
  container: "web",
  ip: "10.77.0.10",
  mac: WEB_MAC,
  from: { host: "edge-a", ofport: 7 },
  to: { host: "edge-b", ofport: 9 },
  migrationId: "m-1",
};

const fwd = (host: string, device: string, port: string): unknown => ({
  type: "PointToPointIntent",
  appId: APP,
  key: `ferry:web:${host}:client:fwd`,
  priority: 100,
  selector: {
    criteria: [
      { type: "ETH_SRC", mac: "02:00:0A:4D:00:64" },
      { type: "ETH_DST", mac: "02:00:0A:4D:00:0A" },
    ],
  },
  ingressPoint: { device: "of:0000000000000003", port: "1" },
  egressPoint: { device, port },
});
const ret = (host: string, device: string, port: string): unknown => ({
  type: "PointToPointIntent",
  appId: APP,
  key: `ferry:web:${host}:client:ret`,
  priority: 300,
  selector: {
    criteria: [
      { type: "ETH_SRC", mac: "02:00:0A:4D:00:0A" },
      { type: "ETH_DST", mac: "02:00:0A:4D:00:64" },
    ],
  },
  ingressPoint: { device, port },
  egressPoint: { device: "of:0000000000000003", port: "1" },
});

describe("OnosSdn against the fake ONOS", () => {
  const fake = new FakeOnos({ hosts: hostsNew });
  let url = "";
  const signal = new AbortController().signal;
  const config = (over: Partial<OnosSdnConfig> = {}): OnosSdnConfig => ({
    url,
    hosts: { "edge-a": { deviceId: "of:0000000000000001" }, "edge-b": { deviceId: "of:0000000000000002" } },
    peers: [{ name: "client", mac: CLIENT_MAC }],
    pollMs: 5,
    ...over,
  });

  beforeAll(async () => {
    url = await fake.start();
  });
  afterAll(async () => {
    await fake.stop();
  });
  beforeEach(() => {
    fake.requests.length = 0;
    fake.intents.clear();
    fake.flows.clear();
    fake.hosts = hostsNew;
    fake.intentState = () => "INSTALLED";
  });

  it("install: POSTs forward and return PointToPointIntents with ONOS's exact JSON, return at higher priority", async () => {
    const r = await new OnosSdn(config()).install(web, signal);
    const posts = fake.sent("POST", "/intents");
    expect(posts.map((p) => p.body)).toEqual([fwd("edge-a", "of:0000000000000001", "7"), ret("edge-a", "of:0000000000000001", "7")]);
    for (const p of fake.requests) expect(p.authorization).toBe(AUTH);
    expect(posts.every((p) => p.contentType === "application/json" && p.status === 201)).toBe(true);
    // it waited until ONOS reported both intents INSTALLED
    expect(
      fake
        .sent("GET", "/intents/")
        .map((g) => g.path)
        .sort(),
    ).toEqual(["/intents/org.onosproject.ovsdb/ferry:web:edge-a:client:fwd", "/intents/org.onosproject.ovsdb/ferry:web:edge-a:client:ret"]);
    expect(r.details.intents).toBe(2);
    expect([...fake.intents.values()].map((i) => [i.key, i.state])).toEqual([
      ["ferry:web:edge-a:client:fwd", "INSTALLED"],
      ["ferry:web:edge-a:client:ret", "INSTALLED"],
    ]);
  });

  it("switchPath: withdraws the old path's intents (DELETE, all before any POST), then submits the new path", async () => {
    const sdn = new OnosSdn(config());
    await sdn.install(web, signal);
    fake.requests.length = 0;
    const r = await sdn.switchPath(sw, signal);
    const changes = fake.requests.filter((q) => q.method !== "GET");
    expect(changes.map((q) => `${q.method} ${q.path}`)).toEqual([
      "DELETE /intents/org.onosproject.ovsdb/ferry:web:edge-a:client:fwd",
      "DELETE /intents/org.onosproject.ovsdb/ferry:web:edge-a:client:ret",
      "POST /intents",
      "POST /intents",
    ]);
    expect(changes.slice(0, 2).every((q) => q.status === 204)).toBe(true);
    expect(changes.slice(2).map((q) => q.body)).toEqual([
      fwd("edge-b", "of:0000000000000002", "9"),
      ret("edge-b", "of:0000000000000002", "9"),
    ]);
    expect([...fake.intents.values()].map((i) => i.key)).toEqual(["ferry:web:edge-b:client:fwd", "ferry:web:edge-b:client:ret"]);
    expect(Object.keys(r.details).sort()).toEqual(["installed_ms", "intents", "resolve_ms", "submit_ms", "withdraw_ms"]);
  });

  it("revert withdraws what switchPath created and restores the source path; a second revert is a no-op", async () => {
    const sdn = new OnosSdn(config());
    await sdn.install(web, signal);
    await sdn.switchPath(sw, signal);
    fake.requests.length = 0;
    await sdn.revert(sw, signal);
    expect(fake.sent("DELETE").map((q) => [q.path, q.status])).toEqual([
      ["/intents/org.onosproject.ovsdb/ferry:web:edge-b:client:fwd", 204],
      ["/intents/org.onosproject.ovsdb/ferry:web:edge-b:client:ret", 204],
    ]);
    expect(fake.sent("POST", "/intents").map((q) => q.body)).toEqual([
      fwd("edge-a", "of:0000000000000001", "7"),
      ret("edge-a", "of:0000000000000001", "7"),
    ]);
    expect([...fake.intents.values()].map((i) => i.key)).toEqual(["ferry:web:edge-a:client:fwd", "ferry:web:edge-a:client:ret"]);

    fake.requests.length = 0;
    await sdn.revert(sw, signal);
    // ONOS answers 400 "For input string" to DELETE of an absent string key (Long.decode fallback): treated as absent
    expect(fake.sent("DELETE").map((q) => q.status)).toEqual([400, 400]);
    expect([...fake.intents.values()].map((i) => i.key)).toEqual(["ferry:web:edge-a:client:fwd", "ferry:web:edge-a:client:ret"]);
  });

  it("remove withdraws the container's intents at its host", async () => {
    const sdn = new OnosSdn(config());
    await sdn.install(web, signal);
    await sdn.remove(web, signal);
    expect(fake.intents.size).toBe(0);
  });

  it("h2h mode: one HostToHostIntent per peer, host ids MAC/-1", async () => {
    await new OnosSdn(config({ mode: "h2h", priority: 55 })).install(web, signal);
    expect(fake.sent("POST", "/intents").map((q) => q.body)).toEqual([
      {
        type: "HostToHostIntent",
        appId: APP,
        key: "ferry:web:edge-a:client:h2h",
        priority: 55,
        one: "02:00:0A:4D:00:64/-1",
        two: "02:00:0A:4D:00:0A/-1",
      },
    ]);
  });

  it("init checks the app id and, when asked, deactivates reactive forwarding as MIRA! did", async () => {
    await new OnosSdn(config({ disableReactiveForwarding: true })).init(signal);
    expect(fake.requests.map((q) => `${q.method} ${q.path} ${q.status}`)).toEqual([
      "GET /applications/ids/entry 200",
      "DELETE /applications/org.onosproject.fwd/active 204",
    ]);
    expect(fake.requests[0]!.query).toEqual({ name: APP });
    await expect(new OnosSdn(config({ appId: "org.example.none" })).init(signal)).rejects.toMatchObject({
      code: "FailedPrecondition",
      field: "onos.appId",
      message: expect.stringContaining("Application ID is not found"),
    });
  });

  describe("errors", () => {
    it("401 → PermissionDenied telling to check --onos-user/--onos-password", async () => {
      const e = await new OnosSdn(config({ password: "wrong" })).install(web, signal).catch((x: unknown) => x);
      expect(e).toMatchObject({
        code: "PermissionDenied",
        fix: expect.stringContaining("--onos-user/--onos-password"),
        data: { status: 401 },
      });
      expect(fake.requests[0]!.status).toBe(401);
    });

    it("unregistered appId: ONOS's 404 'Application ID is not found' → FailedPrecondition with ONOS's status and body", async () => {
      const e = await new OnosSdn(config({ appId: "org.example.none" })).install(web, signal).catch((x: unknown) => x);
      expect(fake.sent("POST", "/intents")[0]!.status).toBe(404);
      expect(e).toMatchObject({
        code: "FailedPrecondition",
        message: expect.stringContaining("Application ID is not found"),
        fix: expect.stringContaining("activate the app"),
        data: { status: 404, body: '{"code":404,"message":"Application ID is not found"}' },
      });
    });

    it("a JSON shape ONOS's codec refuses → 400 → InvalidArgument carrying ONOS's message", async () => {
      const client = new OnosClient({ url, user: "onos", password: "rocks" });
      const bad = { type: "PointToPointIntent", appId: APP, ingressPoint: { device: "of:0000000000000001", port: "1" } } as never;
      await expect(client.submitIntent(bad)).rejects.toMatchObject({
        code: "InvalidArgument",
        message: expect.stringContaining("egressPoint member is required in Intent"),
        data: { status: 400 },
      });
      await expect(client.submitIntent({ appId: APP } as never)).rejects.toMatchObject({
        message: expect.stringContaining("type member is required in Intent"),
      });
    });

    it("connection refused → Unavailable (retryable)", async () => {
      const gone = new FakeOnos();
      const deadUrl = await gone.start();
      await gone.stop();
      const e = await new OnosSdn(config({ url: deadUrl })).install(web, signal).catch((x: unknown) => x);
      expect(e).toMatchObject({ code: "Unavailable", retryable: true, message: expect.stringContaining("ECONNREFUSED") });
    });

    it("intent FAILED → FailedPrecondition; never INSTALLED → DeadlineExceeded naming the keys", async () => {
      fake.intentState = () => "FAILED";
      await expect(new OnosSdn(config()).install(web, signal)).rejects.toMatchObject({
        code: "FailedPrecondition",
        message: expect.stringContaining("state FAILED"),
      });
      fake.intentState = () => "INSTALLING";
      await expect(new OnosSdn(config({ waitInstalledMs: 40 })).install(web, signal)).rejects.toMatchObject({
        code: "DeadlineExceeded",
        message: expect.stringContaining("ferry:web:edge-a:client:fwd=INSTALLING"),
      });
    });

    it("refuses bad configuration with the field named", () => {
      expect(() => new OnosSdn(config({ returnPriority: 100 }))).toThrow(/onos.returnPriority/);
      expect(() => new OnosSdn(config({ peers: [] }))).toThrow(/onos.peers/);
      expect(() => new OnosSdn(config({ hosts: { "edge-a": { deviceId: "0000000000000001" } } }))).toThrow(/onos.hosts.edge-a.deviceId/);
      expect(() => new OnosSdn(config({ url: "not a url" }))).toThrow(/onos.url/);
    });
  });

  describe("discovery by MAC from GET /hosts", () => {
    it("legacy single `location` (older ONOS) is read like `locations[]`", async () => {
      fake.hosts = hostsLegacy;
      await new OnosSdn(config()).install(web, signal);
      expect(fake.sent("GET", "/hosts")).toHaveLength(1); // one look-up per operation
      expect(fake.sent("POST", "/intents")[0]!.body).toEqual(fwd("edge-a", "of:0000000000000001", "7"));
    });

    it("the container's point comes from `locations[]` when no ofport is given", async () => {
      await new OnosSdn(config()).install({ ...web, ofport: undefined }, signal);
      expect((fake.sent("POST", "/intents")[0]!.body as { egressPoint: unknown }).egressPoint).toEqual({
        device: "of:0000000000000001",
        port: "7",
      });
    });

    it("falls back to configuration when ONOS does not know the MAC, and fails clearly when neither knows", async () => {
      fake.hosts = [];
      await new OnosSdn(
        config({
          peers: [{ name: "client", mac: CLIENT_MAC, deviceId: "of:0000000000000003", port: 1 }],
          hosts: { "edge-a": { deviceId: "of:0000000000000001", port: 7 } },
        }),
      ).install({ ...web, ofport: undefined }, signal);
      expect(fake.sent("POST", "/intents")[0]!.body).toEqual(fwd("edge-a", "of:0000000000000001", "7"));

      await expect(new OnosSdn(config()).install(web, signal)).rejects.toMatchObject({ code: "FailedPrecondition", field: "onos.peers" });
      expect(fake.sent("POST", "/intents")).toHaveLength(2); // nothing more was submitted
    });
  });

  describe("flow rules", () => {
    const rule: OnosFlowRule = {
      priority: 40000,
      timeout: 0,
      isPermanent: true,
      deviceId: "of:0000000000000001",
      treatment: { instructions: [{ type: "OUTPUT", port: "2" }] },
      selector: {
        criteria: [
          { type: "ETH_TYPE", ethType: "0x0800" },
          { type: "IPV4_DST", ip: "10.77.0.10/32" },
        ],
      },
    };

    it("POST /flows/{deviceId}?appId= with the rule as sent; the 64-bit flow id is parsed from Location as a string", async () => {
      const client = new OnosClient({ url, user: "onos", password: "rocks" });
      const { deviceId, flowId } = await client.addFlow(rule, APP);
      const post = fake.sent("POST", "/flows")[0]!;
      expect(post.path).toBe("/flows/of:0000000000000001");
      expect(post.query).toEqual({ appId: APP });
      expect(post.body).toEqual(rule);
      expect(deviceId).toBe("of:0000000000000001");
      expect(BigInt(flowId)).toBeGreaterThan(2n ** 53n);
      expect(fake.flows.has(`of:0000000000000001/${flowId}`)).toBe(true);
      await client.deleteFlow(deviceId, flowId);
      expect(fake.sent("DELETE", "/flows")[0]!.status).toBe(204);
      expect(fake.flows.size).toBe(0);
      // the device now has no flows: ONOS says 404 "Device is not found"; deleting again is still fine
      await client.deleteFlow(deviceId, flowId);
      expect(fake.sent("DELETE", "/flows")[1]!.status).toBe(404);
    });

    it("a body deviceId that differs from the path → 400 InvalidArgument", async () => {
      // the URL is rewritten on the way so that the path names another device than the body
      const rewrite: typeof fetch = (input, init) =>
        fetch((input instanceof Request ? input.url : input.toString()).replace("of:0000000000000001", "of:0000000000000009"), init);
      const client = new OnosClient({ url, user: "onos", password: "rocks", fetch: rewrite });
      await expect(client.addFlow(rule)).rejects.toMatchObject({
        code: "InvalidArgument",
        message: expect.stringContaining("Invalid deviceId in flow creation request"),
      });
      expect(fake.sent("POST", "/flows")[0]).toMatchObject({ path: "/flows/of:0000000000000009", status: 400 });
    });
  });
});

describe("the fake answers like ONOS's IntentsWebResource", () => {
  const fake = new FakeOnos();
  let client: OnosClient;
  beforeAll(async () => {
    client = new OnosClient({ url: await fake.start(), user: "onos", password: "rocks" });
  });
  afterAll(async () => {
    await fake.stop();
  });
  afterEach(() => {
    fake.intents.clear();
  });

  it("Location carries the intent id (fingerprint, decimal); an intent without key gets LongKey(id), found by that number", async () => {
    const { location, intentId } = await client.submitIntent({
      type: "HostToHostIntent",
      appId: APP,
      priority: 55,
      one: "46:E4:3C:A4:17:C8/-1",
      two: "08:00:27:56:8A:15/-1",
    });
    expect(location).toBe(`${client.url}/intents/${APP}/${intentId}`);
    expect(intentId).toMatch(/^\d+$/);
    const info = await client.getIntent(APP, intentId);
    expect(info).toMatchObject({
      type: "HostToHostIntent",
      key: `0x${Number(intentId).toString(16)}`,
      state: "INSTALLED",
      one: "46:E4:3C:A4:17:C8/-1",
    });
    expect(await client.listIntents()).toHaveLength(1);
    await client.withdrawIntent(APP, intentId);
    expect(await client.getIntent(APP, intentId)).toBeUndefined();
    await client.withdrawIntent(APP, "12345"); // absent numeric key: 204
  });

  it("a second submit with the same key replaces the intent", async () => {
    const i = {
      type: "HostToHostIntent" as const,
      appId: APP,
      key: intentKey("web", "edge-a", "client", "h2h"),
      one: "46:E4:3C:A4:17:C8/-1",
      two: "08:00:27:56:8A:15/-1",
    };
    await client.submitIntent(i);
    await client.submitIntent({ ...i, priority: 7 });
    expect(fake.intents.size).toBe(1);
    expect((await client.getIntent(APP, i.key))!.priority).toBe(7);
  });

  it("GET on an unknown app → 404 'Application Id not found' → FailedPrecondition", async () => {
    await expect(client.getIntent("org.example.none", "x")).rejects.toMatchObject({ code: "FailedPrecondition" });
  });
});

describe("lastSegments", () => {
  it("reads absolute and relative Location headers", () => {
    expect(
      lastSegments("http://10.0.0.5:8181/onos/v1/flows/of:0000000000000001/54043195528453770", "http://10.0.0.5:8181/onos/v1"),
    ).toEqual(["of:0000000000000001", "54043195528453770"]);
    expect(lastSegments("/onos/v1/intents/org.onosproject.ovsdb/16", "http://h:8181/onos/v1")).toEqual(["org.onosproject.ovsdb", "16"]);
    expect(lastSegments("", "http://h:8181/onos/v1")).toEqual([undefined, undefined]);
  });
});
