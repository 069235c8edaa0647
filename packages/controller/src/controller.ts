import { ContainerState } from "@ferry/api/agent";
import { AdmissionStrategy, ControllerServiceService, MigrationMode } from "@ferry/api/controller";
import { PROTO_ROOT } from "@ferry/api/proto-root";
import {
  FerryError,
  asFerryError,
  serve,
  silentLogger,
  validateName,
  type AccessPolicy,
  type Logger,
  type RunningServer,
  type Security,
  type ServiceImpl,
} from "@ferry/common";
import { mkdir } from "node:fs/promises";
import type { StrategyName } from "./admission.js";
import { ContainerService } from "./containers.js";
import { HostRegistry, mtlsAgentConnector, type AgentConnector } from "./hosts.js";
import { MigrationJournal } from "./journal.js";
import { LockTable, hostLock } from "./locks.js";
import type { MigrationCtx } from "./migration/steps.js";
import { MigrationService } from "./migrations.js";
import { Monitor } from "./monitor.js";
import type { PipelineOptions, Stage } from "./pipeline/index.js";
import { PolicyStore, normalizePolicy } from "./policies.js";
import { MigrationScheduler } from "./scheduler.js";
import { OnosSdn, OvsSdn, agentFlowPort, type OnosSdnConfig, type Sdn } from "./sdn/index.js";

export interface ControllerConfig {
  listen: string;
  /** How the controller's server authenticates admins. */
  security: Security;
  /** How the controller authenticates to agents (its controller certificate). */
  agentSecurity: Security;
  /** hosts.json, policies.json and the migration journal live here. */
  stateDir: string;
  log?: Logger;
  connectAgent?: AgentConnector;
  /** "ovs" (default: agents program their bridges), "onos" (needs `onos`), or an Sdn (tests). */
  sdn?: "ovs" | "onos" | Sdn;
  onos?: OnosSdnConfig;
  /** Admission strategy when a request leaves it unspecified; default conservative. */
  strategy?: StrategyName;
  /** Migrations at once; default 4. */
  maxParallel?: number;
  /** Agents' StreamMetrics interval; 0 = no streams; default 1000. */
  metricsIntervalMs?: number;
  reconnectInitialMs?: number;
  /** Tests: other stages, engine knobs, the monitor's clock. */
  stages?: () => Stage<MigrationCtx>[];
  pipeline?: Partial<Pick<PipelineOptions, "sleep" | "abortGraceMs" | "now">>;
  monitorNow?: () => number;
  /** Schedule the policies on node-cron; default true. */
  schedulePolicies?: boolean;
}

type Impl = ServiceImpl<typeof ControllerServiceService>;

/** Admins drive the controller; agents and other controllers may not. */
export const CONTROLLER_ACCESS: AccessPolicy = { allow: ["admin"] };

export interface Controller {
  impl: Impl;
  hosts: HostRegistry;
  containers: ContainerService;
  migrations: MigrationService;
  monitor: Monitor;
  policies: PolicyStore;
  locks: LockTable;
  scheduler: MigrationScheduler;
  journal: MigrationJournal;
  sdn: Sdn;
  /** Ids of the migrations resumed at start-up. */
  resumed: string[];
  close(): void;
}

function makeSdn(cfg: ControllerConfig, hosts: HostRegistry): Sdn {
  const s = cfg.sdn ?? "ovs";
  if (typeof s !== "string") return s;
  if (s === "ovs")
    return new OvsSdn(
      agentFlowPort(
        (name) => hosts.client(name),
        () => hosts.topology(),
      ),
    );
  if (s === "onos") {
    if (!cfg.onos?.url)
      throw FerryError.invalid("--onos-url", "is required with --sdn onos", "give ONOS's REST base, e.g. http://10.0.0.5:8181/onos/v1");
    return new OnosSdn(cfg.onos);
  }
  throw FerryError.invalid("--sdn", `"${String(s)}" is not a backend`, "use ovs or onos");
}

