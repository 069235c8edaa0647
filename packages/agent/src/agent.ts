import { mkdir } from "node:fs/promises";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import * as agentApi from "@ferry/api/agent";
import { AgentServiceService, type GetCapabilitiesResponse } from "@ferry/api/agent";
import {
  FerryError,
  serve,
  silentLogger,
  type AccessPolicy,
  type Logger,
  type RunningServer,
  type Security,
  type ServiceImpl,
} from "@ferry/common";
import { PROTO_ROOT } from "@ferry/api/proto-root";
import { probeCapabilities } from "./capabilities.js";
import { OperationLog, idempotent } from "./ops.js";
import { HostResources } from "./resources.js";

export const AGENT_VERSION = "0.1.0";

export interface AgentConfig {
  /** This host's name (the controller registers it under this name). */
  name: string;
  /** "0.0.0.0:7441"; port 0 picks a free port. */
  listen: string;
  stateDir: string;
  security: Security;
  criuPath: string;
  runcPath: string;
  log?: Logger;
}

type Impl = ServiceImpl<typeof AgentServiceService>;

/** Only the controller drives an agent; peer agents may only read blobs (the destination pulls). */
export const AGENT_ACCESS: AccessPolicy = {
  allow: ["controller"],
  methods: { readBlob: ["controller", "agent"] },
};

function notYet(rpc: string): never {
  throw new FerryError("FailedPrecondition", `${rpc} is not available in this agent build`, { fix: "upgrade the agent" });
}

export interface Agent {
  impl: Impl;
  capabilities: GetCapabilitiesResponse;
}

/** Build the agent's service implementation from its parts. */
export async function createAgent(cfg: AgentConfig): Promise<Agent> {
  const log = cfg.log ?? silentLogger;
  await mkdir(cfg.stateDir, { recursive: true });
  const capabilities = await probeCapabilities({ criuPath: cfg.criuPath, runcPath: cfg.runcPath, agentVersion: AGENT_VERSION });
  capabilities.hostname = cfg.name;
  const resources = new HostResources(cfg.stateDir);
  const ops = new OperationLog(path.join(cfg.stateDir, "ops"));
  log.info({ criu: capabilities.criu?.version, kernel: capabilities.kernel }, "agent capabilities probed");

  const impl: Impl = {
    getCapabilities: () => Promise.resolve(capabilities),
    getResources: async () => {
      const s = await resources.sample();
      return { capacity: s.capacity, free: s.free, used: s.used, containers: [], sampledAt: new Date() };
    },
    streamMetrics: async function* (req, ctx) {
      const interval = req.intervalMs === 0 ? 1000 : req.intervalMs;
      if (interval < 100 || interval > 60_000) throw FerryError.invalid("interval_ms", `${interval} is out of range`, "use 100..60000 ms");
      while (!ctx.signal.aborted) {
        const s = await resources.sample();
        yield { hostname: cfg.name, sampledAt: new Date(), capacity: s.capacity, used: s.used, containers: [] };
        await sleep(interval, undefined, { signal: ctx.signal }).catch(() => undefined);
      }
    },
    createContainer: () => notYet("CreateContainer"),
    startContainer: () => notYet("StartContainer"),
    stopContainer: () => notYet("StopContainer"),
    deleteContainer: () => notYet("DeleteContainer"),
    listContainers: () => Promise.resolve({ containers: [] }),
    inspectContainer: () => notYet("InspectContainer"),
    readContainerLog: () => notYet("ReadContainerLog"),
    hasBlobs: () => notYet("HasBlobs"),
    pushBlob: () => notYet("PushBlob"),
    getBlobStatus: () => notYet("GetBlobStatus"),
    readBlob: () => notYet("ReadBlob"),
    pullBlob: () => notYet("PullBlob"),
    tagImage: () => notYet("TagImage"),
    listImages: () => Promise.resolve({ images: [] }),
    deleteBlob: () => notYet("DeleteBlob"),
    checkpoint: () => notYet("Checkpoint"),
    exportCheckpoint: () => notYet("ExportCheckpoint"),
    restore: () => notYet("Restore"),
    deleteCheckpoint: () => notYet("DeleteCheckpoint"),
    startPageServer: () => notYet("StartPageServer"),
    stopPageServer: () => notYet("StopPageServer"),
    createNetns: () => notYet("CreateNetns"),
    clearNetns: () => notYet("ClearNetns"),
    ensureBridge: () => notYet("EnsureBridge"),
    addVxlanPort: () => notYet("AddVxlanPort"),
    deletePort: () => notYet("DeletePort"),
    setFlows: () => notYet("SetFlows"),
    deleteFlows: () => notYet("DeleteFlows"),
    listFlows: () => notYet("ListFlows"),
  };
  return { impl: idempotent(AgentServiceService, impl, ops), capabilities };
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
    services: [{ name: "ferry.agent.v1.AgentService", definition: AgentServiceService, impl: agent.impl, access: AGENT_ACCESS }],
    protoFiles: ["ferry/agent/v1/agent.proto"],
    protoRoot: PROTO_ROOT,
    ...(cfg.log ? { log: cfg.log } : {}),
  });
  return { ...server, agent };
}

/** The generated message types, for `connect()` to fill request defaults. */
export { agentApi };
