import type { Flow } from "@ferry/api/agent";
import { FerryError } from "@ferry/common";
import { describe, expect, it } from "vitest";
import { OvsSdn, agentFlowPort, cookieForIp, type OvsFlowPort, type OvsTopology } from "./ovs.js";
import type { PathSwitch, Placement } from "./types.js";

/** Three hosts, full VXLAN mesh: vx<N> = ofport 1000+N, as the testbed names them. */
const topo: OvsTopology = {
  hosts: [
    { name: "edge-a", bridge: "br-ferry", vxlanPortTo: { "edge-b": 1002, "edge-c": 1003 } },
    { name: "edge-b", bridge: "br-ferry", vxlanPortTo: { "edge-a": 1001, "edge-c": 1003 } },
    { name: "edge-c", bridge: "br-ferry", vxlanPortTo: { "edge-a": 1001, "edge-b": 1002 } },
  ],
};

type Call =
  | { op: "set"; host: string; bridge: string; flows: Flow[]; key: string; start: number; end: number }
  | { op: "del"; host: string; bridge: string; cookie: number; key: string; start: number; end: number };

/** A fake agent fleet: records every call; each takes `delayMs[host]` so ordering is observable. */
function fakePort(delayMs: Record<string, number> = {}, failOn?: string): OvsFlowPort & { calls: Call[]; tables: Map<string, Flow[]> } {
  const calls: Call[] = [];
  const tables = new Map<string, Flow[]>(); // host → rules, with SetFlows/DeleteFlows semantics
  let clock = 0;
  const tick = async (host: string): Promise<[number, number]> => {
    const start = clock++;
    await new Promise((r) => setTimeout(r, delayMs[host] ?? 1));
    return [start, clock++];
  };
  return {
    calls,
    tables,
    async setFlows(host, bridge, flows, key) {
      if (failOn === host) throw new FerryError("Unavailable", `agent ${host} down`);
      const [start, end] = await tick(host);
      const cookies = new Set(flows.map((f) => f.cookie));
      tables.set(host, [...(tables.get(host) ?? []).filter((f) => !cookies.has(f.cookie)), ...flows]);
      calls.push({ op: "set", host, bridge, flows, key, start, end });
    },
    async deleteFlows(host, bridge, cookie, key) {
      const [start, end] = await tick(host);
      tables.set(
        host,
        (tables.get(host) ?? []).filter((f) => f.cookie !== cookie),
      );
      calls.push({ op: "del", host, bridge, cookie, key, start, end });
    },
    topology: () => topo,
  };
}

const web: Placement = { container: "web", ip: "10.77.0.10", mac: "02:00:0a:4d:00:0a", host: "edge-a", ofport: 7, opId: "create-1" };
const sw: PathSwitch = {
  container: "web",
  ip: "10.77.0.10",
  mac: "02:00:0a:4d:00:0a",
  from: { host: "edge-a", ofport: 7 },
  to: { host: "edge-b", ofport: 9 },
  migrationId: "m-1",
};
const C = 0xfe0a4d000a; // cookieForIp("10.77.0.10")

const rules = (out: number): Flow[] => [
  { table: 0, priority: 100, cookie: C, match: "ip,nw_dst=10.77.0.10", actions: `output:${out}` },
  { table: 0, priority: 100, cookie: C, match: "arp,arp_tpa=10.77.0.10", actions: `output:${out}` },
];

describe("cookieForIp", () => {
  it("is stable, below 2^53, non-zero, and the same as the testbed's (0xfe_<ip>)", () => {
    expect(cookieForIp("10.77.0.10")).toBe(C);
    expect(cookieForIp("10.77.0.10")).toBe(cookieForIp("10.77.0.10"));
    expect(cookieForIp("255.255.255.255")).toBeLessThan(2 ** 53);
    expect(Number.isSafeInteger(cookieForIp("255.255.255.255"))).toBe(true);
    expect(cookieForIp("0.0.0.0")).toBeGreaterThan(0);
    expect(cookieForIp("10.77.0.11")).not.toBe(C);
  });
  it("refuses a non-IPv4 address, naming the field", () => {
    expect(() => cookieForIp("10.77.0.10/24")).toThrow(/ip: "10.77.0.10\/24" is not an IPv4 address/);
  });
});

