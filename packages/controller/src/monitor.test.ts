import { ContainerState, type StreamMetricsResponse } from "@ferry/api/agent";
import { MigrationState, Policy, Resource } from "@ferry/api/controller";
import type { FerryError } from "@ferry/common";
import { afterEach, describe, expect, it } from "vitest";
import { PolicyStore } from "./policies.js";
import { clusterPool, type FakeCluster } from "./testkit.js";

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;

const pool = clusterPool();
afterEach(() => pool.closeAll());

async function setup(): Promise<FakeCluster> {
  const c = await pool.cluster({ hosts: ["edge-a", "edge-b", "edge-c"] });
  await c.run("web", "edge-a", 10);
  await c.run("db", "edge-a", 11);
  // edge-b is busier than edge-c: the least loaded admissible host is edge-c.
  c.agent("edge-b").baseUsed = { cpuMillicores: 2000, memoryBytes: 5 * GiB, diskBytes: 10 * GiB };
  c.agent("edge-c").baseUsed = { cpuMillicores: 100, memoryBytes: 1 * GiB, diskBytes: 10 * GiB };
  return c;
}

/** A sample of edge-a with `share` of its 8 GiB memory used; db is the busiest container. */
function sample(at: number, share: number): StreamMetricsResponse {
  const cont = (name: string, mem: number) => ({
    name,
    state: ContainerState.CONTAINER_STATE_RUNNING,
    cpuMillicores: 250,
    memoryLimitBytes: 64 * MiB,
    usage: { cpuMillicores: 100, memoryBytes: mem, diskBytes: 0 },
  });
  return {
    hostname: "edge-a",
    sampledAt: new Date(at),
    capacity: { cpuCores: 4, memoryBytes: 8 * GiB, diskBytes: 100 * GiB },
    used: { cpuMillicores: 500, memoryBytes: Math.round(share * 8 * GiB), diskBytes: 10 * GiB },
    containers: [cont("web", 20 * MiB), cont("db", 50 * MiB)],
  };
}

const policy = (over: Partial<Policy> = {}): Policy =>
  Policy.fromPartial({
    name: "mem-high",
    resource: Resource.RESOURCE_MEMORY,
    threshold: 0.8,
    host: "edge-a",
    sustainedSamples: 3,
    cooldownSeconds: 300,
    schedule: "*/10 * * * * *",
    enabled: true,
    ...over,
  });

