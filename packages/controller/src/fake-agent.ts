// Test support: in-memory agents that behave like ferry-agent as far as the controller can see
// (containers, namespaces, blobs, checkpoints, bridges, flows), with failpoints and latency. Not a
// mock of runc or CRIU: it is the controller's view of an agent, for the controller's unit tests.
import * as api from "@ferry/api/agent";
import {
  BlobKind,
  ContainerState,
  type BlobRef,
  type Capacity,
  type ContainerInfo,
  type ContainerSpec,
  type Flow,
  type GetCapabilitiesResponse,
  type NetworkSpec,
  type Usage,
} from "@ferry/api/agent";
import { FerryError, type ErrorCode } from "@ferry/common";
import { createHash, randomBytes } from "node:crypto";
import type { AgentClient, AgentConnector } from "./hosts.js";

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

/** What a failpoint does to the calls of one RPC. */
export interface Failpoint {
  code: ErrorCode;
  /** How many calls fail (then the failpoint is spent); Infinity = always. Default 1. */
  times?: number;
  message?: string;
  /** Hang until the caller's signal aborts instead of failing (with `after`: once the work is done). */
  hang?: boolean;
  /** Let this many matching calls through first. */
  skip?: number;
  /** Fail only calls whose request matches. */
  when?: (req: Record<string, unknown>) => boolean;
  /** Fail after doing the work (the agent did it, the answer was lost). */
  after?: boolean;
}

interface FakeNetns {
  network: NetworkSpec;
  ofport: number;
  locked: boolean;
}

interface FakeCheckpoint {
  container: string;
  spec: ContainerSpec;
  imageDigest: string;
}

/** Everything a fake host holds; tests read and set these directly. */
export class FakeAgent {
  readonly containers = new Map<string, ContainerInfo>();
  readonly netns = new Map<string, FakeNetns>();
  readonly blobs = new Map<string, BlobRef>();
  readonly images = new Map<string, api.ImageInfo>();
  readonly checkpoints = new Map<string, FakeCheckpoint>();
  /** bridge → rules. */
  readonly flows = new Map<string, Flow[]>();
  readonly bridges = new Set<string>();
  /** port name → { remoteIp, ofport }. */
  readonly ports = new Map<string, { remoteIp: string; ofport: number }>();
  /** Every call: method and request, in order. */
  readonly calls: { method: string; req: Record<string, unknown> }[] = [];
  readonly failpoints = new Map<string, Failpoint[]>();
  /** Added to every call, in ms. */
  latencyMs = 0;
  /** Per method latency, added to `latencyMs`. */
  readonly methodLatency = new Map<string, number>();
  /** All calls fail Unavailable (the agent is down). */
  down = false;
  /** Restore ignores delete_blobs, as an agent from before it did. */
  restoreKeepsBlobs = false;
  /** Checkpoint ignores export_blobs, as an agent from before it did. */
  checkpointPacksNothing = false;
  capabilities: GetCapabilitiesResponse;
  capacity: Capacity = { cpuCores: 4, memoryBytes: 8 * GiB, diskBytes: 100 * GiB };
  /** Host-wide use apart from the containers. */
  baseUsed: Usage = { cpuMillicores: 200, memoryBytes: 512 * MiB, diskBytes: 10 * GiB };
  /** Per container measured use; default 100m / 32 MiB. */
  readonly usage = new Map<string, Usage>();
  /** Calls seen by operation key → answer, like the agent's operation log. */
  private readonly ops = new Map<string, { method: string; req: string; res: unknown }>();
  private nextOfport = 10;
  private nextPid = 1000;
  private seq = 0;

  constructor(
    readonly name: string,
    readonly address: string,
    private readonly net: FakeNetwork,
  ) {
    this.capabilities = api.GetCapabilitiesResponse.fromPartial({
      hostname: name,
      agentVersion: "fake",
      kernel: "6.18.0",
      arch: "x86_64",
      criu: { version: "4.2.1", path: "/usr/local/sbin/criu", checkOk: true, features: ["uffd"] },
      runtime: "runc 1.1.5",
      cpuFlags: ["sse2", "avx2"],
      cgroupVersion: "v1",
      dirtyTracking: false,
      userfaultfd: true,
    });
  }

  /** Make the next `times` calls of `method` fail (or hang). */
  fail(method: string, fp: Failpoint): void {
    const list = this.failpoints.get(method) ?? [];
    list.push({ times: 1, ...fp });
    this.failpoints.set(method, list);
  }