/**
 * Builds the controller over its state directory: loads hosts (reconnecting to them), policies and
 * the journal, resumes every unfinished migration, schedules the policies.
 */
export async function createController(cfg: ControllerConfig): Promise<Controller> {
  const log = cfg.log ?? silentLogger;
  const strategy = cfg.strategy ?? "conservative";
  if (!["conservative", "semi-conservative", "live"].includes(strategy)) {
    throw FerryError.invalid("--strategy", `"${strategy}" is not a strategy`, "use conservative, semi-conservative or live");
  }
  await mkdir(cfg.stateDir, { recursive: true, mode: 0o700 });
  const hosts = new HostRegistry({
    connectAgent: cfg.connectAgent ?? mtlsAgentConnector(cfg.agentSecurity),
    log,
    stateDir: cfg.stateDir,
    metricsIntervalMs: cfg.metricsIntervalMs,
    reconnectInitialMs: cfg.reconnectInitialMs,
  });
  const sdn = makeSdn(cfg, hosts);
  const journal = await MigrationJournal.open(cfg.stateDir, log);
  const policies = new PolicyStore(cfg.stateDir);
  await policies.load();
  await hosts.load();
  await sdn.init(AbortSignal.timeout(15_000));
  const locks = new LockTable();
  const scheduler = new MigrationScheduler({ maxParallel: cfg.maxParallel ?? 4 });
  const getStrategy = (): StrategyName => strategy;
  const containers = new ContainerService({ hosts, locks, scheduler, sdn, log, strategy: getStrategy });
  const migrations = new MigrationService({
    hosts,
    containers,
    locks,
    scheduler,
    journal,
    sdn,
    log,
    strategy: getStrategy,
    ...(cfg.stages ? { stages: cfg.stages } : {}),
    ...(cfg.pipeline ? { pipeline: cfg.pipeline } : {}),
  });
  const monitor = new Monitor({
    hosts,
    migrations,
    journal,
    locks,
    scheduler,
    policies,
    log,
    strategy: getStrategy,
    ...(cfg.monitorNow ? { now: cfg.monitorNow } : {}),
  });
  const resumed = await migrations.resumeAll();
  // A host that joins or comes back learns where every container is now.
  hosts.onReady((name) => {
    void containers.resyncFlows().then((n) => log.info({ host: name, containers: n }, "flows re-installed"));
  });
  if (cfg.schedulePolicies !== false) monitor.start();

  /** DrainHost: cordon, then move every running container to a host that admits it. */
  const drain = async (name: string, cordonOnly: boolean): Promise<string[]> => {
    validateName("name", name);
    hosts.get(name);
    await hosts.setCordoned(name, true);
    if (cordonOnly) return [];
    const on = (await containers.list(name)).filter(
      (c) => c.host === name && !c.migrating && c.info?.state === ContainerState.CONTAINER_STATE_RUNNING,
    );
    const ids: string[] = [];
    const failures: string[] = [];
    for (const c of on) {
      const cname = c.info!.spec!.name;
      const others = hosts.names().filter((h) => h !== name && hosts.isReachable(h) && !hosts.isCordoned(h));
      const errors: string[] = [];
      let started = false;
      // Least loaded first (by memory share), then the first that admits it.
      const load = (h: string): number => {
        const x = hosts.host(h);
        return x.used && x.capacity?.memoryBytes ? x.used.memoryBytes / x.capacity.memoryBytes : 1;
      };
      for (const dest of others.sort((a, b) => load(a) - load(b))) {
        try {
          const m = await migrations.start(
            {
              container: cname,
              destination: dest,
              strategy: AdmissionStrategy.ADMISSION_STRATEGY_UNSPECIFIED,
              mode: MigrationMode.MIGRATION_MODE_UNSPECIFIED,
            },
            "drain",
          );
          ids.push(m.id);
          started = true;
          break;
        } catch (e) {
          errors.push(asFerryError(e).message);
        }
      }
      if (!started) failures.push(`"${cname}": ${errors.length ? errors.join("; ") : "no other reachable, uncordoned host"}`);
    }
    if (failures.length) {
      throw new FerryError(
        "ResourceExhausted",
        `host "${name}" is cordoned; started ${ids.length ? ids.join(", ") : "no migration"}; could not move ${failures.join("; ")}`,
        {
          fix: "add capacity elsewhere and drain again, or move those containers by hand",
          data: { migrationIds: ids },
        },
      );
    }
    return ids;
  };

  const removeHost = async (name: string): Promise<void> => {
    validateName("name", name);
    hosts.get(name);
    // Exclusive: no migration through it may start while we look.
    const release = locks.tryAcquire([hostLock(name, "exclusive")], `rm-${name}`, `a request to remove host "${name}"`, {
      doing: "removed",
    });
    try {
      if (hosts.isReachable(name)) {
        const on = (await containers.list(name)).filter((c) => c.host === name);
        if (on.length) {
          throw new FerryError(
            "FailedPrecondition",
            `host "${name}" still has ${on.length} container(s): ${on.map((c) => c.info?.spec?.name).join(", ")}`,
            {
              fix: `drain it first (ferry host drain ${name}) or delete them`,
            },
          );
        }
      }
      await hosts.remove(name);
    } finally {
      release();
    }
  };

  const impl: Impl = {
    registerHost: async (req) => ({ host: await hosts.register(req) }),
    listHosts: () => Promise.resolve({ hosts: hosts.list() }),
    drainHost: async (req) => ({ migrationIds: await drain(req.name, req.cordonOnly) }),
    removeHost: async (req) => {
      await removeHost(req.name);
      return {};
    },
    listImages: async (req) => ({ images: await containers.images(req.host || undefined) }),
    runContainer: async (req) => ({ container: await containers.run(req) }),
    stopContainer: async (req) => ({ container: await containers.stop(req) }),
    deleteContainer: async (req) => {
      await containers.delete(req);
      return {};
    },
    listContainers: async (req) => ({ containers: await containers.list(req.host || undefined) }),
    whereContainer: async (req) => ({ container: await containers.where(req.name) }),
    readContainerLog: (req, ctx) => containers.readLog(req, ctx.signal),
    startMigration: async (req) => ({ migration: await migrations.start(req) }),
    getMigration: async (req) => ({ migration: await migrations.get(req.id) }),
    watchMigration: (req, ctx) => migrations.watch(req.id, ctx.signal),
    cancelMigration: async (req) => ({ migration: await migrations.cancel(req.id) }),
    listMigrations: async (req) => ({ migrations: await migrations.list({ container: req.container, limit: req.limit }) }),
    setPolicy: async (req) => {
      const p = normalizePolicy(req.policy, (h) => hosts.has(h));
      await policies.set(p);
      monitor.schedule(p);
      return { policy: p };
    },
    listPolicies: () => Promise.resolve({ policies: policies.list() }),
    deletePolicy: async (req) => {
      await policies.delete(req.name);
      monitor.unschedule(req.name);
      return {};
    },
    watchMetrics: (req, ctx) => monitor.watch(req.host, ctx.signal),
  };
  return {
    impl,
    hosts,
    containers,
    migrations,
    monitor,
    policies,
    locks,
    scheduler,
    journal,
    sdn,
    resumed,
    close: () => {
      monitor.close();
      migrations.close();
      hosts.close();
      // Nothing records after migrations.close(): flush what is queued and close the open logs.
      void journal.close();
    },
  };
}

export interface RunningController extends RunningServer {
  controller: Controller;
}

export async function startController(cfg: ControllerConfig): Promise<RunningController> {
  const controller = await createController(cfg);
  let server: RunningServer;
  try {
    server = await serve({
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
  } catch (e) {
    controller.close();
    throw e;
  }
  return {
    ...server,
    controller,
    close: async (grace) => {
      controller.close();
      await server.close(grace);
    },
  };
}