describe("monitor policies", () => {
  it("a breach for N samples starts exactly one migration of the busiest container to the least loaded admissible host", async () => {
    const c = await setup();
    const now = Date.now();
    const series = [sample(now - 2000, 0.9), sample(now - 1000, 0.92), sample(now, 0.95)];
    const [ev] = await c.ctl.monitor.evaluate(policy(), { now, samples: () => series });
    expect(ev).toMatchObject({ breached: true, container: "db", destination: "edge-c", note: "migration started" });
    const m = await c.wait(ev!.migrationId!);
    expect(m.state).toBe(MigrationState.MIGRATION_STATE_SUCCEEDED);
    expect(m.reason).toBe("policy:mem-high");
    expect(c.net.whereRunning("db")).toEqual(["edge-c"]);
    expect((await c.ctl.journal.list()).length).toBe(1);

    // The same breach again within the cool-down: "db" is left alone, and so is "web" (picked next).
    const again = await c.ctl.monitor.evaluate(policy(), {
      now: now + 1000,
      samples: () =>
        [sample(now - 1000, 0.9), sample(now, 0.9), sample(now + 1000, 0.9)].map((s) => ({
          ...s,
          containers: s.containers.filter((x) => x.name === "db"),
        })),
    });
    expect(again[0]).toMatchObject({ breached: true, note: "breach, but every candidate is cooling down or being migrated" });
    expect((await c.ctl.journal.list()).length).toBe(1);
  });

  it("no policy migration while a migration of the container runs", async () => {
    const c = await setup();
    c.agent("edge-b").methodLatency.set("restore", 300);
    const { id } = await c.ctl.migrations.start({ container: "db", destination: "edge-b", strategy: 0, mode: 0 });
    const now = Date.now();
    const p = policy({ container: "db", resource: Resource.RESOURCE_CPU, threshold: 0.3 });
    const [ev] = await c.ctl.monitor.evaluate(p, { now, samples: () => [sample(now - 2, 0.9), sample(now - 1, 0.9), sample(now, 0.9)] });
    expect(ev!.breached).toBe(true);
    expect(ev!.migrationId).toBeUndefined();
    await c.wait(id);
    expect((await c.ctl.journal.list()).length).toBe(1);
  });

  it("does not fire below the threshold, on fewer than N breaching samples, or on stale samples", async () => {
    const c = await setup();
    const now = Date.now();
    const below = await c.ctl.monitor.evaluate(policy(), {
      now,
      samples: () => [sample(now - 2000, 0.5), sample(now - 1000, 0.6), sample(now, 0.7)],
    });
    expect(below[0]!.breached).toBe(false);
    const twoOfThree = await c.ctl.monitor.evaluate(policy(), {
      now,
      samples: () => [sample(now - 2000, 0.5), sample(now - 1000, 0.9), sample(now, 0.95)],
    });
    expect(twoOfThree[0]!.breached).toBe(false);
    const tooFew = await c.ctl.monitor.evaluate(policy(), { now, samples: () => [sample(now - 1000, 0.9), sample(now, 0.95)] });
    expect(tooFew[0]!.note).toBe("2 of 3 samples");
    const stale = await c.ctl.monitor.evaluate(policy(), {
      now: now + 120_000,
      samples: () => [sample(now - 2000, 0.9), sample(now - 1000, 0.9), sample(now, 0.9)],
    });
    expect(stale[0]!.note).toContain("old");
    expect(await c.ctl.journal.list()).toEqual([]);
  });

  it("a breach with no admissible destination starts nothing and says why", async () => {
    const c = await setup();
    for (const h of ["edge-b", "edge-c"]) c.agent(h).capacity = { cpuCores: 4, memoryBytes: 16 * MiB, diskBytes: 100 * GiB };
    const now = Date.now();
    const [ev] = await c.ctl.monitor.evaluate(policy(), {
      now,
      samples: () => [sample(now - 2, 0.9), sample(now - 1, 0.9), sample(now, 0.9)],
    });
    expect(ev!.note).toContain('no host can take "db"');
    expect(await c.ctl.journal.list()).toEqual([]);
  });

  it("SetPolicy validates, fills defaults and persists; a cron schedule evaluates on its own", async () => {
    const c = await setup();
    const set = (p: Partial<Policy>) => c.ctl.impl.setPolicy({ policy: policy(p) }, undefined as never);
    const bad = async (p: Partial<Policy>, field: string) => {
      const e = await set(p).then(
        () => undefined,
        (x: unknown) => x as FerryError,
      );
      expect(e?.code).toBe("InvalidArgument");
      expect(e?.message).toContain(field);
    };
    await bad({ threshold: 1.5 }, "policy.threshold");
    await bad({ threshold: 0 }, "policy.threshold");
    await bad({ schedule: "every minute" }, "policy.schedule");
    await bad({ resource: Resource.RESOURCE_UNSPECIFIED }, "policy.resource");
    await bad({ name: "Bad Name" }, "policy.name");
    const { policy: p } = await set({ sustainedSamples: 0, cooldownSeconds: 0, schedule: "", enabled: false });
    expect(p).toMatchObject({ sustainedSamples: 3, cooldownSeconds: 300, schedule: "*/10 * * * * *" });
    const store = new PolicyStore(c.stateDir);
    await store.load();
    expect(store.list().map((x) => x.name)).toEqual(["mem-high"]);
    expect(c.ctl.monitor.scheduled()).toEqual([]);

    // Every second, on the registry's own samples.
    const now = Date.now();
    for (const s of [sample(now - 2000, 0.9), sample(now - 1000, 0.9), sample(now, 0.9)]) c.ctl.hosts.ingest("edge-a", s);
    await set({ name: "every-second", schedule: "* * * * * *", sustainedSamples: 3 });
    expect(c.ctl.monitor.scheduled()).toEqual(["every-second"]);
    const t0 = Date.now();
    while ((await c.ctl.journal.list()).length === 0 && Date.now() - t0 < 4000) await new Promise((r) => setTimeout(r, 50));
    const [m] = await c.ctl.journal.list();
    expect(m?.reason).toBe("policy:every-second");
    await c.ctl.impl.deletePolicy({ name: "every-second" }, undefined as never);
    expect(c.ctl.monitor.scheduled()).toEqual([]);
    await c.wait(m!.id);
  });
});
