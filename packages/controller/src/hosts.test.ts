import { HostState, MigrationState } from "@ferry/api/controller";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { vxlanPortName } from "./hosts.js";
import { clusterPool, fakeCluster, flowOut, refusal } from "./testkit.js";

const pool = clusterPool();
const cluster = pool.cluster;
afterEach(() => pool.closeAll());

const waitFor = async (pred: () => boolean, ms = 5_000): Promise<void> => {
  const t0 = Date.now();
  while (!pred()) {
    if (Date.now() - t0 > ms) throw new Error("condition not met");
    await new Promise((r) => setTimeout(r, 10));
  }
};

describe("hosts", () => {
  it("registration builds the VXLAN mesh both ways and persists the hosts", async () => {
    const c = await cluster({ hosts: ["edge-a", "edge-b", "a-very-long-host"] });
    const a = c.agent("edge-a");
    expect(a.bridges.has("br-ferry")).toBe(true);
    expect(a.callsOf("ensureBridge")[0]).toMatchObject({ bridge: "br-ferry", datapathType: "netdev" });
    expect(a.ports.get("vx-edge-b")?.remoteIp).toBe("192.168.77.2");
    expect(a.ports.get(vxlanPortName("a-very-long-host"))?.remoteIp).toBe("192.168.77.3");
    expect(vxlanPortName("a-very-long-host")).toBe("vx-a-very-long-");
    expect(a.callsOf("addVxlanPort")[0]).toMatchObject({ vni: 77, localIp: "192.168.77.1" });
    expect(c.agent("a-very-long-host").ports.get("vx-edge-a")?.remoteIp).toBe("192.168.77.1");
    const topo = c.ctl.hosts.topology();
    expect(topo.hosts.find((h) => h.name === "edge-b")!.vxlanPortTo).toEqual({
      "edge-a": c.agent("edge-b").ports.get("vx-edge-a")!.ofport,
      "a-very-long-host": c.agent("edge-b").ports.get(vxlanPortName("a-very-long-host"))!.ofport,
    });
    const saved = JSON.parse(await readFile(join(c.stateDir, "hosts.json"), "utf8")) as { name: string }[];
    expect(saved.map((h) => h.name)).toEqual(["edge-a", "edge-b", "a-very-long-host"]);
    expect(c.ctl.hosts.list().map((h) => h.state)).toEqual([
      HostState.HOST_STATE_READY,
      HostState.HOST_STATE_READY,
      HostState.HOST_STATE_READY,
    ]);
    // Same name, other address: refused. Same name and address: idempotent.
    expect(
      (await refusal(c.ctl.hosts.register({ name: "edge-a", address: "x:1", tlsServerName: "", underlayIp: "", labels: {} }))).code,
    ).toBe("AlreadyExists");
    await c.ctl.hosts.register({ name: "edge-a", address: a.address, tlsServerName: "", underlayIp: "192.168.77.1", labels: {} });
    expect(
      (await refusal(c.ctl.hosts.register({ name: "bad name", address: "x:1", tlsServerName: "", underlayIp: "", labels: {} }))).code,
    ).toBe("InvalidArgument");
    // Unreachable agent: Unavailable naming the address.
    const e = await refusal(c.ctl.hosts.register({ name: "ghost", address: "nowhere:1", tlsServerName: "", underlayIp: "", labels: {} }));
    expect(e.code).toBe("Unavailable");
    expect(e.message).toContain("nowhere:1");
  });

  it("a restarted controller reconnects to the saved hosts and finds their containers", async () => {
    const c1 = await fakeCluster();
    await c1.run("web", "edge-a", 10);
    await c1.close(true);
    const c2 = await cluster({ net: c1.net, stateDir: c1.stateDir });
    expect(c2.ctl.hosts.list().map((h) => [h.name, h.state, h.underlayIp])).toEqual([
      ["edge-a", HostState.HOST_STATE_READY, "192.168.77.1"],
      ["edge-b", HostState.HOST_STATE_READY, "192.168.77.2"],
    ]);
    expect((await c2.ctl.containers.where("web")).host).toBe("edge-a");
    expect(c2.ctl.hosts.topology().hosts.find((h) => h.name === "edge-a")!.vxlanPortTo["edge-b"]).toBeGreaterThan(0);
  });

  it("consumes the metrics stream; a failing stream marks the host unreachable, then it reconnects", async () => {
    const c = await cluster({ config: { metricsIntervalMs: 20, reconnectInitialMs: 20 } });
    const seen: string[] = [];
    const off = c.ctl.hosts.onMetrics((h) => seen.push(h));
    await waitFor(() => c.ctl.hosts.history("edge-a").length >= 3);
    expect(seen).toContain("edge-b");
    expect(c.ctl.hosts.host("edge-a").used?.memoryBytes).toBeGreaterThan(0);
    const watched = [];
    const ac = new AbortController();
    for await (const ev of c.ctl.monitor.watch("edge-b", ac.signal)) {
      watched.push(ev);
      if (watched.length === 2) ac.abort();
    }
    expect(watched.map((w) => w.host)).toEqual(["edge-b", "edge-b"]);
    c.agent("edge-a").down = true;
    await waitFor(() => c.ctl.hosts.host("edge-a").state === HostState.HOST_STATE_UNREACHABLE);
    expect(c.ctl.hosts.topology().hosts.map((h) => h.name)).toEqual(["edge-b"]);
    expect((await refusal(c.run("x", "edge-a", 30))).code).toBe("Unavailable");
    c.agent("edge-a").down = false;
    await waitFor(() => c.ctl.hosts.host("edge-a").state === HostState.HOST_STATE_READY);
    off();
  });

  it("RemoveHost is refused while containers or migrations use the host", async () => {
    const c = await cluster({ hosts: ["edge-a", "edge-b", "edge-c"] });
    await c.run("web", "edge-a", 10);
    const e = await refusal(c.ctl.impl.removeHost({ name: "edge-a" }, undefined as never));
    expect(e.code).toBe("FailedPrecondition");
    expect(e.message).toContain("web");
    c.agent("edge-b").methodLatency.set("restore", 200);
    const { id } = await c.ctl.migrations.start({ container: "web", destination: "edge-b", strategy: 0, mode: 0 });
    const busy = await refusal(c.ctl.impl.removeHost({ name: "edge-b" }, undefined as never));
    expect(busy.message).toContain(`host "edge-b" is being used by migration ${id}`);
    await c.wait(id);
    await c.ctl.impl.removeHost({ name: "edge-c" }, undefined as never);
    expect(c.ctl.hosts.names()).toEqual(["edge-a", "edge-b"]);
    expect(c.agent("edge-a").ports.has("vx-edge-c")).toBe(false);
  });

  it("DrainHost cordons the host and migrates each container to a host that admits it", async () => {
    const c = await cluster({ hosts: ["edge-a", "edge-b", "edge-c"] });
    await c.run("one", "edge-a", 11);
    await c.run("two", "edge-a", 12);
    // edge-b is full for conservative admission: everything goes to edge-c.
    c.agent("edge-b").capacity = { cpuCores: 4, memoryBytes: 32 * 1024 * 1024, diskBytes: 100 * 1024 ** 3 };
    const { migrationIds } = await c.ctl.impl.drainHost({ name: "edge-a", cordonOnly: false }, undefined as never);
    expect(migrationIds.length).toBe(2);
    expect(c.ctl.hosts.host("edge-a").state).toBe(HostState.HOST_STATE_CORDONED);
    for (const id of migrationIds) {
      const m = await c.wait(id);
      expect(m.state).toBe(MigrationState.MIGRATION_STATE_SUCCEEDED);
      expect(m.reason).toBe("drain");
      expect(m.destination).toBe("edge-c");
    }
    expect(c.net.whereRunning("one")).toEqual(["edge-c"]);
    expect(flowOut(c.agent("edge-c"), "10.77.0.12")).toBe(c.agent("edge-c").netns.get("two")!.ofport);
    const e = await refusal(c.run("three", "edge-a", 13));
    expect(e.message).toContain("cordoned");
  });
});

