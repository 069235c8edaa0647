// Agents in emulated edge hosts for integration tests: a testbed, the test image, real agents
// over mTLS, a client workload, and COAT's migration done step by step through the agents' RPCs.
import { spawn } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { randomBytes, randomInt } from "node:crypto";
import * as agentApi from "@ferry/api/agent";
import type { BlobRef, ContainerSpec } from "@ferry/api/agent";
import { agentServiceDefinition } from "@ferry/agent";
import { connect, exec, type PromiseClient } from "@ferry/common";
import { Testbed, endpointFlows, pushImage, spawnAgent, type AgentProcess, type EmulatedHost, type Workload } from "@ferry/testbed";
import { REPO, makePki, type TestPki } from "./certs.js";

export type AgentClient = PromiseClient<typeof agentServiceDefinition>;

export interface Edge {
  host: EmulatedHost;
  proc: AgentProcess;
  client: AgentClient;
}

export interface Bed {
  tb: Testbed;
  pki: TestPki;
  work: string;
  edges: Map<string, Edge>;
  clientHost: EmulatedHost;
  workload: Workload;
  image: BlobRef;
  /** The test client binary (runs in the workload's namespace). */
  echoClient: string;
  spawn(name: string, env?: NodeJS.ProcessEnv, extraArgs?: string[]): Promise<Edge>;
  destroy(): Promise<void>;
}

/** Build the test image once per process (deterministic: same digest every time). */
let built: Promise<{ tar: string; client: string; dir: string }> | undefined;
export function testkit(): Promise<{ tar: string; client: string; dir: string }> {
  built ??= (async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), "ferry-testkit-"));
    const tar = path.join(dir, "testkit.tar");
    const client = path.join(dir, "ferry-echo-client");
    await exec("bash", [path.join(REPO, "deploy/testkit/build.sh"), tar, client], { timeoutMs: 120_000 });
    return { tar, client, dir };
  })();
  return built;
}

const open = new Set<Bed>();

/** Tear down every bed made in this process, finished or not (afterAll). */
export async function destroyBeds(): Promise<void> {
  for (const b of [...open]) await b.destroy();
}

export async function makeBed(hostNames: string[]): Promise<Bed> {
  const sfx = randomBytes(2).toString("hex");
  const pki = await makePki(["controller:controller", "admin:admin", ...hostNames.map((h) => `agent:${h}`)]);
  const work = await mkdtemp(path.join(os.tmpdir(), "ferry-bed-"));
  // A random underlay /24, so that two testbeds (or a leftover) never share a route.
  const tb = await Testbed.create({ prefix: `ferry-t${sfx}-`, underlayNet: `172.31.${randomInt(100, 250)}` });
  const edges = new Map<string, Edge>();
  const bed: Bed = {
    tb,
    pki,
    work,
    edges,
    clientHost: undefined as unknown as EmulatedHost,
    workload: undefined as unknown as Workload,
    image: undefined as unknown as BlobRef,
    echoClient: "",
    async spawn(name, env, extraArgs) {
      const old = edges.get(name);
      if (old) {
        old.client.close();
        await old.proc.stop();
      }
      const host = tb.host(name);
      const proc = await spawnAgent({
        host,
        certsDir: pki.dir,
        stateDir: path.join(work, name),
        fromSource: true,
        ...(env ? { env } : {}),
        ...(extraArgs ? { extraArgs } : {}),
      });
      const client = connect(agentServiceDefinition, agentApi as unknown as Record<string, unknown>, {
        address: proc.address,
        security: pki.security("controller"),
        serverName: name,
      });
      const e = { host, proc, client };
      edges.set(name, e);
      return e;
    },
    async destroy() {
      open.delete(bed);
      for (const e of edges.values()) {
        // Containers die with their namespaces' owners: delete what each agent still runs.
        const list = await e.client.listContainers({}, { timeoutMs: 10_000 }).catch(() => ({ containers: [] }));
        for (const c of list.containers) {
          await e.client.deleteContainer({ name: c.spec!.name, force: true }, { timeoutMs: 30_000 }).catch(() => undefined);
        }
        e.client.close();
        await e.proc.stop();
      }
      await tb.destroy();
      await rm(work, { recursive: true, force: true });
      await pki.cleanup();
    },
  };
  // Registered at once: a set-up that times out half-way is still torn down by destroyBeds().
  open.add(bed);
  try {
    for (const h of hostNames) await tb.createHost({ name: h });
    bed.clientHost = await tb.createHost({ name: "client" });
    await tb.attachRoot();
    const kit = await testkit();
    bed.echoClient = kit.client;
    for (const h of hostNames) await bed.spawn(h);
    bed.workload = await tb.addWorkload(bed.clientHost, { name: "wl", ipCidr: "10.77.0.100/24", ofport: 10 });
    bed.image = await pushImage(edges.get(hostNames[0]!)!.client, kit.tar, "testkit");
  } catch (e) {
    await bed.destroy().catch(() => undefined);
    throw e;
  }
  return bed;
}