  clearFailpoints(): void {
    this.failpoints.clear();
  }

  /** Put an image in the store (as an admin import would). */
  addImage(name: string, sizeBytes = 50 * MiB): string {
    const digest = "sha256:" + createHash("sha256").update(`image:${name}`).digest("hex");
    this.blobs.set(digest, { digest, sizeBytes, kind: BlobKind.BLOB_KIND_IMAGE });
    this.images.set(name, { name, digest, sizeBytes });
    return digest;
  }

  running(): string[] {
    return [...this.containers.values()].filter((c) => c.state === ContainerState.CONTAINER_STATE_RUNNING).map((c) => c.spec!.name);
  }

  callsOf(method: string): Record<string, unknown>[] {
    return this.calls.filter((c) => c.method === method).map((c) => c.req);
  }

  containerUsage(name: string): Usage {
    return this.usage.get(name) ?? { cpuMillicores: 100, memoryBytes: 32 * MiB, diskBytes: MiB };
  }

  resources(): api.GetResourcesResponse {
    const containers = [...this.containers.values()].map((c) => ({
      name: c.spec!.name,
      state: c.state,
      cpuMillicores: c.spec!.cpuMillicores,
      memoryLimitBytes: c.spec!.memoryLimitBytes,
      usage:
        c.state === ContainerState.CONTAINER_STATE_RUNNING
          ? this.containerUsage(c.spec!.name)
          : { cpuMillicores: 0, memoryBytes: 0, diskBytes: 0 },
    }));
    const used = { ...this.baseUsed };
    for (const c of containers) {
      used.cpuMillicores += c.usage.cpuMillicores;
      used.memoryBytes += c.usage.memoryBytes;
      used.diskBytes += c.usage.diskBytes;
    }
    const free = {
      cpuMillicores: Math.max(0, this.capacity.cpuCores * 1000 - used.cpuMillicores),
      memoryBytes: Math.max(0, this.capacity.memoryBytes - used.memoryBytes),
      diskBytes: Math.max(0, this.capacity.diskBytes - used.diskBytes),
    };
    return { capacity: { ...this.capacity }, free, used, containers, sampledAt: new Date() };
  }

  /** Entry of every call: record, failpoints, latency. Returns a function to run after the work. */
  async enter(method: string, req: Record<string, unknown>, signal?: AbortSignal): Promise<() => Promise<void>> {
    this.calls.push({ method, req });
    this.net.log.push({ agent: this.name, method, req });
    if (this.down) throw new FerryError("Unavailable", `fake agent ${this.name} is down`);
    const fps = this.failpoints.get(method) ?? [];
    const fp = fps.find((f) => (f.times ?? 1) > 0 && (!f.when || f.when(req)));
    const wait = this.latencyMs + (this.methodLatency.get(method) ?? 0);
    if (wait > 0) await sleep(wait, signal);
    let after = (): Promise<void> => Promise.resolve();
    if (fp && (fp.skip ?? 0) > 0) {
      fp.skip!--;
    } else if (fp) {
      fp.times = (fp.times ?? 1) - 1;
      const err = new FerryError(fp.code, fp.message ?? `failpoint: ${this.name}.${method} fails with ${fp.code}`);
      if (fp.after) {
        after = () => (fp.hang ? sleep(Infinity, signal) : Promise.reject(err));
      } else if (fp.hang) {
        await sleep(Infinity, signal);
      } else throw err;
    }
    return after;
  }

  /** Answers a repeated operation key from the record, like the real agent's operation log. */
  async once<T>(method: string, key: unknown, req: unknown, fn: () => T | Promise<T>): Promise<T> {
    if (typeof key !== "string" || !key) return fn();
    const body = JSON.stringify(req);
    const prev = this.ops.get(key);
    if (prev) {
      if (prev.method !== method || prev.req !== body) {
        throw new FerryError("AlreadyExists", `operation key "${key}" is in use by a different request`, { field: "operation_key" });
      }
      return prev.res as T;
    }
    const res = await fn();
    this.ops.set(key, { method, req: body, res });
    return res;
  }

  private container(name: string): ContainerInfo {
    const c = this.containers.get(name);
    if (!c) throw FerryError.notFound("container", name);
    return c;
  }

  private resolveImage(image: string): string {
    if (image.startsWith("sha256:")) {
      if (!this.blobs.has(image)) throw FerryError.notFound("image", image);
      return image;
    }
    const i = this.images.get(image);
    if (!i) throw FerryError.notFound("image", image, "import it first");
    return i.digest;
  }