describe("OvsSdn", () => {
  const signal = new AbortController().signal;

  it("install: local rules on the holder, VXLAN towards the holder everywhere else", async () => {
    const port = fakePort();
    const r = await new OvsSdn(port).install(web, signal);
    expect(Object.fromEntries(port.tables)).toEqual({ "edge-a": rules(7), "edge-b": rules(1001), "edge-c": rules(1001) });
    expect(port.calls.map((c) => c.key).sort()).toEqual([
      "create-1/sdn-install/edge-a",
      "create-1/sdn-install/edge-b",
      "create-1/sdn-install/edge-c",
    ]);
    expect(port.calls.every((c) => c.bridge === "br-ferry")).toBe(true);
    expect(r.details.hosts).toBe(3);
  });

  it("switchPath: destination first, then the others and the source at once; flows point at the destination", async () => {
    const port = fakePort({ "edge-a": 5, "edge-b": 20, "edge-c": 5 });
    const sdn = new OvsSdn(port);
    await sdn.install(web, signal);
    port.calls.length = 0;
    const r = await sdn.switchPath(sw, signal);
    expect(Object.fromEntries(port.tables)).toEqual({ "edge-a": rules(1002), "edge-b": rules(9), "edge-c": rules(1002) });
    const [dest, ...rest] = port.calls as Extract<Call, { op: "set" }>[];
    expect(dest!.host).toBe("edge-b");
    expect(rest.map((c) => c.host).sort()).toEqual(["edge-a", "edge-c"]);
    // ordering by time, not only by completion: the rest starts after the destination is done
    for (const c of rest) expect(c.start).toBeGreaterThan(dest!.end);
    expect(port.calls.map((c) => c.key).sort()).toEqual(["m-1/sdn-switch/edge-a", "m-1/sdn-switch/edge-b", "m-1/sdn-switch/edge-c"]);
    expect(r.durationMs).toBeGreaterThanOrEqual(20);
    expect(Object.keys(r.details).sort()).toEqual(["dest_ms", "hosts", "rest_ms"]);
    expect(r.details.dest_ms).toBeGreaterThanOrEqual(15);
  });

  it("revert: the mirror image (source first, then the rest) with its own operation keys", async () => {
    const port = fakePort();
    const sdn = new OvsSdn(port);
    await sdn.install(web, signal);
    await sdn.switchPath(sw, signal);
    port.calls.length = 0;
    await sdn.revert(sw, signal);
    expect(Object.fromEntries(port.tables)).toEqual({ "edge-a": rules(7), "edge-b": rules(1001), "edge-c": rules(1001) });
    expect(port.calls[0]!.host).toBe("edge-a");
    expect(port.calls.map((c) => c.key).sort()).toEqual(["m-1/sdn-revert/edge-a", "m-1/sdn-revert/edge-b", "m-1/sdn-revert/edge-c"]);
    // idempotent: a second revert leaves the same tables
    await sdn.revert(sw, signal);
    expect(Object.fromEntries(port.tables)).toEqual({ "edge-a": rules(7), "edge-b": rules(1001), "edge-c": rules(1001) });
  });

  it("remove: deletes the container's cookie on every host, other containers untouched", async () => {
    const port = fakePort();
    const sdn = new OvsSdn(port);
    await sdn.install(web, signal);
    await sdn.install({ ...web, container: "db", ip: "10.77.0.20", host: "edge-c", ofport: 4 }, signal);
    await sdn.remove(web, signal);
    const dels = port.calls.filter((c): c is Extract<Call, { op: "del" }> => c.op === "del");
    expect(dels.map((d) => [d.host, d.cookie, d.key]).sort()).toEqual([
      ["edge-a", C, "create-1/sdn-remove/edge-a"],
      ["edge-b", C, "create-1/sdn-remove/edge-b"],
      ["edge-c", C, "create-1/sdn-remove/edge-c"],
    ]);
    for (const h of ["edge-a", "edge-b", "edge-c"]) {
      expect(port.tables.get(h)!.map((f) => f.match)).toEqual(["ip,nw_dst=10.77.0.20", "arp,arp_tpa=10.77.0.20"]);
    }
    expect(port.tables.get("edge-c")![0]!.actions).toBe("output:4");
    expect(port.tables.get("edge-a")![0]!.actions).toBe("output:1003");
  });

  it("refuses a missing destination ofport and unknown hosts before touching any agent", async () => {
    const port = fakePort();
    const sdn = new OvsSdn(port);
    await expect(sdn.switchPath({ ...sw, to: { host: "edge-b" } }, signal)).rejects.toMatchObject({
      code: "InvalidArgument",
      field: "to.ofport",
    });
    await expect(sdn.switchPath({ ...sw, to: { host: "edge-z", ofport: 3 } }, signal)).rejects.toMatchObject({ code: "NotFound" });
    await expect(sdn.install({ ...web, container: "Bad_Name" }, signal)).rejects.toMatchObject({ code: "InvalidArgument" });
    expect(port.calls).toEqual([]);
  });

  it("a missing VXLAN port is a FailedPrecondition naming both hosts", async () => {
    const port = { ...fakePort(), topology: () => ({ hosts: [topo.hosts[0]!, { name: "edge-b", bridge: "br-ferry", vxlanPortTo: {} }] }) };
    await expect(new OvsSdn(port).install(web, signal)).rejects.toThrow(/host "edge-b" has no VXLAN port towards "edge-a"/);
  });

  it("a failed destination stops the switch before the source is touched", async () => {
    const port = fakePort({}, "edge-b");
    await expect(new OvsSdn(port).switchPath(sw, signal)).rejects.toMatchObject({ code: "Unavailable" });
    expect(port.calls.filter((c) => c.host === "edge-a")).toEqual([]);
  });

  it("stops when the signal is aborted", async () => {
    const ac = new AbortController();
    ac.abort();
    await expect(new OvsSdn(fakePort()).switchPath(sw, ac.signal)).rejects.toThrow();
  });

  it("agentFlowPort maps to AgentService.SetFlows/DeleteFlows requests", async () => {
    const seen: unknown[] = [];
    const port = agentFlowPort(
      (host) => ({
        setFlows: (req) => Promise.resolve(seen.push({ host, rpc: "SetFlows", req })),
        deleteFlows: (req) => Promise.resolve(seen.push({ host, rpc: "DeleteFlows", req })),
      }),
      () => topo,
    );
    await new OvsSdn(port).remove(web, signal);
    expect(seen).toContainEqual({
      host: "edge-b",
      rpc: "DeleteFlows",
      req: { operationKey: "create-1/sdn-remove/edge-b", bridge: "br-ferry", cookie: C },
    });
  });
});