/**
 * Route a container's IP to `holder` on every host: through the agents' SetFlows where there is
 * an agent, directly on the client host (which has none).
 */
export async function routeTo(
  bed: Bed,
  ip: string,
  holder: EmulatedHost,
  ofport: number,
  order?: [first: EmulatedHost, last: EmulatedHost],
): Promise<void> {
  const port = (h: EmulatedHost): number => (h === holder ? ofport : h.vxlanPortTo(holder).ofport);
  const set = (h: EmulatedHost): Promise<unknown> => {
    const e = [...bed.edges.values()].find((x) => x.host === h);
    return e ? e.client.setFlows({ bridge: h.bridge, flows: endpointFlows(ip, port(h)) }) : h.setFlows(endpointFlows(ip, port(h)));
  };
  const all = [...[...bed.edges.values()].map((e) => e.host), bed.clientHost];
  if (!order) {
    await Promise.all(all.map(set));
    return;
  }
  await set(order[0]);
  await Promise.all(all.filter((h) => h !== order[0] && h !== order[1]).map(set));
  await set(order[1]);
}

export interface MigrationTimes {
  prepareMs: number;
  checkpointMs: number;
  frozenMs: number;
  transferMs: number;
  restoreMs: number;
  downtimeMs: number;
  imageBytes: number;
  /** The checkpoint and upper blobs the destination pulled, and whether its restore deleted them. */
  pulled: string[];
  blobsDeleted: boolean;
  /** The checkpoint answered with its blobs (export_blobs), and no ExportCheckpoint was needed. */
  packedAtCheckpoint: boolean;
}

/**
 * COAT's migration, Ferry-style, through the agents only: destination namespace prepared and
 * locked ahead; checkpoint; transfer ‖ clear the source namespace ‖ switch the path; restore;
 * then the source's copy is deleted.
 */
export interface MigrateOptions {
  /** Clear the source namespace inside the downtime, in parallel with the transfer (COAT's
   *  order), instead of after the restore. */
  clearInDowntime?: boolean;
  /** Switch the flows host by host (destination, then the others, then the source). */
  sequentialSwitch?: boolean;
  /** Dump the memory pages straight into a page server on the destination. */
  pageServer?: boolean;
  /** The checkpoint packs its blobs (export_blobs), as the controller asks, instead of a separate ExportCheckpoint. */
  packAtCheckpoint?: boolean;
}

export async function migrateViaAgents(
  bed: Bed,
  spec: ContainerSpec,
  from: string,
  to: string,
  key: string,
  opts: MigrateOptions = {},
): Promise<MigrationTimes> {
  const src = bed.edges.get(from)!;
  const dst = bed.edges.get(to)!;
  const ip = spec.network!.ipCidr.split("/")[0]!;
  const t0 = performance.now();
  const { present } = await dst.client.hasBlobs({ digests: [bed.image.digest] });
  if (!present.includes(bed.image.digest)) {
    for await (const _ of dst.client.pullBlob({
      operationKey: `${key}/image`,
      blob: bed.image,
      sourceAddress: src.proc.address,
      sourceServerName: from,
    }));
  }
  const ns = await dst.client.createNetns({
    operationKey: `${key}/netns`,
    container: spec.name,
    network: spec.network,
    networkLocked: true,
  });
  const prepareMs = performance.now() - t0;
  const ps = opts.pageServer ? await dst.client.startPageServer({ operationKey: `${key}/ps`, checkpointId: `ps-${key}` }) : undefined;
  const t1 = performance.now();
  const cp = await src.client.checkpoint({
    operationKey: `${key}/checkpoint`,
    name: spec.name,
    tcpEstablished: true,
    exportBlobs: opts.packAtCheckpoint === true,
    ...(ps ? { pageServer: { address: ps.address, port: ps.port } } : {}),
  });
  const checkpointMs = performance.now() - t1;
  const t2 = performance.now();
  const pull = async (blob: BlobRef | undefined, k: string): Promise<void> => {
    for await (const _ of dst.client.pullBlob({
      operationKey: `${key}/${k}`,
      blob,
      sourceAddress: src.proc.address,
      sourceServerName: from,
    }));
  };
  let ex: agentApi.ExportCheckpointResponse | undefined;
  await Promise.all([
    (async () => {
      ex =
        cp.blobs ?? (await src.client.exportCheckpoint({ operationKey: `${key}/export`, name: spec.name, checkpointId: cp.checkpointId }));
      await Promise.all([pull(ex.checkpoint, "pull-checkpoint"), pull(ex.upper, "pull-upper")]);
    })(),
    opts.clearInDowntime ? src.client.clearNetns({ operationKey: `${key}/clear`, container: spec.name }) : Promise.resolve(),
    routeTo(bed, ip, dst.host, ns.ofport, opts.sequentialSwitch ? [dst.host, src.host] : undefined),
  ]);
  const transferMs = performance.now() - t2;
  const t3 = performance.now();
  const restored = await dst.client.restore({
    operationKey: `${key}/restore`,
    spec: cp.spec,
    checkpointBlob: ex!.checkpoint,
    upperBlob: ex!.upper,
    tcpEstablished: true,
    imageDigest: cp.imageDigest,
    ...(ps ? { checkpointId: `ps-${key}` } : {}),
    deleteBlobs: true,
  });
  const restoreMs = performance.now() - t3;
  const downtimeMs = performance.now() - t1;
  await src.client.deleteContainer({
    operationKey: `${key}/cleanup`,
    name: spec.name,
    force: true,
    keepNetns: opts.clearInDowntime === true,
  });
  await src.client.deleteCheckpoint({ operationKey: `${key}/cleanup-cp`, checkpointId: cp.checkpointId });
  return {
    prepareMs,
    checkpointMs,
    frozenMs: cp.stats?.frozenMs ?? 0,
    transferMs,
    restoreMs,
    downtimeMs,
    imageBytes: (ex!.checkpoint?.sizeBytes ?? 0) + (ex!.upper?.sizeBytes ?? 0),
    pulled: [ex!.checkpoint!.digest, ex!.upper!.digest],
    blobsDeleted: restored.blobsDeleted,
    packedAtCheckpoint: cp.blobs !== undefined,
  };
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.floor((s.length - 1) / 2)]! : NaN;
}

