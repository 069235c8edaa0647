/**
 * Ferry end to end, driven through the admin CLI: real agents on three emulated edge hosts, a
 * real controller process, a client whose every byte is checked. A migration with the client
 * connected; a conflicting delete refused mid-migration; two migrations at once; one refused by
 * admission that changes nothing; and a controller killed mid-migration and restarted.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Cluster, destroyClusters, echoClient, makeCluster } from "../helpers/cluster.js";
import type { EchoReport } from "@ferry/testbed";
import { echoConnected } from "../helpers/wait.js";

interface Ps {
  host: string;
  migrating: string;
  info: { state: string; spec: { name: string } };
}
interface Mig {
  id: string;
  state: string;
  createdAt: string;
  finishedAt: string;
  totalMs: number;
  downtimeMs: number;
  controlOverheadMs: number;
  partial: boolean;
  steps: { name: string; state: string; durationMs: number }[];
}

let c: Cluster;

beforeAll(async () => {
  // edge-b's restores take 3 s longer: room to kill the controller mid-migration.
  c = await makeCluster(["edge-a", "edge-b", "edge-c"], { "edge-b": { FERRY_FAILPOINTS: "restore=delay:3000" } });
}, 240_000);

afterAll(async () => {
  await destroyClusters();
}, 120_000);

async function run(name: string, ip: string, memory = "64m"): Promise<void> {
  const r = await c.ferry(
    "run",
    name,
    "--host",
    "edge-a",
    "--image",
    "testkit",
    "--ip",
    `${ip}/24`,
    "--memory",
    memory,
    "--",
    "/usr/local/bin/ferry-echo",
    "7000",
  );
  if (r.code !== 0) throw new Error(r.err);
}

async function where(name: string): Promise<Ps[]> {
  const ps = await c.ferryJson<Ps[]>("ps");
  return ps.filter((p) => p.info.spec.name === name);
}

async function finish(client: ReturnType<typeof echoClient>): Promise<EchoReport> {
  client.child.kill("SIGTERM");
  const { code, out } = await client.done;
  expect(code).toBe(0);
  return JSON.parse(out) as EchoReport;
}

describe("ferry end to end", () => {
  it("migrates a service with a connected client through the CLI, full then partial, and the client sees no reconnect", async () => {
    await run("web", "10.77.0.10");
    const client = echoClient(c, "10.77.0.10");
    await echoConnected(client);
    // edge-c lacks the image: a full migration, the image streamed ahead of the freeze.
    const full = await c.ferryJson<Mig>("migrate", "web", "--to", "edge-c");
    expect(full.state).toBe("MIGRATION_STATE_SUCCEEDED");
    expect(full.partial ?? false).toBe(false); // proto3 JSON leaves out a false
    // Back to edge-a, which has the image: a partial migration.
    const partial = await c.ferryJson<Mig>("migrate", "web", "--to", "edge-a");
    expect(partial.partial).toBe(true);
    const report = await finish(client);
    expect(report.serial).toBe(1);
    expect(report.errors).toBe(0);
    expect(report.checked).toBe(report.sent);
    const here = await where("web");
    expect(here.map((p) => [p.host, p.info.state])).toEqual([["edge-a", "CONTAINER_STATE_RUNNING"]]);
    // The breakdown, as the CLI shows it.
    const shown = await c.ferry("migration", full.id);
    expect(shown.out).toMatch(/checkpoint\s+done/);
    expect(shown.out).toMatch(/control overhead/);
    const prepare = full.steps.find((s) => s.name === "prepare-image")!;
    const checkpoint = full.steps.find((s) => s.name === "checkpoint")!;
    expect(prepare.state).toBe("STEP_STATE_DONE");
    expect(checkpoint.state).toBe("STEP_STATE_DONE");
    console.log(
      JSON.stringify({
        full: { total: full.totalMs, downtime: full.downtimeMs, overhead: full.controlOverheadMs },
        partial: { total: partial.totalMs, downtime: partial.downtimeMs, overhead: partial.controlOverheadMs },
        gaps: report.gaps.map((g) => g.ms),
      }),
    );
  }, 180_000);

  it("refuses a delete, a stop and a second migration of a container being migrated", async () => {
    // edge-b restores slowly (failpoint delay): the migration is still running when we try.
    const r = await c.ferry("migrate", "web", "--to", "edge-b", "--detach");
    expect(r.code).toBe(0);
    const id = r.out.trim();
    const rm = await c.ferry("rm", "web", "--force");
    expect(rm.code).not.toBe(0);
    expect(rm.err).toContain(id);
    const stop = await c.ferry("stop", "web");
    expect(stop.code).not.toBe(0);
    const again = await c.ferry("migrate", "web", "--to", "edge-c");
    expect(again.code).not.toBe(0);
    expect(again.err).toMatch(/migrat/);
    for (let i = 0; i < 200; i++) {
      const m = await c.ferryJson<Mig>("migration", id);
      if (!m.state.endsWith("RUNNING") && !m.state.endsWith("PENDING")) break;
      await new Promise((res) => setTimeout(res, 100));
    }
    expect((await c.ferryJson<Mig>("migration", id)).state).toBe("MIGRATION_STATE_SUCCEEDED");
    expect((await where("web")).map((p) => p.host)).toEqual(["edge-b"]);
  }, 120_000);

  it("runs two migrations in parallel", async () => {
    await run("p1", "10.77.0.21");
    await run("p2", "10.77.0.22");
    const [a, b] = await Promise.all([
      c.ferryJson<Mig>("migrate", "p1", "--to", "edge-c"),
      c.ferryJson<Mig>("migrate", "p2", "--to", "edge-c"),
    ]);
    expect(a.state).toBe("MIGRATION_STATE_SUCCEEDED");
    expect(b.state).toBe("MIGRATION_STATE_SUCCEEDED");
    // They overlapped in time: each started before the other finished.
    expect(Date.parse(a.createdAt)).toBeLessThan(Date.parse(b.finishedAt));
    expect(Date.parse(b.createdAt)).toBeLessThan(Date.parse(a.finishedAt));
    expect((await where("p1")).map((p) => p.host)).toEqual(["edge-c"]);
    expect((await where("p2")).map((p) => p.host)).toEqual(["edge-c"]);
  }, 120_000);

  it("a migration refused by admission leaves everything as it was", async () => {
    // edge-b's conservative budget: limits of all its containers + the incoming one > capacity.
    const big = await c.ferry(
      "run",
      "big",
      "--host",
      "edge-b",
      "--image",
      "testkit",
      "--ip",
      "10.77.0.30/24",
      "--memory",
      "20g",
      "--",
      "/usr/local/bin/ferry-echo",
      "7000",
    );
    expect(big.code).toBe(0);
    await run("mid", "10.77.0.31", "8g");
    const before = await c.ferryJson<Mig[]>("migrations");
    const r = await c.ferry("migrate", "mid", "--to", "edge-b", "--strategy", "conservative");
    expect(r.code).toBe(10 + 8); // RESOURCE_EXHAUSTED
    expect(r.err).toMatch(/memory/);
    expect(r.err).toMatch(/free|capacity/);
    expect(await c.ferryJson<Mig[]>("migrations")).toHaveLength(before.length);
    const mid = await where("mid");
    expect(mid.map((p) => [p.host, p.info.state, p.migrating ?? ""])).toEqual([["edge-a", "CONTAINER_STATE_RUNNING", ""]]);
    // The refusal held no lock: the container can still be moved elsewhere.
    expect((await c.ferryJson<Mig>("migrate", "mid", "--to", "edge-c", "--strategy", "live")).state).toBe("MIGRATION_STATE_SUCCEEDED");
  }, 120_000);

  it("a controller killed mid-migration and restarted ends with the container running exactly once, client connected", async () => {
    await run("phoenix", "10.77.0.40");
    const client = echoClient(c, "10.77.0.40");
    await echoConnected(client);
    const r = await c.ferry("migrate", "phoenix", "--to", "edge-b", "--detach");
    const id = r.out.trim();
    // Kill it while the restore runs on edge-b (stalled 3 s by a failpoint): the container is
    // dumped on edge-a and half-way to edge-b, the worst moment to lose the controller.
    let seen = "";
    for (let i = 0; i < 200 && seen !== "STEP_STATE_RUNNING"; i++) {
      const m = await c.ferryJson<Mig>("migration", id);
      seen = m.steps.find((s) => s.name === "restore")?.state ?? "";
      if (seen !== "STEP_STATE_RUNNING") await new Promise((res) => setTimeout(res, 50));
    }
    expect(seen).toBe("STEP_STATE_RUNNING");
    await c.killController();
    await c.startController();
    // The stalled restore wakes up after the controller is back: let it, then count copies.
    await new Promise((res) => setTimeout(res, 3500));
    let m: Mig | undefined;
    for (let i = 0; i < 300; i++) {
      m = await c.ferryJson<Mig>("migration", id).catch(() => undefined);
      if (m && !/RUNNING|PENDING|ROLLING_BACK|CANCELLING/.test(m.state)) break;
      await new Promise((res) => setTimeout(res, 100));
    }
    expect(["MIGRATION_STATE_SUCCEEDED", "MIGRATION_STATE_ROLLED_BACK"]).toContain(m!.state);
    const here = await where("phoenix");
    expect(here).toHaveLength(1);
    expect(here[0]!.info.state).toBe("CONTAINER_STATE_RUNNING");
    expect(here[0]!.host).toBe(m!.state === "MIGRATION_STATE_SUCCEEDED" ? "edge-b" : "edge-a");
    const shown = await c.ferry("migrations");
    expect(shown.out).toContain(id);
    await new Promise((res) => setTimeout(res, 1000));
    const report = await finish(client);
    expect(report.serial).toBe(1);
    expect(report.errors).toBe(0);
    expect(report.checked).toBe(report.sent);
    console.log(
      JSON.stringify({ restartedMigration: m!.state, steps: m!.steps.map((s) => `${s.name}:${s.state.replace("STEP_STATE_", "")}`) }),
    );
  }, 180_000);
});