  private makeNetns(container: string, network: NetworkSpec, locked: boolean): FakeNetns {
    if (this.netns.has(container)) throw new FerryError("AlreadyExists", `netns ferry-${container} exists on ${this.name}`);
    const used = new Set([...this.netns.values()].map((n) => n.ofport));
    let ofport = network.ofport;
    if (!ofport || used.has(ofport)) {
      while (used.has(this.nextOfport)) this.nextOfport++;
      ofport = this.nextOfport++;
    }
    const n = { network: { ...network, ofport }, ofport, locked };
    this.netns.set(container, n);
    return n;
  }

  /** A checkpoint and its upper dir as blobs (ExportCheckpoint, or Checkpoint with export_blobs). */
  private pack(checkpointId: string): api.ExportCheckpointResponse {
    const ck = this.checkpoints.get(checkpointId);
    if (!ck) throw FerryError.notFound("checkpoint", checkpointId);
    const checkpoint = this.newBlob(BlobKind.BLOB_KIND_CHECKPOINT, 4 * MiB);
    const upper = this.newBlob(BlobKind.BLOB_KIND_UPPER, 64 * 1024);
    this.net.blobMeta.set(checkpoint.digest, ck);
    return { checkpoint, upper, durationMs: 4 };
  }

  private newBlob(kind: BlobKind, sizeBytes: number): BlobRef {
    const digest = "sha256:" + randomBytes(32).toString("hex");
    const b = { digest, sizeBytes, kind };
    this.blobs.set(digest, b);
    return b;
  }

  private async *metricsStream(intervalMs: number, signal?: AbortSignal): AsyncGenerator<api.StreamMetricsResponse> {
    const every = Math.max(10, intervalMs);
    while (!signal?.aborted) {
      if (this.down) throw new FerryError("Unavailable", `fake agent ${this.name} is down`);
      const r = this.resources();
      yield api.StreamMetricsResponse.fromPartial({
        hostname: this.name,
        sampledAt: new Date(),
        capacity: r.capacity,
        used: r.used,
        containers: r.containers,
      });
      await sleep(every, signal).catch(() => undefined);
    }
  }

  private async *logStream(name: string, signal?: AbortSignal): AsyncGenerator<api.ReadContainerLogResponse> {
    this.container(name);
    await sleep(0, signal);
    const data = Buffer.from(`hello from ${name} on ${this.name}\n`);
    yield { data, nextOffset: data.length };
  }

  private async *pullStream(r: api.PullBlobRequest, signal?: AbortSignal): AsyncGenerator<api.PullBlobResponse> {
    const src = this.net.byAddress(r.sourceAddress);
    const blob = src.blobs.get(r.blob!.digest);
    if (!blob) throw FerryError.notFound("blob", r.blob!.digest);
    const had = this.blobs.has(blob.digest);
    const img = [...src.images.values()].find((i) => i.digest === blob.digest);
    await sleep(1, signal);
    this.blobs.set(blob.digest, { ...blob });
    if (img && !this.images.has(img.name)) this.images.set(img.name, { ...img });
    const bytes = had ? 0 : blob.sizeBytes;
    yield {
      receivedBytes: blob.sizeBytes,
      totalBytes: blob.sizeBytes,
      done: true,
      stats: { bytes: blob.sizeBytes, resumedFrom: blob.sizeBytes - bytes, durationMs: 3, mbPerS: 400 },
    };
  }