/** What ferry-echo-client prints when it stops: bytes sent and checked, errors, and each gap. */
export interface EchoClientReport {
  errors: number;
  sent: number;
  checked: number;
  gaps: { atMs: number; ms: number }[];
}

/**
 * For the A/B benchmarks: a ferry-echo container `name` at `ip` on edge-a, routed, and the
 * checking client connected to it from the client workload (100 kB/s, gaps from 50 ms).
 * Call `mark()` as each migration starts; once `finish()` has stopped the client, `gapAfter(at)`
 * is the longest gap the client saw that began between the migration marked `at` and the next
 * one marked (or 3 s after the last): a window past the next start would take in its gap too.
 */
export async function echoUnderTest(
  bed: Bed,
  name: string,
  ip: string,
): Promise<{ spec: ContainerSpec; mark(): number; finish(): Promise<EchoClientReport>; gapAfter(at: number): number }> {
  const spec: ContainerSpec = {
    name,
    image: "testkit",
    args: ["/usr/local/bin/ferry-echo", "7000"],
    env: [],
    cwd: "/",
    cpuMillicores: 0,
    memoryLimitBytes: 0,
    network: { ipCidr: `${ip}/24`, mac: "", gateway: "", bridge: "", ofport: 0 },
    labels: {},
  };
  const a = bed.edges.get("edge-a")!;
  const { container } = await a.client.createContainer({ spec, createNetns: true });
  await a.client.startContainer({ name });
  await routeTo(bed, ip, a.host, container!.spec!.network!.ofport);
  const spawnedAt = Date.now();
  const client = spawn("nsenter", [`--net=${bed.workload.netnsPath}`, bed.echoClient, ip, "7000", "--rate", "100000", "--gap-ms", "50"], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  client.stdout.on("data", (d: Buffer) => (out += d.toString()));
  await new Promise((r) => setTimeout(r, 1500));
  let report: EchoClientReport | undefined;
  const t0 = Date.now();
  // The client's clock starts when it has connected, a few ms after the spawn: its times, less
  // this, are ms since t0 (early by those few ms; the window below allows 50).
  const clientOffset = t0 - spawnedAt;
  /** Migration starts, ms since t0, in order. */
  const marks: number[] = [];
  return {
    spec,
    mark: () => {
      marks.push(Date.now() - t0);
      return marks[marks.length - 1]!;
    },
    async finish() {
      client.kill("SIGTERM");
      await new Promise((r) => client.on("close", r));
      return (report = JSON.parse(out) as EchoClientReport);
    },
    gapAfter: (at) => {
      const until = marks.find((m) => m > at) ?? at + 3000;
      return Math.max(
        0,
        ...(report?.gaps ?? []).filter((g) => g.atMs - clientOffset >= at - 50 && g.atMs - clientOffset < until).map((g) => g.ms),
      );
    },
  };
}
