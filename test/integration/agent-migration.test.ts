/**
 * The agent's whole job, with the real tools: two edge hosts (namespaces, each with its own OVS
 * and a real ferry-agent over mTLS) joined by VXLAN, a client in a third. A container running a
 * TCP service with a connected client is checkpointed on one, its checkpoint streamed to the
 * other, its namespace re-created there with the same IP and MAC, flows switched, restored —
 * ten times back and forth, every byte checked by the client. Then iperf3 -R and sockperf, a
 * restore that fails on purpose (the source restores), and bad input.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { readdir } from "node:fs/promises";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ContainerState, type ContainerSpec } from "@ferry/api/agent";
import type { FerryError } from "@ferry/common";
import { type Bed, destroyBeds, makeBed, median, migrateViaAgents, routeTo, type MigrationTimes } from "../helpers/agents.js";
import { echoConnected, waitListening } from "../helpers/wait.js";
import type { EchoReport } from "@ferry/testbed";

let bed: Bed;

beforeAll(async () => {
  bed = await makeBed(["edge-a", "edge-b"]);
}, 180_000);

afterAll(async () => {
  await destroyBeds();
}, 120_000);

function specOf(name: string, ip: string, args: string[]): ContainerSpec {
  return {
    name,
    image: "testkit",
    args,
    env: [],
    cwd: "/",
    cpuMillicores: 1000,
    memoryLimitBytes: 256 << 20,
    network: { ipCidr: `${ip}/24`, mac: "", gateway: "", bridge: "", ofport: 0 },
    labels: {},
  };
}

/** Create and start `spec` on `host`, route its IP there, and wait until it listens on `port`. */
async function runContainer(host: string, spec: ContainerSpec, port: number): Promise<void> {
  const e = bed.edges.get(host)!;
  const { container } = await e.client.createContainer({ spec, createNetns: true });
  const started = await e.client.startContainer({ name: spec.name });
  await routeTo(bed, spec.network!.ipCidr.split("/")[0]!, e.host, container!.spec!.network!.ofport);
  await waitListening(started.container!.pid, port);
}