  /** The methods of an AgentClient, bound to this fake. */
  handlers(): Record<string, (req: Record<string, unknown>, signal?: AbortSignal) => unknown> {
    const clone = <T>(v: T): T => structuredClone(v);
    return {
      getCapabilities: () => clone(this.capabilities),
      getResources: () => this.resources(),
      streamMetrics: (req, signal) => this.metricsStream(Number(req["intervalMs"] ?? 1000), signal),
      createContainer: (req) =>
        this.once("createContainer", req["operationKey"], req, () => {
          const r = api.CreateContainerRequest.fromPartial(req);
          const spec = r.spec!;
          if (this.containers.has(spec.name)) throw new FerryError("AlreadyExists", `container "${spec.name}" exists on ${this.name}`);
          const imageDigest = this.resolveImage(spec.image);
          let network = spec.network ?? api.NetworkSpec.fromPartial({});
          if (r.createNetns) network = this.makeNetns(spec.name, network, false).network;
          const info = api.ContainerInfo.fromPartial({
            spec: { ...spec, network },
            state: ContainerState.CONTAINER_STATE_CREATED,
            imageDigest,
            createdAt: new Date(),
          });
          this.containers.set(spec.name, info);
          return { container: clone(info) };
        }),
      startContainer: (req) =>
        this.once("startContainer", req["operationKey"], req, () => {
          const c = this.container(String(req["name"]));
          c.state = ContainerState.CONTAINER_STATE_RUNNING;
          c.pid = this.nextPid++;
          return { container: clone(c) };
        }),
      stopContainer: (req) =>
        this.once("stopContainer", req["operationKey"], req, () => {
          const c = this.container(String(req["name"]));
          c.state = ContainerState.CONTAINER_STATE_STOPPED;
          c.pid = 0;
          return { container: clone(c) };
        }),
      deleteContainer: (req) =>
        this.once("deleteContainer", req["operationKey"], req, () => {
          const name = String(req["name"]);
          const c = this.container(name);
          if (c.state === ContainerState.CONTAINER_STATE_RUNNING && !req["force"]) {
            throw new FerryError("FailedPrecondition", `container "${name}" is running`, { fix: "stop it or use force" });
          }
          this.containers.delete(name);
          if (!req["keepNetns"]) this.netns.delete(name);
          return {};
        }),
      listContainers: () => ({
        containers: [...this.containers.values()].map((c) => ({ ...clone(c), usage: this.containerUsage(c.spec!.name) })),
      }),
      inspectContainer: (req) => ({
        container: { ...clone(this.container(String(req["name"]))), usage: this.containerUsage(String(req["name"])) },
      }),
      readContainerLog: (req, signal) => this.logStream(String(req["name"]), signal),
      hasBlobs: (req) => {
        const digests = (req["digests"] as string[] | undefined) ?? [];
        return { present: digests.filter((d) => this.blobs.has(d)), missing: digests.filter((d) => !this.blobs.has(d)) };
      },
      getBlobStatus: (req) => {
        const b = this.blobs.get(String(req["digest"]));
        return { complete: !!b, receivedBytes: b?.sizeBytes ?? 0 };
      },
      pullBlob: (req, signal) => this.pullStream(api.PullBlobRequest.fromPartial(req), signal),
      connectPeer: (req) => {
        const peer = this.net.byAddress(String(req["address"]));
        if (peer.down) throw new FerryError("Unavailable", `peer agent ${peer.address} not reached`);
        return { connectMs: 0 };
      },
      tagImage: (req) => {
        const digest = String(req["digest"]);
        const b = this.blobs.get(digest);
        if (!b) throw FerryError.notFound("blob", digest);
        const image = { name: String(req["name"]), digest, sizeBytes: b.sizeBytes };
        this.images.set(image.name, image);
        return { image };
      },
      listImages: () => ({ images: [...this.images.values()].map(clone) }),
      deleteBlob: (req) => {
        this.blobs.delete(String(req["digest"]));
        return {};
      },
      checkpoint: (req) =>
        this.once("checkpoint", req["operationKey"], req, () => {
          const name = String(req["name"]);
          const c = this.container(name);
          if (c.state !== ContainerState.CONTAINER_STATE_RUNNING)
            throw new FerryError("FailedPrecondition", `container "${name}" is not running`);
          const checkpointId = `ck-${name}-${++this.seq}`;
          this.checkpoints.set(checkpointId, { container: name, spec: clone(c.spec!), imageDigest: c.imageDigest });
          c.state = ContainerState.CONTAINER_STATE_CHECKPOINTED;
          c.pid = 0;
          c.checkpointId = checkpointId;
          return {
            checkpointId,
            stats: {
              freezingMs: 2,
              frozenMs: 20,
              memdumpMs: 10,
              memwriteMs: 5,
              pagesWritten: 1024,
              pagesScanned: 2048,
              imageBytes: 4 * MiB,
              totalMs: 25,
            },
            connections: [{ localAddress: "10.77.0.10", localPort: 7000, remoteAddress: "10.77.0.99", remotePort: 40000 }],
            spec: clone(c.spec!),
            imageDigest: c.imageDigest,
            ...(req["exportBlobs"] && !this.checkpointPacksNothing ? { blobs: this.pack(checkpointId) } : {}),
          };
        }),
      exportCheckpoint: (req) => this.once("exportCheckpoint", req["operationKey"], req, () => this.pack(String(req["checkpointId"]))),
      restore: (req) =>
        this.once("restore", req["operationKey"], req, () => {
          const r = api.RestoreRequest.fromPartial(req);
          let ck: FakeCheckpoint | undefined;
          if (r.checkpointId) {
            ck = this.checkpoints.get(r.checkpointId);
            if (!ck) throw FerryError.notFound("checkpoint", r.checkpointId);
          } else {
            const d = r.checkpointBlob?.digest ?? "";
            if (!this.blobs.has(d)) throw new FerryError("FailedPrecondition", `checkpoint blob ${d} is not on ${this.name}`);
            if (!this.blobs.has(r.upperBlob?.digest ?? "")) throw new FerryError("FailedPrecondition", `upper blob is not on ${this.name}`);
            ck = this.net.blobMeta.get(d);
            if (!ck) throw new FerryError("DataLoss", `checkpoint blob ${d} is unknown`);
          }
          if (!this.blobs.has(ck.imageDigest)) throw new FerryError("FailedPrecondition", `image ${ck.imageDigest} is not on ${this.name}`);
          const name = ck.container;
          const ns = this.netns.get(name);
          if (!ns) throw new FerryError("FailedPrecondition", `netns ferry-${name} is missing on ${this.name}`);
          const existing = this.containers.get(name);
          if (existing && existing.state === ContainerState.CONTAINER_STATE_RUNNING) {
            throw new FerryError("AlreadyExists", `container "${name}" already runs on ${this.name}`);
          }
          ns.locked = false;
          const spec = { ...(r.spec ?? ck.spec), network: { ...(r.spec ?? ck.spec).network!, ofport: ns.ofport } };
          const info = api.ContainerInfo.fromPartial({
            ...(existing ?? {}),
            spec,
            state: ContainerState.CONTAINER_STATE_RUNNING,
            pid: this.nextPid++,
            imageDigest: ck.imageDigest,
            createdAt: existing?.createdAt ?? new Date(),
            checkpointId: "",
          });
          this.containers.set(name, info);
          // As the agent: the blobs given, whichever way the checkpoint came.
          const blobs =
            r.deleteBlobs && !this.restoreKeepsBlobs ? [r.checkpointBlob?.digest, r.upperBlob?.digest].filter((d): d is string => !!d) : [];
          for (const d of blobs) this.blobs.delete(d);
          return {
            container: clone(info),
            stats: { unpackMs: 3, restoreMs: 15, forkingMs: 2, runcMs: 17, totalMs: 20 },
            blobsDeleted: blobs.length > 0,
          };
        }),
      deleteCheckpoint: (req) => {
        this.checkpoints.delete(String(req["checkpointId"]));
        return {};
      },
      startPageServer: () => {
        throw new FerryError("FailedPrecondition", "the fake agent has no page server");
      },
      stopPageServer: () => ({}),
      createNetns: (req) =>
        this.once("createNetns", req["operationKey"], req, () => {
          const r = api.CreateNetnsRequest.fromPartial(req);
          const n = this.makeNetns(r.container, r.network ?? api.NetworkSpec.fromPartial({}), r.networkLocked);
          return {
            netnsPath: `/run/netns/ferry-${r.container}`,
            veth: `vf-${r.container}`.slice(0, 15),
            ofport: n.ofport,
            mac: n.network.mac,
          };
        }),
      clearNetns: (req) => {
        this.netns.delete(String(req["container"]));
        return { waitMs: 1 };
      },
      ensureBridge: (req) => {
        this.bridges.add(String(req["bridge"]));
        const dp = req["datapathType"];
        return { bridge: String(req["bridge"]), datapathType: typeof dp === "string" && dp ? dp : "netdev" };
      },
      addVxlanPort: (req) => {
        const port = String(req["port"]);
        if (!this.bridges.has(String(req["bridge"]))) throw FerryError.notFound("bridge", String(req["bridge"]));
        let p = this.ports.get(port);
        if (!p || p.remoteIp !== req["remoteIp"]) {
          p = { remoteIp: String(req["remoteIp"]), ofport: p?.ofport ?? 100 + this.ports.size };
          this.ports.set(port, p);
        }
        return { ofport: p.ofport };
      },
      deletePort: (req) => {
        this.ports.delete(String(req["port"]));
        return {};
      },
      setFlows: (req) => {
        const r = api.SetFlowsRequest.fromPartial(req);
        const cookies = new Set(r.flows.map((f) => f.cookie));
        const kept = (this.flows.get(r.bridge) ?? []).filter((f) => !cookies.has(f.cookie));
        this.flows.set(r.bridge, [...kept, ...r.flows]);
        return { durationMs: 1 };
      },
      deleteFlows: (req) => {
        const bridge = String(req["bridge"]);
        this.flows.set(
          bridge,
          (this.flows.get(bridge) ?? []).filter((f) => f.cookie !== req["cookie"]),
        );
        return {};
      },
      listFlows: (req) => ({ flows: clone(this.flows.get(String(req["bridge"])) ?? []) }),
    };
  }
}

