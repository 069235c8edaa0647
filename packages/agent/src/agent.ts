// The agent: every AgentService RPC, as a thin translation onto its parts —
//   ContainerRuntime (runc + CRIU), BlobStore (images, upper dirs, checkpoints), NetNs + Ovs
//   (namespaces, the overlay bridge, flows), HostResources (capacity and use).
// Mutating calls run once per operation key (ops.ts).
import { mkdir } from "node:fs/promises";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import {
  AgentServiceService,
  BlobKind,
  ContainerState,
  type ContainerInfo,
  type ContainerResources,
  type ContainerSpec,
  type ExportCheckpointResponse,
  type GetCapabilitiesResponse,
  type NetworkSpec,
} from "@ferry/api/agent";
import { PROTO_ROOT } from "@ferry/api/proto-root";
import {
  FerryError,
  isFerryError,
  macFromIp,
  parseIpv4Cidr,
  serve,
  silentLogger,
  validateName,
  type AccessPolicy,
  type Logger,
  type RunningServer,
  type Security,
  type ServiceImpl,
} from "@ferry/common";
import { probeCapabilities, versionAtLeast } from "./capabilities.js";
import { Failpoints } from "./failpoints.js";
import { NetNs, Ovs, PacketHolds, portNameFor } from "./net/index.js";
import { OperationLog, idempotent } from "./ops.js";
import { HostResources } from "./resources.js";
import { ContainerRuntime, Criu, Runc } from "./runtime/index.js";
import { BlobStore, agentServiceDefinition, createStoreService, grpcPeerClients } from "./store/index.js";

export const AGENT_VERSION = "0.1.0";
/** CRIU 4.1 fails on any TCP/UDP socket on kernels >= 6.16 (criu#2705); 4.2 works. */
export const MIN_CRIU = "4.2";

const mib = (n: number): string => `${Math.round(n / 2 ** 20)} MiB`;

export interface AgentConfig {
  /** This host's name (the controller registers it under this name). */
  name: string;
  /** "0.0.0.0:7441"; port 0 picks a free port. */
  listen: string;
  stateDir: string;
  security: Security;
  criuPath: string;
  runcPath: string;
  /** First on runc's (and so CRIU's) PATH: deploy/host/criu-tar.c as `tar`. None when empty. */
  criuTools?: string;
  /** Namespace name prefix: "ferry-" gives /run/netns/ferry-<container>. Emulated hosts sharing a machine need their own. */
  netnsPrefix: string;
  /** How a container's eth0 joins the bridge (NetNsConfig.link). Default "tap". */
  netnsLink?: "tap" | "veth";
  /** This host's OVS instance (its ovsdb socket and run dir) and the overlay bridge. */
  ovs: { rundir: string; dbSock: string };
  bridge: string;
  /** Address CRIU page servers listen on (the host's underlay address). */
  pageServerAddress: string;
  failpoints?: string;
  log?: Logger;
}

type Impl = ServiceImpl<typeof AgentServiceService>;

/** Only the controller drives an agent; peer agents may only read blobs (the destination pulls). */
export const AGENT_ACCESS: AccessPolicy = {
  allow: ["controller"],
  methods: { readBlob: ["controller", "agent"] },
};

export interface Agent {
  impl: Impl;
  capabilities: GetCapabilitiesResponse;
  runtime: ContainerRuntime;
  store: BlobStore;
  netns: NetNs;
}

function validateSpec(spec: ContainerSpec | undefined): ContainerSpec & { network: NetworkSpec } {
  if (!spec) throw FerryError.invalid("spec", "is required", "send the container's spec");
  validateName("spec.name", spec.name);
  if (!spec.image) throw FerryError.invalid("spec.image", "is required", "give an image name or its sha256 digest");
  if (spec.args.length === 0)
    throw FerryError.invalid("spec.args", "is empty", 'give the command to run, e.g. ["/bin/ferry-echo", "7000"]');
  if (!spec.network?.ipCidr)
    throw FerryError.invalid("spec.network.ip_cidr", "is required", 'give the container\'s overlay address, e.g. "10.77.0.10/24"');
  const { ip } = parseIpv4Cidr("spec.network.ip_cidr", spec.network.ipCidr);
  return { ...spec, network: { ...spec.network, mac: spec.network.mac || macFromIp(ip) } };
}

