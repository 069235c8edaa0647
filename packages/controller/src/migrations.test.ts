import { BlobKind, ContainerState } from "@ferry/api/agent";
import { AdmissionStrategy, MigrationMode, MigrationState, StepState, type Migration } from "@ferry/api/controller";
import { afterEach, describe, expect, it } from "vitest";
import { FakeNetwork, type Failpoint } from "./fake-agent.js";
import { MigrationJournal } from "./journal.js";
import { controlOverheadMs } from "./migrations.js";
import { clusterPool, fakeCluster, flowOut, isRunning, refusal, type FakeCluster } from "./testkit.js";

const MiB = 1024 * 1024;
const req = (container: string, destination: string, extra: Partial<{ strategy: AdmissionStrategy; mode: MigrationMode }> = {}) => ({
  container,
  destination,
  strategy: extra.strategy ?? AdmissionStrategy.ADMISSION_STRATEGY_UNSPECIFIED,
  mode: extra.mode ?? MigrationMode.MIGRATION_MODE_UNSPECIFIED,
});

const pool = clusterPool();
const cluster = pool.cluster;
afterEach(() => pool.closeAll());

/** The container runs exactly on `host`, nothing of it is left elsewhere, the flows point at it, no lock is held. */
function expectOnlyOn(c: FakeCluster, name: string, ip: string, host: string): void {
  expect(c.net.whereRunning(name)).toEqual([host]);
  const holder = c.agent(host);
  const port = holder.netns.get(name)?.ofport;
  expect(port).toBeGreaterThan(0);
  for (const a of c.net.agents.values()) {
    if (a.name === host) {
      expect(flowOut(a, ip)).toBe(port);
      continue;
    }
    expect(a.containers.has(name)).toBe(false);
    expect(a.netns.has(name)).toBe(false);
    // Every other host forwards the container's IP over its tunnel to the holder.
    expect(flowOut(a, ip)).toBe(c.ctl.hosts.get(a.name).saved.vxlanPortTo[host]);
  }
  // No checkpoint or upper blob is left anywhere (exported on the source, pulled to the destination).
  for (const a of c.net.agents.values()) expect([...a.blobs.values()].filter((b) => b.kind !== BlobKind.BLOB_KIND_IMAGE)).toEqual([]);
  expect(c.ctl.locks.all()).toEqual([]);
  expect(c.ctl.scheduler.running()).toBe(0);
}