const STREAMING = new Set(["streamMetrics", "readContainerLog", "pullBlob", "readBlob"]);

/** A set of fake agents reachable by address, and the connector the controller uses to reach them. */
export class FakeNetwork {
  readonly agents = new Map<string, FakeAgent>();
  /** Every call to any agent, in order. */
  readonly log: { agent: string; method: string; req: Record<string, unknown> }[] = [];
  /** What ExportCheckpoint packed, by checkpoint blob digest (the fake's "tar" content). */
  readonly blobMeta = new Map<string, FakeCheckpoint>();
  private readonly clients = new Set<{ severed: boolean }>();

  add(name: string, address = `fake-${name}:7441`): FakeAgent {
    const a = new FakeAgent(name, address, this);
    this.agents.set(address, a);
    return a;
  }

  byAddress(address: string): FakeAgent {
    const a = this.agents.get(address);
    if (!a) throw new FerryError("Unavailable", `no fake agent at ${address}`);
    return a;
  }

  byName(name: string): FakeAgent {
    const a = [...this.agents.values()].find((x) => x.name === name);
    if (!a) throw new Error(`no fake agent ${name}`);
    return a;
  }

  /**
   * Cuts every client made so far: their calls hang until their signal aborts (a controller that
   * was "killed" can no longer touch the agents; a new controller connects afresh).
   */
  severAll(): void {
    for (const c of this.clients) c.severed = true;
  }