/** Build the agent's service implementation from its parts. */
export async function createAgent(cfg: AgentConfig): Promise<Agent> {
  const log = cfg.log ?? silentLogger;
  const fail = new Failpoints(cfg.failpoints ?? "");
  await mkdir(cfg.stateDir, { recursive: true });
  const capabilities = await probeCapabilities({ criuPath: cfg.criuPath, runcPath: cfg.runcPath, agentVersion: AGENT_VERSION });
  capabilities.hostname = cfg.name;
  const criu = new Criu({ path: cfg.criuPath });
  // CRIU re-probes kernel features on every call unless its cache sits on tmpfs: prime it once.
  await criu.primeKdatCache().catch((e: unknown) => log.warn({ err: e }, "criu kdat cache not primed"));
  const runtime = new ContainerRuntime({
    stateDir: cfg.stateDir,
    runc: new Runc({
      root: path.join(cfg.stateDir, "runc"),
      criuPath: cfg.criuPath,
      binary: cfg.runcPath,
      ...(cfg.criuTools ? { criuTools: cfg.criuTools } : {}),
      log,
    }),
    criu,
    agentId: cfg.name,
    log,
  });
  const store = new BlobStore({ root: path.join(cfg.stateDir, "store"), log });
  await store.init();
  const ovs = new Ovs({ rundir: cfg.ovs.rundir, dbSock: cfg.ovs.dbSock, owner: cfg.name });
  const holds = new PacketHolds((msg, fields) => log.warn(fields, msg));
  const netns = new NetNs({ prefix: cfg.netnsPrefix, ovs, bridge: cfg.bridge, holds, ...(cfg.netnsLink ? { link: cfg.netnsLink } : {}) });
  const resources = new HostResources(cfg.stateDir);
  const ops = new OperationLog(path.join(cfg.stateDir, "ops"));
  const storeImpl = createStoreService({ store, peerClient: grpcPeerClients(cfg.security), log });
  const { containers, orphans } = await runtime.rediscover();
  const held = await netns.holdLocked().catch((e: unknown) => {
    log.warn({ err: e }, "locked namespaces not held again: what reaches them is dropped until their restore");
    return [] as string[];
  });
  log.info(
    { criu: capabilities.criu?.version, kernel: capabilities.kernel, containers: containers.length, orphans, heldAgain: held },
    "agent started",
  );

  /** CRIU must be there, pass `criu check`, and be new enough for TCP on this kernel. */
  function requireCriu(): void {
    const v = capabilities.criu?.version ?? "";
    if (capabilities.criu?.checkOk !== true || !versionAtLeast(v, MIN_CRIU)) {
      const what = `${v ? `version ${v}` : "missing"}${capabilities.criu?.checkOk ? "" : " or fails `criu check`"}`;
      throw new FerryError("FailedPrecondition", `CRIU on ${cfg.name} is ${what}; Ferry needs ${MIN_CRIU} or newer`, {
        fix: "run deploy/host/setup.sh on this host: it installs CRIU 4.2 (older CRIU fails on TCP sockets with kernels >= 6.16)",
      });
    }
  }

  /** The container's spec as stored, with the ofport its interface really has. */
  async function withOfport(info: ContainerInfo): Promise<ContainerInfo> {
    const net = info.spec?.network;
    if (!info.spec || !net || net.ofport) return info;
    const ofport = await ovs.ofportOf(portNameFor(cfg.netnsPrefix, info.spec.name)).catch(() => 0);
    return { ...info, spec: { ...info.spec, network: { ...net, ofport } } };
  }

  async function containerResources(): Promise<ContainerResources[]> {
    const list = await runtime.list();
    return Promise.all(
      list.map(async (c) => {
        const running = c.state === ContainerState.CONTAINER_STATE_RUNNING;
        const usage = running ? await runtime.usage(c.spec!.name, 200).catch(() => undefined) : undefined;
        return {
          name: c.spec?.name ?? "",
          state: c.state,
          cpuMillicores: c.spec?.cpuMillicores ?? 0,
          memoryLimitBytes: c.spec?.memoryLimitBytes ?? 0,
          ...(usage ? { usage } : {}),
        };
      }),
    );
  }

  /** A checkpoint and its container's upper dir, packed into blobs for a peer to pull. */
  async function exportBlobs(name: string, checkpointId: string): Promise<ExportCheckpointResponse> {
    const started = performance.now();
    const [checkpoint, upper] = await Promise.all([
      store.packDir(runtime.checkpointDir(checkpointId), BlobKind.BLOB_KIND_CHECKPOINT),
      store.packDir(runtime.upperDir(name), BlobKind.BLOB_KIND_UPPER),
    ]);
    return { checkpoint, upper, durationMs: Math.round(performance.now() - started) };
  }

  const impl: Impl = {
    ...storeImpl,
    getCapabilities: () => Promise.resolve(capabilities),
    getResources: async () => {
      const [s, cs] = await Promise.all([resources.sample(), containerResources()]);
      return { capacity: s.capacity, free: s.free, used: s.used, containers: cs, sampledAt: new Date() };
    },
    streamMetrics: async function* (req, ctx) {
      const interval = req.intervalMs === 0 ? 1000 : req.intervalMs;
      if (interval < 100 || interval > 60_000)
        throw FerryError.invalid("interval_ms", `${interval} is out of range`, "use 100..60000 ms, or 0 for 1000");
      while (!ctx.signal.aborted) {
        const [s, cs] = await Promise.all([resources.sample(), containerResources()]);
        yield { hostname: cfg.name, sampledAt: new Date(), capacity: s.capacity, used: s.used, containers: cs };
        await sleep(interval, undefined, { signal: ctx.signal }).catch(() => undefined);
      }
    },

    // --- containers --------------------------------------------------------------------------
    createContainer: async (req) => {
      await fail.check("createContainer");
      const spec = validateSpec(req.spec);
      const digest = await store.resolveImage(spec.image, "spec.image");
      if (
        await runtime.inspect(spec.name).then(
          () => true,
          (e: unknown) => !isFerryError(e, "NotFound"),
        )
      ) {
        throw new FerryError("AlreadyExists", `container "${spec.name}" already exists on ${cfg.name}`, {
          field: "spec.name",
          fix: "pick another name, or delete the existing container first",
        });
      }
      if (spec.memoryLimitBytes > 0) {
        const { free } = await resources.sample();
        if (spec.memoryLimitBytes > free.memoryBytes) {
          throw new FerryError(
            "ResourceExhausted",
            `${cfg.name} cannot give "${spec.name}" ${mib(spec.memoryLimitBytes)} of memory: ${mib(free.memoryBytes)} free`,
            {
              field: "spec.memory_limit_bytes",
              fix: "lower the memory limit or run it on another host",
              data: { resource: "memory", needBytes: spec.memoryLimitBytes, freeBytes: free.memoryBytes },
            },
          );
        }
      }
      const lowerDir = await store.lowerDir(digest);
      let network = spec.network;
      if (req.createNetns) {
        const n = await netns.create(spec.name, {
          ipCidr: network.ipCidr,
          mac: network.mac,
          ...(network.gateway ? { gateway: network.gateway } : {}),
          ...(network.ofport ? { ofport: network.ofport } : {}),
        });
        network = { ...network, ofport: n.ofport, mac: n.mac };
      } else if (!(await netns.exists(spec.name))) {
        throw new FerryError("FailedPrecondition", `the network namespace of "${spec.name}" does not exist`, {
          field: "create_netns",
          fix: "set create_netns, or call CreateNetns first",
        });
      }
      try {
        const container = await runtime.create({ ...spec, network }, { lowerDir, netnsPath: netns.path(spec.name), imageDigest: digest });
        return { container };
      } catch (e) {
        if (req.createNetns) await netns.clear(spec.name).catch(() => undefined);
        throw e;
      }
    },
    startContainer: async (req) => ({ container: await withOfport(await runtime.start(validateName("name", req.name))) }),
    stopContainer: async (req) => ({
      container: await withOfport(await runtime.stop(validateName("name", req.name), req.timeoutMs || 5000)),
    }),
    deleteContainer: async (req) => {
      const name = validateName("name", req.name);
      await runtime.delete(name, { force: req.force });
      if (!req.keepNetns && (await netns.exists(name))) await netns.clear(name);
      return {};
    },
    listContainers: async () => ({ containers: await Promise.all((await runtime.list()).map(withOfport)) }),
    inspectContainer: async (req) => ({ container: await withOfport(await runtime.inspect(validateName("name", req.name))) }),
    readContainerLog: async function* (req, ctx) {
      const name = validateName("name", req.name);
      let offset = req.offset;
      for (;;) {
        const { data, nextOffset } = await runtime.logs(name, { offset, maxBytes: 1 << 20 });
        if (data.length > 0) yield { data, nextOffset };
        offset = nextOffset;
        if (data.length === 0 && !req.follow) return;
        if (data.length === 0) await sleep(200, undefined, { signal: ctx.signal }).catch(() => undefined);
        if (ctx.signal.aborted) return;
      }
    },

    // --- checkpoint and restore ----------------------------------------------------------------
    checkpoint: async (req) => {
      await fail.check("checkpoint");
      const name = validateName("name", req.name);
      requireCriu();
      const r = await runtime.checkpoint(name, {
        tcpEstablished: req.tcpEstablished,
        leaveRunning: req.leaveRunning,
        ...(req.pageServer?.address ? { pageServer: { address: req.pageServer.address, port: req.pageServer.port } } : {}),
      });
      const { raw: _raw, ...stats } = r.stats;
      // The container is dumped whatever the pack does: a failed one leaves the blobs to ExportCheckpoint.
      const blobs = req.exportBlobs
        ? await exportBlobs(name, r.checkpointId).catch((e: unknown) => {
            log.warn({ err: e, container: name, checkpointId: r.checkpointId }, "checkpoint not packed; ExportCheckpoint will");
            return undefined;
          })
        : undefined;
      return {
        checkpointId: r.checkpointId,
        stats,
        connections: r.connections,
        spec: r.spec,
        imageDigest: r.imageDigest,
        ...(blobs ? { blobs } : {}),
      };
    },
    exportCheckpoint: (req) => exportBlobs(validateName("name", req.name), req.checkpointId),
    restore: async (req) => {
      await fail.check("restore");
      const started = performance.now();
      const spec = validateSpec(req.spec);
      requireCriu();
      if (!(await netns.exists(spec.name))) {
        throw new FerryError("FailedPrecondition", `the network namespace of "${spec.name}" does not exist on ${cfg.name}`, {
          fix: "create it (CreateNetns, locked) before restoring",
        });
      }
      // A destination may know the image by digest only (pulled for this migration).
      const digest = req.imageDigest
        ? await store.resolveImage(req.imageDigest, "image_digest")
        : await store.resolveImage(spec.image, "spec.image");
      const lowerDir = await store.lowerDir(digest);
      let checkpointDir: string;
      // A checkpoint made here from what a migration brought, used once: deleted once restored
      // (kept when the restore fails: its restore.log says why).
      let consumed: string | undefined;
      if (req.checkpointBlob?.digest && req.checkpointId) {
        // The pages came straight from the source's dump through a page server into this
        // checkpoint; the blob holds the rest of the images.
        checkpointDir = await runtime.mergeCheckpoint(req.checkpointId, await store.pathOf(req.checkpointBlob.digest));
        consumed = req.checkpointId;
        if (req.upperBlob?.digest) await runtime.unpackUpper(spec.name, await store.pathOf(req.upperBlob.digest));
      } else if (req.checkpointBlob?.digest) {
        // Blobs are tars: unpack straight from the store's file.
        const id = `${spec.name}-${req.checkpointBlob.digest.slice(7, 19)}`;
        // A retried restore unpacks again: a half-unpacked directory must not be restored from.
        await runtime.deleteCheckpoint(id).catch(() => undefined);
        checkpointDir = await runtime.unpackCheckpoint(id, await store.pathOf(req.checkpointBlob.digest));
        consumed = id;
        if (req.upperBlob?.digest) await runtime.unpackUpper(spec.name, await store.pathOf(req.upperBlob.digest));
      } else if (req.checkpointId) {
        checkpointDir = runtime.checkpointDir(req.checkpointId);
      } else {
        throw FerryError.invalid(
          "checkpoint_id",
          "neither checkpoint_id nor checkpoint_blob given",
          "name a checkpoint held here or the blobs pulled from the source",
        );
      }
      const unpackMs = Math.round(performance.now() - started);
      const r = await runtime.restore(spec, {
        checkpointDir,
        lowerDir,
        netnsPath: netns.path(spec.name),
        tcpEstablished: req.tcpEstablished,
        imageDigest: digest,
      });
      // The container runs: what its clients sent during the downtime is its now.
      const heldPackets = await netns.releaseHeld(spec.name);
      // What the restore was made from is not needed again: deleted now, all at once. A deletion
      // that fails is logged, not the restore's failure (the container runs).
      const deleted = (what: string, del: () => Promise<unknown>): Promise<boolean> =>
        del().then(
          () => true,
          (e: unknown) => {
            if (isFerryError(e, "NotFound")) return true;
            log.warn({ err: e, container: spec.name, what }, "restored-from data not deleted");
            return false;
          },
        );
      const blobs = req.deleteBlobs ? [req.checkpointBlob?.digest, req.upperBlob?.digest].filter((d): d is string => !!d) : [];
      const [, ...blobsGone] = await Promise.all([
        consumed ? deleted(consumed, () => runtime.deleteCheckpoint(consumed)) : true,
        ...blobs.map((d) => deleted(d, () => store.delete(d))),
      ]);
      return {
        container: await withOfport(r.container),
        stats: {
          unpackMs,
          restoreMs: r.stats.restoreMs,
          forkingMs: r.stats.forkingMs,
          runcMs: r.stats.runcMs,
          heldPackets,
          totalMs: Math.round(performance.now() - started),
        },
        blobsDeleted: blobs.length > 0 && blobsGone.every(Boolean),
      };
    },
    deleteCheckpoint: async (req) => {
      await runtime.deleteCheckpoint(req.checkpointId);
      return {};
    },
    startPageServer: async (req) => {
      const r = await runtime.startPageServer(req.checkpointId, { address: req.address || cfg.pageServerAddress, port: req.port });
      return { address: r.address, port: r.port };
    },
    stopPageServer: async (req) => {
      await runtime.stopPageServer(req.checkpointId);
      return {};
    },

    // --- network -------------------------------------------------------------------------------
    createNetns: async (req) => {
      await fail.check("createNetns");
      const container = validateName("container", req.container);
      const net = req.network;
      if (!net?.ipCidr)
        throw FerryError.invalid("network.ip_cidr", "is required", 'give the container\'s overlay address, e.g. "10.77.0.10/24"');
      const lock = req.networkLocked || req.networkLock.length > 0 ? req.networkLock : undefined;
      const r = await netns.create(
        container,
        {
          ipCidr: net.ipCidr,
          ...(net.mac ? { mac: net.mac } : {}),
          ...(net.gateway ? { gateway: net.gateway } : {}),
          ...(net.ofport ? { ofport: net.ofport } : {}),
        },
        lock,
      );
      return { netnsPath: r.path, veth: r.veth, ofport: r.ofport, mac: r.mac };
    },
    clearNetns: async (req) => {
      const container = validateName("container", req.container);
      const st = await runtime.inspect(container).catch(() => undefined);
      if (st?.state === ContainerState.CONTAINER_STATE_RUNNING) {
        throw new FerryError("FailedPrecondition", `container "${container}" still runs in this namespace`, {
          fix: "checkpoint or stop it first",
        });
      }
      return netns.clear(container);
    },
    ensureBridge: async (req) => {
      const dp = req.datapathType || "netdev";
      await ovs.ensureBridge(req.bridge || cfg.bridge, dp);
      return { bridge: req.bridge || cfg.bridge, datapathType: dp };
    },
    addVxlanPort: async (req) => ({
      ofport: await ovs.addVxlanPort(req.bridge || cfg.bridge, req.port, {
        remoteIp: req.remoteIp,
        ...(req.localIp ? { localIp: req.localIp } : {}),
        vni: req.vni,
        ...(req.ofport ? { ofport: req.ofport } : {}),
      }),
    }),
    deletePort: async (req) => {
      await ovs.deletePort(req.bridge || cfg.bridge, req.port);
      return {};
    },
    setFlows: async (req) => ({ durationMs: Math.round((await ovs.setFlows(req.bridge || cfg.bridge, req.flows)).durationMs) }),
    deleteFlows: async (req) => {
      await ovs.deleteFlows(req.bridge || cfg.bridge, req.cookie);
      return {};
    },
    listFlows: async (req) => ({ flows: await ovs.listFlows(req.bridge || cfg.bridge) }),
  };
  return { impl: idempotent(AgentServiceService, impl, ops), capabilities, runtime, store, netns };
}

export interface RunningAgent extends RunningServer {
  agent: Agent;
}

/** Create the agent and serve it (health and reflection included) until `close()`. */
export async function startAgent(cfg: AgentConfig): Promise<RunningAgent> {
  const agent = await createAgent(cfg);
  const server = await serve({
    address: cfg.listen,
    security: cfg.security,
    services: [{ name: "ferry.agent.v1.AgentService", definition: agentServiceDefinition, impl: agent.impl, access: AGENT_ACCESS }],
    protoFiles: ["ferry/agent/v1/agent.proto"],
    protoRoot: PROTO_ROOT,
    ...(cfg.log ? { log: cfg.log } : {}),
  });
  return { ...server, agent };
}