describe("a migration", () => {
  it("moves the container, switches the flows, releases the locks and records every step", async () => {
    const c = await cluster();
    await c.run("web", "edge-a", 10);
    expectOnlyOn(c, "web", "10.77.0.10", "edge-a");
    const inspectsBefore = c.agent("edge-a").callsOf("inspectContainer").length;
    const hasBlobsBefore = c.agent("edge-b").callsOf("hasBlobs").length;
    const started = await c.ctl.migrations.start(req("web", "edge-b"));
    expect(started.state).toBe(MigrationState.MIGRATION_STATE_PENDING);
    expect(started.id).toMatch(/^m-\d{8}-\d{6}-[0-9a-f]{4}$/);
    expect(c.ctl.containers.migratingId("web")).toBe(started.id);
    const m = await c.wait(started.id);
    expect(m.state).toBe(MigrationState.MIGRATION_STATE_SUCCEEDED);
    expect(m.error).toBe("");
    expectOnlyOn(c, "web", "10.77.0.10", "edge-b");
    expect(c.agent("edge-a").checkpoints.size).toBe(0);
    // The destination's restore deleted the blobs it was made from: cleanup-source asked only the source.
    const restores = c.agent("edge-b").callsOf("restore");
    expect(restores.map((r) => r["deleteBlobs"])).toEqual([true]);
    expect(c.agent("edge-b").callsOf("deleteBlob")).toEqual([]);
    expect(c.agent("edge-a").callsOf("deleteBlob")).toHaveLength(2);
    // Before the freeze, the destination connected its channel to the source.
    const connects = c.agent("edge-b").callsOf("connectPeer");
    expect(connects.map((r) => r["address"])).toEqual([c.agent("edge-a").address]);
    // ... and asked to warm a new connection with 1 MiB of the image, which both hold (partial migration)
    const image = c.agent("edge-b").containers.get("web")!.imageDigest;
    expect(image).toMatch(/^sha256:/);
    expect(connects.map((r) => [r["warmDigest"], r["warmBytes"]])).toEqual([[image, 1024 * 1024]]);

    const saved = (await c.ctl.journal.get(m.id))!;
    expect(saved.steps.map((s) => s.name)).toEqual([
      "prepare-image",
      "prepare-netns",
      "checkpoint",
      "transfer",
      "switch-path",
      "restore",
      "cleanup-source",
    ]);
    for (const s of saved.steps) {
      expect(s.state).toBe(StepState.STEP_STATE_DONE);
      expect(s.attempts).toBe(1);
      expect(s.startedAt).toBeInstanceOf(Date);
    }
    expect(saved.steps.filter((s) => s.group === "transfer").map((s) => s.name)).toEqual(["transfer", "switch-path"]);
    // The source's namespace goes with its container after the commit, outside the downtime.
    expect(saved.steps.filter((s) => s.inDowntime).map((s) => s.name)).toEqual(["checkpoint", "transfer", "switch-path", "restore"]);
    expect(c.agent("edge-a").callsOf("clearNetns")).toEqual([]);
    expect(
      c
        .agent("edge-a")
        .callsOf("deleteContainer")
        .map((r) => r["keepNetns"]),
    ).toEqual([false]);
    // The pre-checks inspected the container and asked the destination for its image, and saved
    // what they learnt with the record: no step asked again.
    expect(c.agent("edge-a").callsOf("inspectContainer")).toHaveLength(inspectsBefore + 1);
    expect(c.agent("edge-b").callsOf("hasBlobs")).toHaveLength(hasBlobsBefore + 1);
    expect((await c.ctl.journal.getContext<{ spec?: unknown; sourceOfport?: number }>(m.id))?.spec).toBeDefined();
    expect(saved.partial).toBe(true);
    expect(saved.bytesTransferred).toBe(4 * MiB + 64 * 1024);
    expect(saved.totalMs).toBeGreaterThan(0);
    expect(saved.downtimeMs).toBeGreaterThan(0);
    // total − (checkpoint 25 + max(transfer 4+3, switch) + restore 20), as the agents reported.
    const work =
      saved.steps.find((s) => s.name === "checkpoint")!.details["work_ms"]! +
      saved.steps.find((s) => s.name === "restore")!.details["work_ms"]!;
    expect(work).toBe(45);
    expect(saved.controlOverheadMs).toBe(controlOverheadMs(saved));
    expect(saved.controlOverheadMs).toBeGreaterThanOrEqual(0);
    expect(saved.controlOverheadMs).toBeLessThanOrEqual(Math.max(0, saved.totalMs - 45));
    expect(saved.reason).toBe("manual");
    expect(saved.strategy).toBe(AdmissionStrategy.ADMISSION_STRATEGY_CONSERVATIVE);
    expect((await c.ctl.containers.where("web")).host).toBe("edge-b");
    // And back again: the next migration uses the destination's real ofport.
    const back = await c.wait((await c.ctl.migrations.start(req("web", "edge-a"))).id);
    expect(back.state).toBe(MigrationState.MIGRATION_STATE_SUCCEEDED);
    expectOnlyOn(c, "web", "10.77.0.10", "edge-a");
  });

  it("control overhead: total minus the agents' work, a parallel group counting its longest step", () => {
    const s = (name: string, group: string, work?: number) => ({
      name,
      group,
      state: StepState.STEP_STATE_DONE,
      durationMs: 0,
      attempts: 1,
      bytes: 0,
      error: "",
      inDowntime: false,
      details: work === undefined ? {} : { work_ms: work },
    });
    const m = {
      totalMs: 1000,
      steps: [s("a", "", 100), s("t", "g", 300), s("u", "g", 50), s("v", "g"), s("r", "", 200), s("x", "")],
    } as unknown as Migration;
    expect(controlOverheadMs(m)).toBe(1000 - 100 - 300 - 200);
  });

  // Each step before the commit, made to fail for good: the migration rolls back to the source.
  // `older`: the source predates export_blobs, and the transfer asks it to export.
  const failures: [step: string, host: "src" | "dst", method: string, extra?: Partial<Failpoint>, older?: boolean][] = [
    ["prepare-image", "dst", "pullBlob"],
    ["prepare-netns", "dst", "createNetns"],
    ["checkpoint", "src", "checkpoint"],
    ["checkpoint", "src", "checkpoint", { after: true, times: 1 }],
    ["transfer", "dst", "pullBlob", { when: (r) => String(r["operationKey"]).includes("/transfer/") }],
    ["transfer", "src", "exportCheckpoint", {}, true],
    ["switch-path", "dst", "setFlows", { when: (r) => String(r["operationKey"]).includes("/sdn-switch/") }],
    ["restore", "dst", "restore", { after: true }],
  ];
  for (const [step, side, method, extra, older] of failures) {
    const how = `${method}${extra?.after ? " after its work" : ""}${older ? ", an older source" : ""}`;
    it(`a failure in step "${step}" (${how}) rolls back: the container runs on the source, exactly once, nothing left anywhere`, async () => {
      const c = await cluster({ imageOn: ["edge-a"] });
      await c.run("web", "edge-a", 10);
      c.agent("edge-a").checkpointPacksNothing = !!older;
      const agent = c.agent(side === "src" ? "edge-a" : "edge-b");
      agent.fail(method, { code: "Internal", times: Infinity, ...extra });
      const started = await c.ctl.migrations.start(req("web", "edge-b"));
      const m = await c.wait(started.id);
      agent.clearFailpoints();
      expect(m.state, m.error).toBe(MigrationState.MIGRATION_STATE_ROLLED_BACK);
      expect(m.error).toContain(`step "${step}" failed`);
      const failed = m.steps.find((s) => s.name === step)!;
      expect([StepState.STEP_STATE_COMPENSATED, StepState.STEP_STATE_FAILED]).toContain(failed.state);
      expect(m.steps.find((s) => s.name === "cleanup-source")!.state).toBe(StepState.STEP_STATE_SKIPPED);
      expectOnlyOn(c, "web", "10.77.0.10", "edge-a");
      expect(isRunning(c.agent("edge-a"), "web")).toBe(true);
      expect((await c.ctl.containers.where("web")).host).toBe("edge-a");
      // The checkpoint packed the blobs; only an older source is asked to export them.
      expect(c.agent("edge-a").callsOf("exportCheckpoint").length > 0).toBe(!!older);
    });
  }

  it("retries an Unavailable agent call and succeeds", async () => {
    const c = await cluster();
    await c.run("web", "edge-a", 10);
    c.agent("edge-b").fail("createNetns", { code: "Unavailable", times: 1 });
    c.agent("edge-a").fail("checkpoint", { code: "Unavailable", times: 1, after: true });
    const m = await c.wait((await c.ctl.migrations.start(req("web", "edge-b"))).id);
    expect(m.state, m.error).toBe(MigrationState.MIGRATION_STATE_SUCCEEDED);
    expect(m.steps.find((s) => s.name === "prepare-netns")!.attempts).toBe(2);
    // The agent did the dump but the answer was lost: the retry is answered from its record, not dumped twice.
    expect(m.steps.find((s) => s.name === "checkpoint")!.attempts).toBe(2);
    expectOnlyOn(c, "web", "10.77.0.10", "edge-b");
  });

  it("a destination whose agent keeps the blobs after a restore (an older agent) gets them deleted by cleanup-source", async () => {
    const c = await cluster();
    await c.run("web", "edge-a", 10);
    c.agent("edge-b").restoreKeepsBlobs = true;
    const m = await c.wait((await c.ctl.migrations.start(req("web", "edge-b"))).id);
    expect(m.state, m.error).toBe(MigrationState.MIGRATION_STATE_SUCCEEDED);
    expect(c.agent("edge-b").callsOf("deleteBlob")).toHaveLength(2);
    expectOnlyOn(c, "web", "10.77.0.10", "edge-b");
  });

  it("refuses a container that is not running, and one its source cannot inspect, before recording anything", async () => {
    const c = await cluster();
    await c.run("web", "edge-a", 10);
    c.agent("edge-a").containers.get("web")!.state = ContainerState.CONTAINER_STATE_STOPPED;
    const stopped = await refusal(c.ctl.migrations.start(req("web", "edge-b")));
    expect(stopped.code).toBe("FailedPrecondition");
    expect(stopped.message).toBe('container "web" is not running on edge-a');
    c.agent("edge-a").containers.get("web")!.state = ContainerState.CONTAINER_STATE_RUNNING;
    c.agent("edge-a").fail("inspectContainer", { code: "Internal", times: Infinity });
    expect((await refusal(c.ctl.migrations.start(req("web", "edge-b")))).code).toBe("Internal");
    c.agent("edge-a").clearFailpoints();
    expect(await c.ctl.journal.list()).toEqual([]);
    expect(c.agent("edge-b").callsOf("createNetns")).toEqual([]);
    expect(c.agent("edge-a").callsOf("checkpoint")).toEqual([]);
    expectOnlyOn(c, "web", "10.77.0.10", "edge-a");
    expect((await c.wait((await c.ctl.migrations.start(req("web", "edge-b"))).id)).state).toBe(MigrationState.MIGRATION_STATE_SUCCEEDED);
  });

  it("refuses stop, delete and a second migration of a container being migrated, naming the migration", async () => {
    const c = await cluster({ hosts: ["edge-a", "edge-b", "edge-c"] });
    await c.run("web", "edge-a", 10);
    c.agent("edge-b").methodLatency.set("restore", 300);
    const { id } = await c.ctl.migrations.start(req("web", "edge-b"));
    for (const p of [
      c.ctl.containers.stop({ name: "web", timeoutMs: 0 }),
      c.ctl.containers.delete({ name: "web", force: true }),
      c.ctl.migrations.start(req("web", "edge-c")),
    ]) {
      const e = await refusal(p);
      expect(e.code).toBe("FailedPrecondition");
      expect(e.message).toContain(`container "web" is being migrated by migration ${id}`);
    }
    const list = await c.ctl.containers.list();
    expect(list.filter((x) => x.info?.spec?.name === "web").every((x) => x.migrating === id)).toBe(true);
    expect((await c.wait(id)).state).toBe(MigrationState.MIGRATION_STATE_SUCCEEDED);
    expect((await c.ctl.journal.list()).length).toBe(1);
    await c.ctl.containers.delete({ name: "web", force: true });
    expect(c.net.whereRunning("web")).toEqual([]);
    for (const a of c.net.agents.values()) expect(flowOut(a, "10.77.0.10")).toBeUndefined();
  });

  it("runs independent migrations in parallel and refuses one beyond --max-parallel", async () => {
    const c = await cluster({ hosts: ["edge-a", "edge-b", "edge-c"], config: { maxParallel: 2 } });
    await c.run("one", "edge-a", 11);
    await c.run("two", "edge-a", 12);
    await c.run("three", "edge-b", 13);
    c.agent("edge-a").methodLatency.set("checkpoint", 200);
    const m1 = await c.ctl.migrations.start(req("one", "edge-b"));
    const m2 = await c.ctl.migrations.start(req("two", "edge-c"));
    // Both are inside their checkpoint at the same time.
    await c.until(m1.id, (m) => m.steps.find((s) => s.name === "checkpoint")?.state === StepState.STEP_STATE_RUNNING);
    const r2 = await c.until(m2.id, (m) => m.steps.find((s) => s.name === "checkpoint")?.state === StepState.STEP_STATE_RUNNING);
    expect((await c.ctl.journal.get(m1.id))!.steps.find((s) => s.name === "checkpoint")!.state).toBe(StepState.STEP_STATE_RUNNING);
    expect(r2.state).toBe(MigrationState.MIGRATION_STATE_RUNNING);
    expect(c.ctl.migrations.running().sort()).toEqual([m1.id, m2.id].sort());
    const e = await refusal(c.ctl.migrations.start(req("three", "edge-c")));
    expect(e.code).toBe("ResourceExhausted");
    expect(e.message).toContain("the limit is 2");
    expect(c.ctl.containers.migratingId("three")).toBe("");
    expect((await c.ctl.journal.list()).length).toBe(2);
    expect((await c.wait(m1.id)).state).toBe(MigrationState.MIGRATION_STATE_SUCCEEDED);
    expect((await c.wait(m2.id)).state).toBe(MigrationState.MIGRATION_STATE_SUCCEEDED);
    expect(c.net.whereRunning("one")).toEqual(["edge-b"]);
    expect(c.net.whereRunning("two")).toEqual(["edge-c"]);
    // A slot is free again.
    expect((await c.wait((await c.ctl.migrations.start(req("three", "edge-c"))).id)).state).toBe(MigrationState.MIGRATION_STATE_SUCCEEDED);
  });

  it("an admission refusal says which resource, the need and the free amount, and changes nothing", async () => {
    const c = await cluster();
    await c.run("big", "edge-a", 20, { memoryLimitBytes: 3 * 1024 * MiB });
    c.agent("edge-b").capacity = { cpuCores: 4, memoryBytes: 2 * 1024 * MiB, diskBytes: 100 * 1024 * MiB };
    const e = await refusal(c.ctl.migrations.start(req("big", "edge-b")));
    expect(e.code).toBe("ResourceExhausted");
    expect(e.message).toContain('edge-b cannot take "big" under conservative admission: memory needs 3 GiB');
    expect(e.message).toContain("capacity 2 GiB");
    expect(e.data).toMatchObject({ resource: "memory", needBytes: 3 * 1024 * MiB, freeBytes: 2 * 1024 * MiB });
    expect(await c.ctl.journal.list()).toEqual([]);
    expect(c.ctl.locks.all()).toEqual([]);
    expect(c.ctl.scheduler.running()).toBe(0);
    expect(c.agent("edge-b").callsOf("createNetns")).toEqual([]);
    // The live strategy counts measured use (32 MiB) instead of the limit: admitted.
    const m = await c.wait(
      (await c.ctl.migrations.start(req("big", "edge-b", { strategy: AdmissionStrategy.ADMISSION_STRATEGY_LIVE }))).id,
    );
    expect(m.state).toBe(MigrationState.MIGRATION_STATE_SUCCEEDED);
    expect(m.strategy).toBe(AdmissionStrategy.ADMISSION_STRATEGY_LIVE);
  });

  it("a destination that cannot reach its source fails the migration before the freeze", async () => {
    const c = await cluster();
    await c.run("web", "edge-a", 10);
    c.agent("edge-b").fail("connectPeer", { code: "Unavailable", times: Infinity });
    const m = await c.wait((await c.ctl.migrations.start(req("web", "edge-b"))).id);
    c.agent("edge-b").clearFailpoints();
    expect(m.state, m.error).toBe(MigrationState.MIGRATION_STATE_ROLLED_BACK);
    expect(m.error).toContain('step "prepare-image" failed');
    expect(c.agent("edge-a").callsOf("checkpoint")).toEqual([]);
    expectOnlyOn(c, "web", "10.77.0.10", "edge-a");
  });

  it("refuses a capability mismatch before any freeze", async () => {
    const c = await cluster();
    await c.run("web", "edge-a", 10);
    c.agent("edge-b").capabilities.criu!.version = "3.17";
    const e = await refusal(c.ctl.migrations.start(req("web", "edge-b")));
    expect(e.code).toBe("FailedPrecondition");
    expect(e.message).toContain("CRIU 3.17, older than 4.2");
    expect(c.agent("edge-a").callsOf("checkpoint")).toEqual([]);
    expect(c.ctl.locks.all()).toEqual([]);
  });

  it("refuses bad requests with the field at fault", async () => {
    const c = await cluster();
    await c.run("web", "edge-a", 10);
    expect((await refusal(c.ctl.migrations.start(req("nope", "edge-b")))).code).toBe("NotFound");
    expect((await refusal(c.ctl.migrations.start(req("web", "edge-z")))).code).toBe("NotFound");
    expect((await refusal(c.ctl.migrations.start(req("web", "edge-a")))).message).toContain("already runs on edge-a");
    expect((await refusal(c.ctl.migrations.start(req("Bad!", "edge-b")))).code).toBe("InvalidArgument");
    const ps = await refusal(c.ctl.migrations.start(req("web", "edge-b", { mode: MigrationMode.MIGRATION_MODE_PAGE_SERVER })));
    expect(ps.code).toBe("FailedPrecondition");
    expect(ps.message).toContain("not supported yet");
    await c.ctl.hosts.setCordoned("edge-b", true);
    expect((await refusal(c.ctl.migrations.start(req("web", "edge-b")))).message).toContain("cordoned");
    expect(c.ctl.locks.all()).toEqual([]);
  });

  it("pre-copy falls back to stop-and-copy without dirty tracking, and says so", async () => {
    const c = await cluster();
    await c.run("web", "edge-a", 10);
    const m = await c.wait((await c.ctl.migrations.start(req("web", "edge-b", { mode: MigrationMode.MIGRATION_MODE_PRE_COPY }))).id);
    expect(m.state).toBe(MigrationState.MIGRATION_STATE_SUCCEEDED);
    expect(m.steps[0]!.details).toMatchObject({ precopy_requested: 1, precopy_fallback: 1, dirty_tracking: 0 });
  });

  it("partial: a destination with the image gets no image; full: the image is pulled before the checkpoint", async () => {
    const partial = await cluster();
    await partial.run("web", "edge-a", 10);
    const p = await partial.wait((await partial.ctl.migrations.start(req("web", "edge-b"))).id);
    expect(p.partial).toBe(true);
    expect(p.steps.find((s) => s.name === "prepare-image")!.details["partial"]).toBe(1);
    const pulls = partial
      .agent("edge-b")
      .callsOf("pullBlob")
      .map((r) => (r["blob"] as { kind: BlobKind }).kind);
    expect(pulls).not.toContain(BlobKind.BLOB_KIND_IMAGE);
    expect(pulls.length).toBe(2);

    const full = await cluster({ imageOn: ["edge-a"] });
    await full.run("web", "edge-a", 10);
    const f = await full.wait((await full.ctl.migrations.start(req("web", "edge-b"))).id);
    expect(f.state).toBe(MigrationState.MIGRATION_STATE_SUCCEEDED);
    expect(f.partial).toBe(false);
    expect(f.steps.find((s) => s.name === "prepare-image")!.bytes).toBe(50 * MiB);
    const log = full.net.log.map((x) => `${x.agent}.${x.method}`);
    const imagePull = full.net.log.findIndex(
      (x) => x.method === "pullBlob" && (x.req["blob"] as { kind: BlobKind }).kind === BlobKind.BLOB_KIND_IMAGE,
    );
    expect(imagePull).toBeGreaterThanOrEqual(0);
    expect(imagePull).toBeLessThan(log.indexOf("edge-a.checkpoint"));
    expect(full.agent("edge-b").images.has("busybox")).toBe(true);
  });

  it("cancel rolls back before the commit; refused after it", async () => {
    const c = await cluster();
    await c.run("web", "edge-a", 10);
    c.agent("edge-a").methodLatency.set("checkpoint", 300);
    const { id } = await c.ctl.migrations.start(req("web", "edge-b"));
    await c.until(id, (m) => m.steps.find((s) => s.name === "checkpoint")?.state === StepState.STEP_STATE_RUNNING);
    const r = await c.ctl.migrations.cancel(id);
    expect(r.state).toBe(MigrationState.MIGRATION_STATE_CANCELLING);
    const m = await c.wait(id);
    expect(m.state).toBe(MigrationState.MIGRATION_STATE_ROLLED_BACK);
    expect(m.error).toContain("cancelled by request");
    expectOnlyOn(c, "web", "10.77.0.10", "edge-a");
    expect((await refusal(c.ctl.migrations.cancel(id))).message).toContain("already ended");

    c.agent("edge-a").methodLatency.clear();
    c.agent("edge-a").methodLatency.set("deleteContainer", 300);
    const { id: id2 } = await c.ctl.migrations.start(req("web", "edge-b"));
    await c.until(id2, (m2) => m2.steps.find((s) => s.name === "cleanup-source")?.state === StepState.STEP_STATE_RUNNING);
    expect((await refusal(c.ctl.migrations.cancel(id2))).message).toContain("past its commit point");
    expect((await c.wait(id2)).state).toBe(MigrationState.MIGRATION_STATE_SUCCEEDED);
  });

  it("WatchMigration streams the snapshot, each step change, and ends with the migration", async () => {
    const c = await cluster();
    await c.run("web", "edge-a", 10);
    c.agent("edge-b").methodLatency.set("createNetns", 50);
    const { id } = await c.ctl.migrations.start(req("web", "edge-b"));
    const events = [];
    for await (const ev of c.ctl.migrations.watch(id, new AbortController().signal)) events.push(ev);
    expect(events[0]!.step).toBeUndefined();
    const last = events[events.length - 1]!.migration!;
    expect(last.state).toBe(MigrationState.MIGRATION_STATE_SUCCEEDED);
    const done = events.filter((e) => e.step?.state === StepState.STEP_STATE_DONE).map((e) => e.step!.name);
    expect(done).toContain("restore");
    expect(done).toContain("cleanup-source");
    // A finished migration: one snapshot, then the stream ends.
    const again = [];
    for await (const ev of c.ctl.migrations.watch(id, new AbortController().signal)) again.push(ev);
    expect(again.length).toBe(1);
  });
});