  /** Where a container runs (RUNNING), over all agents. */
  whereRunning(name: string): string[] {
    return [...this.agents.values()]
      .filter((a) => a.containers.get(name)?.state === ContainerState.CONTAINER_STATE_RUNNING)
      .map((a) => a.name);
  }

  connector(): AgentConnector {
    return (address) => {
      const state = { severed: false };
      this.clients.add(state);
      // A closed client is cut like a severed one: nothing it still has in flight reaches the agents.
      const out: Record<string, unknown> = { close: () => (state.severed = true), raw: undefined };
      for (const method of Object.keys(api.AgentServiceService)) {
        const streaming = STREAMING.has(method);
        const call = async (req: unknown, signal?: AbortSignal): Promise<{ res: unknown; after: () => Promise<void> }> => {
          if (state.severed) await sleep(Infinity, signal);
          const agent = this.byAddress(address);
          const r = structuredClone((req ?? {}) as Record<string, unknown>);
          const after = await agent.enter(method, r, signal);
          if (state.severed) await sleep(Infinity, signal);
          const h = agent.handlers()[method];
          if (!h) throw new FerryError("Internal", `fake agent: no ${method}`);
          return { res: await h(r, signal), after };
        };
        out[method] = streaming
          ? (req: unknown, o?: { signal?: AbortSignal }) =>
              (async function* () {
                const { res, after } = await call(req, o?.signal);
                for await (const x of res as AsyncIterable<unknown>) {
                  if (state.severed) await sleep(Infinity, o?.signal);
                  yield x;
                }
                await after();
              })()
          : async (req: unknown, o?: { signal?: AbortSignal; onServerMs?: (ms: number) => void }) => {
              const { res, after } = await call(req, o?.signal);
              await after();
              // Like a real agent's ferry-server-ms trailer: the time its stats say it worked.
              o?.onServerMs?.((res as { stats?: { totalMs?: number } }).stats?.totalMs ?? 0);
              return structuredClone(res);
            };
      }
      return out as unknown as AgentClient;
    };
  }
}

/** Sleeps `ms` (Infinity: forever), rejecting with the signal's reason when it aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(abortReason(signal));
    const timer = Number.isFinite(ms) ? setTimeout(done, ms) : undefined;
    function done(): void {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }
    function onAbort(): void {
      clearTimeout(timer);
      reject(abortReason(signal!));
    }
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

function abortReason(signal: AbortSignal): FerryError {
  const r: unknown = signal.reason;
  return r instanceof FerryError ? r : new FerryError("Cancelled", "the call was cancelled");
}
