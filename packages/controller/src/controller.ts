import { ControllerServiceService } from "@ferry/api/controller";
import { PROTO_ROOT } from "@ferry/api/proto-root";
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
import { HostRegistry, mtlsAgentConnector, type AgentConnector } from "./hosts.js";

export interface ControllerConfig {
  listen: string;
  /** How the controller's server authenticates admins. */
  security: Security;
  /** How the controller authenticates to agents (its controller certificate). */
  agentSecurity: Security;
  stateDir: string;
  log?: Logger;
  connectAgent?: AgentConnector;
}

type Impl = ServiceImpl<typeof ControllerServiceService>;

/** Admins drive the controller; agents and other controllers may not. */
export const CONTROLLER_ACCESS: AccessPolicy = { allow: ["admin"] };

function notYet(rpc: string): never {
  throw new FerryError("FailedPrecondition", `${rpc} is not available in this controller build`, { fix: "upgrade the controller" });
}

export interface Controller {
  impl: Impl;
  hosts: HostRegistry;
  close(): void;
}

export function createController(cfg: ControllerConfig): Controller {
  const log = cfg.log ?? silentLogger;
  const hosts = new HostRegistry(cfg.connectAgent ?? mtlsAgentConnector(cfg.agentSecurity), log);
  const impl: Impl = {
    registerHost: async (req) => ({ host: await hosts.register(req) }),
    listHosts: () => Promise.resolve({ hosts: hosts.list() }),
    drainHost: () => notYet("DrainHost"),
    removeHost: (req) => {
      hosts.remove(req.name);
      return Promise.resolve({});
    },
    listImages: () => notYet("ListImages"),
    runContainer: () => notYet("RunContainer"),
    stopContainer: () => notYet("StopContainer"),
    deleteContainer: () => notYet("DeleteContainer"),
    listContainers: () => notYet("ListContainers"),
    whereContainer: () => notYet("WhereContainer"),
    readContainerLog: () => notYet("ReadContainerLog"),
    startMigration: () => notYet("StartMigration"),
    getMigration: () => notYet("GetMigration"),
    watchMigration: () => notYet("WatchMigration"),
    cancelMigration: () => notYet("CancelMigration"),
    listMigrations: () => notYet("ListMigrations"),
    setPolicy: () => notYet("SetPolicy"),
    listPolicies: () => notYet("ListPolicies"),
    deletePolicy: () => notYet("DeletePolicy"),
    watchMetrics: () => notYet("WatchMetrics"),
  };
  return { impl, hosts, close: () => hosts.close() };
}

export interface RunningController extends RunningServer {
  controller: Controller;
}

export async function startController(cfg: ControllerConfig): Promise<RunningController> {
  const controller = createController(cfg);
  const server = await serve({
    address: cfg.listen,
    security: cfg.security,
    services: [
      {
        name: "ferry.controller.v1.ControllerService",
        definition: ControllerServiceService,
        impl: controller.impl,
        access: CONTROLLER_ACCESS,
      },
    ],
    protoFiles: ["ferry/controller/v1/controller.proto"],
    protoRoot: PROTO_ROOT,
    ...(cfg.log ? { log: cfg.log } : {}),
  });
  return {
    ...server,
    controller,
    close: async (grace) => {
      controller.close();
      await server.close(grace);
    },
  };
}