describe("a controller restart mid-migration", () => {
  /**
   * `afterWork`: the agent does the call's work, then hangs (the controller dies before the answer).
   * `asOlder`: rewrite the record (and the agents) as an older controller would have left them.
   */
  async function crashDuring(
    step: string,
    method: string,
    host: "edge-a" | "edge-b",
    afterWork?: (c: FakeCluster) => boolean,
    asOlder?: (before: Migration, c1: FakeCluster) => Migration,
    olderSource = false,
  ): Promise<{ c2: FakeCluster; id: string; before: Migration }> {
    const net = new FakeNetwork();
    const c1 = await fakeCluster({ net });
    await c1.run("web", "edge-a", 10);
    c1.agent("edge-a").checkpointPacksNothing = olderSource;
    c1.agent(host).fail(method, { code: "Internal", hang: true, after: !!afterWork });
    const { id } = await c1.ctl.migrations.start(req("web", "edge-b"));
    const before = await c1.until(id, (m) => m.steps.find((s) => s.name === step)?.state === StepState.STEP_STATE_RUNNING);
    for (let i = 0; afterWork && !afterWork(c1); i++) {
      if (i > 400) throw new Error(`${host}.${method} never did its work`);
      await new Promise((r) => setTimeout(r, 5));
    }
    // "Kill" it: it records nothing more and its channels to the agents are cut.
    await c1.close(true);
    net.severAll();
    // Writes it had already begun land before the successor starts (a dead process writes nothing later).
    await c1.ctl.journal.flush();
    if (asOlder) {
      const journal = await MigrationJournal.open(c1.stateDir);
      await journal.saveState(asOlder(before, c1), await journal.getContext(id));
      await journal.close();
    }
    for (const a of net.agents.values()) a.clearFailpoints();
    const c2 = await cluster({ net, stateDir: c1.stateDir });
    return { c2, id, before };
  }

  it("before the commit: rolls back, the container runs on the source exactly once", async () => {
    const { c2, id } = await crashDuring("restore", "restore", "edge-b");
    expect(c2.ctl.resumed).toEqual([id]);
    expect(c2.ctl.containers.migratingId("web")).toBe(id);
    const m = await c2.wait(id);
    expect(m.state, m.error).toBe(MigrationState.MIGRATION_STATE_ROLLED_BACK);
    expect(m.error).toContain("the controller restarted");
    expectOnlyOn(c2, "web", "10.77.0.10", "edge-a");
    expect((await c2.ctl.migrations.get(id)).state).toBe(MigrationState.MIGRATION_STATE_ROLLED_BACK);
  });

  it("a record from an older controller, with its inspect step done: resumed, it rolls back cleanly", async () => {
    // As an older controller saved it: the pipeline began with an inspect step.
    const { c2, id } = await crashDuring("prepare-netns", "createNetns", "edge-b", undefined, (before) => ({
      ...before,
      steps: [{ ...before.steps[0]!, name: "inspect", group: "", state: StepState.STEP_STATE_DONE }, ...before.steps],
    }));
    const m = await c2.wait(id);
    expect(m.state, m.error).toBe(MigrationState.MIGRATION_STATE_ROLLED_BACK);
    expect(m.error).not.toContain("unknown to this controller");
    expect(m.steps.map((s) => s.name)).not.toContain("inspect");
    expectOnlyOn(c2, "web", "10.77.0.10", "edge-a");
  });

  it("a record from an older controller that cleared the source's namespace in the downtime: its rollback puts it back", async () => {
    // As an older controller left it: clear-source-netns done beside the transfer, the namespace gone.
    const { c2, id } = await crashDuring("restore", "restore", "edge-b", undefined, (before, c1) => {
      c1.agent("edge-a").netns.delete("web");
      const transfer = before.steps.find((s) => s.name === "transfer")!;
      const clear = { ...transfer, name: "clear-source-netns", details: {}, bytes: 0 };
      return { ...before, steps: before.steps.flatMap((s) => (s === transfer ? [s, clear] : [s])) };
    });
    const m = await c2.wait(id);
    expect(m.state, m.error).toBe(MigrationState.MIGRATION_STATE_ROLLED_BACK);
    expect(m.steps.find((s) => s.name === "clear-source-netns")!.state).toBe(StepState.STEP_STATE_COMPENSATED);
    expect(
      c2
        .agent("edge-a")
        .callsOf("createNetns")
        .map((r) => r["networkLocked"]),
    ).toContain(true);
    expectOnlyOn(c2, "web", "10.77.0.10", "edge-a");
  });

  it("after the dump, before the checkpoint's DONE was saved: the undo restores from the source's checkpoint", async () => {
    const dumped = (c: FakeCluster) => c.agent("edge-a").containers.get("web")?.state === ContainerState.CONTAINER_STATE_CHECKPOINTED;
    const { c2, id } = await crashDuring("checkpoint", "checkpoint", "edge-a", dumped);
    // The journal never learnt the checkpoint's id: the undo must get it from the source.
    expect((await c2.ctl.journal.getContext<{ checkpointId?: string }>(id))?.checkpointId).toBeUndefined();
    const m = await c2.wait(id);
    expect(m.state, m.error).toBe(MigrationState.MIGRATION_STATE_ROLLED_BACK);
    // Nor which blobs the dump was packed into: the undo asked the source again, under the run's
    // key, and deleted them (expectOnlyOn: no checkpoint or upper blob anywhere).
    expectOnlyOn(c2, "web", "10.77.0.10", "edge-a");
    expect(c2.agent("edge-a").calls.filter((x) => x.method === "restore")).toHaveLength(1);
    const keys = c2
      .agent("edge-a")
      .calls.filter((x) => x.method === "checkpoint")
      .map((x) => x.req["operationKey"]);
    expect(keys).toEqual([`${id}/checkpoint`, `${id}/checkpoint`]);
  });

  it("after the export of an older source, before its answer: the undo asks the source which blobs it made, and deletes them", async () => {
    const exported = (c: FakeCluster) => [...c.agent("edge-a").blobs.values()].some((b) => b.kind === BlobKind.BLOB_KIND_CHECKPOINT);
    const { c2, id } = await crashDuring("transfer", "exportCheckpoint", "edge-a", exported, undefined, true);
    expect((await c2.ctl.journal.getContext<{ checkpointBlob?: unknown }>(id))?.checkpointBlob).toBeUndefined();
    const m = await c2.wait(id);
    expect(m.state, m.error).toBe(MigrationState.MIGRATION_STATE_ROLLED_BACK);
    expectOnlyOn(c2, "web", "10.77.0.10", "edge-a");
    // The first controller's export and the undo's, under one operation key: the source answers
    // the second from its record of the first.
    const keys = c2
      .agent("edge-a")
      .calls.filter((x) => x.method === "exportCheckpoint")
      .map((x) => x.req["operationKey"]);
    expect(keys).toEqual([`${id}/transfer/export`, `${id}/transfer/export`]);
    for (const a of c2.net.agents.values()) expect([...a.blobs.values()].filter((b) => b.kind !== BlobKind.BLOB_KIND_IMAGE)).toEqual([]);
  });

  it("after the commit: rolls forward, the container runs on the destination exactly once", async () => {
    const { c2, id } = await crashDuring("cleanup-source", "deleteContainer", "edge-a");
    const m = await c2.wait(id);
    expect(m.state, m.error).toBe(MigrationState.MIGRATION_STATE_SUCCEEDED);
    expectOnlyOn(c2, "web", "10.77.0.10", "edge-b");
    expect(c2.agent("edge-a").containers.has("web")).toBe(false);
  });
});