/** A program in the client's namespace; resolves with its stdout when it exits. */
function inClient(
  cmd: string,
  args: string[],
): { child: ChildProcess; stderr: () => string; done: Promise<{ code: number | null; out: string; err: string }> } {
  const child = spawn("nsenter", [`--net=${bed.workload.netnsPath}`, cmd, ...args], { stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  let err = "";
  child.stdout.on("data", (d: Buffer) => (out += d.toString()));
  child.stderr.on("data", (d: Buffer) => (err += d.toString()));
  const done = new Promise<{ code: number | null; out: string; err: string }>((resolve) =>
    child.on("close", (code) => resolve({ code, out, err })),
  );
  return { child, stderr: () => err, done };
}

async function removeEverywhere(name: string): Promise<void> {
  for (const e of bed.edges.values()) {
    await e.client.deleteContainer({ name, force: true }).catch((x: FerryError) => {
      if (x.code !== "NotFound") throw x;
    });
  }
}

describe("live migration between two agents", () => {
  it("moves a TCP service 10 times back and forth with no reconnect, no lost and no duplicated bytes", async () => {
    const spec = specOf("echo", "10.77.0.10", ["/usr/local/bin/ferry-echo", "7000", "4"]);
    await runContainer("edge-a", spec, 7000);
    const client = inClient(bed.echoClient, [
      "10.77.0.10",
      "7000",
      "--rate",
      "200000",
      "--chunk",
      "2000",
      "--drain",
      "15",
      "--gap-ms",
      "50",
    ]);
    await echoConnected(client);
    await new Promise((r) => setTimeout(r, 500));
    const times: MigrationTimes[] = [];
    // The client prints a line for each pause once its data flows again.
    const pausesSeen = (): number => (client.stderr().match(/^gap /gm) ?? []).length;
    let where = "edge-a";
    for (let i = 0; i < 10; i++) {
      const pausesBefore = pausesSeen();
      const to = where === "edge-a" ? "edge-b" : "edge-a";
      // Every other one as the controller asks: the checkpoint packs its blobs in the same call.
      const t = await migrateViaAgents(bed, spec, where, to, `echo-${i}`, { packAtCheckpoint: i % 2 === 1 });
      expect(t.packedAtCheckpoint).toBe(i % 2 === 1);
      times.push(t);
      // The destination's restore deleted the blobs it was made from.
      expect(t.blobsDeleted).toBe(true);
      expect((await bed.edges.get(to)!.client.hasBlobs({ digests: t.pulled })).missing).toEqual(t.pulled);
      where = to;
      // The next move waits for the client's data to flow again: a client whose retransmission
      // met the source's lock is backing off (200, 400, 800 ms...), and moves every ~0.7 s would
      // meet it at every retry, merging all the pauses into one (seen once: 8.7 s over 10).
      for (const end = Date.now() + 10_000; pausesSeen() === pausesBefore && Date.now() < end;) {
        await new Promise((r) => setTimeout(r, 20));
      }
      // Let the stream run between moves: each round checks bytes that crossed a migration.
      await new Promise((r) => setTimeout(r, 400));
    }
    client.child.kill("SIGTERM");
    const { code, out, err } = await client.done;
    const report = JSON.parse(out) as EchoReport;
    const gaps = report.gaps.map((g) => g.ms);
    console.log(
      JSON.stringify({
        migrations: times.length,
        median: {
          prepare_ms: Math.round(median(times.map((t) => t.prepareMs))),
          checkpoint_ms: Math.round(median(times.map((t) => t.checkpointMs))),
          criu_frozen_ms: median(times.map((t) => t.frozenMs)),
          transfer_ms: Math.round(median(times.map((t) => t.transferMs))),
          restore_ms: Math.round(median(times.map((t) => t.restoreMs))),
          downtime_ms: Math.round(median(times.map((t) => t.downtimeMs))),
          client_gap_ms: Math.round(median(gaps)),
        },
        image_bytes: median(times.map((t) => t.imageBytes)),
        bytes_checked: report.checked,
      }),
    );
    expect(err).not.toMatch(/error/i);
    expect(code).toBe(0);
    expect(report.serial).toBe(1); // the first and only connection: no reconnect
    expect(report.errors).toBe(0);
    expect(report.closed).toBe(false);
    expect(report.checked).toBe(report.sent);
    expect(report.checked).toBeGreaterThan(500_000);
    expect(gaps.length).toBeGreaterThanOrEqual(10); // every migration is a visible pause...
    expect(Math.max(...gaps)).toBeLessThan(5000); // ...and none is a reconnect-length outage
    const { container } = await bed.edges.get(where)!.client.inspectContainer({ name: "echo" });
    expect(container!.state).toBe(ContainerState.CONTAINER_STATE_RUNNING);
    await removeEverywhere("echo");
    // Nothing of the 10 checkpoints is left on either host: each source deleted its own dump,
    // each destination the copy it restored from.
    for (const h of bed.edges.keys()) {
      const left = await readdir(path.join(bed.work, h, "checkpoints")).catch(() => [] as string[]);
      expect(
        left.filter((d) => d.startsWith("echo-")),
        h,
      ).toEqual([]);
    }
  }, 240_000);

  it("migrates with the memory pages dumped straight into the destination's page server", async () => {
    const spec = specOf("paged", "10.77.0.14", ["/usr/local/bin/ferry-echo", "7000", "32"]);
    await runContainer("edge-a", spec, 7000);
    const client = inClient(bed.echoClient, ["10.77.0.14", "7000", "--rate", "100000", "--drain", "15"]);
    await echoConnected(client);
    const plain = await migrateViaAgents(bed, spec, "edge-a", "edge-b", "paged-0");
    const paged = await migrateViaAgents(bed, spec, "edge-b", "edge-a", "paged-1", { pageServer: true });
    // The pages went to the page server: what travels afterwards is a fraction of a full dump.
    expect(paged.imageBytes).toBeLessThan(plain.imageBytes / 4);
    client.child.kill("SIGTERM");
    const { code, out } = await client.done;
    const report = JSON.parse(out) as EchoReport;
    console.log(
      JSON.stringify({
        plain_checkpoint_bytes: plain.imageBytes,
        paged_checkpoint_bytes: paged.imageBytes,
        plain_downtime_ms: Math.round(plain.downtimeMs),
        paged_downtime_ms: Math.round(paged.downtimeMs),
      }),
    );
    expect(code).toBe(0);
    expect(report.serial).toBe(1);
    expect(report.errors).toBe(0);
    expect(report.checked).toBe(report.sent);
    await removeEverywhere("paged");
  }, 120_000);

  it("keeps iperf3 -R running across a migration", async () => {
    const spec = specOf("iperf", "10.77.0.11", ["/usr/bin/iperf3", "-s", "-p", "5201"]);
    await runContainer("edge-a", spec, 5201);
    const client = inClient("iperf3", ["-c", "10.77.0.11", "-p", "5201", "-R", "-t", "8", "-i", "0.5", "-b", "50M", "--json"]);
    await new Promise((r) => setTimeout(r, 2500));
    const t = await migrateViaAgents(bed, spec, "edge-a", "edge-b", "iperf-0");
    const { code, out } = await client.done;
    const result = JSON.parse(out) as { error?: string; intervals: { sum: { bytes: number } }[]; end: { sum_received: { bytes: number } } };
    console.log(JSON.stringify({ iperf_downtime_ms: Math.round(t.downtimeMs), received_bytes: result.end.sum_received.bytes }));
    expect(result.error).toBeUndefined();
    expect(code).toBe(0);
    expect(result.intervals.length).toBeGreaterThanOrEqual(15);
    // Data flowed after the migration too: the last intervals carried bytes.
    expect(result.intervals.slice(-3).reduce((s, i) => s + i.sum.bytes, 0)).toBeGreaterThan(0);
    await removeEverywhere("iperf");
  }, 120_000);

  it("keeps sockperf ping-pong running across a migration", async () => {
    const spec = specOf("sockperf", "10.77.0.12", ["/usr/bin/sockperf", "sr", "--tcp", "-i", "0.0.0.0", "-p", "11111"]);
    await runContainer("edge-a", spec, 11111);
    const client = inClient("sockperf", ["pp", "--tcp", "-i", "10.77.0.12", "-p", "11111", "-t", "6", "--mps", "200"]);
    await new Promise((r) => setTimeout(r, 2000));
    await migrateViaAgents(bed, spec, "edge-a", "edge-b", "sockperf-0");
    const { code, out, err } = await client.done;
    const observed = /Summary: Latency is ([\d.]+) usec/.exec(out + err);
    const max = /<MAX> observation\s*=\s*([\d.]+)/.exec(out + err);
    console.log(JSON.stringify({ sockperf_avg_latency_us: observed?.[1], sockperf_max_us: max?.[1] }));
    expect(code).toBe(0);
    expect(observed).not.toBeNull();
    await removeEverywhere("sockperf");
  }, 120_000);

  it("a failed restore on the destination leaves a checkpoint the source restores from, and the client survives", async () => {
    // edge-b's next restore fails on purpose.
    await bed.spawn("edge-b", { FERRY_FAILPOINTS: "restore=1" });
    const a = bed.edges.get("edge-a")!;
    const b = bed.edges.get("edge-b")!;
    const spec = specOf("rollback", "10.77.0.13", ["/usr/local/bin/ferry-echo", "7000"]);
    await runContainer("edge-a", spec, 7000);
    const client = inClient(bed.echoClient, ["10.77.0.13", "7000", "--rate", "100000", "--drain", "15"]);
    await echoConnected(client);
    const e = (await migrateViaAgents(bed, spec, "edge-a", "edge-b", "rb-0").catch((x: unknown) => x)) as FerryError;
    expect(e.code).toBe("Internal");
    expect(e.message).toContain("failpoint restore");
    // Roll back as the controller would: undo in reverse.
    const { containers } = await a.client.listContainers({});
    const cp = containers.find((c) => c.spec?.name === "rollback")!;
    expect(cp.state).toBe(ContainerState.CONTAINER_STATE_CHECKPOINTED);
    await b.client.clearNetns({ container: "rollback" });
    const ns = await a.client.createNetns({ container: "rollback", network: cp.spec!.network, networkLocked: true });
    await routeTo(bed, "10.77.0.13", a.host, ns.ofport);
    await a.client.restore({ spec: cp.spec, checkpointId: cp.checkpointId, tcpEstablished: true });
    await new Promise((r) => setTimeout(r, 1500));
    client.child.kill("SIGTERM");
    const { code, out } = await client.done;
    const report = JSON.parse(out) as EchoReport;
    expect(code).toBe(0);
    expect(report.serial).toBe(1);
    expect(report.errors).toBe(0);
    expect(report.checked).toBe(report.sent);
    const after = await a.client.inspectContainer({ name: "rollback" });
    expect(after.container!.state).toBe(ContainerState.CONTAINER_STATE_RUNNING);
    await expect(b.client.inspectContainer({ name: "rollback" })).rejects.toMatchObject({ code: "NotFound" });
    await removeEverywhere("rollback");
    await bed.spawn("edge-b");
  }, 120_000);
});

describe("bad input: the right status, a message naming the field, and nothing lost", () => {
  const spec = specOf("keeper", "10.77.0.20", ["/usr/local/bin/ferry-echo", "7000"]);
  let client: ReturnType<typeof inClient>;

  beforeAll(async () => {
    // A service with a connected client runs throughout: every refusal below must leave it be.
    await runContainer("edge-a", spec, 7000);
    client = inClient(bed.echoClient, ["10.77.0.20", "7000", "--rate", "50000", "--drain", "10"]);
    await echoConnected(client);
  }, 60_000);

  afterAll(async () => {
    client.child.kill("SIGTERM");
    const { code, out } = await client.done;
    const report = JSON.parse(out) as EchoReport;
    expect(code).toBe(0);
    expect(report.errors).toBe(0);
    expect(report.checked).toBe(report.sent);
    const { container } = await bed.edges.get("edge-a")!.client.inspectContainer({ name: "keeper" });
    expect(container!.state).toBe(ContainerState.CONTAINER_STATE_RUNNING);
    await removeEverywhere("keeper");
  }, 60_000);

  async function refused(p: Promise<unknown>): Promise<FerryError> {
    const e = await p.then(
      () => undefined,
      (x: unknown) => x as FerryError,
    );
    if (!e) throw new Error("expected a refusal");
    return e;
  }

  const a = () => bed.edges.get("edge-a")!.client;

  it("invalid names and paths: InvalidArgument naming the field", async () => {
    let e = await refused(a().createContainer({ spec: { ...spec, name: "../etc" }, createNetns: true }));
    expect(e.code).toBe("InvalidArgument");
    expect(e.message).toContain("spec.name");
    e = await refused(a().restore({ spec, checkpointId: "../../etc", tcpEstablished: true }));
    expect(e.code).toBe("InvalidArgument");
    e = await refused(a().hasBlobs({ digests: ["sha256:../../x"] }));
    expect(e.code).toBe("InvalidArgument");
    e = await refused(a().createNetns({ container: "ok", network: { ipCidr: "10.77.0.300/24" } }));
    expect(e.code).toBe("InvalidArgument");
    expect(e.message).toContain("ip_cidr");
    e = await refused(
      a().setFlows({ bridge: "br-ferry", flows: [{ table: 0, priority: 1, match: "ip\nadd-flow x", actions: "drop", cookie: 5 }] }),
    );
    expect(e.code).toBe("InvalidArgument");
  });

  it("unknown container or image: NotFound", async () => {
    expect((await refused(a().inspectContainer({ name: "nosuch" }))).code).toBe("NotFound");
    expect((await refused(a().checkpoint({ name: "nosuch", tcpEstablished: true }))).code).toBe("NotFound");
    const e = await refused(a().createContainer({ spec: { ...spec, name: "other", image: "nosuch-image" }, createNetns: true }));
    expect(e.code).toBe("NotFound");
    expect(e.message).toContain("nosuch-image");
  });

  it("a duplicate name or an IP already used here: AlreadyExists", async () => {
    const e = await refused(a().createContainer({ spec, createNetns: true }));
    expect(e.code).toBe("AlreadyExists");
    const ip = await refused(a().createNetns({ container: "twin", network: { ipCidr: "10.77.0.20/24" } }));
    expect(ip.code).toBe("AlreadyExists");
    expect(ip.message).toContain("10.77.0.20");
  });

  it("a corrupted upload: DataLoss, and nothing stored", async () => {
    const digest = "sha256:" + "ab".repeat(32);
    const e = await refused(
      a().pushBlob([
        { msg: { $case: "header", value: { digest, sizeBytes: 4, kind: 1 } }, offset: 0 },
        { msg: { $case: "chunk", value: Buffer.from("evil") } },
      ]),
    );
    expect(e.code).toBe("DataLoss");
    const { missing } = await a().hasBlobs({ digests: [digest] });
    expect(missing).toEqual([digest]);
  });

  it("not enough memory or disk: ResourceExhausted with the numbers", async () => {
    const mem = await refused(a().createContainer({ spec: { ...spec, name: "huge", memoryLimitBytes: 2 ** 50 }, createNetns: true }));
    expect(mem.code).toBe("ResourceExhausted");
    expect(mem.message).toMatch(/MiB free/);
    const disk = await refused(
      a().pushBlob([{ msg: { $case: "header", value: { digest: "sha256:" + "cd".repeat(32), sizeBytes: 2 ** 52, kind: 1 } }, offset: 0 }]),
    );
    expect(disk.code).toBe("ResourceExhausted");
    // Nothing half-made: no container, no namespace left behind by the refused create.
    expect((await refused(a().inspectContainer({ name: "huge" }))).code).toBe("NotFound");
    const ns = await a().createNetns({ container: "huge", network: { ipCidr: "10.77.0.21/24" } });
    expect(ns.ofport).toBeGreaterThan(0);
    await a().clearNetns({ container: "huge" });
  });

  it("a checkpoint that fails leaves the container running and its client connected", async () => {
    // A page server that does not exist: CRIU fails mid-dump.
    const e = await refused(a().checkpoint({ name: "keeper", tcpEstablished: true, pageServer: { address: "127.0.0.1", port: 9 } }));
    expect(e.code).not.toBe("OK");
    const { container } = await a().inspectContainer({ name: "keeper" });
    expect(container!.state).toBe(ContainerState.CONTAINER_STATE_RUNNING);
  });

  it("reports capacity, limits and live usage, and streams metrics", async () => {
    const r = await a().getResources({});
    expect(r.capacity!.cpuCores).toBeGreaterThan(0);
    expect(r.capacity!.memoryBytes).toBeGreaterThan(r.used!.memoryBytes);
    const keeper = r.containers.find((c) => c.name === "keeper")!;
    expect(keeper.memoryLimitBytes).toBe(256 << 20);
    expect(keeper.cpuMillicores).toBe(1000);
    expect(keeper.usage!.memoryBytes).toBeGreaterThan(0);
    const samples = [];
    for await (const m of a().streamMetrics({ intervalMs: 200 })) {
      samples.push(m);
      if (samples.length === 3) break;
    }
    expect(samples.map((m) => m.hostname)).toEqual(["edge-a", "edge-a", "edge-a"]);
    expect(samples[2]!.sampledAt!.getTime() - samples[0]!.sampledAt!.getTime()).toBeGreaterThanOrEqual(350);
    expect(
      (
        await refused(
          (async () => {
            for await (const _ of a().streamMetrics({ intervalMs: 5 })) break;
          })(),
        )
      ).code,
    ).toBe("InvalidArgument");
  });

  it("answers a retried call with the same operation key from its record, not by doing it twice", async () => {
    const req = { operationKey: "retry-test/netns", container: "retried", network: { ipCidr: "10.77.0.22/24" } };
    const first = await a().createNetns(req);
    const again = await a().createNetns(req);
    expect(again).toEqual(first);
    // A different request under the same key is refused, not silently answered.
    const e = await refused(a().createNetns({ ...req, network: { ipCidr: "10.77.0.23/24" } }));
    expect(e.code).toBe("AlreadyExists");
    expect(e.message).toContain("operation key");
    await a().clearNetns({ container: "retried" });
  });

  it("keeps its containers across an agent restart, which finds them again", async () => {
    await bed.spawn("edge-a");
    const { containers } = await a().listContainers({});
    const keeper = containers.find((c) => c.spec?.name === "keeper");
    expect(keeper?.state).toBe(ContainerState.CONTAINER_STATE_RUNNING);
    // Still manageable: a checkpoint-capable, inspectable container, its log readable.
    const { container } = await a().inspectContainer({ name: "keeper" });
    expect(container!.pid).toBeGreaterThan(0);
  });

  it("CRIU too old: FailedPrecondition with the fix, before anything is frozen", async () => {
    const fake = `${bed.work}/old-criu`;
    await (
      await import("node:fs/promises")
    ).writeFile(fake, '#!/bin/sh\n[ "$1" = --version ] && echo "Version: 3.17"\nexit 0\n', { mode: 0o755 });
    const old = await bed.spawn("edge-b", undefined, ["--criu", fake]);
    try {
      const e = await refused(old.client.checkpoint({ name: "anything", tcpEstablished: true }));
      expect(e.code).toBe("FailedPrecondition");
      expect(e.message).toContain("3.17");
      expect(e.message).toContain("setup.sh");
    } finally {
      await bed.spawn("edge-b");
    }
  });
});