describe("flows after a topology change", () => {
  it("a host registered later (or back from unreachable) gets the flows of existing containers", async () => {
    const c = await cluster();
    await c.run("web", "edge-a", 10);
    const late = c.net.add("edge-c");
    late.addImage("busybox");
    await c.ctl.hosts.register({ name: "edge-c", address: late.address, tlsServerName: "", underlayIp: "192.168.77.3", labels: {} });
    await waitFor(() => flowOut(late, "10.77.0.10") !== undefined);
    expect(flowOut(late, "10.77.0.10")).toBe(late.ports.get("vx-edge-a")!.ofport);
  });
});

describe("containers", () => {
  it("RunContainer validates, installs flows everywhere, refuses duplicates and what does not fit", async () => {
    const c = await cluster();
    const info = await c.run("web", "edge-a", 10);
    expect(info.spec?.network?.mac).toBe("02:00:0a:4d:00:0a");
    const port = c.agent("edge-a").netns.get("web")!.ofport;
    expect(info.spec?.network?.ofport).toBe(port);
    expect(flowOut(c.agent("edge-a"), "10.77.0.10")).toBe(port);
    expect(flowOut(c.agent("edge-b"), "10.77.0.10")).toBe(c.agent("edge-b").ports.get("vx-edge-a")!.ofport);
    const dupName = await refusal(c.run("web", "edge-b", 11));
    expect(dupName.code).toBe("AlreadyExists");
    expect(dupName.message).toContain("already exists on edge-a");
    const dupIp = await refusal(c.run("web2", "edge-b", 10));
    expect(dupIp.message).toContain('10.77.0.10 is already used by container "web"');
    const big = await refusal(c.run("big", "edge-b", 12, { memoryLimitBytes: 64 * 1024 ** 3 }));
    expect(big.code).toBe("ResourceExhausted");
    expect(big.message).toContain("memory needs");
    expect(c.agent("edge-b").containers.size).toBe(0);
    const bad = await refusal(
      c.ctl.containers.run({
        host: "edge-a",
        spec: {
          name: "ok",
          image: "busybox",
          args: ["x"],
          env: [],
          cwd: "",
          cpuMillicores: 0,
          memoryLimitBytes: 0,
          network: { ipCidr: "10.77.0.300/24", mac: "", gateway: "", bridge: "", ofport: 0 },
          labels: {},
        },
      }),
    );
    expect(bad.code).toBe("InvalidArgument");
    expect(bad.message).toContain("spec.network.ip_cidr");
    // A failing flow install undoes the container.
    c.agent("edge-b").fail("setFlows", { code: "Internal" });
    expect((await refusal(c.run("gone", "edge-a", 13))).code).toBe("Internal");
    expect(c.agent("edge-a").containers.has("gone")).toBe(false);
    expect(c.agent("edge-a").netns.has("gone")).toBe(false);
  });

  it("list, where, logs, images, stop and delete", async () => {
    const c = await cluster();
    await c.run("web", "edge-a", 10);
    await c.run("db", "edge-b", 11);
    const all = await c.ctl.containers.list();
    expect(all.map((x) => [x.info?.spec?.name, x.host, x.migrating])).toEqual([
      ["db", "edge-b", ""],
      ["web", "edge-a", ""],
    ]);
    expect((await c.ctl.containers.list("edge-b")).map((x) => x.info?.spec?.name)).toEqual(["db"]);
    expect((await c.ctl.containers.where("db")).host).toBe("edge-b");
    const chunks = [];
    for await (const ch of c.ctl.containers.readLog({ name: "db", offset: 0, follow: false }, new AbortController().signal))
      chunks.push(Buffer.from(ch.data).toString());
    expect(chunks.join("")).toContain("hello from db on edge-b");
    expect((await c.ctl.containers.images()).map((i) => `${i.host}/${i.image?.name}`).sort()).toEqual(["edge-a/busybox", "edge-b/busybox"]);
    const stopped = await c.ctl.containers.stop({ name: "web", timeoutMs: 0 });
    expect(stopped.info?.state).toBe(3);
    await c.ctl.containers.delete({ name: "web", force: false });
    expect(c.agent("edge-a").containers.has("web")).toBe(false);
    expect(flowOut(c.agent("edge-a"), "10.77.0.10")).toBeUndefined();
    expect(flowOut(c.agent("edge-b"), "10.77.0.10")).toBeUndefined();
    expect((await refusal(c.ctl.containers.where("web"))).code).toBe("NotFound");
  });
});
